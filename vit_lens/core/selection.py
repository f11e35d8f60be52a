"""Layers and heads: one way to select them, and the hook names and cache entries they map to."""

from __future__ import annotations

import difflib
import numbers
import operator
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from vit_lens.core.errors import InputError, InputTypeError, OutOfRangeError, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import ActivationCache

    from vit_lens.model import HookedViT

__all__ = [
    "BLOCK_HOOKS",
    "CacheLike",
    "FwdHooks",
    "Layers",
    "cache_get",
    "cache_has",
    "head_mask",
    "int_list",
    "hook_layer",
    "hook_name",
    "hook_names",
    "resolve_layers",
]

Layers = Union[None, int, Iterable[int]]
#: what the analyses read activations from: the ActivationCache of ``model.run_with_cache``, or its dict
#: (``return_cache_object=False``); every read goes through :func:`cache_get`
CacheLike = Union["ActivationCache", Dict[str, Tensor]]
#: forward hooks as TransformerLens's ``run_with_hooks`` / ``hooks`` take them: [(hook name, hook fn), ...]
FwdHooks = List[Tuple[Union[str, Callable[..., Any]], Callable[..., Any]]]

#: per-block residual-stream hooks, by short name
BLOCK_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_ATTN_SHORT = ("q", "k", "v", "z", "pattern", "attn_scores", "result")
_MODEL_LEVEL = ("hook_embed", "hook_pos_embed", "hook_pooled")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _n_layers(model: Any) -> int:
    if isinstance(model, numbers.Integral):
        return int(model)
    return int(getattr(model, "cfg", model).n_layers)


def int_list(v: Any, what: str) -> List[int]:
    """ints from an int, a sequence of ints or an integer tensor; anything else is refused."""
    bad = InputTypeError(
        f"{what} must be an int or a sequence of ints (negative counts from the end), got {v!r}"
    )
    if isinstance(v, Tensor):
        if v.dtype == torch.bool or v.is_floating_point() or v.is_complex():
            raise bad
        return [int(i) for i in v.reshape(-1).tolist()]
    if isinstance(v, (bool, str, bytes)):
        raise bad
    try:
        return [operator.index(v)]
    except TypeError:
        pass
    try:
        items = list(v)
    except TypeError:
        raise bad from None
    out = []
    for i in items:
        if isinstance(i, (bool, str, bytes)):
            raise bad
        try:
            out.append(operator.index(i))
        except TypeError:
            raise bad from None
    return out


def resolve_layers(layers: Layers, model: Any, *, allow_empty: bool = False) -> List[int]:
    """A layer selection as a list of block indices in ``0 .. n_layers - 1``, in the order given.

    Args:
        layers: ``None`` (every block), an int, or ints; negative values count from the end.
        model: the model, its config, or the number of blocks.
        allow_empty: accept an empty selection (for interventions, where "no layer" means "no
            change"); an error otherwise, since a sweep or summary over no layer has no result.

    Raises:
        OutOfRangeError: an index outside the model. InputError: an empty selection.
    """
    n = _n_layers(model)
    if layers is None:
        return list(range(n))
    layers = int_list(layers, "layers")
    out = []
    for l in layers:
        if not -n <= l < n:
            raise OutOfRangeError(f"layer {l} out of range for a model with {n} blocks (0..{n - 1})")
        out.append(l % n)
    if not out and not allow_empty:
        raise InputError("the layer selection is empty; pass None for every layer")
    return out


def head_mask(model: Any, heads: Union[None, int, Sequence[int], Tensor]) -> Optional[Bool[Tensor, "n_heads"]]:
    """A head selection (ints, negative from the end, or a boolean ``[n_heads]``) as a bool mask;
    ``None`` stays None (every head)."""
    if heads is None:
        return None
    H = int(getattr(model, "cfg", model).n_heads)
    if isinstance(heads, Tensor) and heads.dtype == torch.bool:
        if tuple(heads.shape) != (H,):
            raise InputError(f"a boolean head mask must have shape [{H}], got {tuple(heads.shape)}")
        return heads.detach().cpu().clone()
    idx = torch.tensor(int_list(heads, "heads"), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < -H or int(idx.max()) >= H):
        raise OutOfRangeError(f"heads {idx.tolist()} out of range for {H} heads (0..{H - 1})")
    m = torch.zeros(H, dtype=torch.bool)
    m[idx % H] = True
    return m


def hook_layer(model: Any, name: str) -> Optional[int]:
    """The block a hook lives in; None before the blocks; ``n_layers`` after them (readout)."""
    m = _BLOCK_RE.match(name)
    if m:
        return int(m.group(1))
    if name.startswith(("ln_final.", "fc_norm.")) or name == "hook_pooled":
        return _n_layers(model)
    return None


def _expand_short(short: str) -> str:
    """``"resid_pre"`` -> ``"hook_resid_pre"``, ``"z"`` -> ``"attn.hook_z"``, ``"mlp_post"`` -> ``"mlp.hook_post"``;
    names with a dot or a ``hook_`` prefix are kept."""
    if "." in short or short.startswith("hook_"):
        return short
    if short in BLOCK_HOOKS:
        return "hook_" + short
    if short in _ATTN_SHORT:
        return "attn.hook_" + short
    if short in ("mlp_pre", "mlp_post"):
        return "mlp.hook_" + short[4:]
    return "hook_" + short


def hook_name(model: "HookedViT", hook: str, layer: Optional[int] = None) -> str:
    """A full hook name, checked against the model.

    ``hook`` is a full name (``"blocks.3.attn.hook_z"``, ``"ln_final.hook_scale"``), or with
    ``layer`` a block-relative one in any of its spellings: ``"resid_pre"``, ``"hook_resid_pre"``,
    ``"attn.hook_z"``, ``"z"``, ``"mlp_post"``.

    Raises:
        UnknownNameError: no such hook (with close names suggested).
    """
    if not isinstance(hook, str):
        raise InputTypeError(f"a hook name must be a string, got {type(hook).__name__}")
    if layer is None:
        name = hook
    else:
        l = resolve_layers(layer, model)[0]
        name = f"blocks.{l}.{_expand_short(hook)}"
    model._check_hook_name(name)
    return name


def hook_names(model: "HookedViT", *hooks: str, layers: Layers = None) -> List[str]:
    """Full hook names to cache for short or full names, e.g. for ``run_with_cache(names_filter=...)``.

    Block-level short names (``"resid_post"``, ``"attn_out"``, ``"mlp_post"``, ``"z"``, ``"pattern"``
    ...) expand to every layer (or ``layers``); model-level and full names are kept.

    Example::

        _, cache = model.run_with_cache(x, names_filter=hook_names(model, "resid_post", "ln_final.hook_scale"))
    """
    ls = resolve_layers(layers, model)
    out: List[str] = []
    for h in hooks:
        if "." in h or h in _MODEL_LEVEL:
            names = [hook_name(model, h)]
        elif h in BLOCK_HOOKS or h in _ATTN_SHORT or h in ("mlp_pre", "mlp_post"):
            names = [hook_name(model, h, l) for l in ls]
        else:
            known = list(BLOCK_HOOKS) + list(_ATTN_SHORT) + ["mlp_pre", "mlp_post"] + list(_MODEL_LEVEL)
            close = difflib.get_close_matches(h, known, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise UnknownNameError(f"unknown short hook name {h!r}.{hint} Short names: {known}; full names work too.")
        out += [n for n in names if n not in out]
    return out


def cache_has(cache: Any, name: str) -> bool:
    """Whether an :class:`~transformer_lens.ActivationCache` (or dict) holds ``name``."""
    return name in getattr(cache, "cache_dict", cache)


def cache_get(cache: Any, name: str, what: str = "") -> Tensor:
    """``cache[name]``, or an error that says how to cache it (``what``: why it is needed)."""
    d = getattr(cache, "cache_dict", cache)
    if not isinstance(d, dict):
        raise InputTypeError(
            f"expected an ActivationCache (from model.run_with_cache) or a dict of activations, got {type(cache).__name__}"
        )
    if name not in d:
        raise UnknownNameError(
            f"the cache has no {name!r}{' (' + what + ')' if what else ''}. Cache it: "
            f"model.run_with_cache(images, names_filter=vit_lens.core.hook_names(model, ...)) "
            "or run_with_cache without names_filter."
        )
    return d[name]
