"""Activation patching for Vision Transformers: single patched runs and batched sweeps.

Patching runs the model on one batch (the *corrupted* images) with chosen activations replaced
by those of another run (the *clean* images) -- or by zeros, the batch mean, or activations
resampled from other images -- and measures the effect with a *metric*.

Positions know the token grid: position ``0 .. n_prefix_tokens - 1`` are the prefix tokens
([CLS], distillation, registers), then the patches in row-major order. Positions can be given as
indices, as a boolean mask over the sequence, or as a boolean mask over the patch grid
(:func:`position_mask`). Sweep results (:class:`PatchingResult`) keep named axes, label every
position (``"CLS"``, ``"r,c"``), normalise to [0, 1] between the corrupted (0) and clean (1)
baselines, lay positions out on the patch grid, and turn into tidy pandas tables.

Metrics
    A metric maps logits ``[..., batch, n_classes]`` to one number per image ``[..., batch]``
    (the leading axes are the patched runs of a sweep, so write metrics with ``...``, e.g.
    ``lambda logits: logits[..., 281]``). :func:`logit_metric`, :func:`logit_diff_metric`,
    :func:`prob_metric` and :func:`identifiability_metric` build the usual ones; per-image target
    classes broadcast along the batch axis. A metric object with a ``hook_name`` attribute is
    called as ``metric(logits, activation)`` with that hook's activation of the same run
    (``[..., batch, ...]``): this is how :func:`identifiability_metric` reads the tokens of the
    last layer.

Sweeps are batched: many patched runs share one forward pass (the corrupted input is repeated
along the batch axis and one hook writes a different patch into every row), each run starts at
the patched layer from the corrupted run's cached residual stream (earlier blocks are not
recomputed), runs whose patch would not change anything (the clean and corrupted activations
are equal there) are not run at all, and runs are chunked to fit ``memory_mb``. On a CPU a
chunk also holds at most about :data:`CPU_CHUNK_TOKENS` tokens: there a batch-1 forward already
keeps the cores busy, and chunks whose activations overflow the caches run slower per patched run
(measured on ViT-Ti: 6 ms per run at 8 runs a chunk, 9 ms at 64).

Class identifiability (Vilas et al., 2023) follows :mod:`vit_lens.class_space`: tokens are
projected with ``model.project_to_classes`` (the model's own final norm and classifier applied to
every token), the target's 0-based rank is :func:`vit_lens.class_space.class_rank`, a token is
*identifiable* when the rank is 0 and its score is ``r = 1 - rank / n_classes``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_lens.config import resolve_layers
from vit_lens.core.errors import InputError, OutOfRangeError, UnknownNameError

__all__ = [
    "PatchingResult",
    "identifiability_metric",
    "logit_diff_metric",
    "logit_metric",
    "patch_block_every",
    "patch_components_sweep",
    "patch_heads_sweep",
    "patch_positions_sweep",
    "patching_hooks",
    "position_labels",
    "position_mask",
    "prob_metric",
    "run_patched",
]

#: On a CPU, the most tokens (runs x batch x positions) one chunk of patched runs holds, unless
#: ``chunk_size`` says otherwise (about 8 runs of one 224x224 image at patch size 16).
CPU_CHUNK_TOKENS = 1600

Classes = Union[int, Sequence[int], Tensor]
Positions = Union[None, str, int, Sequence[int], Tensor]
Metric = Callable[..., Tensor]

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_HEAD_POS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_result")
_HEAD_QK = ("attn.hook_attn_scores", "attn.hook_pattern")


# =============================================================================================
# positions
# =============================================================================================
def position_labels(model: Any, grid_size: Optional[Tuple[int, int]] = None) -> List[str]:
    """One label per sequence position: the prefix token names, then ``"row,col"`` per patch.

    Args:
        model: a :class:`~vit_lens.HookedViT` (or its config).
        grid_size: (rows, cols) if not the model's native grid.
    """
    cfg = getattr(model, "cfg", model)
    rows, cols = grid_size or cfg.grid_size
    return list(cfg.prefix_token_names) + [f"{r},{c}" for r in range(rows) for c in range(cols)]


def position_mask(
    model: Any,
    positions: Positions = None,
    *,
    grid_size: Optional[Tuple[int, int]] = None,
) -> Bool[Tensor, "pos"]:
    """Turn any way of naming positions into a boolean mask over the sequence.

    Args:
        model: a :class:`~vit_lens.HookedViT` (or its config).
        positions: ``None`` or ``"all"`` (every position), ``"patches"`` (image tokens),
            ``"prefix"`` (the prefix tokens), ``"cls"``; an index or a sequence of indices
            (negative ones count from the end); a boolean tensor over the sequence ``[pos]``; or
            a boolean tensor over the patch grid ``[rows, cols]`` (patch tokens only).
        grid_size: (rows, cols) if not the model's native grid.

    Returns:
        bool tensor ``[n_prefix_tokens + rows * cols]``, True at the chosen positions.
    """
    cfg = getattr(model, "cfg", model)
    rows, cols = grid_size or cfg.grid_size
    n_pre = cfg.n_prefix_tokens
    n = n_pre + rows * cols
    mask = torch.zeros(n, dtype=torch.bool)
    if positions is None:
        return ~mask
    if isinstance(positions, str):
        key = positions.lower()
        if key == "all":
            return ~mask
        if key in ("patches", "image"):
            mask[n_pre:] = True
            return mask
        if key == "prefix":
            mask[:n_pre] = True
            return mask
        if key == "cls":
            if not cfg.has_class_token:
                raise InputError(f"{cfg.model_name} has no [CLS] token; choose positions by index")
            mask[0] = True
            return mask
        raise InputError(f"unknown positions {positions!r}; use 'all', 'patches', 'prefix', 'cls', indices or a mask")
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        p = positions.detach().cpu()
        if p.ndim == 1 and p.shape[0] == n:
            return p.clone()
        if p.ndim == 2 and tuple(p.shape) == (rows, cols):
            mask[n_pre:] = p.reshape(-1)
            return mask
        if p.ndim == 1 and p.shape[0] == rows * cols:
            mask[n_pre:] = p
            return mask
        raise InputError(
            f"a boolean position mask must be [{n}] (every position), [{rows * cols}] (patches) or "
            f"[{rows}, {cols}] (the patch grid); got {tuple(p.shape)}"
        )
    idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1).cpu()
    if idx.numel() and (idx.min() < -n or idx.max() >= n):
        raise OutOfRangeError(
            f"positions {idx.tolist()} out of range for {n} positions "
            f"({n_pre} prefix + {rows}x{cols} patches); see vit_lens.rowcol_to_patch_index"
        )
    mask[idx % n] = True
    return mask


def _grid_of(model: Any, n_pos: int) -> Tuple[int, int]:
    """The patch grid for a sequence of ``n_pos`` positions (native grid, or a square one)."""
    cfg = model.cfg
    if n_pos == cfg.n_ctx:
        return tuple(cfg.grid_size)
    n_patch = n_pos - cfg.n_prefix_tokens
    side = int(round(math.sqrt(max(n_patch, 0))))
    if side * side == n_patch:
        return (side, side)
    raise InputError(
        f"cannot infer the patch grid for {n_pos} positions; pass images of the model's native "
        f"size {cfg.image_size} (or square images)"
    )


# =============================================================================================
# metrics and class identifiability
# =============================================================================================
def _class_tensor(classes: Classes, n_classes: int, device: Any) -> Union[int, Tensor]:
    if isinstance(classes, int):
        if not -n_classes <= classes < n_classes:
            raise OutOfRangeError(f"class {classes} out of range for {n_classes} classes")
        return classes % n_classes
    c = torch.as_tensor(classes, dtype=torch.long, device=device)
    if c.ndim == 0:
        return _class_tensor(int(c), n_classes, device)
    if c.ndim != 1:
        raise InputError(f"classes must be an int or one class per image [batch], got shape {tuple(c.shape)}")
    if c.numel() and (c.min() < 0 or c.max() >= n_classes):
        raise OutOfRangeError(f"classes {c.tolist()} out of range for {n_classes} classes")
    return c


def _gather_class(x: Float[Tensor, "... batch n_classes"], classes: Classes) -> Float[Tensor, "... batch"]:
    c = _class_tensor(classes, x.shape[-1], x.device)
    if isinstance(c, int):
        return x[..., c]
    if x.shape[-2] != c.shape[0]:
        raise InputError(
            f"{c.shape[0]} target classes for a batch of {x.shape[-2]} images: give one class per image "
            "(or a single int for all)"
        )
    return x.gather(-1, c.expand(x.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def logit_metric(classes: Classes) -> Metric:
    """Metric: the logit of ``classes`` (an int, or one class per image ``[batch]``)."""

    def metric(logits: Float[Tensor, "... batch n_classes"]) -> Float[Tensor, "... batch"]:
        return _gather_class(logits, classes)

    metric.__name__ = "logit"
    return metric


def logit_diff_metric(classes: Classes, other: Classes) -> Metric:
    """Metric: ``logit[classes] - logit[other]`` (ints, or one class per image each)."""

    def metric(logits: Float[Tensor, "... batch n_classes"]) -> Float[Tensor, "... batch"]:
        return _gather_class(logits, classes) - _gather_class(logits, other)

    metric.__name__ = "logit_diff"
    return metric


def prob_metric(classes: Classes) -> Metric:
    """Metric: the softmax probability of ``classes`` (an int, or one class per image)."""

    def metric(logits: Float[Tensor, "... batch n_classes"]) -> Float[Tensor, "... batch"]:
        return _gather_class(logits.float().softmax(-1), classes)

    metric.__name__ = "prob"
    return metric


class identifiability_metric:
    """Metric: class identifiability of chosen tokens after a chosen block.

    Reads ``blocks.{layer}.hook_resid_post``, projects the tokens at ``positions`` onto the
    classes with ``model.project_to_classes``, and returns per image either the fraction of those
    tokens that are identifiable (``kind="rate"``: the target class is their top-1) or their mean
    class identifiability ``r = 1 - rank / n_classes`` (``kind="score"``, smoother).

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        classes: target class, an int or one per image ``[batch]``.
        positions: the tokens to score (default ``"patches"``, the image tokens); anything
            :func:`position_mask` accepts.
        layer: the block whose output is read (default the last; negative counts from the end).
        kind: ``"rate"`` or ``"score"``.
    """

    def __init__(
        self,
        model: Any,
        classes: Classes,
        *,
        positions: Positions = "patches",
        layer: int = -1,
        kind: Literal["rate", "score"] = "rate",
    ):
        L = model.cfg.n_layers
        if not -L <= layer < L:
            raise OutOfRangeError(f"layer {layer} out of range for {L} layers")
        if kind not in ("rate", "score"):
            raise InputError(f"kind must be 'rate' or 'score', got {kind!r}")
        self.model = model
        self.classes = classes
        self.layer = layer % L
        self.kind = kind
        self.positions = positions
        self.hook_name = f"blocks.{self.layer}.hook_resid_post"
        self.__name__ = f"identifiability_{kind}"

    def __call__(self, logits: Tensor, activation: Float[Tensor, "... batch pos d_model"]) -> Float[Tensor, "... batch"]:
        from vit_lens.class_space import class_rank

        pos = position_mask(self.model, self.positions, grid_size=_grid_of(self.model, activation.shape[-2]))
        pos = pos.to(activation.device)
        proj = self.model.project_to_classes(activation[..., pos, :])  # [..., batch, k, C]
        c = _class_tensor(self.classes, proj.shape[-1], proj.device)
        if isinstance(c, int):
            c = torch.tensor(c, device=proj.device)
        else:
            if proj.shape[-3] != c.shape[0]:
                raise InputError(f"{c.shape[0]} target classes for a batch of {proj.shape[-3]} images")
            c = c[:, None]  # broadcast over the tokens
        rank = class_rank(proj, c)
        if self.kind == "rate":
            score = (rank == 0).to(torch.float32)
        else:
            score = 1.0 - rank.to(torch.float32) / proj.shape[-1]
        return score.mean(-1)


def _metric_name(metric: Metric) -> str:
    return getattr(metric, "__name__", type(metric).__name__)


def _call_metric(metric: Metric, logits: Tensor, activation: Optional[Tensor]) -> Tensor:
    if getattr(metric, "hook_name", None) is not None:
        out = metric(logits, activation)
    else:
        out = metric(logits)
    if not isinstance(out, Tensor) or out.shape != logits.shape[:-1]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InputError(
            f"a metric must return one value per image [..., batch] = {tuple(logits.shape[:-1])}, got {shape}; "
            "write it over the last axes, e.g. lambda logits: logits[..., c]"
        )
    return out


# =============================================================================================
# hook layouts and generic patching
# =============================================================================================
def _layout(name: str) -> str:
    """How a hook's activation is laid out: which axis is the position, which the head."""
    if name.endswith(_HEAD_POS):
        return "pos_head"  # [B, P, H, E]
    if name.endswith(_HEAD_QK):
        return "head_qk"  # [B, H, Pq, Pk]
    if name == "hook_pooled" or name.startswith("fc_norm."):
        return "none"  # [B, D]
    return "pos"  # [B, P, ...]


def _hook_layer(model: Any, name: str) -> Optional[int]:
    """Block index a hook lives in; None before the blocks; n_layers after them."""
    m = _BLOCK_RE.match(name)
    if m:
        return int(m.group(1))
    if name.startswith(("ln_final.", "fc_norm.")) or name == "hook_pooled":
        return model.cfg.n_layers
    return None


def _full_hook_name(model: Any, hook: str, layer: Optional[int] = None) -> str:
    """``"resid_pre"`` / ``"hook_resid_pre"`` / ``"attn.hook_z"`` + layer -> a full hook name."""
    if layer is None:
        name = hook
    else:
        short = hook
        if "." not in short and not short.startswith("hook_"):
            short = "hook_" + short
        name = f"blocks.{layer}.{short}"
    if name not in model.hook_dict:
        model._check_hook_name(name)  # raises a helpful ValueError
    return name


def _patch_mask(
    layout: str,
    pos: Optional[Bool[Tensor, "... pos"]],
    heads: Optional[Bool[Tensor, "... head"]],
    ndim: int,
) -> Optional[Tensor]:
    """Boolean mask broadcastable to an activation ``[..., batch, *rest]`` (rest has ndim - 1 axes).

    ``pos`` / ``heads`` have shape ``[*lead, P]`` / ``[*lead, H]`` (lead: the runs of a sweep,
    possibly empty); the mask has shape ``[*lead, 1, ...]`` with the batch axis as a 1.
    """
    if layout == "none":
        if pos is not None and not bool(pos.all()):
            raise InputError("this hook has no position axis ([batch, d_model]); leave positions=None")
        if heads is not None:
            raise InputError("this hook has no head axis; leave heads=None")
        return None
    rest = ndim - 1
    m = None
    if layout == "pos":
        if heads is not None:
            raise InputError("heads can only be chosen for per-head hooks (attn.hook_q/k/v/z/result/pattern/attn_scores)")
        if pos is not None:
            m = pos.reshape(*pos.shape[:-1], 1, pos.shape[-1], *([1] * (rest - 1)))
        return m
    if layout == "pos_head":  # [B, P, H, E]
        if pos is not None:
            m = pos.reshape(*pos.shape[:-1], 1, pos.shape[-1], 1, 1)
        if heads is not None:
            h = heads.reshape(*heads.shape[:-1], 1, 1, heads.shape[-1], 1)
            m = h if m is None else m & h
        return m
    # head_qk: [B, H, Pq, Pk]; positions are query positions
    if pos is not None:
        m = pos.reshape(*pos.shape[:-1], 1, 1, pos.shape[-1], 1)
    if heads is not None:
        h = heads.reshape(*heads.shape[:-1], 1, heads.shape[-1], 1, 1)
        m = h if m is None else m & h
    return m


def _head_mask(model: Any, heads: Union[None, int, Sequence[int], Tensor]) -> Optional[Tensor]:
    if heads is None:
        return None
    H = model.cfg.n_heads
    if isinstance(heads, Tensor) and heads.dtype == torch.bool:
        if heads.shape != (H,):
            raise InputError(f"a boolean head mask must have shape [{H}], got {tuple(heads.shape)}")
        return heads.cpu()
    idx = torch.as_tensor(heads, dtype=torch.long).reshape(-1)
    if idx.numel() and (idx.min() < -H or idx.max() >= H):
        raise OutOfRangeError(f"heads {idx.tolist()} out of range for {H} heads")
    m = torch.zeros(H, dtype=torch.bool)
    m[idx % H] = True
    return m


def patching_hooks(
    model: Any,
    hook_names: Union[str, Sequence[str]],
    source: Any = None,
    *,
    value: Literal["source", "zero", "mean", "resample"] = "source",
    positions: Positions = None,
    heads: Union[None, int, Sequence[int], Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> List[Tuple[str, Callable]]:
    """Hooks that replace activations, for ``model.run_with_hooks`` / ``model.hooks``.

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        hook_names: one full hook name or several (``"blocks.3.hook_resid_pre"``,
            ``"blocks.5.attn.hook_z"``, ...).
        source: the activations patched in: an :class:`~transformer_lens.ActivationCache` (or
            dict) of another run holding ``hook_names`` (batch 1 or the same batch as the patched
            run); required for ``value="source"``, ``"mean"`` and ``"resample"``.
        value: ``"source"`` (the source run's activation at the same place), ``"zero"``,
            ``"mean"`` (the mean over the source batch), ``"resample"`` (for every image, the
            activation of a random image of the source batch, drawn with ``generator``).
        positions: which positions to patch (anything :func:`position_mask` accepts; for
            attention patterns/scores these are query positions). Default all.
        heads: which heads to patch, for per-head hooks (``attn.hook_q/k/v/z/result``,
            ``attn.hook_pattern``, ``attn.hook_attn_scores``). Default all.
        generator: random generator for ``"resample"``.

    Returns:
        a list of ``(hook_name, hook_fn)``.
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if value not in ("source", "zero", "mean", "resample"):
        raise InputError(f"value must be 'source', 'zero', 'mean' or 'resample', got {value!r}")
    if value != "zero" and source is None:
        raise InputError(
            f"value={value!r} needs a source run: pass source=cache from "
            "model.run_with_cache(other_images) (or use value='zero')"
        )
    head_mask = _head_mask(model, heads)
    hooks = []
    for name in names:
        _full_hook_name(model, name)
        layout = _layout(name)
        src = None
        if value != "zero":
            if name not in source:
                raise UnknownNameError(f"the source cache has no {name!r}; cache it with names_filter including it")
            src = source[name]
        pos_given = positions is not None

        def hook(act: Tensor, hook: Any = None, *, _src=src, _layout=layout) -> Tensor:
            if value == "zero":
                new = torch.zeros_like(act)
            elif value == "mean":
                new = _src.mean(0, keepdim=True).to(act.dtype)
            elif value == "resample":
                idx = torch.randint(0, _src.shape[0], (act.shape[0],), generator=generator)
                new = _src[idx.to(_src.device)]
            else:
                new = _src
            new = new.to(device=act.device, dtype=act.dtype)
            if new.shape[1:] != act.shape[1:] or new.shape[0] not in (1, act.shape[0]):
                raise InputError(
                    f"cannot patch {hook.name if hook is not None else 'activation'}: source shape "
                    f"{tuple(new.shape)} vs run shape {tuple(act.shape)} (batch must match or be 1)"
                )
            pos = None
            if pos_given and _layout != "none":
                n_pos = act.shape[1] if _layout in ("pos", "pos_head") else act.shape[2]
                pos = position_mask(model, positions, grid_size=_grid_of(model, n_pos)).to(act.device)
            mask = _patch_mask(_layout, pos, None if head_mask is None else head_mask.to(act.device), act.ndim)
            if mask is None:
                return new.expand_as(act).clone()
            return torch.where(mask, new, act)

        hooks.append((name, hook))
    return hooks


def run_patched(
    model: Any,
    images: Float[Tensor, "batch chans height width"],
    hook_names: Union[str, Sequence[str]],
    source: Any = None,
    *,
    value: Literal["source", "zero", "mean", "resample"] = "source",
    positions: Positions = None,
    heads: Union[None, int, Sequence[int], Tensor] = None,
    metric: Optional[Metric] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Run ``images`` with activations replaced (see :func:`patching_hooks` for the arguments).

    ``source`` may also be a batch of images: the source run is then computed here.

    Returns:
        ``metric`` per image ``[batch]`` if a metric is given, else the logits ``[batch, n_classes]``.

    Example::

        _, clean_cache = model.run_with_cache(clean)
        logit = run_patched(model, corrupted, "blocks.4.hook_resid_pre", clean_cache,
                            positions=[0], metric=logit_metric(281))
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if isinstance(source, Tensor):
        _, source = model.run_with_cache(source, names_filter=names, return_type=None)
    hooks = patching_hooks(
        model, names, source, value=value, positions=positions, heads=heads, generator=generator
    )
    act: Dict[str, Tensor] = {}
    mname = getattr(metric, "hook_name", None) if metric is not None else None
    if mname is not None:
        _full_hook_name(model, mname)

        def grab(x: Tensor, hook: Any = None) -> None:
            act["x"] = x

        hooks = hooks + [(mname, grab)]
    logits = model.run_with_hooks(images, fwd_hooks=hooks)
    if metric is None:
        return logits
    return _call_metric(metric, logits, act.get("x"))


# =============================================================================================
# sweep results
# =============================================================================================
@dataclass
class PatchingResult:
    """Metric values of a patching sweep, with named axes.

    Attributes:
        values: the metric of every patched run; axes named by ``dims`` (``"batch"`` is last).
        dims: axis names, e.g. ``("layer", "pos", "batch")``.
        coords: labels along each axis (``"pos"``: ``"CLS"``, ``"0,0"``, ...; ``"layer"``: ints).
        clean: the metric of the unpatched clean run ``[batch]``.
        corrupted: the metric of the unpatched corrupted run ``[batch]``.
        positions: sequence index of every entry along ``"pos"`` (if that axis exists).
        hook: what was patched (a hook name template such as ``"blocks.{l}.hook_resid_pre"``).
        metric: the metric's name.
        n_prefix_tokens, grid_size: the token layout, for :meth:`grid`.
    """

    values: Tensor
    dims: Tuple[str, ...]
    coords: Dict[str, list]
    clean: Tensor
    corrupted: Tensor
    hook: str = ""
    metric: str = ""
    positions: Optional[Tensor] = None
    n_prefix_tokens: int = 1
    grid_size: Tuple[int, int] = (1, 1)
    prefix_token_names: List[str] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.values.shape)

    def normalized(self) -> Tensor:
        """``(value - corrupted) / (clean - corrupted)`` per image: 0 = corrupted, 1 = clean.

        Images whose clean and corrupted metrics are equal get NaN (with a warning).
        """
        denom = self.clean - self.corrupted
        if bool((denom == 0).any()):
            warnings.warn("clean and corrupted metrics are equal for some images: their normalised values are NaN")
        denom = torch.where(denom == 0, torch.full_like(denom, float("nan")), denom)
        return (self.values - self.corrupted) / denom

    def mean(self, dim: str = "batch") -> "PatchingResult":
        """Average over one axis (e.g. ``"batch"``), keeping it as a length-1 axis for the baselines."""
        i = self._axis(dim)
        out = PatchingResult(**{**self.__dict__})
        out.values = self.values.mean(i, keepdim=True)
        out.coords = {**self.coords, dim: ["mean"]}
        if dim == "batch":
            out.clean = self.clean.mean(0, keepdim=True)
            out.corrupted = self.corrupted.mean(0, keepdim=True)
        return out

    def _axis(self, dim: str) -> int:
        if dim not in self.dims:
            raise InputError(f"no axis {dim!r}; axes are {self.dims}")
        return self.dims.index(dim)

    def grid(self, normalized: bool = True) -> Tuple[Tensor, Tuple[str, ...]]:
        """The values of the patch tokens laid out on the patch grid.

        Returns:
            ``(values, dims)`` where the ``"pos"`` axis is replaced by ``"row", "col"``; patch
            positions that were not swept are NaN. Prefix tokens are left out (see
            :meth:`prefix`).
        """
        i = self._axis("pos")
        v = self.normalized() if normalized else self.values
        rows, cols = self.grid_size
        n_pre = self.n_prefix_tokens
        shape = list(v.shape)
        shape[i] = rows * cols
        out = torch.full(shape, float("nan"), dtype=v.dtype)
        pos = self.positions
        keep = pos >= n_pre
        out.index_copy_(i, (pos[keep] - n_pre).long(), v.index_select(i, torch.nonzero(keep).reshape(-1)))
        out = out.reshape(*shape[:i], rows, cols, *shape[i + 1 :])
        dims = self.dims[:i] + ("row", "col") + self.dims[i + 1 :]
        return out, dims

    def prefix(self, normalized: bool = True) -> Tuple[Tensor, List[str]]:
        """The values at the swept prefix positions (along ``"pos"``) and their names."""
        i = self._axis("pos")
        v = self.normalized() if normalized else self.values
        keep = self.positions < self.n_prefix_tokens
        idx = torch.nonzero(keep).reshape(-1)
        names = [self.coords["pos"][int(j)] for j in idx]
        return v.index_select(i, idx), names

    def to_frame(self):
        """A tidy :class:`pandas.DataFrame`: one row per cell, a column per axis (``pos`` also
        gives ``token``, ``row`` and ``col``; NaN rows/cols for prefix tokens), ``value`` and
        ``normalized``."""
        import numpy as np
        import pandas as pd

        vals = self.values.detach().cpu().double().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            norm = self.normalized().detach().cpu().double().numpy()
        grids = np.meshgrid(*[np.arange(n) for n in vals.shape], indexing="ij")
        data: Dict[str, Any] = {}
        for d, g in zip(self.dims, grids):
            g = g.reshape(-1)
            if d == "pos":
                pos = self.positions.cpu().numpy()[g]
                data["pos"] = pos
                data["token"] = np.asarray(self.coords["pos"], dtype=object)[g]
                p = pos - self.n_prefix_tokens
                cols = self.grid_size[1]
                data["row"] = np.where(p >= 0, p // cols, np.nan)
                data["col"] = np.where(p >= 0, p % cols, np.nan)
            else:
                data[d] = np.asarray(self.coords[d], dtype=object)[g]
        data["value"] = vals.reshape(-1)
        data["normalized"] = norm.reshape(-1)
        df = pd.DataFrame(data)
        for d in self.dims:
            if d in df and d != "token":
                try:
                    df[d] = pd.to_numeric(df[d])
                except (ValueError, TypeError):
                    pass
        return df

    def __repr__(self) -> str:
        dims = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape))
        return f"PatchingResult({self.metric} patching {self.hook!r}: {dims})"


# =============================================================================================
# the batched sweep engine
# =============================================================================================
@dataclass
class _Group:
    """Runs that patch the same hook: one boolean position / head mask per run."""

    name: str
    pos: Optional[Tensor]  # [R, P] or None (all positions)
    heads: Optional[Tensor]  # [R, H] or None (all heads)
    n_runs: int


def _forward_from(model: Any, start: Optional[int], x: Tensor, prune_last: bool = False) -> Tensor:
    """Run the model from block ``start`` on the residual stream ``x`` (or, if ``start`` is None,
    from the images ``x``), firing every hook from there on. Returns the logits.

    With ``prune_last`` (see :func:`_can_prune_last`) the last block computes only the pooled
    prefix tokens -- keys and values of every token, queries, attention, MLP and final norm of
    the pooled ones -- which is all the classifier reads.
    """
    if start is None:
        return model(x)
    L = model.cfg.n_layers
    if not (prune_last and start < L and _can_prune_last(model)):
        return model(x, start_at_layer=start)
    x = model(x, start_at_layer=start, stop_at_layer=L - 1)
    x = _pooled_tokens_of_last_block(model, model.blocks[L - 1], x)
    return model(x, start_at_layer=L)


def _n_pooled(model: Any) -> int:
    return {"token": 1, "token_dist": 2}.get(model.cfg.pooling, 0)


def _can_prune_last(model: Any) -> bool:
    """Whether the last block may compute only the pooled tokens: token pooling, pre-norm, and no
    hook anywhere in the last block (but ``hook_resid_pre``) or on the final norm."""
    from vit_lens.components import Attention, LayerNorm, TransformerBlock

    cfg = model.cfg
    if _n_pooled(model) == 0 or cfg.post_norm or cfg.use_attn_result:
        return False
    block = model.blocks[-1]
    if type(block) is not TransformerBlock or type(block.attn) is not Attention:
        return False
    if model.ln_final is not None and type(model.ln_final) is not LayerNorm:
        return False
    for name, hp in block.named_modules():
        if name != "hook_resid_pre" and hasattr(hp, "has_hooks") and hp.has_hooks():
            return False
    if model.ln_final is not None and (model.ln_final.hook_scale.has_hooks() or model.ln_final.hook_normalized.has_hooks()):
        return False
    return True


def _pooled_tokens_of_last_block(model: Any, block: Any, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
    """The last block's output at the pooled prefix positions only ``[batch, n_pooled, d_model]``.

    The same arithmetic as :class:`~vit_lens.components.TransformerBlock` (pre-norm) restricted to
    the query rows the classifier reads; every token still provides keys and values.
    """
    n = _n_pooled(model)
    attn = block.attn
    H, E = attn.cfg.n_heads, attn.cfg.d_head
    N, P, D = x.shape
    x = block.hook_resid_pre(x)
    h = block.ln1(x)
    Wk = attn.W_K.permute(0, 2, 1).reshape(H * E, D)
    Wv = attn.W_V.permute(0, 2, 1).reshape(H * E, D)
    Wq = attn.W_Q.permute(0, 2, 1).reshape(H * E, D)
    kv = F.linear(h, torch.cat([Wk, Wv]), torch.cat([attn.b_K.reshape(-1), attn.b_V.reshape(-1)]))
    kv = kv.view(N, P, 2, H, E)
    q = F.linear(h[:, :n], Wq, attn.b_Q.reshape(-1)).view(N, n, H, E)
    mask = attn.attn_mask
    if mask is not None:
        if mask.shape[-2] != 1:
            mask = mask[..., :n, :]
        mask = mask.expand(N, H, n, P)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    if mask is not None:
        z = torch.nan_to_num(z)
    attn_out = F.linear(z.reshape(N, n, H * E), attn.W_O.reshape(H * E, -1).T, attn.b_O)
    resid_mid = x[:, :n] + attn_out
    return resid_mid + block.mlp(block.ln2(resid_mid))


def _bytes_per_run(model: Any, n_pos: int, batch: int, materialised: bool) -> int:
    cfg = model.cfg
    per_token = 3 * cfg.d_mlp + 10 * cfg.d_model + (2 * cfg.n_heads * n_pos if materialised else 0)
    return 4 * batch * n_pos * per_token + 4 * batch * max(cfg.n_classes, 1) * 4


def _run_groups(
    model: Any,
    clean: Tensor,
    corrupted: Tensor,
    metric: Metric,
    groups: List[_Group],
    *,
    memory_mb: float,
    chunk_size: Optional[int],
    progress: bool,
    skip_unchanged: bool,
    desc: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Run every patched run of ``groups`` (clean activations into the corrupted run).

    Returns ``(values [n_runs_total, batch], clean_metric [batch], corrupted_metric [batch])``.
    """
    from tqdm.auto import tqdm

    if clean.shape != corrupted.shape:
        raise InputError(
            f"clean and corrupted batches must have the same shape (pairs of images), got "
            f"{tuple(clean.shape)} and {tuple(corrupted.shape)}"
        )
    L = model.cfg.n_layers
    mname = getattr(metric, "hook_name", None)
    if mname is not None:
        _full_hook_name(model, mname)
    patch_names = sorted({g.name for g in groups})
    starts = {g.name: _hook_layer(model, g.name) for g in groups}
    start_names = set()
    for s in starts.values():
        if s is not None:
            start_names.add(f"blocks.{s}.hook_resid_pre" if s < L else f"blocks.{L - 1}.hook_resid_post")
    names_clean = set(patch_names) | ({mname} if mname else set())
    names_corr = names_clean | start_names

    with torch.inference_mode():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=sorted(names_clean))
        corr_logits, corr_cache = model.run_with_cache(corrupted, names_filter=sorted(names_corr))
        clean_m = _call_metric(metric, clean_logits, clean_cache[mname] if mname else None)
        corr_m = _call_metric(metric, corr_logits, corr_cache[mname] if mname else None)

        B = corrupted.shape[0]
        total = sum(g.n_runs for g in groups)
        bar = tqdm(total=total, disable=not progress, desc=desc, unit="run")
        results = []
        for g in groups:
            start = starts[g.name]
            src = clean_cache[g.name]
            tgt = corr_cache[g.name]
            layout = _layout(g.name)
            # which runs would change anything at all
            vals = torch.full((g.n_runs, B), float("nan"), dtype=corr_m.dtype, device=corr_m.device)
            if skip_unchanged:
                diff = src != tgt
                todo = _runs_that_change(layout, diff, g)
            else:
                todo = torch.ones(g.n_runs, dtype=torch.bool)
            vals[~todo.to(vals.device)] = corr_m.to(vals.dtype)
            bar.update(int((~todo).sum()))
            idx_todo = torch.nonzero(todo).reshape(-1)
            if start is None:
                x0 = corrupted
                n_pos = src.shape[1] if layout != "none" else model.cfg.n_ctx
            elif start < L:
                x0 = corr_cache[f"blocks.{start}.hook_resid_pre"]
                n_pos = x0.shape[1]
            else:
                x0 = corr_cache[f"blocks.{L - 1}.hook_resid_post"]
                n_pos = x0.shape[1]
            per_run = _bytes_per_run(model, n_pos, B, layout == "head_qk")
            R = chunk_size or max(1, int(memory_mb * 2**20 // per_run))
            if chunk_size is None and x0.device.type == "cpu":
                R = min(R, max(1, CPU_CHUNK_TOKENS // (n_pos * B)))
            for s in range(0, idx_todo.numel(), R):
                ridx = idx_todo[s : s + R]
                r = ridx.numel()
                pos = None if g.pos is None else g.pos[ridx].to(src.device)
                heads = None if g.heads is None else g.heads[ridx].to(src.device)
                mask = _patch_mask(layout, pos, heads, src.ndim)  # [r, 1, ...]
                captured: Dict[str, Tensor] = {}

                def patch_hook(act: Tensor, hook: Any = None, *, _mask=mask, _r=r) -> Tensor:
                    a = act.view(_r, B, *act.shape[1:])
                    if _mask is None:
                        out = src.unsqueeze(0).expand_as(a)
                    else:
                        out = torch.where(_mask, src.unsqueeze(0), a)
                    return out.reshape(act.shape)

                hooks = [(g.name, patch_hook)]
                m_layer = None if mname is None else _hook_layer(model, mname)
                if mname is not None and (start is None or (m_layer is not None and m_layer >= start)):

                    def grab(act: Tensor, hook: Any = None) -> None:
                        captured["x"] = act

                    hooks.append((mname, grab))
                x = x0.unsqueeze(0).expand(r, *x0.shape).reshape(r * B, *x0.shape[1:])
                with model.hooks(fwd_hooks=hooks):
                    logits = _forward_from(model, start, x, prune_last=mname is None)
                logits = logits.view(r, B, -1)
                act = None
                if mname is not None:
                    if "x" in captured:
                        act = captured["x"].view(r, B, *captured["x"].shape[1:])
                    else:  # the metric's hook is before the patch: the corrupted run's activation
                        act = corr_cache[mname].unsqueeze(0).expand(r, *corr_cache[mname].shape)
                vals[ridx.to(vals.device)] = _call_metric(metric, logits, act).to(vals.dtype)
                bar.update(r)
            results.append(vals)
        bar.close()
    return torch.cat(results, 0).cpu(), clean_m.cpu(), corr_m.cpu()


def _runs_that_change(layout: str, diff: Tensor, g: _Group) -> Tensor:
    """Runs of ``g`` whose patched region holds an activation that differs between the runs."""
    B = diff.shape[0]
    if layout == "none":
        return torch.full((g.n_runs,), bool(diff.any()))
    if layout == "pos":
        d = diff.reshape(B, diff.shape[1], -1).any(-1).any(0)  # [P]
        ph = None
    elif layout == "pos_head":
        d = diff.any(-1).any(0)  # [P, H]
        ph = d
        d = None
    else:  # head_qk [B, H, Pq, Pk] -> [Pq, H]
        ph = diff.any(-1).any(0).transpose(0, 1)
        d = None
    if ph is None:
        pos = g.pos if g.pos is not None else torch.ones(g.n_runs, d.shape[0], dtype=torch.bool)
        return (pos.to(d.device) & d[None]).any(-1).cpu()
    P, H = ph.shape
    pos = g.pos if g.pos is not None else torch.ones(g.n_runs, P, dtype=torch.bool)
    heads = g.heads if g.heads is not None else torch.ones(g.n_runs, H, dtype=torch.bool)
    sel = pos.to(ph.device)[:, :, None] & heads.to(ph.device)[:, None, :]  # [R, P, H]
    return (sel & ph[None]).flatten(1).any(-1).cpu()


def _layers(model: Any, layers: Union[None, int, Iterable[int]]) -> List[int]:
    return resolve_layers(layers, model.cfg.n_layers)


def _one_position_per_run(model: Any, positions: Positions, clean: Tensor) -> Tuple[Tensor, Tensor]:
    """The swept positions ``[K]`` and one boolean mask per run selecting one of them ``[K, n_pos]``."""
    mask = position_mask(model, positions, grid_size=model._check_images(clean))
    pos_idx = torch.nonzero(mask).reshape(-1)
    K = pos_idx.numel()
    pos_masks = torch.zeros(K, mask.numel(), dtype=torch.bool)
    pos_masks[torch.arange(K), pos_idx] = True
    return pos_idx, pos_masks


def _base_result(model: Any, clean: Tensor) -> Dict[str, Any]:
    cfg = model.cfg
    return dict(
        n_prefix_tokens=cfg.n_prefix_tokens,
        grid_size=tuple(model._check_images(clean)),
        prefix_token_names=list(cfg.prefix_token_names),
    )


def patch_positions_sweep(
    model: Any,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    hook: str = "resid_pre",
    layers: Union[None, int, Iterable[int]] = None,
    positions: Positions = None,
    memory_mb: float = 512,
    chunk_size: Optional[int] = None,
    progress: bool = True,
    skip_unchanged: bool = True,
) -> PatchingResult:
    """Layer x position sweep: patch one position of one block's activation per run.

    For every layer ``l`` and position ``p``, runs the corrupted images with
    ``blocks.{l}.{hook}[:, p]`` replaced by the clean run's, and records ``metric``.

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        clean, corrupted: two preprocessed batches of the same shape (pairs of images).
        metric: logits ``[..., batch, n_classes]`` -> ``[..., batch]`` (see the module docs).
        hook: a block hook with a position axis: ``"resid_pre"`` (default), ``"resid_mid"``,
            ``"resid_post"``, ``"attn_out"``, ``"mlp_out"``, ``"attn.hook_z"`` (all heads),
            ``"mlp.hook_post"``, ...
        layers: blocks to sweep (default all).
        positions: positions to sweep (default all, prefix tokens included); anything
            :func:`position_mask` accepts.
        memory_mb: memory budget for one chunk of patched runs (the chunk size follows from it;
            on a CPU, chunks are also capped at :data:`CPU_CHUNK_TOKENS` tokens).
        chunk_size: patched runs per forward pass (overrides ``memory_mb`` and the CPU cap).
        progress: show a tqdm bar.
        skip_unchanged: do not run patches that write the value already there (the result is
            the corrupted baseline then, e.g. the [CLS] token of block 0 when both runs share it).

    Returns:
        a :class:`PatchingResult` with dims ``("layer", "pos", "batch")``.
    """
    layers = _layers(model, layers)
    pos_idx, pos_masks = _one_position_per_run(model, positions, clean)
    K = pos_idx.numel()
    groups = [_Group(_full_hook_name(model, hook, l), pos_masks, None, K) for l in layers]
    for g in groups:
        if _layout(g.name) not in ("pos", "pos_head"):
            raise InputError(f"{g.name} has no position axis to sweep; use patch_heads_sweep or another hook")
    vals, cm, km = _run_groups(
        model, clean, corrupted, metric, groups, memory_mb=memory_mb, chunk_size=chunk_size,
        progress=progress, skip_unchanged=skip_unchanged, desc=f"patching {hook}",
    )
    labels = position_labels(model, model._check_images(clean))
    return PatchingResult(
        values=vals.view(len(layers), K, -1),
        dims=("layer", "pos", "batch"),
        coords={"layer": layers, "pos": [labels[int(p)] for p in pos_idx], "batch": list(range(clean.shape[0]))},
        clean=cm,
        corrupted=km,
        hook=_full_hook_name(model, hook, layers[0]).replace(f"blocks.{layers[0]}.", "blocks.{l}.", 1),
        metric=_metric_name(metric),
        positions=pos_idx,
        **_base_result(model, clean),
    )


def patch_heads_sweep(
    model: Any,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    hook: str = "attn.hook_z",
    layers: Union[None, int, Iterable[int]] = None,
    heads: Union[None, Sequence[int]] = None,
    positions: Positions = None,
    memory_mb: float = 512,
    chunk_size: Optional[int] = None,
    progress: bool = True,
    skip_unchanged: bool = True,
) -> PatchingResult:
    """Layer x head sweep: patch one head's output (at ``positions``, default all) per run.

    Args:
        hook: a per-head hook: ``"attn.hook_z"`` (default: the head's output before ``W_O``),
            ``"attn.hook_q"``, ``"attn.hook_k"``, ``"attn.hook_v"``, ``"attn.hook_pattern"``
            (positions are then query positions), ``"attn.hook_result"`` (needs
            ``model.set_use_attn_result(True)``).
        heads: heads to sweep (default all).
        (other arguments as in :func:`patch_positions_sweep`)

    Returns:
        a :class:`PatchingResult` with dims ``("layer", "head", "batch")``.
    """
    layers = _layers(model, layers)
    H = model.cfg.n_heads
    head_idx = torch.arange(H) if heads is None else torch.nonzero(_head_mask(model, heads)).reshape(-1)
    K = head_idx.numel()
    head_masks = torch.zeros(K, H, dtype=torch.bool)
    head_masks[torch.arange(K), head_idx] = True
    grid = model._check_images(clean)
    pm = None if positions is None else position_mask(model, positions, grid_size=grid).expand(K, -1)
    groups = []
    for l in layers:
        name = _full_hook_name(model, hook, l)
        if _layout(name) not in ("pos_head", "head_qk"):
            raise InputError(f"{name} has no head axis; use one of attn.hook_q/k/v/z/result/pattern/attn_scores")
        groups.append(_Group(name, pm, head_masks, K))
    vals, cm, km = _run_groups(
        model, clean, corrupted, metric, groups, memory_mb=memory_mb, chunk_size=chunk_size,
        progress=progress, skip_unchanged=skip_unchanged, desc=f"patching {hook} heads",
    )
    return PatchingResult(
        values=vals.view(len(layers), K, -1),
        dims=("layer", "head", "batch"),
        coords={"layer": layers, "head": head_idx.tolist(), "batch": list(range(clean.shape[0]))},
        clean=cm,
        corrupted=km,
        hook=groups[0].name.replace(f"blocks.{layers[0]}.", "blocks.{l}.", 1),
        metric=_metric_name(metric),
        **_base_result(model, clean),
    )


def patch_block_every(
    model: Any,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    layers: Union[None, int, Iterable[int]] = None,
    positions: Positions = None,
    memory_mb: float = 512,
    chunk_size: Optional[int] = None,
    progress: bool = True,
    skip_unchanged: bool = True,
) -> PatchingResult:
    """Per-component layer x position sweeps (residual stream, attention output, MLP output).

    Returns:
        a :class:`PatchingResult` with dims ``("component", "layer", "pos", "batch")``.
    """
    layers = _layers(model, layers)
    pos_idx, pos_masks = _one_position_per_run(model, positions, clean)
    K = pos_idx.numel()
    groups = [_Group(_full_hook_name(model, c, l), pos_masks, None, K) for c in components for l in layers]
    vals, cm, km = _run_groups(
        model, clean, corrupted, metric, groups, memory_mb=memory_mb, chunk_size=chunk_size,
        progress=progress, skip_unchanged=skip_unchanged, desc="patching components",
    )
    labels = position_labels(model, model._check_images(clean))
    return PatchingResult(
        values=vals.view(len(components), len(layers), K, -1),
        dims=("component", "layer", "pos", "batch"),
        coords={
            "component": list(components),
            "layer": layers,
            "pos": [labels[int(p)] for p in pos_idx],
            "batch": list(range(clean.shape[0])),
        },
        clean=cm,
        corrupted=km,
        hook="blocks.{l}.{component}",
        metric=_metric_name(metric),
        positions=pos_idx,
        **_base_result(model, clean),
    )


def patch_components_sweep(
    model: Any,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    layers: Union[None, int, Iterable[int]] = None,
    positions: Positions = None,
    memory_mb: float = 512,
    chunk_size: Optional[int] = None,
    progress: bool = True,
    skip_unchanged: bool = True,
) -> PatchingResult:
    """Component x layer sweep: patch a whole component (at ``positions``, default all) per run.

    Returns:
        a :class:`PatchingResult` with dims ``("component", "layer", "batch")``.
    """
    layers = _layers(model, layers)
    grid = model._check_images(clean)
    pm = None if positions is None else position_mask(model, positions, grid_size=grid)[None]
    groups = [_Group(_full_hook_name(model, c, l), pm, None, 1) for c in components for l in layers]
    vals, cm, km = _run_groups(
        model, clean, corrupted, metric, groups, memory_mb=memory_mb, chunk_size=chunk_size,
        progress=progress, skip_unchanged=skip_unchanged, desc="patching components",
    )
    return PatchingResult(
        values=vals.view(len(components), len(layers), -1),
        dims=("component", "layer", "batch"),
        coords={"component": list(components), "layer": layers, "batch": list(range(clean.shape[0]))},
        clean=cm,
        corrupted=km,
        hook="blocks.{l}.{component}",
        metric=_metric_name(metric),
        **_base_result(model, clean),
    )
