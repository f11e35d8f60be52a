"""Targets: one vocabulary for naming classes.

Every public function that takes a target class (``target=``, ``classes=``, a metric's class)
accepts the same values (:data:`Target`):

* a class index (an int, a numpy or 0-d tensor integer, a string of digits);
* a class name: the full ImageNet description (``"tabby, tabby cat"``) or any of its
  comma-separated names (``"tabby cat"``), case-insensitive; a name two classes share
  (``"crane"``: the bird 134 and the machine 517) is an :class:`AmbiguousNameError` listing both;
* a WordNet synset id (``"n02123045"``) when the model knows its synsets;
* ``"pred"``: each image's own top-1 class;
* one of these per image: a list, or an integer tensor / array ``[batch]``.

An unknown name is an :class:`UnknownNameError` that suggests classes by word, by substring and by
edit distance (``"cat"`` -> the cat classes).
"""

from __future__ import annotations

import difflib
import numbers
import re
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vit_lens.core.errors import AmbiguousNameError, InputError, InputTypeError, OutOfRangeError, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    from vit_lens.model import HookedViT

__all__ = ["PRED", "ClassList", "Target", "class_index", "resolve_targets", "suggest_classes"]

#: the target meaning "each image's own top-1 class"
PRED = "pred"

Target = Union[int, str, Sequence[Union[int, str]], Tensor, Any]


class ClassList:
    """The classes of a class space without a model (what :func:`class_index` and
    :func:`resolve_targets` read of a model): their number, and names / synsets when known."""

    def __init__(self, n_classes: int, names: Optional[Sequence[str]] = None, synsets: Optional[Sequence[str]] = None,
                 name: str = "this class space"):
        self.cfg = _Cfg(int(n_classes), name)
        self.class_names = list(names) if names is not None else None
        self.class_synsets = list(synsets) if synsets is not None else None


class _Cfg:
    def __init__(self, n_classes: int, model_name: str):
        self.n_classes = n_classes
        self.model_name = model_name


def _parts(full: str) -> List[str]:
    return [p.strip().lower() for p in full.split(",") if p.strip()]


def _describe(model: Any, idx: int) -> str:
    names = getattr(model, "class_names", None) or []
    synsets = getattr(model, "class_synsets", None) or []
    name = names[idx] if idx < len(names) else f"class {idx}"
    syn = f" {synsets[idx]}" if idx < len(synsets) and synsets[idx] else ""
    return f"{idx} {name!r}{syn}"


def suggest_classes(model: Any, key: str, n: int = 8) -> List[int]:
    """Class indices whose names are close to ``key``: whole-word matches first, then substrings,
    then edit-distance neighbours (at most ``n``)."""
    names = getattr(model, "class_names", None) or []
    key = key.strip().lower()
    if not key:
        return []
    word = re.compile(rf"(?<![a-z]){re.escape(key)}(?![a-z])")
    out: List[int] = []
    for i, full in enumerate(names):
        if word.search(full.lower()):
            out.append(i)
    for i, full in enumerate(names):
        if i not in out and key in full.lower():
            out.append(i)
    if len(out) < n:
        flat = [(p, i) for i, full in enumerate(names) for p in _parts(full)]
        close = difflib.get_close_matches(key, [p for p, _ in flat], n=n, cutoff=0.6)
        for c in close:
            for p, i in flat:
                if p == c and i not in out:
                    out.append(i)
    return out[:n]


def class_index(model: Any, name: Any) -> int:
    """The class index of one class: an index, a name or a synset id (see the module docs).

    Raises:
        OutOfRangeError: an index outside ``0 .. n_classes - 1``.
        AmbiguousNameError: a name several classes share (the message lists them with indices).
        UnknownNameError: no such class (the message suggests close ones).
    """
    n = int(model.cfg.n_classes)
    if isinstance(name, bool):
        raise InputTypeError(f"a class must be an index, a name or a synset id, got {name!r}")
    if isinstance(name, Tensor) and name.ndim == 0 and not name.is_floating_point() and name.dtype != torch.bool:
        name = int(name)
    if isinstance(name, numbers.Integral):
        idx = int(name)
        if not 0 <= idx < n:
            raise OutOfRangeError(f"class index {idx} out of range for {n} classes (0..{n - 1})")
        return idx
    if not isinstance(name, str):
        raise InputTypeError(
            f"a class must be an index, a name (e.g. 'tabby cat') or a synset id, got {type(name).__name__} {name!r}"
        )
    key = name.strip().lower()
    if key.isdigit():
        return class_index(model, int(key))
    if key == PRED:
        raise InputError("'pred' (each image's top-1 class) is a target for a batch, not one class index")
    names = getattr(model, "class_names", None) or []
    full = [i for i, f in enumerate(names) if f.strip().lower() == key]
    hits = full or [i for i, f in enumerate(names) if key in _parts(f)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        listed = "; ".join(_describe(model, i) for i in hits)
        raise AmbiguousNameError(
            f"class name {name!r} is ambiguous: {listed}. Pass the index (or the synset id) of the one you mean."
        )
    synsets = [s.lower() if s else s for s in (getattr(model, "class_synsets", None) or [])]
    if key in synsets:
        return synsets.index(key)
    if not names:
        raise UnknownNameError(
            f"{getattr(model.cfg, 'model_name', 'this model')} has no class names, so {name!r} cannot be looked up; "
            "pass a class index (or give names with model.set_class_directions(W, labels=...))"
        )
    close = suggest_classes(model, key)
    hint = f" Did you mean: {'; '.join(_describe(model, i) for i in close)}?" if close else ""
    raise UnknownNameError(f"unknown class name {name!r}.{hint} (an index or a synset id works too)")


def resolve_targets(
    model: "HookedViT",
    target: Target,
    batch: int,
    *,
    images: Optional[Float[Tensor, "batch chans height width"]] = None,
    logits: Optional[Float[Tensor, "batch n_classes"]] = None,
    batch_size: int = 32,
    device: Any = None,
) -> Int[Tensor, "batch"]:
    """Target classes as a LongTensor ``[batch]`` on the model's device.

    Args:
        model: the model whose classes the names refer to.
        target: anything in the module docs. ``"pred"`` needs ``logits`` (the model's logits of
            the batch) or ``images`` (then the model is run, ``batch_size`` images at a time).
        batch: the number of images.
        device: where to put the result (default the model's classifier's device; a
            :class:`ClassList` gives the CPU).

    Raises:
        InputError: no target (``None``), the wrong number of per-image targets, ``"pred"``
            without images or logits.
    """
    if hasattr(model, "readout"):
        head = model.readout.require_head()  # a headless model without class directions: a clear error
        dev = device if device is not None else head.W_U.device
    else:
        dev = device if device is not None else torch.device("cpu")
    if target is None:
        raise InputError(
            "a target class is needed: an index, a class name, a synset id, one per image, or 'pred' "
            "(each image's own top-1 class)"
        )
    if isinstance(target, str) and target.strip().lower() == PRED:
        if logits is None:
            if images is None or not hasattr(model, "readout"):
                raise InputError("target='pred' means each image's top-1 class, which needs the images (or logits)")
            with torch.no_grad():
                logits = torch.cat([model(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])
        if logits.shape[0] != batch:
            raise InputError(f"target='pred': {logits.shape[0]} logit rows for a batch of {batch}")
        if not bool(torch.isfinite(logits).all()):
            raise InputError("target='pred': the logits contain NaN/inf, so there is no top-1 class")
        return logits.argmax(-1).to(device=dev, dtype=torch.long)
    if hasattr(target, "__array__") and not isinstance(target, Tensor):
        target = torch.as_tensor(target)
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise InputTypeError(f"target must hold class indices (an integer tensor), got dtype {target.dtype}")
        t = target.detach().to(device=dev, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        n = model.cfg.n_classes
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            bad = sorted({int(v) for v in t.tolist() if not 0 <= v < n})
            raise OutOfRangeError(f"target class index {bad} out of range for {n} classes (0..{n - 1})")
    elif isinstance(target, (numbers.Integral, str)):
        t = torch.full((batch,), class_index(model, target), dtype=torch.long, device=dev)
    else:
        try:
            items = list(target)  # type: ignore[arg-type]  # ints are Integral (handled above)
        except TypeError:
            raise InputTypeError(f"cannot read a target class from {type(target).__name__} {target!r}") from None
        t = torch.tensor([class_index(model, c) for c in items], dtype=torch.long, device=dev)
    if t.shape[0] != batch:
        raise InputError(
            f"{t.shape[0]} targets for a batch of {batch} images; give one target for every image, or one per image "
            "(a list or tensor of one class per image)"
        )
    return t.contiguous()
