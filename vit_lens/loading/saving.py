"""Save a HookedViT to one ``.safetensors`` file and load it back without timm or the hub.

What is saved: every parameter and buffer, the :class:`~vit_lens.HookedViTConfig` (weight
processing and replaced class directions included), the class names and synsets, and the data
config :meth:`~vit_lens.HookedViT.preprocess` uses -- so a processed model (``fold_ln`` ...), or
one given new class directions (``set_class_directions``), reloads exactly as it was saved.

The file is a plain safetensors file: the tensors are under their ``state_dict`` names and the
rest is JSON in its metadata (key ``"vit_lens"``). ``safetensors.torch.save_file(model.state_dict())``
does not work on a HookedViT: its Q, K and V weights are views into one shared buffer (one fused
projection), which safetensors refuses; :func:`save_hooked` writes a contiguous copy of each.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from vit_lens.core.errors import InputError, MissingFileError

FORMAT = "vit_lens.hooked_vit/2"
#: formats this version reads (format 1 named the readout's tensors without the ``readout.`` prefix
#: and had no head state: such files load, with the head state of a model that was never re-headed)
READABLE = ("vit_lens.hooked_vit/1", FORMAT)


def save_hooked(model: Any, path: Union[str, os.PathLike]) -> Path:
    """Write ``model`` (a :class:`~vit_lens.HookedViT`) to ``path`` (a ``.safetensors`` file).

    The file is written to a temporary name first and renamed, so an interrupted save never
    leaves a truncated file behind. Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"save to a .safetensors file, got {str(path)!r}")
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "model_name": model.cfg.model_name,
        "config": dataclasses.asdict(model.cfg),
        "class_names": model.class_names,
        "class_synsets": getattr(model, "class_synsets", None),
        "data_config": model.data_config,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"vit_lens": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_hooked(
    cls: Any, path: Union[str, os.PathLike], *, device: Any = None, dtype: Optional[torch.dtype] = None
) -> Any:
    """Load a model written by :func:`save_hooked` (``HookedViT.load(path)``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vit_lens.config import HookedViTConfig

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such file: {str(path)!r} (write one with model.save(path))")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("vit_lens")
    except Exception as e:  # safetensors raises its own SafetensorError for a file that is not one
        raise InputError(
            f"{str(path)!r} is not a .safetensors file ({e}); HookedViT.load reads files written by model.save(path)"
        ) from e
    if raw is None:
        raise InputError(
            f"{str(path)!r} was not written by HookedViT.save (no 'vit_lens' metadata). A timm checkpoint "
            "loads with HookedViT.from_pretrained(name, checkpoint_path=...)."
        )
    meta = json.loads(raw)
    if meta.get("format") not in READABLE:
        raise InputError(f"{str(path)!r} has format {meta.get('format')!r}; this vit_lens reads {list(READABLE)}")
    fields = {f.name for f in dataclasses.fields(HookedViTConfig)}
    cfg = HookedViTConfig(**{k: v for k, v in meta["config"].items() if k in fields})
    from vit_lens.loading.sources import check_finite

    model = cls(cfg)
    sd = load_file(str(path))
    check_finite(sd, repr(str(path)))
    model.load_state_dict(sd, strict=True)
    model.class_names = meta.get("class_names")
    model.class_synsets = meta.get("class_synsets")
    data_config = dict(meta.get("data_config") or {})
    for key in ("input_size", "mean", "std"):
        if isinstance(data_config.get(key), list):
            data_config[key] = tuple(data_config[key])
    model.data_config = data_config
    model.eval()
    return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
