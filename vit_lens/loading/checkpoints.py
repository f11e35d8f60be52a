"""Reading weights files and accounting for every tensor in them (source-independent).

A source (:mod:`vit_lens.loading.sources`) reads a user's file with :func:`read_checkpoint`, compares
it with the state dict its model expects with :func:`diff_state_dicts`, and refuses with
:class:`CheckpointMismatchError` (naming the keys) unless every tensor is accounted for: no key
missing (a weight that would stay randomly initialised), none unexpected (a weight that would be
dropped), no shape different (a weight that would be resized or refused deep inside torch).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from vit_lens.core.errors import InputError, VitLensError

#: file suffixes read as safetensors / as a ``torch.save`` pickle
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: keys under which training scripts commonly nest the model's state dict in a ``torch.save`` file
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_EXPECTED = "expected a .safetensors, .pth or .bin file holding a state dict in timm's layout"


class CheckpointError(InputError):
    """A weights file that cannot be read, or that holds another model than the one asked for."""


class CheckpointMismatchError(CheckpointError):
    """The file's tensors do not match the model's state dict (missing / unexpected keys, shapes)."""


class CheckpointNotFoundError(VitLensError, FileNotFoundError):
    """No weights file where one was asked for (``checkpoint_path`` or ``$VIT_LENS_CHECKPOINTS``)."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class CheckpointWarning(UserWarning):
    """A checkpoint was loaded, with something the user should know (e.g. its pretrained tag is unknown)."""


@dataclass
class Checkpoint:
    """A weights file read into memory.

    Attributes:
        path: the file.
        state_dict: name -> tensor (CPU), unwrapped from ``{"state_dict": ...}`` / ``{"model": ...}``
            and with a ``module.`` (DataParallel) prefix removed.
        metadata: the safetensors header metadata (``{}`` for ``torch.save`` files), plus the
            parsed ``config.json`` beside a Hugging Face hub file under ``"hf_config"``.
        fmt: ``"safetensors"`` or ``"torch"``.
    """

    path: Path
    state_dict: Dict[str, torch.Tensor]
    metadata: Dict[str, Any] = field(default_factory=dict)
    fmt: str = "safetensors"


def _not_weights(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{str(path)!r} is not a weights file ({why}); {_EXPECTED}.")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= path.stat().st_size - 8


def _is_torch_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive (or, with the legacy format, a pickle stream)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # pickle protocol marker


def _unwrap(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        raise CheckpointError(
            f"{str(path)!r} holds a pickled model object ({type(obj).__name__}), not a state dict: convert the "
            "model itself with HookedViT.from_timm(model), or save model.state_dict() instead."
        )
    for _ in range(3):  # {"model": {"state_dict": ...}} at most this deep
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(inner) != 1:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, Mapping) or not obj:
        raise _not_weights(path, f"it holds a {type(obj).__name__}, not a name -> tensor dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise _not_weights(
            path, f"entries {sorted(map(str, bad))[:5]} are not tensors; a training checkpoint's state dict must "
            f"be under one of the keys {list(WRAPPER_KEYS)}"
        )
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _hf_config(path: Path) -> Optional[Dict[str, Any]]:
    """The ``config.json`` a timm model on the Hugging Face hub keeps beside its weights file."""
    cfg = path.with_name("config.json")
    if path.name not in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin") or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_checkpoint(path: Union[str, os.PathLike]) -> Checkpoint:
    """Read a weights file (safetensors or ``torch.save``) into a :class:`Checkpoint`.

    The format is taken from the file's content (the suffix only chooses the error message), so a
    ``.bin`` that is really safetensors still loads. ``torch.save`` files are read with
    ``weights_only=True`` (no code in the file runs).

    Raises:
        CheckpointNotFoundError: no such file.
        CheckpointError: not a weights file, or not a state dict.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint_path {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint_path {str(path)!r} is a folder; pass the weights file inside it ({_EXPECTED})")
    hf = _hf_config(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata: Dict[str, Any] = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a damaged file: say what it is, not safetensors' internals
            raise _not_weights(path, f"its safetensors header or data is damaged: {e}") from e
        if not sd:
            raise _not_weights(path, "the safetensors file holds no tensors")
        if hf is not None:
            metadata["hf_config"] = hf
        return Checkpoint(path, sd, metadata, "safetensors")
    if _is_torch_file(path):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise _not_weights(path, f"torch.load cannot read it safely: {str(e).splitlines()[0][:200]}") from e
        return Checkpoint(path, _unwrap(obj, path), {"hf_config": hf} if hf else {}, "torch")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        why = "it has a .safetensors name but no safetensors header"
    elif suffix in TORCH_SUFFIXES:
        why = f"it has a {suffix} name but is neither a torch.save archive nor a pickle"
    else:
        why = f"its content is neither safetensors nor torch.save, and {suffix or 'no suffix'} is not a weights suffix"
    raise _not_weights(path, why)


# ---------------------------------------------------------------------------------------------
# accounting for every tensor
# ---------------------------------------------------------------------------------------------
@dataclass
class StateDictDiff:
    """How a file's tensors differ from the model's (key lists sorted)."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)  # key, file, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self, limit: int = 8) -> str:
        def some(keys: List[str]) -> str:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"missing from the file (would stay randomly initialised): {some(self.missing)}")
        if self.unexpected:
            parts.append(f"in the file but not in the model (would be dropped): {some(self.unexpected)}")
        if self.shapes:
            rows = [f"{k} {tuple(a)} in the file vs {tuple(b)} in the model" for k, a, b in self.shapes]
            parts.append(f"different shapes: {some(rows)}")
        return "; ".join(parts)


def _natural(key: str) -> Tuple[Any, ...]:
    """``blocks.2`` before ``blocks.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in key.split("."))


def diff_state_dicts(file_sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> StateDictDiff:
    """Compare a file's tensors with a model's ``state_dict()`` (meta tensors are fine: only shapes are read)."""
    missing = sorted(set(model_sd) - set(file_sd), key=_natural)
    unexpected = sorted(set(file_sd) - set(model_sd), key=_natural)
    shapes = [
        (k, tuple(file_sd[k].shape), tuple(model_sd[k].shape))
        for k in sorted(set(file_sd) & set(model_sd), key=_natural)
        if tuple(file_sd[k].shape) != tuple(model_sd[k].shape)
    ]
    return StateDictDiff(missing, unexpected, shapes)
