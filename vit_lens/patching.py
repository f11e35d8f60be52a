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

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from vit_lens.core import (
    Positions,
    grid_of,
    head_mask,
    hook_layer,
    hook_name,
    position_labels,
    position_mask,
    progress_bar,
    resolve_layers,
    resolve_targets,
)
from vit_lens.core.selection import FwdHooks
from vit_lens.core.targets import ClassList

if TYPE_CHECKING:  # pragma: no cover
    from vit_lens.model import HookedViT
from vit_lens.core.errors import InputError, InputTypeError, UnknownNameError

__all__ = [
    "ClassMetric",
    "PatchRuns",
    "PatchingResult",
    "SweepOptions",
    "bind_metric",
    "run_sweep",
    "sweep_options",
    "identifiability_metric",
    "logit_diff_metric",
    "logit_metric",
    "patch_block_every",
    "patch_components_sweep",
    "patch_heads_sweep",
    "patch_neurons_sweep",
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

Classes = Union[int, str, Sequence[Union[int, str]], Tensor]
Metric = Callable[..., Tensor]

_HEAD_POS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_result")
_HEAD_QK = ("attn.hook_attn_scores", "attn.hook_pattern")


# =============================================================================================
# metrics and class identifiability
# =============================================================================================
class ClassMetric:
    """A metric of the logits of target classes: ``logit``, ``logit_diff`` or ``prob``.

    ``classes`` (and ``other``) are anything :func:`vit_lens.core.resolve_targets` accepts but
    ``"pred"``: an index, a class name, a synset id, or one per image. Indices work on any logits;
    names are looked up in the model the metric is bound to: every sweep and
    :func:`run_patched` bind it to their model (``metric.bind(model)`` does it by hand).
    Calling an unbound metric that names classes is an error saying so.
    """

    def __init__(self, kind: Literal["logit", "logit_diff", "prob"], classes: Classes, other: Optional[Classes] = None,
                 model: Optional[HookedViT] = None):
        if kind not in ("logit", "logit_diff", "prob"):
            raise InputError(f"kind must be 'logit', 'logit_diff' or 'prob', got {kind!r}")
        for c in (classes, other):
            if isinstance(c, str) and c.strip().lower() == "pred":
                raise InputError(
                    "a patching metric needs fixed classes; 'pred' would change from run to run. Resolve it once: "
                    "classes = model(clean).argmax(-1)"
                )
        self.kind, self.classes, self.other = kind, classes, other
        self.model = model
        self.__name__ = kind
        self._memo: Dict[Tuple[int, int, str], Tuple[Tensor, Optional[Tensor]]] = {}

    def bind(self, model: HookedViT) -> "ClassMetric":
        """This metric with its class names resolved against ``model``."""
        return ClassMetric(self.kind, self.classes, self.other, model=model)

    def _targets(self, classes: Classes, batch: int, n_classes: int, device: Any) -> Tensor:
        where: Any = self.model if self.model is not None else ClassList(n_classes, name="these logits")  # names and n_classes
        try:
            return resolve_targets(where, classes, batch, device=device)
        except UnknownNameError as e:
            if self.model is None:
                raise UnknownNameError(
                    f"{e} -- this {self.kind} metric is not bound to a model, so class names cannot be looked up: "
                    f"build it with {self.kind}_metric(..., model=model), call metric.bind(model), or pass indices"
                ) from None
            raise

    def __call__(self, logits: Float[Tensor, "... batch n_classes"]) -> Float[Tensor, "... batch"]:
        if logits.ndim < 2:
            raise InputError(f"a metric reads logits [..., batch, n_classes], got shape {tuple(logits.shape)}")
        B, C = logits.shape[-2], logits.shape[-1]
        key = (B, C, str(logits.device))
        if key not in self._memo:
            t = self._targets(self.classes, B, C, logits.device)
            o = None if self.other is None else self._targets(self.other, B, C, logits.device)
            self._memo[key] = (t, o)
        t, o = self._memo[key]
        x = logits.float().softmax(-1) if self.kind == "prob" else logits
        out = x.gather(-1, t.expand(x.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        if o is not None:
            out = out - x.gather(-1, o.expand(x.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return out

    def __repr__(self) -> str:
        other = f", other={self.other!r}" if self.other is not None else ""
        return f"{self.kind}_metric({self.classes!r}{other})"


def logit_metric(classes: Classes, *, model: Optional[HookedViT] = None) -> ClassMetric:
    """Metric: the logit of ``classes`` (an index, a class name, or one per image ``[batch]``)."""
    return ClassMetric("logit", classes, model=model)


def logit_diff_metric(classes: Classes, other: Classes, *, model: Optional[HookedViT] = None) -> ClassMetric:
    """Metric: ``logit[classes] - logit[other]`` (each a class, or one per image)."""
    return ClassMetric("logit_diff", classes, other, model=model)


def prob_metric(classes: Classes, *, model: Optional[HookedViT] = None) -> ClassMetric:
    """Metric: the softmax probability of ``classes`` (a class, or one per image)."""
    return ClassMetric("prob", classes, model=model)


def bind_metric(metric: Metric, model: HookedViT) -> Metric:
    """``metric`` bound to ``model`` (class names resolved there) when it can be bound."""
    if not callable(metric):
        raise InputTypeError(
            f"metric must be a function of the logits [..., batch, n_classes] -> [..., batch] (e.g. "
            f"logit_metric(class)), got {type(metric).__name__}"
        )
    bind = getattr(metric, "bind", None)
    return bind(model) if callable(bind) else metric


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
        model: HookedViT,
        classes: Classes,
        *,
        positions: Positions = "patches",
        layer: int = -1,
        kind: Literal["rate", "score"] = "rate",
    ):
        L = model.cfg.n_layers
        layer = resolve_layers(layer, model)[0]
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

        pos = position_mask(self.model, self.positions, grid_size=grid_of(self.model, activation.shape[-2]))
        pos = pos.to(activation.device)
        proj = self.model.readout.project(activation[..., pos, :])  # [..., batch, k, C]
        c = resolve_targets(self.model, self.classes, proj.shape[-3], device=proj.device)[:, None]  # over the tokens
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


def patching_hooks(
    model: HookedViT,
    hook_names: Union[str, Sequence[str]],
    source: Any = None,
    *,
    value: Literal["source", "zero", "mean", "resample"] = "source",
    positions: Positions = None,
    heads: Union[None, int, Sequence[int], Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> FwdHooks:
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
    heads_sel = head_mask(model, heads)
    hooks: FwdHooks = []
    for name in names:
        hook_name(model, name)
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
                pos = position_mask(model, positions, grid_size=grid_of(model, n_pos)).to(act.device)
            mask = _patch_mask(_layout, pos, None if heads_sel is None else heads_sel.to(act.device), act.ndim)
            if mask is None:
                return new.expand_as(act).clone()
            return torch.where(mask, new, act)

        hooks.append((name, hook))
    return hooks


def run_patched(
    model: "HookedViT",
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
        hook_name(model, mname)

        def grab(x: Tensor, hook: Any = None) -> None:
            act["x"] = x

        hooks = hooks + [(mname, grab)]
    logits = model.run_with_hooks(images, fwd_hooks=hooks)
    if metric is None:
        return logits
    return _call_metric(bind_metric(metric, model), logits, act.get("x"))


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
        method: ``"exact"`` (patched runs) or ``"attribution"`` / ``"attribution_qk"`` (first-order
            estimates, ``values = corrupted + estimated effect``; :mod:`vit_lens.attribution_patching`).
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
    method: str = "exact"

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

    def _positions(self) -> Tensor:
        if self.positions is None:
            raise InputError("this result has no position index (it was not swept over positions)")
        return self.positions

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
        out = torch.full(shape, float("nan"), dtype=v.dtype, device=v.device)
        pos = self._positions().to(v.device)
        keep = pos >= n_pre
        out.index_copy_(i, (pos[keep] - n_pre).long(), v.index_select(i, torch.nonzero(keep).reshape(-1)))
        out = out.reshape(*shape[:i], rows, cols, *shape[i + 1 :])
        dims = self.dims[:i] + ("row", "col") + self.dims[i + 1 :]
        return out, dims

    def prefix(self, normalized: bool = True) -> Tuple[Tensor, List[str]]:
        """The values at the swept prefix positions (along ``"pos"``) and their names."""
        i = self._axis("pos")
        v = self.normalized() if normalized else self.values
        keep = self._positions() < self.n_prefix_tokens
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
class PatchRuns:
    """Patched runs that replace one hook's activation, one boolean selection per run.

    Attributes:
        hook: the full hook name (``"blocks.3.hook_resid_pre"``).
        positions: ``[n_runs, pos]`` bool, the positions each run patches (for attention patterns
            and scores: query positions); ``None``: every position in every run.
        heads: ``[n_runs, n_heads]`` bool, the heads each run patches (per-head hooks only);
            ``None``: every head.
        n_runs: the number of runs (rows of ``positions`` / ``heads``).
        features: ``[n_runs, d]`` bool, the entries of the last axis each run patches, for hooks
            laid out ``[batch, pos, d]`` (e.g. the neurons of ``mlp.hook_post``); ``None``: all.
    """

    hook: str
    positions: Optional[Tensor] = None
    heads: Optional[Tensor] = None
    n_runs: int = 1
    features: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for what, m in (("positions", self.positions), ("heads", self.heads), ("features", self.features)):
            if m is not None and (m.dtype != torch.bool or m.ndim != 2 or m.shape[0] != self.n_runs):
                raise InputError(f"PatchRuns.{what} must be a bool [n_runs={self.n_runs}, ...] tensor, got "
                                 f"{m.dtype} {tuple(m.shape)}")


@dataclass
class SweepOptions:
    """How a sweep runs (not what it computes).

    Attributes:
        memory_mb: memory budget of one chunk of patched runs (the chunk size follows from it; on a
            CPU chunks also hold at most :data:`CPU_CHUNK_TOKENS` tokens).
        chunk_size: patched runs per forward pass (overrides ``memory_mb`` and the CPU cap).
        progress: show a progress bar.
        skip_unchanged: do not run patches that write the value already there (their result is the
            corrupted baseline).
    """

    memory_mb: float = 512
    chunk_size: Optional[int] = None
    progress: bool = True
    skip_unchanged: bool = True

    def __post_init__(self) -> None:
        if not self.memory_mb > 0:
            raise InputError(f"memory_mb must be > 0, got {self.memory_mb}")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise InputError(f"chunk_size must be >= 1 (or None), got {self.chunk_size}")


def sweep_options(options: Optional[SweepOptions] = None, **keywords: Any) -> SweepOptions:
    """Options from an :class:`SweepOptions` and/or the plain keywords (``memory_mb=``,
    ``chunk_size=``, ``progress=``, ``skip_unchanged=``); keywords given (not None) win."""
    base = options or SweepOptions()
    unknown = set(keywords) - {"memory_mb", "chunk_size", "progress", "skip_unchanged"}
    if unknown:
        raise InputTypeError(f"unknown sweep option(s) {sorted(unknown)}; see SweepOptions")
    given = {k: v for k, v in keywords.items() if v is not None}
    return dataclasses.replace(base, **given) if given else base


def _forward_from(model: Any, start: Optional[int], x: Tensor, prune_last: bool = False) -> Tensor:
    """Run the model from block ``start`` on the residual stream ``x`` (or, if ``start`` is None,
    from the images ``x``), firing every hook from there on. Returns the logits.

    With ``prune_last`` (see :func:`_can_prune_last`) the last block updates only the pooled
    prefix tokens (``TransformerBlock(..., n_queries=...)``), which is all the classifier reads.
    """
    if start is None:
        return model(x)
    L = model.cfg.n_layers
    if not (prune_last and start < L and _can_prune_last(model)):
        return model(x, start_at_layer=start)
    x = model(x, start_at_layer=start, stop_at_layer=L - 1)
    x = model.blocks[L - 1](x, n_queries=model.readout.n_pooled_prefix)
    return model(x, start_at_layer=L)


def _can_prune_last(model: Any) -> bool:
    """Whether the last block may update only the pooled tokens: token pooling, pre-norm, and no
    hook anywhere in the last block (but ``hook_resid_pre``) or on the final norm."""
    cfg = model.cfg
    if model.readout.n_pooled_prefix == 0 or cfg.post_norm or cfg.use_attn_result:
        return False
    block = model.blocks[-1]
    for name, hp in block.named_modules():
        if name != "hook_resid_pre" and hasattr(hp, "has_hooks") and hp.has_hooks():
            return False
    ln = model.readout.ln_final
    return not (ln is not None and (ln.hook_scale.has_hooks() or ln.hook_normalized.has_hooks()))


def _bytes_per_run(model: Any, n_pos: int, batch: int, materialised: bool) -> int:
    cfg = model.cfg
    per_token = 3 * cfg.d_mlp + 10 * cfg.d_model + (2 * cfg.n_heads * n_pos if materialised else 0)
    return 4 * batch * n_pos * per_token + 4 * batch * max(cfg.n_classes, 1) * 4


#: Whether exact sweeps reuse, at the patched layer, what the patch leaves unchanged (see
#: :func:`_reuse_plan`). Only benchmarks and tests turn it off, to compare with the full computation.
_REUSE_AT_PATCHED_LAYER = True

_LN1 = ("ln1.hook_scale", "ln1.hook_normalized")


@dataclass
class _Reuse:
    """What the patched block of one group of runs reuses instead of computing it per run.

    ``entry``: ``"rows"`` (the patch writes the clean activation at some positions before the
    attention: queries, keys and values are the clean run's at those positions and the corrupted
    run's elsewhere), ``"qkv"`` (the patch is inside the attention: its queries, keys and values
    are the corrupted run's), ``"scores"`` / ``"pattern"`` / ``"z"`` / ``"result"`` (the patch is
    of that hook: everything before it is the corrupted run's, so each run starts there, from the
    corrupted run's value, the patch hook firing on it) or ``"attn"`` (the patch is after the
    attention: its output is the corrupted run's). ``corrupted`` / ``clean``: ``(q, k, v)``
    ``[batch, pos, head, d_head]``; for ``"scores"`` / ``"pattern"`` the value at that hook
    ``[batch, head, query_pos, key_pos]`` then ``(q, k, v)`` (the values are used); for ``"z"`` /
    ``"result"`` the value at that hook ``([batch, pos, head, d_head or d_model],)``; for ``"attn"``
    the attention output ``(out,)`` ``[batch, pos, d_model]``; of one run (batch ``B``), computed
    once per group by the block's own modules. ``checked``: the hook points of the block the reuse
    bypasses or relies on; a hook there (the metric's) means no reuse.
    """

    entry: str
    layer: int
    corrupted: Tuple[Tensor, ...]
    clean: Optional[Tuple[Tensor, ...]]
    checked: Tuple[Any, ...]


def _reuse_entry(model: Any, name: str, layer: int) -> Optional[str]:
    """Where in block ``layer`` a patch of hook ``name`` first changes anything, as a reuse entry
    (see :class:`_Reuse`), or None where reuse would not be exact (then the block runs in full).

    Pre-norm (``attn(ln1(resid_pre))``): ``hook_resid_pre`` and ``ln1.hook_normalized`` (the
    attention's input) at positions P change the queries, keys and values at P only (the norm and
    the projections act on each position alone) -> ``"rows"``; ``ln1.hook_scale`` gives a value
    neither run had -> None. Post-norm (``ln1(attn(resid_pre))``): ``hook_resid_pre`` -> ``"rows"``,
    ``ln1.*`` come after the attention -> ``"attn"``. Either: ``attn.hook_q/k/v/attn_scores/pattern/
    z/result`` leave the projections unchanged -> ``"qkv"``; ``hook_attn_out`` and everything after
    it (``resid_mid``, ``ln2.*``, ``mlp.*``, ``mlp_out``, ``resid_post``) leave the attention
    unchanged -> ``"attn"``. :func:`_reuse_plan` goes further for ``attn.hook_attn_scores/pattern/z/
    result`` (runs start at the hook itself, :data:`_FROM_HOOK`) where no attention mask is set.
    """
    from vit_lens.components.attention import Attention
    from vit_lens.components.block import TransformerBlock

    block = model.blocks[layer]
    if type(block) is not TransformerBlock or type(block.attn) is not Attention:
        return None  # another block class: its forward is not the one reasoned about here
    prefix = f"blocks.{layer}."
    if not name.startswith(prefix):
        return None
    suffix = name[len(prefix):]
    post = bool(model.cfg.post_norm)
    if suffix == "hook_resid_pre":
        return "rows"
    if suffix in _LN1:
        if post:
            return "attn"
        return "rows" if suffix == "ln1.hook_normalized" else None
    if suffix.startswith("attn.hook_"):
        return "qkv"
    if suffix in ("hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post") or suffix.startswith(("ln2.", "mlp.")):
        return "attn"
    return None


#: patches of these attention hooks start each run at the hook itself (see :class:`_Reuse`)
_FROM_HOOK = {"attn.hook_attn_scores": "scores", "attn.hook_pattern": "pattern", "attn.hook_z": "z",
              "attn.hook_result": "result"}
#: the attention's hook points a run starting at each entry bypasses (and, pre-norm, ln1's)
_BYPASSED = {
    "qkv": (),
    "scores": ("hook_q", "hook_k", "hook_v"),
    "pattern": ("hook_q", "hook_k", "hook_v", "hook_attn_scores"),
    "z": ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern"),
    "result": ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z"),
}


def _hook_points(module: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    return [(f"{prefix}{n}", m) for n, m in module.named_modules() if hasattr(m, "has_hooks")]


def _reuse_plan(model: Any, name: str, layer: Optional[int], x0: Tensor, src: Tensor, tgt: Tensor) -> Optional[_Reuse]:
    """The reuse of a group patching hook ``name`` (clean activation ``src``, corrupted ``tgt``,
    ``[batch, ...]``) from block ``layer``'s input ``x0`` ``[batch, pos, d_model]``; None: no
    reuse (the block runs in full). Called outside the sweep's hooks: any hook already in the
    block (a user's) means no reuse, so the block's own modules compute exactly what one
    unbatched run computes."""
    if not _REUSE_AT_PATCHED_LAYER or layer is None or layer >= model.cfg.n_layers:
        return None
    entry = _reuse_entry(model, name, layer)
    if entry is None:
        return None
    block = model.blocks[layer]
    if any(hp.has_hooks() for _, hp in _hook_points(block)):
        return None
    post = bool(model.cfg.post_norm)
    suffix = name[len(f"blocks.{layer}."):]
    ln1 = [] if post else [hp for n, hp in _hook_points(block.ln1, "ln1.") if n != suffix]
    attn = [hp for _, hp in _hook_points(block.attn)]
    if entry == "attn":
        out = block.attn(x0 if post else block.ln1(x0))
        return _Reuse(entry, layer, (out,), None, tuple(ln1 + attn))
    clean_in: Optional[Tensor]
    if suffix == "ln1.hook_normalized":  # pre-norm: the attention's input itself
        corr_in, clean_in = tgt, src
    else:
        corr_in = x0 if post else block.ln1(x0)
        clean_in = (src if post else block.ln1(src)) if entry == "rows" else None
    corr = _as_one(block.attn.project_qkv(corr_in))
    clean = None if clean_in is None else _as_one(block.attn.project_qkv(clean_in))
    deeper = _FROM_HOOK.get(suffix) if entry == "qkv" and block.attn.attn_mask is None else None
    if deeper is not None:  # the corrupted run's value at the patched hook, as a run hooking it there computes it
        got: Dict[str, Tensor] = {}

        def grab(act: Tensor, hook: Any = None) -> None:
            got["x"] = act

        with model.hooks(fwd_hooks=[(name, grab)]):
            block.attn.forward_qkv(*_split(corr))
        if "x" in got:  # (hook_result fires only with use_attn_result)
            checked = tuple(ln1) + tuple(getattr(block.attn, n) for n in _BYPASSED[deeper])
            kept = (got["x"], *corr) if deeper in ("scores", "pattern") else (got["x"],)
            return _Reuse(deeper, layer, kept, None, checked)
    return _Reuse(entry, layer, corr, clean, tuple(ln1))


def _as_one(qkv: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """``(q, k, v)`` as the fused projection lays them out, ``(qkv [batch, pos, 3, head, d_head],)``,
    when they are views of one such buffer; else as they are. Copies for the runs of a chunk keep the
    layout, so the attention's matmuls see the strides of an unbatched run (the same kernels)."""
    q, k, v = qkv
    if q.ndim == 4 and q.shape == k.shape == v.shape:
        B, N, H, E = q.shape
        fused = (N * 3 * H * E, 3 * H * E, E, 1)  # strides of a view of a contiguous [B, N, 3, H, E] buffer
        same = q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        if same and q.stride() == k.stride() == v.stride() == fused and (
                k.storage_offset() - q.storage_offset() == H * E == v.storage_offset() - k.storage_offset()):
            return (q.as_strided((B, N, 3, H, E), (fused[0], fused[1], H * E, E, 1), q.storage_offset()),)
    return qkv


def _split(qkv: Tuple[Tensor, ...]) -> Tuple[Tensor, Tensor, Tensor]:
    if len(qkv) == 1:
        t = qkv[0]
        return t[:, :, 0], t[:, :, 1], t[:, :, 2]
    q, k, v = qkv
    return q, k, v


@contextlib.contextmanager
def _reusing(model: Any, plan: Optional[_Reuse], n_runs: int, pos: Optional[Tensor]):
    """Within: the patched block of a chunk of ``n_runs`` runs (batch ``n_runs * B``) takes its
    queries / keys / values (or its attention output) from ``plan`` instead of computing them;
    ``pos`` ``[n_runs, pos]`` (``"rows"``): where each run patches (None: everywhere). Enter it
    inside the sweep's hooks: a hook on a checked hook point (the metric's) turns reuse off."""
    attn = None if plan is None else model.blocks[plan.layer].attn
    if (plan is None or attn is None or any(hp.has_hooks() for hp in plan.checked)
            or "forward" in attn.__dict__ or "project_qkv" in attn.__dict__):  # someone else's override: leave it be
        yield
        return
    R = n_runs

    def rep(t: Tensor) -> Tensor:  # [B, ...] -> [R * B, ...], the runs of the chunk in turn
        return t.unsqueeze(0).expand(R, *t.shape).reshape(R * t.shape[0], *t.shape[1:])

    assert plan is not None
    if plan.entry == "attn":
        out = rep(plan.corrupted[0])

        def forward(x: Tensor, n_queries: Optional[int] = None) -> Tensor:
            if x.shape[0] != out.shape[0]:
                raise RuntimeError(f"reused attention output for batch {out.shape[0]}, got {x.shape[0]}")  # pragma: no cover
            return out if n_queries is None else out[:, :n_queries]

        setattr(attn, "forward", forward)  # an instance attribute: shadows the method for this chunk only
    elif plan.entry in _BYPASSED and plan.entry != "qkv":
        at = rep(plan.corrupted[0])  # the corrupted run's value at the patched hook, for every run
        rest = plan.corrupted[1:]  # (qkv,) in the fused layout, or (q, k, v): only the values are used
        values = None if not rest else rep(rest[0])[:, :, 2] if len(rest) == 1 else rep(rest[2])
        step = {"scores": attn.forward_scores, "pattern": attn.forward_pattern, "z": attn.forward_z,
                "result": attn.forward_result}[plan.entry]
        block_attn = attn

        def forward(x: Tensor, n_queries: Optional[int] = None) -> Tensor:
            if n_queries is not None:  # (a pruned block: never the patched one) the full computation
                return type(block_attn).forward(block_attn, x, n_queries)  # pragma: no cover
            if x.shape[0] != at.shape[0]:
                raise RuntimeError(f"reused attention for batch {at.shape[0]}, got {x.shape[0]}")  # pragma: no cover
            return step(at) if values is None else step(at, values)

        setattr(attn, "forward", forward)
    else:
        if plan.entry == "rows":
            assert plan.clean is not None
            qkv = tuple(
                rep(c) if pos is None else torch.where(
                    pos.reshape(R, 1, pos.shape[-1], *([1] * (c.ndim - 2))), c.unsqueeze(0), a.unsqueeze(0)
                ).reshape(R * a.shape[0], *a.shape[1:])
                for c, a in zip(plan.clean, plan.corrupted)
            )
        else:
            qkv = tuple(rep(a) for a in plan.corrupted)
        qkv = _split(qkv)

        def project_qkv(x: Tensor, n_queries: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
            if x.shape[0] != qkv[0].shape[0]:
                raise RuntimeError(f"reused keys and values for batch {qkv[0].shape[0]}, got {x.shape[0]}")  # pragma: no cover
            q, k, v = qkv
            return (q if n_queries is None else q[:, :n_queries]), k, v

        setattr(attn, "project_qkv", project_qkv)
    try:
        yield
    finally:
        attn.__dict__.pop("forward", None)
        attn.__dict__.pop("project_qkv", None)


def run_sweep(
    model: "HookedViT",
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    runs: Sequence[PatchRuns],
    *,
    options: Optional[SweepOptions] = None,
    desc: str = "patching",
    **keywords: Any,
) -> Tuple[Float[Tensor, "n_runs batch"], Float[Tensor, "batch"], Float[Tensor, "batch"]]:
    """The generic sweep engine: make every patched run of ``runs`` (clean activations into the
    corrupted run) and measure ``metric``.

    Many runs share one forward pass (the corrupted input repeated along the batch axis, one
    hook writing a different patch into every row); each run starts at the patched layer from
    the corrupted run's cached residual stream; runs that would not change anything are not run
    (``skip_unchanged``); chunks fit ``memory_mb``. The position / head / component / block sweeps
    below are thin wrappers that build their ``runs`` and label the axes.

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        clean, corrupted: two preprocessed batches of the same shape (pairs of images).
        metric: logits ``[..., batch, n_classes]`` -> ``[..., batch]`` (bound to ``model``, so
            class names resolve there).
        runs: the runs to make, :class:`PatchRuns` per hook.
        options: a :class:`SweepOptions`; or the plain keywords ``memory_mb=``, ``chunk_size=``,
            ``progress=``, ``skip_unchanged=``.
        desc: the progress bar's label.

    Returns:
        ``(values [total runs, batch], clean metric [batch], corrupted metric [batch])``, runs in
        the order of ``runs`` (rows of each in turn).
    """
    opts = sweep_options(options, **keywords)
    memory_mb, chunk_size, progress, skip_unchanged = opts.memory_mb, opts.chunk_size, opts.progress, opts.skip_unchanged
    groups = list(runs)
    if not groups or not all(isinstance(g, PatchRuns) for g in groups):
        raise InputError("runs must be a non-empty list of PatchRuns (hook, positions, heads, n_runs)")
    for images, what in ((clean, "clean"), (corrupted, "corrupted")):
        if not isinstance(images, Tensor):
            raise InputTypeError(f"{what} must be a preprocessed batch (model.preprocess(...)), got {type(images).__name__}")
        model._check_images(images)
    if clean.shape != corrupted.shape:
        raise InputError(
            f"clean and corrupted batches must have the same shape (pairs of images), got "
            f"{tuple(clean.shape)} and {tuple(corrupted.shape)}"
        )
    for g in groups:
        hook_name(model, g.hook)
    metric = bind_metric(metric, model)
    L = model.cfg.n_layers
    mname = getattr(metric, "hook_name", None)
    if mname is not None:
        hook_name(model, mname)
    patch_names = sorted({g.hook for g in groups})
    starts = {g.hook: hook_layer(model, g.hook) for g in groups}
    start_names = set()
    for s in starts.values():
        if s is not None:
            start_names.add(f"blocks.{s}.hook_resid_pre" if s < L else f"blocks.{L - 1}.hook_resid_post")
    # A hook on a pattern or scores materialises that layer's attention, which rounds differently from
    # the fused kernel: caching them in the baselines would start every later layer's runs from a
    # residual stream no single patched run computes. They are computed block by block instead, and a
    # metric reading one (its hook is in every patched run, not in the run the clean activations come
    # from) gets a clean run of its own.
    alone = {n for n in patch_names if _layout(n) == "head_qk"}
    names_src = (set(patch_names) - alone) | {_block_input(model, n) for n in alone}
    names_m = {mname} if mname else set()
    names_corr = names_src | names_m | start_names
    own_run = mname is not None and _layout(mname) == "head_qk"

    with torch.inference_mode():
        clean_logits, clean_run = model.run_with_cache(clean, names_filter=sorted(names_m if own_run else names_src | names_m))
        if own_run:
            _, clean_run_src = model.run_with_cache(clean, names_filter=sorted(names_src), return_type=None)
        else:
            clean_run_src = clean_run
        corr_logits, corr_run = model.run_with_cache(corrupted, names_filter=sorted(names_corr))
        clean_cache = {n: clean_run_src[n] for n in names_src}
        corr_cache = {n: corr_run[n] for n in names_corr}
        for n in sorted(alone):
            clean_cache[n] = _in_its_block_alone(model, n, clean_cache[_block_input(model, n)])
            if n != mname:
                corr_cache[n] = _in_its_block_alone(model, n, corr_cache[_block_input(model, n)])
        clean_m = _call_metric(metric, clean_logits, clean_run[mname] if mname else None)
        corr_m = _call_metric(metric, corr_logits, corr_cache[mname] if mname else None)

        B = corrupted.shape[0]
        total = sum(g.n_runs for g in groups)
        bar = progress_bar(total=total, progress=progress, desc=desc, unit="run", leave=True)
        results = []
        for g in groups:
            start = starts[g.hook]
            src = clean_cache[g.hook]
            tgt = corr_cache[g.hook]
            layout = _layout(g.hook)
            if g.features is not None and (layout != "pos" or src.ndim != 3 or g.features.shape[1] != src.shape[-1]):
                raise InputError(f"PatchRuns.features selects entries of the last axis of a [batch, pos, d] hook; {g.hook} "
                                 f"is {tuple(src.shape)} ({g.features.shape[1]} features given)")
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
            plan = _reuse_plan(model, g.hook, start, corr_cache[f"blocks.{start}.hook_resid_pre"], src, tgt) if (
                idx_todo.numel() and start is not None and start < L) else None
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
                pos = None if g.positions is None else g.positions[ridx].to(src.device)
                heads = None if g.heads is None else g.heads[ridx].to(src.device)
                mask = _patch_mask(layout, pos, heads, src.ndim)  # [r, 1, ...]
                if g.features is not None:
                    fm = g.features[ridx].to(src.device).reshape(r, 1, 1, -1)  # [r, 1, 1, d]
                    mask = fm if mask is None else mask & fm
                captured: Dict[str, Tensor] = {}

                def patch_hook(act: Tensor, hook: Any = None, *, _mask=mask, _r=r) -> Tensor:
                    a = act.view(_r, B, *act.shape[1:])
                    if _mask is None:
                        out = src.unsqueeze(0).expand_as(a)
                    else:
                        out = torch.where(_mask, src.unsqueeze(0), a)
                    return out.reshape(act.shape)

                hooks: FwdHooks = [(g.hook, patch_hook)]
                m_layer = None if mname is None else hook_layer(model, mname)
                if mname is not None and (start is None or (m_layer is not None and m_layer >= start)):

                    def grab(act: Tensor, hook: Any = None) -> None:
                        captured["x"] = act

                    hooks.append((mname, grab))
                x = x0.unsqueeze(0).expand(r, *x0.shape).reshape(r * B, *x0.shape[1:])
                with model.hooks(fwd_hooks=hooks), _reusing(model, plan, r, pos):
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


def _block_input(model: Any, name: str) -> str:
    return f"blocks.{hook_layer(model, name)}.hook_resid_pre"


def _in_its_block_alone(model: Any, name: str, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
    """The activation of block hook ``name`` when its block runs on its cached input ``x`` with a hook
    there only: what a full forward hooking only ``name`` computes (the same block on the same input),
    while every other block of the baseline run kept the fused attention."""
    layer = hook_layer(model, name)
    if layer is None or layer >= model.cfg.n_layers:
        raise InputError(f"{name} is not a hook inside a block")  # pragma: no cover (only patterns and scores come here)
    got: Dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any = None) -> None:
        got["x"] = act

    with model.hooks(fwd_hooks=[(name, grab)]):
        model(x, start_at_layer=layer, stop_at_layer=layer + 1)
    return got["x"]


def _runs_that_change(layout: str, diff: Tensor, g: PatchRuns) -> Tensor:
    """Runs of ``g`` whose patched region holds an activation that differs between the runs."""
    B = diff.shape[0]
    if layout == "none":
        return torch.full((g.n_runs,), bool(diff.any()))
    if layout == "pos" and g.features is not None:  # [B, P, d]: as a position x feature selection
        ph = diff.any(0)  # [P, d]
        pos = g.positions if g.positions is not None else torch.ones(g.n_runs, ph.shape[0], dtype=torch.bool)
        sel = pos.to(ph.device)[:, :, None] & g.features.to(ph.device)[:, None, :]  # [R, P, d]
        return (sel & ph[None]).flatten(1).any(-1).cpu()
    if layout == "pos":
        d = diff.reshape(B, diff.shape[1], -1).any(-1).any(0)  # [P]
        pos = g.positions if g.positions is not None else torch.ones(g.n_runs, d.shape[0], dtype=torch.bool)
        return (pos.to(d.device) & d[None]).any(-1).cpu()
    if layout == "pos_head":
        ph = diff.any(-1).any(0)  # [P, H]
    else:  # head_qk [B, H, Pq, Pk] -> [Pq, H]
        ph = diff.any(-1).any(0).transpose(0, 1)
    P, H = ph.shape
    pos = g.positions if g.positions is not None else torch.ones(g.n_runs, P, dtype=torch.bool)
    heads = g.heads if g.heads is not None else torch.ones(g.n_runs, H, dtype=torch.bool)
    sel = pos.to(ph.device)[:, :, None] & heads.to(ph.device)[:, None, :]  # [R, P, H]
    return (sel & ph[None]).flatten(1).any(-1).cpu()


def _one_position_per_run(model: Any, positions: Positions, clean: Tensor) -> Tuple[Tensor, Tensor]:
    """The swept positions ``[K]`` and one boolean mask per run selecting one of them ``[K, n_pos]``."""
    mask = position_mask(model, positions, grid_size=grid_of(model, clean))
    pos_idx = torch.nonzero(mask).reshape(-1)
    K = pos_idx.numel()
    pos_masks = torch.zeros(K, mask.numel(), dtype=torch.bool)
    pos_masks[torch.arange(K), pos_idx] = True
    return pos_idx, pos_masks


def _base_result(model: Any, clean: Tensor) -> Dict[str, Any]:
    cfg = model.cfg
    return dict(
        n_prefix_tokens=cfg.n_prefix_tokens,
        grid_size=tuple(grid_of(model, clean)),
        prefix_token_names=list(cfg.prefix_token_names),
    )


def patch_positions_sweep(
    model: HookedViT,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    hook: str = "resid_pre",
    layers: Union[None, int, Iterable[int]] = None,
    positions: Positions = None,
    options: Optional[SweepOptions] = None,
    method: str = "exact",
    **sweep: Any,
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
        options: a :class:`SweepOptions` (memory budget, chunk size, progress bar, skipping
            unchanged runs); the plain keywords ``memory_mb=``, ``chunk_size=``, ``progress=``,
            ``skip_unchanged=`` are accepted too (see :class:`SweepOptions`: e.g. ``skip_unchanged``
            does not run patches that write the value already there, such as the [CLS] token of
            block 0 when both runs share it; their result is the corrupted baseline).
        method: ``"exact"`` (default: patched runs), ``"attribution"`` (first-order estimate of
            every run from one backward pass; also ``ig_steps=k``) or ``"attribution_qk"`` (with
            AtP*'s QK fix for query / key / score patches); see
            :mod:`vit_lens.attribution_patching`. The same result type either way.

    Returns:
        a :class:`PatchingResult` with dims ``("layer", "pos", "batch")``.
    """
    layers = resolve_layers(layers, model)
    pos_idx, pos_masks = _one_position_per_run(model, positions, clean)
    K = pos_idx.numel()
    groups = [PatchRuns(hook_name(model, hook, l), pos_masks, None, K) for l in layers]
    for g in groups:
        if _layout(g.hook) not in ("pos", "pos_head"):
            raise InputError(f"{g.hook} has no position axis to sweep; use patch_heads_sweep or another hook")
    vals, cm, km = _sweep_by(method, model, clean, corrupted, metric, groups, options=options, desc=f"patching {hook}", **sweep)
    labels = position_labels(model, grid_of(model, clean))
    return PatchingResult(
        values=vals.view(len(layers), K, -1),
        dims=("layer", "pos", "batch"),
        coords={"layer": layers, "pos": [labels[int(p)] for p in pos_idx], "batch": list(range(clean.shape[0]))},
        clean=cm,
        corrupted=km,
        hook=hook_name(model, hook, layers[0]).replace(f"blocks.{layers[0]}.", "blocks.{l}.", 1),
        metric=_metric_name(metric),
        method=method,
        positions=pos_idx,
        **_base_result(model, clean),
    )


def patch_heads_sweep(
    model: HookedViT,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    hook: str = "attn.hook_z",
    layers: Union[None, int, Iterable[int]] = None,
    heads: Union[None, Sequence[int]] = None,
    positions: Positions = None,
    options: Optional[SweepOptions] = None,
    method: str = "exact",
    **sweep: Any,
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
    layers = resolve_layers(layers, model)
    H = model.cfg.n_heads
    hm = head_mask(model, heads)
    head_idx = torch.arange(H) if hm is None else torch.nonzero(hm).reshape(-1)
    K = head_idx.numel()
    head_masks = torch.zeros(K, H, dtype=torch.bool)
    head_masks[torch.arange(K), head_idx] = True
    grid = grid_of(model, clean)
    pm = None if positions is None else position_mask(model, positions, grid_size=grid).expand(K, -1)
    groups = []
    for l in layers:
        name = hook_name(model, hook, l)
        if _layout(name) not in ("pos_head", "head_qk"):
            raise InputError(f"{name} has no head axis; use one of attn.hook_q/k/v/z/result/pattern/attn_scores")
        groups.append(PatchRuns(name, pm, head_masks, K))
    vals, cm, km = _sweep_by(method, model, clean, corrupted, metric, groups, options=options, desc=f"patching {hook} heads", **sweep)
    return PatchingResult(
        values=vals.view(len(layers), K, -1),
        dims=("layer", "head", "batch"),
        coords={"layer": layers, "head": head_idx.tolist(), "batch": list(range(clean.shape[0]))},
        clean=cm,
        corrupted=km,
        hook=groups[0].hook.replace(f"blocks.{layers[0]}.", "blocks.{l}.", 1),
        metric=_metric_name(metric),
        method=method,
        **_base_result(model, clean),
    )


def patch_block_every(
    model: HookedViT,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    layers: Union[None, int, Iterable[int]] = None,
    positions: Positions = None,
    options: Optional[SweepOptions] = None,
    method: str = "exact",
    **sweep: Any,
) -> PatchingResult:
    """Per-component layer x position sweeps (residual stream, attention output, MLP output).

    Returns:
        a :class:`PatchingResult` with dims ``("component", "layer", "pos", "batch")``.
    """
    layers = resolve_layers(layers, model)
    pos_idx, pos_masks = _one_position_per_run(model, positions, clean)
    K = pos_idx.numel()
    groups = [PatchRuns(hook_name(model, c, l), pos_masks, None, K) for c in components for l in layers]
    vals, cm, km = _sweep_by(method, model, clean, corrupted, metric, groups, options=options, desc="patching components", **sweep)
    labels = position_labels(model, grid_of(model, clean))
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
        method=method,
        positions=pos_idx,
        **_base_result(model, clean),
    )


def patch_components_sweep(
    model: HookedViT,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    layers: Union[None, int, Iterable[int]] = None,
    positions: Positions = None,
    options: Optional[SweepOptions] = None,
    method: str = "exact",
    **sweep: Any,
) -> PatchingResult:
    """Component x layer sweep: patch a whole component (at ``positions``, default all) per run.

    Returns:
        a :class:`PatchingResult` with dims ``("component", "layer", "batch")``.
    """
    layers = resolve_layers(layers, model)
    grid = grid_of(model, clean)
    pm = None if positions is None else position_mask(model, positions, grid_size=grid)[None]
    groups = [PatchRuns(hook_name(model, c, l), pm, None, 1) for c in components for l in layers]
    vals, cm, km = _sweep_by(method, model, clean, corrupted, metric, groups, options=options, desc="patching components", **sweep)
    return PatchingResult(
        values=vals.view(len(components), len(layers), -1),
        dims=("component", "layer", "batch"),
        coords={"component": list(components), "layer": layers, "batch": list(range(clean.shape[0]))},
        clean=cm,
        corrupted=km,
        hook="blocks.{l}.{component}",
        metric=_metric_name(metric),
        method=method,
        **_base_result(model, clean),
    )


# =============================================================================================
# attribution patching (vit_lens.attribution_patching) and the neuron sweep
# =============================================================================================
def hook_layout(name: str) -> str:
    """How a hook's activation is laid out: ``"pos"`` ``[B, P, ...]``, ``"pos_head"`` ``[B, P, H, E]``,
    ``"head_qk"`` ``[B, H, Pq, Pk]`` or ``"none"`` ``[B, D]``."""
    return _layout(name)


def call_metric(metric: Metric, logits: Tensor, activation: Optional[Tensor]) -> Tensor:
    """``metric(logits)`` (or ``metric(logits, activation)`` for a metric with a ``hook_name``),
    checked to give one value per image ``[..., batch]``."""
    return _call_metric(metric, logits, activation)


def _sweep_by(method: str, model: Any, clean: Tensor, corrupted: Tensor, metric: Metric, groups: List[PatchRuns],
              *, options: Optional[SweepOptions], desc: str, **sweep: Any):
    from vit_lens.attribution_patching import attribution_sweep, resolve_method

    if resolve_method(method) == "exact":
        if "ig_steps" in sweep:
            raise InputError("ig_steps= goes with method='attribution' (integrated-gradient steps); exact sweeps have none")
        return run_sweep(model, clean, corrupted, metric, groups, options=options, desc=desc, **sweep)
    return attribution_sweep(model, clean, corrupted, metric, groups, method=method, options=options, desc=desc, **sweep)


def patch_neurons_sweep(
    model: HookedViT,
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    *,
    layers: Union[None, int, Iterable[int]] = None,
    neurons: Union[None, int, Sequence[int], Tensor] = None,
    positions: Positions = None,
    options: Optional[SweepOptions] = None,
    method: str = "exact",
    **sweep: Any,
) -> PatchingResult:
    """Layer x neuron sweep: patch one neuron of ``blocks.{l}.mlp.hook_post`` (at ``positions``,
    default every position) per run.

    Args:
        layers: blocks to sweep (default all).
        neurons: neuron indices to sweep (default all ``d_mlp``; a sample keeps an exact sweep short).
        method: ``"exact"`` (batched patched runs), ``"attribution"`` (every neuron of every layer
            from one backward pass; ``ig_steps=k`` too) or ``"attribution_qk"`` (the same here).
        (other arguments as in :func:`patch_positions_sweep`)

    Returns:
        a :class:`PatchingResult` with dims ``("layer", "neuron", "batch")``.
    """
    from vit_lens.attribution_patching import NeuronRuns, exact_neuron_sweep, neuron_attribution_sweep, resolve_method

    method = resolve_method(method)
    layers = resolve_layers(layers, model)
    N = model.cfg.d_mlp
    if neurons is None:
        idx = torch.arange(N)
    else:
        idx = torch.as_tensor(neurons).reshape(-1)
        if idx.is_floating_point() or idx.dtype == torch.bool or idx.numel() == 0:
            raise InputError(f"neurons must be integer indices in 0..{N - 1}, got {neurons!r}")
        if bool(((idx < -N) | (idx >= N)).any()):
            from vit_lens.core.errors import OutOfRangeError

            raise OutOfRangeError(f"neuron indices must be in 0..{N - 1} (d_mlp = {N}), got {idx.tolist()}")
        idx = idx % N
    pm = None if positions is None else position_mask(model, positions, grid_size=grid_of(model, clean))
    runs = [NeuronRuns(l, idx, pm) for l in layers]
    for r in runs:
        hook_name(model, r.hook)
    if method == "exact":
        if "ig_steps" in sweep:
            raise InputError("ig_steps= goes with method='attribution' (integrated-gradient steps); exact sweeps have none")
        vals, cm, km = exact_neuron_sweep(model, clean, corrupted, metric, runs, options=options, **sweep)
    else:
        vals, cm, km = neuron_attribution_sweep(model, clean, corrupted, metric, runs, method=method, options=options,
                                                **sweep)
    return PatchingResult(
        values=vals.view(len(layers), idx.numel(), -1),
        dims=("layer", "neuron", "batch"),
        coords={"layer": layers, "neuron": idx.tolist(), "batch": list(range(clean.shape[0]))},
        clean=cm,
        corrupted=km,
        hook="blocks.{l}.mlp.hook_post",
        metric=_metric_name(metric),
        method=method,
        **_base_result(model, clean),
    )
