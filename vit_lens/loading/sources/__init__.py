"""One module per source of weights; each turns its models into the same :class:`Converted`.

The interface a source implements (:mod:`vit_lens.loading.sources.timm` is the reference)::

    convert(source_model, *, name=None) -> Converted
        an in-memory model of that library (timm ``VisionTransformer``; later a Hugging Face
        ``ViTForImageClassification`` or an OpenCLIP ``VisionTransformer``) -> config + state dict.
    load(name, *, checkpoint_path=None, **source_options) -> Converted
        a model name of that library, with weights from a local file or its hub (timm's
        option: ``timm_kwargs``). A local file is loaded strictly: every tensor accounted for
        (:func:`vit_lens.loading.checkpoints.diff_state_dicts`), none left randomly initialised.

Both refuse (``UnsupportedModelError``) any feature HookedViT does not reproduce exactly, and a
file that does not match the model asked for (``CheckpointError``). :func:`build_model` then makes
the :class:`~vit_lens.HookedViT` from a :class:`Converted`, whatever its source -- allocation in the
target dtype/device, a strict ``load_state_dict`` (every parameter and persistent buffer comes
from the source: none is left randomly initialised), class names, the preprocessing config and
weight processing.

To add a source: write ``sources/<name>.py`` with ``convert`` and ``load`` returning
:class:`Converted`, and add it to :data:`SOURCES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from vit_lens.config import HookedViTConfig

#: source name -> module implementing ``convert`` / ``load``
SOURCES: Dict[str, str] = {"timm": "vit_lens.loading.sources.timm", "hf": "vit_lens.loading.sources.hf",
    "open_clip": "vit_lens.loading.sources.open_clip",
}


@dataclass
class Converted:
    """What every source produces.

    Attributes:
        config: the architecture (``config.model_name``: the source's name for the weights,
            e.g. timm's ``"arch.tag"``; ``config.extra["source"]`` says which source).
        state_dict: HookedViT parameter names -> tensors (e.g. ``blocks.0.attn.W_Q``
            ``[n_heads, d_model, d_head]``, ``unembed.W_U`` ``[d_model, n_classes]``), exactly the
            keys of ``HookedViT(config).state_dict()``.
        class_names: ``n_classes`` human-readable class names, index-aligned with the columns of
            ``W_U``, or None when the source does not know them.
        class_synsets: ``n_classes`` class ids (ImageNet synsets), or None.
        data_config: the preprocessing :meth:`~vit_lens.HookedViT.preprocess` uses (timm's keys:
            ``input_size`` ``(C, H, W)``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
            ``crop_mode``).
        notes: what the source inferred or assumed (for messages and ``config.extra``).
    """

    config: HookedViTConfig
    state_dict: Dict[str, torch.Tensor]
    class_names: Optional[List[str]] = None
    class_synsets: Optional[List[str]] = None
    data_config: Dict[str, Any] = field(default_factory=dict)
    notes: Dict[str, Any] = field(default_factory=dict)


def build_model(cls: Any, converted: Converted, *, device: Any = None, dtype: Optional[torch.dtype] = None,
                **processing: bool) -> Any:
    """A ``cls`` (HookedViT) holding exactly ``converted``'s weights.

    Args:
        cls: :class:`~vit_lens.HookedViT` (or a subclass).
        converted: a source's output.
        device, dtype: where and in which precision (default: those of the state dict's tensors).
        **processing: weight-processing options (``fold_ln`` ...), applied after loading.
    """
    from vit_lens.loading.processing import process_weights, validate_processing_options

    validate_processing_options(processing)
    check_finite(converted.state_dict, converted.config.model_name)
    ref = next(iter(converted.state_dict.values()))
    device = torch.device(device) if device is not None else ref.device
    dtype = dtype or ref.dtype
    with torch.device("meta"):
        hooked = cls(converted.config).to(dtype=dtype)  # allocate in the target dtype: no float32 round trip
    hooked = hooked.to_empty(device=device)
    # strict: every parameter and persistent buffer of the HookedViT is written from the source
    hooked.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in converted.state_dict.items()}, strict=True)
    hooked.eval()
    hooked.data_config = dict(converted.data_config)
    hooked.class_names = converted.class_names
    hooked.class_synsets = converted.class_synsets
    if any(processing.values()):
        process_weights(hooked, **processing)
    return hooked


def check_finite(state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or inf (a corrupt file, a diverged training run): every score
    computed from them would be NaN or meaningless. Tensors on the meta device are skipped."""
    from vit_lens.loading.checkpoints import CheckpointError

    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta"
           and v.numel() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(
            f"the weights of {what} contain NaN or inf ({', '.join(bad[:5])}{more}); every score computed from them "
            "would be NaN or meaningless, so they are refused. Re-download or re-export the checkpoint (or find the "
            "step where training diverged)."
        )


def layer_norm_eps(m: Any, where: str) -> float:
    """The ``eps`` of a source's LayerNorm ``m`` (named ``where`` in errors); anything that is not an
    affine ``nn.LayerNorm`` (RMSNorm, no weight or bias) is refused: HookedViT's LayerNorm would differ."""
    from torch import nn

    from vit_lens.loading.sources.timm import UnsupportedModelError

    if not isinstance(m, nn.LayerNorm):
        raise UnsupportedModelError(f"{where} is {type(m).__name__}; only LayerNorm is supported")
    if not m.elementwise_affine or m.bias is None:
        raise UnsupportedModelError(f"{where} is a LayerNorm without affine weight and bias; not supported")
    return float(m.eps)


__all__ = ["Converted", "SOURCES", "build_model", "check_finite", "layer_norm_eps"]
