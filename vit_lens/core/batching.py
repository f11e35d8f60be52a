"""Batches: images in, chunks out, progress bars."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, List, Optional

from jaxtyping import Float
from torch import Tensor

from vit_lens.core.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from vit_lens.model import HookedViT

__all__ = ["as_batch", "chunks", "progress_bar"]


def as_batch(model: "HookedViT", images: Any) -> Float[Tensor, "batch chans height width"]:
    """A normalised batch on the model's device and in its dtype.

    Float tensors ``[batch, chans, H, W]`` pass through (checked like the forward checks them);
    anything else (paths, PIL images, uint8 arrays, lists of these) goes through
    ``model.preprocess`` with the model's own transform.
    """
    if isinstance(images, Tensor) and images.is_floating_point():
        if images.ndim == 3:
            raise InputError(
                f"expected a batch [batch, channels, H, W], got a single image of shape {tuple(images.shape)}; "
                "add a batch axis with images[None]."
            )
        model._check_images(images)
        return images.to(device=model.device, dtype=model.dtype)
    return model.preprocess(images)


def chunks(n: int, batch_size: int) -> List[slice]:
    """``slice``s covering ``0 .. n - 1`` in steps of ``batch_size``."""
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def progress_bar(it: Optional[Iterable] = None, *, progress: bool = True, desc: str = "", total: Optional[int] = None,
                 unit: str = "it", leave: bool = False):
    """A tqdm bar, disabled with ``progress=False``: a notebook widget where Jupyter and ipywidgets are
    present, a text bar otherwise (tqdm.auto alone warns "IProgress not found" in a notebook without
    ipywidgets; the text bar works there too)."""
    return _tqdm_class()(it, desc=desc, total=total, disable=not progress, leave=leave, unit=unit)


_TQDM: Optional[type] = None


def _tqdm_class() -> type:
    global _TQDM
    if _TQDM is None:
        from tqdm import tqdm as text_bar

        _TQDM = text_bar
        try:
            from IPython import get_ipython

            shell = get_ipython()
            if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
                import ipywidgets  # noqa: F401  # the widget bar needs it
                from tqdm.notebook import tqdm as widget_bar

                _TQDM = widget_bar
        except ImportError:
            pass
    return _TQDM
