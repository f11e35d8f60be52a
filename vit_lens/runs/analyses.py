"""The analyses a dataset run can make: each one function from (model, batch, targets) to tidy rows.

An analysis is registered with :func:`register` and receives a :class:`RunBatch` (preprocessed
images, their targets, and what the analysis asked the data source for: a corruption partner, a
segmentation) plus its options; it returns a :class:`pandas.DataFrame` in long form with the
columns of :data:`ROW_COLUMNS` it uses (``image`` is the position in the batch; the engine adds
the image id, path and label). Every analysis calls the library's public functions
(:func:`vit_lens.identify`, :func:`vit_lens.class_space.logit_lens`, :func:`vit_lens.attribution.dla`,
:func:`vit_lens.ablation.attention_knockout`, :func:`vit_lens.ablation.context_comparison`, the
patching sweeps); none re-implements them.

Row measures (``measure`` column):

* ``identifiability``: per image, layer and token group (``CLS`` / other prefix tokens, ``image``,
  ``readout``): ``mean_r`` (mean of ``1 - rank / n_classes`` over the group's tokens),
  ``top1_rate`` (share of the group's tokens whose top-1 class is the target), ``has_top1``
  (1 when at least one token of the group is top-1).
* ``logit-lens``: per image and layer, for [CLS]: ``class`` and ``logit`` of the top-k classes
  (``index`` = rank 0..k-1) and ``target_rank``.
* ``dla``: per image, ``dla`` of every component / head (``group`` its name, ``layer`` / ``index``
  where it has them) and the model's ``logit`` of the target; the parts sum to the logit.
* ``knockout``: the ``identifiability`` measures at every layer with attention edges knocked out in
  all layers (``condition`` ``"<edges>:<mode>"``, and ``"none"``).
* ``context-ablation``: ``identifiable_rate``, ``mean_r``, ``n_tokens`` per image, layer, token set
  (``group`` ``class`` / ``context``) and ``condition`` ``with`` / ``without`` (the other set).
* ``patching``: ``value`` and ``normalized`` (0 = corrupted, 1 = clean) of the metric (the target's
  logit) per image, layer and position (``group`` ``pos``, ``index`` the sequence position) or head
  (``group`` ``head``), plus ``clean`` / ``corrupted`` baselines (``group`` ``baseline``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from vit_lens.core.errors import InputError, UnknownNameError

__all__ = ["ROW_COLUMNS", "RunBatch", "Analysis", "ANALYSES", "register", "get_analysis", "corrupt_images"]

#: the columns of a result shard, in order (``layer`` and ``index`` are nullable integers)
ROW_COLUMNS = ("image", "path", "label", "target", "layer", "group", "index", "condition", "measure", "value")


@dataclass
class RunBatch:
    """What an analysis gets for one batch.

    Attributes:
        images: preprocessed images ``[batch, chans, H, W]`` on the model's device.
        targets: ``[batch]`` the target class of each image (its label, or the model's top-1). An
            analysis registered with ``own_pred=True`` gets None for ``--target pred`` and sets it
            from its own forward pass (saving a forward).
        ids: the image ids (positions in the data source).
        pair: ``[batch, chans, H, W]`` each image's corruption partner (``patching`` with
            ``corruption="other"``), else None.
        segmentation: per image an ``[H, W]`` integer array of class ids (R + 256 G), else None.
    """

    images: Tensor
    targets: Optional[Tensor]
    ids: List[int]
    pair: Optional[Tensor] = None
    segmentation: Optional[List[Tensor]] = None


@dataclass
class Analysis:
    """A registered analysis: ``fn(model, batch, **options) -> DataFrame``; ``options`` its option
    names with defaults; ``needs`` what the data source must deliver (``"pair"``, ``"segmentation"``)
    as a function of the options."""

    name: str
    fn: Callable[..., Any]
    options: Dict[str, Any]
    doc: str = ""
    needs: Callable[[Dict[str, Any]], Tuple[str, ...]] = field(default=lambda opts: ())
    own_pred: bool = False


ANALYSES: Dict[str, Analysis] = {}


def register(name: str, options: Optional[Dict[str, Any]] = None, *, doc: str = "",
             needs: Optional[Callable[[Dict[str, Any]], Tuple[str, ...]]] = None, own_pred: bool = False) -> Callable:
    """Decorator: add ``fn(model, batch, **options)`` to the registry under ``name``."""

    def deco(fn: Callable) -> Callable:
        ANALYSES[name] = Analysis(name, fn, dict(options or {}), doc or (fn.__doc__ or "").strip().split("\n")[0],
                                  needs or (lambda opts: ()), own_pred)
        return fn

    return deco


def get_analysis(name: str) -> Analysis:
    """The registered analysis ``name`` (an :class:`UnknownNameError` lists the others)."""
    if name not in ANALYSES:
        raise UnknownNameError(f"unknown analysis {name!r}; choose one of {sorted(ANALYSES)}")
    return ANALYSES[name]


def _frame(**cols: Any):
    import pandas as pd

    return pd.DataFrame(cols)


def _group_rows(res: Any, condition: Optional[str] = None):
    """Per-image rows of an :class:`~vit_lens.class_space.IdentifiabilityResult`: every layer x token
    group x (mean_r, top1_rate, has_top1), from its ``r``, ``top1`` and ``mask``."""
    import pandas as pd

    r, top1 = res.r.cpu(), res.top1.cpu()  # [layer, batch, pos]
    L, B, P = r.shape
    groups: List[Tuple[str, Any]] = [(n, [i]) for i, n in enumerate(res.prefix_token_names)]
    if P > res.n_prefix_tokens:
        groups.append(("image", "image"))
    frames = []
    layers = np.asarray(res.layers, dtype=np.int64)
    for name, pos in groups:
        m = res.mask(pos).cpu()  # [batch, pos]
        n = m.sum(-1).clamp_min(1).to(r.dtype)  # [batch]
        stats = {
            "mean_r": (r * m).sum(-1) / n,
            "top1_rate": (top1 & m).sum(-1).to(r.dtype) / n,
            "has_top1": (top1 & m).any(-1).to(r.dtype),
        }
        for measure, v in stats.items():  # v [layer, batch]
            frames.append(_frame(image=np.tile(np.arange(B), L), layer=np.repeat(layers, B), group=name,
                                 measure=measure, value=v.double().numpy().reshape(-1)))
    if res.readout_rank is not None:
        rr = res.readout_rank.cpu()
        for measure, v in (("mean_r", 1.0 - rr.double() / res.n_classes), ("top1_rate", (rr == 0).double()),
                           ("has_top1", (rr == 0).double())):
            frames.append(_frame(image=np.tile(np.arange(B), L), layer=np.repeat(layers, B), group="readout",
                                 measure=measure, value=v.numpy().reshape(-1)))
    df = pd.concat(frames, ignore_index=True)
    if condition is not None:
        df["condition"] = condition
    return df


def _check_mode(mode: str) -> Any:
    """``mode`` checked (typed for the projection functions)."""
    if mode not in ("paper", "dla"):
        raise InputError(f"--mode must be 'paper' or 'dla', got {mode!r}")
    return mode


def _targets(batch: "RunBatch") -> Tensor:
    if batch.targets is None:
        raise InputError("this analysis needs the targets resolved before it runs (register it without own_pred)")
    return batch.targets


@register("identifiability", dict(mode="paper"), own_pred=True)
def identifiability_rows(model: Any, batch: RunBatch, *, mode: str = "paper"):
    """Class identifiability of the target per image, block and token group (vit_lens.identify)."""
    from vit_lens.class_space import identify

    mode_: Any = _check_mode(mode)
    target: Any = "pred" if batch.targets is None else batch.targets
    res, _ = identify(model, batch.images, target, mode=mode_, batch_size=len(batch.ids), progress=False)
    batch.targets = res.target
    return _group_rows(res)


@register("logit-lens", dict(mode="paper", top_k=5))
def logit_lens_rows(model: Any, batch: RunBatch, *, mode: str = "paper", top_k: int = 5):
    """Top-k classes of the [CLS] token at every block (class_space.logit_lens) and the target's rank."""
    import pandas as pd

    from vit_lens.class_space import class_rank, logit_lens
    from vit_lens.core import hook_names

    mode_: Any = _check_mode(mode)
    cfg = model.cfg
    if not cfg.has_class_token:
        raise InputError(f"logit-lens reads the [CLS] token and {cfg.model_name} has none; use identifiability")
    k = int(top_k)
    if not 1 <= k <= cfg.n_classes:
        raise InputError(f"--top-k must be in 1..{cfg.n_classes}, got {top_k}")
    names = hook_names(model, "resid_post")
    if mode == "dla" and model.ln_final is not None:
        names.append("ln_final.hook_scale")
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.images, names_filter=names)
        ll = logit_lens(model, cache, mode=mode_, positions=[0])[:, :, 0]  # [layer, batch, n_classes]
        top = ll.topk(k, dim=-1)
        rank = class_rank(ll, _targets(batch).to(ll.device)[None, :]).cpu()  # [layer, batch]
    L, B = ll.shape[:2]
    lay = np.arange(cfg.n_layers, dtype=np.int64)[:L]
    out = []
    for measure, v in (("class", top.indices), ("logit", top.values)):
        out.append(_frame(image=np.tile(np.repeat(np.arange(B), k), L), layer=np.repeat(lay, B * k), group="CLS",
                          index=np.tile(np.arange(k), L * B), measure=measure,
                          value=v.detach().double().cpu().numpy().reshape(-1)))
    out.append(_frame(image=np.tile(np.arange(B), L), layer=np.repeat(lay, B), group="CLS", measure="target_rank",
                      value=rank.double().numpy().reshape(-1)))
    return pd.concat(out, ignore_index=True)


@register("dla", dict(by="component"))
def dla_rows(model: Any, batch: RunBatch, *, by: str = "component"):
    """Direct logit attribution of the target logit per component / head / layer (attribution.dla)."""
    import pandas as pd

    from vit_lens.attribution import dla, dla_hooks

    if by not in ("component", "layer", "head", "neuron"):
        raise InputError(f"--by must be one of component, layer, head, neuron; got {by!r}")
    by_: Any = by
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.images, names_filter=dla_hooks(model, by_))
        res = dla(model, cache, _targets(batch), by=by_)
    df = res.to_frame(include_rest=True)
    out = _frame(image=df["image"].to_numpy(), group=df["component"].astype(str).to_numpy(), measure="dla",
                 value=df["value"].astype(float).to_numpy())
    if "layer" in df:
        out["layer"] = pd.array(df["layer"].to_numpy(), dtype="Int64")
    for col in ("head", "neuron"):
        if col in df:
            out["index"] = pd.array(df[col].to_numpy(), dtype="Int64")
    logit = _frame(image=np.arange(len(batch.ids)), group="logit", measure="logit",
                   value=res.logit.detach().double().cpu().numpy())
    return pd.concat([out, logit], ignore_index=True)


@register("knockout", dict(edges=("self_only", "no_cls"), modes=("mask", "paper"), mode="paper"))
def knockout_rows(model: Any, batch: RunBatch, *, edges: Sequence[str] = ("self_only", "no_cls"),
                  modes: Sequence[str] = ("mask", "paper"), mode: str = "paper"):
    """Identifiability at every block with attention edges knocked out in all layers (ablation.attention_knockout),
    for every edge set x knockout mode, and without knockout (condition 'none')."""
    import pandas as pd

    from vit_lens.ablation import attention_knockout
    from vit_lens.class_space import identifiability
    from vit_lens.core import hook_names

    mode_: Any = _check_mode(mode)
    names = hook_names(model, "resid_post")
    if mode == "dla" and model.ln_final is not None:
        names.append("ln_final.hook_scale")
    frames = []
    conditions: List[Tuple[str, Optional[str], Optional[str]]] = [("none", None, None)]
    conditions += [(f"{e}:{m}", e, m) for e in edges for m in modes]
    for cond, e, m in conditions:
        with torch.no_grad():
            if e is None:
                _, cache = model.run_with_cache(batch.images, names_filter=names)
            else:
                with attention_knockout(model, e, mode=m):  # type: ignore[arg-type]
                    _, cache = model.run_with_cache(batch.images, names_filter=names)
            res = identifiability(model, cache, _targets(batch), mode=mode_)
        frames.append(_group_rows(res, condition=cond))
    return pd.concat(frames, ignore_index=True)


#: ImageNet-S segmentation ids that mark no object (0 = background, 1000 = ignored)
SEGMENTATION_NO_OBJECT = (0, 1000)


def _context_needs(opts: Dict[str, Any]) -> Tuple[str, ...]:
    return ("segmentation",) if opts.get("segmentations") else ()


@register("context-ablation", dict(box=None, segmentations=None, context_method="remove"), needs=_context_needs)
def context_rows(model: Any, batch: RunBatch, *, box: Optional[Sequence[float]] = None,
                 segmentations: Optional[str] = None, context_method: str = "remove"):
    """Identifiability of class vs context tokens with and without the other set (ablation.context_comparison);
    the class tokens are a --box (model input pixels) or each image's segmentation (ids R + 256 G; 0 and 1000
    are no object)."""
    import pandas as pd

    from vit_lens.ablation import context_comparison, grid_mask_from_box, grid_mask_from_segmentation

    if (box is None) == (segmentations is None):
        raise InputError("context-ablation needs exactly one of --box X0 Y0 X1 Y1 (model input pixels) or "
                         "--segmentations FOLDER (PNGs parallel to the images)")
    B = len(batch.ids)
    if box is not None:
        masks = grid_mask_from_box(list(box), model)[None].expand(B, -1, -1)
    else:
        assert batch.segmentation is not None
        grids = []
        for seg in batch.segmentation:
            ids = seg.clone()
            for v in SEGMENTATION_NO_OBJECT:
                ids[ids == v] = 0
            grids.append(grid_mask_from_segmentation(ids, model))
        masks = torch.stack(grids)
    df = context_comparison(model, batch.images, _targets(batch), masks, method=context_method,  # type: ignore[arg-type]
                            progress=False)
    if df.empty:
        return _frame(image=np.zeros(0, dtype=np.int64), measure=np.zeros(0, dtype=object), value=np.zeros(0))
    long = df.melt(id_vars=["image", "tokens", "context", "layer"], value_vars=["identifiable_rate", "mean_r", "n_tokens"],
                   var_name="measure", value_name="value")
    return pd.DataFrame(dict(image=long["image"].to_numpy(), layer=long["layer"].to_numpy(),
                             group=long["tokens"].to_numpy(), condition=long["context"].to_numpy(),
                             measure=long["measure"].to_numpy(), value=long["value"].astype(float).to_numpy()))


CORRUPTIONS = ("other", "noise", "blur", "gray")


def corrupt_images(x: Tensor, kind: str, ids: Sequence[int], seed: int = 0,
                   pair: Optional[Tensor] = None) -> Tensor:
    """Corrupted copies of a normalised batch ``[batch, C, H, W]``, deterministic per image id.

    ``"other"``: the paired image of another class (``pair``); ``"noise"``: the image plus unit
    Gaussian noise seeded by ``(seed, id)``; ``"blur"``: a Gaussian blur with sigma = 1/16 of the
    image side; ``"gray"``: the all-zero normalised image (the dataset mean).
    """
    if kind == "other":
        if pair is None:
            raise InputError("corruption 'other' needs the paired images")
        return pair.to(x)
    if kind == "gray":
        return torch.zeros_like(x)
    if kind == "noise":
        out = []
        for i, xi in zip(ids, x):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
            out.append(xi + torch.randn(xi.shape, generator=g).to(xi))
        return torch.stack(out)
    if kind == "blur":
        F = torch.nn.functional
        H, W = x.shape[-2:]
        sigma = max(H, W) / 16
        r = max(1, min(int(3 * sigma), H - 1, W - 1))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-(t**2) / (2 * sigma**2))
        k = k / k.sum()
        C = x.shape[1]
        y = F.pad(x, (r, r, r, r), mode="reflect")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(C, 1, 1, -1).contiguous(), groups=C)
        return F.conv2d(y, k.view(1, 1, -1, 1).expand(C, 1, -1, 1).contiguous(), groups=C)
    raise InputError(f"unknown corruption {kind!r}; use one of {CORRUPTIONS}")


def _patching_needs(opts: Dict[str, Any]) -> Tuple[str, ...]:
    return ("pair",) if opts.get("corruption", "other") == "other" else ()


@register("patching", dict(sweep="positions", hook=None, layers=None, corruption="other", seed=0, method=None,
                           memory_mb=512.0), needs=_patching_needs)
def patching_rows(model: Any, batch: RunBatch, *, sweep: str = "positions", hook: Optional[str] = None,
                  layers: Optional[Sequence[int]] = None, corruption: str = "other", seed: int = 0,
                  method: Optional[str] = None, memory_mb: float = 512.0):
    """Activation patching clean -> corrupted, metric = the target's logit: a layer x position sweep
    (patching.patch_positions_sweep) or a layer x head sweep (patching.patch_heads_sweep)."""
    import pandas as pd

    from vit_lens.patching import logit_metric, patch_heads_sweep, patch_positions_sweep

    if sweep not in ("positions", "heads"):
        raise InputError(f"--sweep must be 'positions' or 'heads', got {sweep!r}")
    corrupted = corrupt_images(batch.images, corruption, batch.ids, seed, batch.pair)
    metric = logit_metric(_targets(batch).to(batch.images.device), model=model)
    kw: Dict[str, Any] = dict(layers=None if layers is None else list(layers), memory_mb=memory_mb, progress=False)
    if method is not None:
        kw["method"] = method  # passed through: the sweep refuses a method it does not know
    with torch.no_grad():
        if sweep == "positions":
            res = patch_positions_sweep(model, batch.images, corrupted, metric, hook=hook or "resid_pre", **kw)
        else:
            res = patch_heads_sweep(model, batch.images, corrupted, metric, hook=hook or "attn.hook_z", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = res.to_frame()
    axis = "pos" if sweep == "positions" else "head"
    group = "pos" if sweep == "positions" else "head"
    frames = []
    for measure in ("value", "normalized"):
        frames.append(_frame(image=df["batch"].to_numpy(), layer=df["layer"].to_numpy(), group=group,
                             index=df[axis].to_numpy(), condition=corruption, measure=measure,
                             value=df[measure].astype(float).to_numpy()))
    B = len(batch.ids)
    for measure, v in (("clean", res.clean), ("corrupted", res.corrupted)):
        frames.append(_frame(image=np.arange(B), group="baseline", condition=corruption, measure=measure,
                             value=v.detach().double().cpu().numpy()))
    return pd.concat(frames, ignore_index=True)
