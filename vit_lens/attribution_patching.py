"""Attribution patching: a whole patching sweep estimated from two forwards and one backward.

Exact activation patching (:mod:`vit_lens.patching`) runs the corrupted images once per patched
node. Attribution patching (Nanda, 2023) estimates all of them at once to first order: for a node
``a`` (an activation, or a part of one: a position, a head, a neuron),

    metric(corrupted with a := a_clean)  ~=  metric(corrupted) + (a_clean - a_corrupted) . dmetric/da

with the gradient taken on the corrupted run. The sign convention is the exact sweeps': clean
activations patched into the corrupted run, so a result holds ``values = corrupted metric +
estimated effect`` and :meth:`PatchingResult.normalized`, grids, tables and figures mean the same
as for exact results (0 = corrupted, 1 = clean).

``method="attribution_qk"`` adds the QK fix of AtP* (Kramar et al., 2024) where a patch goes
through an attention softmax: patching queries (``attn.hook_q``), keys (``attn.hook_k``) or
scores (``attn.hook_attn_scores``) recomputes that layer's softmax exactly with the patched
queries / keys / scores, and only the effect of the changed pattern on the metric is linearised
(``(pattern_patched - pattern_corrupted) . dmetric/dpattern``). Saturated softmaxes, whose
gradient is ~0 although a patch would flip them, are the main false negatives of plain
attribution. For every other hook (residual stream, sublayer outputs, ``hook_z``, ``hook_result``,
``hook_pattern``, neurons) nothing passes through a softmax between the patch and the linearised
part, so ``"attribution_qk"`` equals ``"attribution"`` there (the effect on *later* layers'
softmaxes stays first order: AtP*'s fix covers a node's own attention only).

``ig_steps=k`` (with ``method="attribution"``) averages the gradient over ``k`` inputs on the
straight line from the corrupted to the clean images (``alpha = 0, 1/k, .., (k-1)/k``; the left
Riemann sum of integrated gradients, as EAP-IG does over input embeddings); ``k = 1`` is plain
attribution.

The gradient machinery (:func:`node_gradients`) is public: activations of the clean and the
corrupted run and the metric's gradient on the corrupted run at any set of hooks, batched over
pairs in chunks, without leaving gradients on (or changing ``requires_grad`` of) the model's
parameters.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.core import InputError, InputTypeError, NotDefinedError, hook_layer, hook_name, progress_bar
from vit_lens.patching import (
    CPU_CHUNK_TOKENS,
    Metric,
    PatchRuns,
    SweepOptions,
    bind_metric,
    call_metric,
    hook_layout,
    run_sweep,
    sweep_options,
)

if TYPE_CHECKING:  # pragma: no cover
    from vit_lens.model import HookedViT

__all__ = [
    "METHODS",
    "NeuronRuns",
    "NodeGradients",
    "agreement",
    "attribution_sweep",
    "exact_neuron_sweep",
    "neuron_attribution_sweep",
    "node_gradients",
    "resolve_method",
]

#: The ``method=`` values of the patching sweeps.
METHODS = ("exact", "attribution", "attribution_qk")

_QK_HOOKS = ("attn.hook_q", "attn.hook_k", "attn.hook_attn_scores")


# =============================================================================================
# the gradient machinery
# =============================================================================================
@dataclass
class NodeGradients:
    """Activations of a clean and a corrupted run and the metric's gradient on the corrupted run.

    Attributes:
        clean: hook name -> clean activation ``[batch, ...]``.
        corrupted: hook name -> corrupted activation ``[batch, ...]``.
        grads: hook name -> ``d sum_b metric_b / d activation`` on the corrupted run (images are
            independent, so row ``b`` is image ``b``'s own gradient), averaged over the ``ig_steps``
            interpolated inputs.
        clean_metric, corrupted_metric: ``[batch]``.
    """

    clean: Dict[str, Tensor]
    corrupted: Dict[str, Tensor]
    grads: Dict[str, Tensor]
    clean_metric: Tensor
    corrupted_metric: Tensor
    extra: Dict[str, Any] = field(default_factory=dict)

    def delta(self, name: str) -> Tensor:
        """``clean - corrupted`` activation at ``name``."""
        return self.clean[name] - self.corrupted[name]


@contextmanager
def _frozen_parameters(model: Any) -> Iterator[None]:
    """No parameter requires a gradient inside; every ``requires_grad`` flag restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _pairs_per_chunk(model: Any, n_pos: int, memory_mb: float, device: torch.device, qk: bool) -> int:
    """Pairs one forward + backward holds within ``memory_mb`` (activations kept for the backward)."""
    cfg = model.cfg
    per_token_layer = 12 * cfg.d_model + 4 * cfg.d_mlp + (4 * cfg.n_heads * n_pos if qk else 2 * cfg.n_heads * n_pos)
    per_pair = 4 * cfg.n_layers * n_pos * per_token_layer
    n = max(1, int(memory_mb * 2**20 // per_pair))
    if device.type == "cpu":
        n = min(n, max(1, 4 * CPU_CHUNK_TOKENS // n_pos))
    return n


def _check_pairs(model: Any, clean: Any, corrupted: Any) -> None:
    for images, what in ((clean, "clean"), (corrupted, "corrupted")):
        if not isinstance(images, Tensor):
            raise InputTypeError(f"{what} must be a preprocessed batch (model.preprocess(...)), got {type(images).__name__}")
        model._check_images(images)
    if clean.shape != corrupted.shape:
        raise InputError(
            f"clean and corrupted batches must have the same shape (pairs of images), got "
            f"{tuple(clean.shape)} and {tuple(corrupted.shape)}"
        )


def node_gradients(
    model: "HookedViT",
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    hook_names: Sequence[str],
    *,
    ig_steps: int = 1,
    memory_mb: float = 512,
    chunk_size: Optional[int] = None,
    progress: bool = False,
    desc: str = "attribution",
) -> NodeGradients:
    """Clean and corrupted activations at ``hook_names`` and the metric's gradient there.

    Two forwards (clean without gradients; corrupted with) and one backward per chunk of pairs
    (``chunk_size`` pairs, or as many as fit ``memory_mb``), with a progress bar over pairs.
    The model's parameters get no gradient: their ``requires_grad`` is off during the call and
    restored after (``p.grad`` stays as it was).

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        clean, corrupted: preprocessed batches of the same shape (pairs of images).
        metric: logits ``[..., batch, n_classes]`` -> ``[..., batch]`` (as for the exact sweeps,
            including metrics with a ``hook_name``); it must be differentiable.
        hook_names: full hook names (``"blocks.3.hook_resid_pre"``).
        ig_steps: average the gradient over the inputs ``corrupted + alpha (clean - corrupted)``,
            ``alpha = i / ig_steps`` for ``i = 0 .. ig_steps - 1`` (1: the corrupted run only).

    Returns:
        a :class:`NodeGradients` (activations and gradients ``[batch, ...]`` on the model's device).
    """
    if torch.is_inference_mode_enabled():
        raise InputError("attribution patching needs gradients: call it outside torch.inference_mode() "
                         "(torch.no_grad() is fine), or use method='exact'")
    _check_pairs(model, clean, corrupted)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise InputError(f"ig_steps must be an int >= 1 (1: plain attribution), got {ig_steps!r}")
    metric = bind_metric(metric, model)
    names = list(dict.fromkeys(hook_names))
    for n in names:
        hook_name(model, n)
    mname = getattr(metric, "hook_name", None)
    if mname is not None:
        hook_name(model, mname)
    B = corrupted.shape[0]
    n_pos = model.cfg.n_ctx
    qk = any(n.endswith(("attn.hook_pattern", "attn.hook_attn_scores")) for n in names)
    per = chunk_size or _pairs_per_chunk(model, n_pos, memory_mb, corrupted.device, qk)
    out_clean: Dict[str, List[Tensor]] = {n: [] for n in names}
    out_corr: Dict[str, List[Tensor]] = {n: [] for n in names}
    out_grad: Dict[str, List[Tensor]] = {n: [] for n in names}
    cms: List[Tensor] = []
    kms: List[Tensor] = []
    bar = progress_bar(total=B, progress=progress, desc=desc, unit="pair", leave=True)
    with _frozen_parameters(model):
        for s in range(0, B, per):
            c, k = clean[s : s + per], corrupted[s : s + per]
            with torch.no_grad():
                want = sorted(set(names) | ({mname} if mname else set()))
                c_logits, c_cache = model.run_with_cache(c, names_filter=want)
                cms.append(_metric_rows(metric, c_logits, c_cache[mname] if mname else None, s, B).detach())
            for n in names:
                out_clean[n].append(c_cache[n].detach())
            grads: Dict[str, Tensor] = {}
            for i in range(ig_steps):
                x = k if i == 0 else k + (i / ig_steps) * (c - k)
                acts, m = _grad_forward(model, x, metric, names, mname, s, B)
                if i == 0:
                    kms.append(m.detach())
                    for n in names:
                        out_corr[n].append(acts[n].detach())
                g = _backward(m, acts, names, metric)
                for n in names:
                    grads[n] = g[n] if i == 0 else grads[n] + g[n]
            for n in names:
                out_grad[n].append(grads[n] / ig_steps)
            bar.update(c.shape[0])
    bar.close()
    cat = lambda d: {n: torch.cat(v, 0) for n, v in d.items()}  # noqa: E731
    return NodeGradients(cat(out_clean), cat(out_corr), cat(out_grad), torch.cat(cms), torch.cat(kms))


def _metric_rows(metric: Metric, logits: Tensor, act: Optional[Tensor], start: int, batch: int) -> Tensor:
    """The metric of rows ``start ..`` of the full batch, from a chunk of them: the chunk is placed in a
    full-batch tensor (zeros elsewhere) so that per-image targets line up with their images."""
    def full(t: Tensor) -> Tensor:
        n = t.shape[0]
        if n == batch:
            return t
        z = t.detach().new_zeros((batch - n, *t.shape[1:]))
        return torch.cat([z[:start], t, z[start:]], 0)

    out = call_metric(metric, full(logits), None if act is None else full(act))
    return out[start : start + logits.shape[0]]


def _grad_forward(model: Any, x: Tensor, metric: Metric, names: Sequence[str], mname: Optional[str], start: int = 0,
                  batch: Optional[int] = None):
    acts: Dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> Tensor:
        if not act.requires_grad:  # the first hook the gradient reaches: a leaf from here on
            act = act.detach().requires_grad_(True)
        acts[hook.name] = act
        return act

    wanted = list(names) + ([mname] if mname and mname not in names else [])
    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, capture) for n in wanted]):
        logits = model(x)
        m = _metric_rows(metric, logits, acts.get(mname) if mname else None, start, batch or logits.shape[0])
    return acts, m


def _backward(m: Tensor, acts: Dict[str, Tensor], names: Sequence[str], metric: Metric) -> Dict[str, Tensor]:
    if not m.requires_grad:
        raise NotDefinedError(
            f"the metric {getattr(metric, '__name__', type(metric).__name__)} has no gradient (it counts ranks or "
            "thresholds, as identifiability_metric does), so attribution patching would estimate every effect as 0; "
            "use method='exact', or a differentiable metric (logit_metric, logit_diff_metric, prob_metric)"
        )
    missing = [n for n in names if n not in acts]
    if missing:
        raise InputError(f"the hooks {missing} did not fire in the forward pass; check the model's configuration "
                         "(attn.hook_result needs model.set_use_attn_result(True))")
    tensors = [acts[n] for n in names]
    grads = torch.autograd.grad(m.sum(), tensors, allow_unused=True)
    return {n: (torch.zeros_like(t) if g is None else g.detach()) for n, t, g in zip(names, tensors, grads)}


# =============================================================================================
# estimates per granularity
# =============================================================================================
def _contributions(layout: str, prod: Tensor) -> Tensor:
    """Per-(position, head) sums of ``delta * grad``: ``[b]`` / ``[b, P]`` / ``[b, P, H]`` / ``[b, Pq, H]``."""
    prod = prod.double()
    if layout == "none":
        return prod.flatten(1).sum(1)
    if layout == "pos":
        return prod.flatten(2).sum(2)
    if layout == "pos_head":
        return prod.sum(-1)
    return prod.sum(-1).transpose(1, 2)  # head_qk [b, H, Pq, Pk] -> [b, Pq, H]


def _select(layout: str, c: Tensor, g: PatchRuns) -> Tensor:
    """Sum the per-(position, head) contributions ``c`` over each run's selection: ``[n_runs, b]``."""
    if layout == "none":
        return c[None].expand(g.n_runs, -1)
    P = c.shape[1]
    pos = g.positions.to(c.device, c.dtype) if g.positions is not None else torch.ones(g.n_runs, P, dtype=c.dtype,
                                                                                         device=c.device)
    if layout == "pos":
        if g.heads is not None:
            raise InputError("heads can only be chosen for per-head hooks (attn.hook_q/k/v/z/result/pattern/attn_scores)")
        return pos @ c.T
    H = c.shape[2]
    heads = g.heads.to(c.device, c.dtype) if g.heads is not None else torch.ones(g.n_runs, H, dtype=c.dtype,
                                                                                  device=c.device)
    return torch.einsum("rp,rh,bph->rb", pos, heads, c)


def _layer_tensors(model: Any, layer: Optional[int]) -> Tuple[str, Optional[Tensor], float]:  # attention hooks: a block
    attn = model.blocks[layer].attn
    return f"blocks.{layer}.attn.", attn.attn_mask, 1.0 / math.sqrt(model.cfg.d_head)


def _softmax_like_model(scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``softmax`` of ``[b, H, Pq, Pk]`` scores, masked (``-inf``) where ``mask`` is False, as the model does."""
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(p) if mask is not None else p


def _qk_fixed(model: Any, ng: NodeGradients, g: PatchRuns, b: slice) -> Tensor:
    """AtP*'s QK fix for a query / key / score patch: the layer's softmax recomputed exactly with the
    patch, the changed pattern linearised. ``[n_runs, b]``."""
    layer = hook_layer(model, g.hook)
    pre, mask, scale = _layer_tensors(model, layer)
    A = ng.corrupted[pre + "hook_pattern"][b]  # [b, H, Pq, Pk]
    gA = ng.grads[pre + "hook_pattern"][b]
    if g.hook.endswith("attn.hook_attn_scores"):
        new = _softmax_like_model(ng.clean[g.hook][b], mask)  # patched rows: the clean scores
        e = ((new - A).double() * gA.double()).sum(-1).transpose(1, 2)  # [b, Pq, H]
        return _select("head_qk", e, g)
    q = ng.corrupted[pre + "hook_q"][b]  # [b, P, H, E]
    k = ng.corrupted[pre + "hook_k"][b]
    if g.hook.endswith("attn.hook_q"):
        qc = ng.clean[g.hook][b]
        s = torch.matmul(qc.transpose(1, 2), k.permute(0, 2, 3, 1)) * scale  # every row with the clean query
        e = ((_softmax_like_model(s, mask) - A).double() * gA.double()).sum(-1).transpose(1, 2)  # [b, Pq, H]
        return _select("pos_head", e, g)
    # keys: a run's key set changes every row; runs sharing a key set share one recomputation
    kc = ng.clean[g.hook][b]
    P = k.shape[1]
    keysets = g.positions if g.positions is not None else torch.ones(1, P, dtype=torch.bool)
    uniq, inverse = torch.unique(keysets, dim=0, return_inverse=True)
    if g.positions is None:
        inverse = torch.zeros(g.n_runs, dtype=torch.long)
    qt = q.transpose(1, 2)  # [b, H, Pq, E]
    f = torch.empty(uniq.shape[0], A.shape[0], A.shape[1], dtype=torch.float64, device=A.device)  # [U, b, H]
    per = max(1, int(2**25 // max(1, A.numel())))
    for s0 in range(0, uniq.shape[0], per):
        u = uniq[s0 : s0 + per].to(k.device)  # [u, P]
        kn = torch.where(u[:, None, :, None, None], kc[None], k[None])  # [u, b, P, H, E]
        s = torch.matmul(qt[None], kn.permute(0, 1, 3, 4, 2)) * scale  # [u, b, H, Pq, Pk]
        new = _softmax_like_model(s, mask)  # the mask broadcasts over the leading key-set axis
        f[s0 : s0 + per] = ((new - A[None]).double() * gA[None].double()).sum((-1, -2))
    fr = f[inverse.to(f.device)]  # [R, b, H]
    heads = g.heads.to(fr.device, fr.dtype) if g.heads is not None else torch.ones(g.n_runs, fr.shape[-1],
                                                                                    dtype=fr.dtype, device=fr.device)
    return torch.einsum("rbh,rh->rb", fr, heads)


def _needed_hooks(model: Any, groups: Sequence[PatchRuns], qk: bool) -> List[str]:
    names = []
    for g in groups:
        names.append(g.hook)
        if qk and g.hook.endswith(_QK_HOOKS):
            pre = _layer_tensors(model, hook_layer(model, g.hook))[0]
            names += [pre + "hook_pattern", pre + "hook_q", pre + "hook_k"]
    return list(dict.fromkeys(names))


def _check_method(method: str, ig_steps: int) -> None:
    if method not in METHODS[1:]:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if ig_steps != 1 and method != "attribution":
        raise InputError(f"ig_steps={ig_steps} works with method='attribution' only (the QK fix linearises at the "
                         "corrupted run); use method='attribution', ig_steps=... or method='attribution_qk' alone")


def _opts(options: Optional[SweepOptions], keywords: Dict[str, Any]) -> SweepOptions:
    return sweep_options(options, **keywords)


def attribution_sweep(
    model: "HookedViT",
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    runs: Sequence[PatchRuns],
    *,
    method: str = "attribution",
    ig_steps: int = 1,
    options: Optional[SweepOptions] = None,
    desc: str = "attribution",
    **keywords: Any,
) -> Tuple[Float[Tensor, "n_runs batch"], Float[Tensor, "batch"], Float[Tensor, "batch"]]:
    """:func:`vit_lens.patching.run_sweep`'s contract, estimated by attribution patching.

    Every run of ``runs`` (a hook and the positions / heads it patches) gets ``corrupted metric +
    sum over its patched elements of (clean - corrupted) * dmetric/dactivation``, from one
    gradient pass per chunk of pairs (see :func:`node_gradients`); ``method="attribution_qk"``
    recomputes the softmax exactly for query / key / score patches (module docs).

    Args:
        options / keywords: :class:`~vit_lens.patching.SweepOptions` (``memory_mb`` bounds the pairs
            per gradient pass, ``chunk_size`` sets it, ``progress`` shows a bar over pairs;
            ``skip_unchanged`` has nothing to skip: an unchanged patch's estimate is exactly 0).

    Returns:
        ``(values [total runs, batch], clean metric [batch], corrupted metric [batch])``.
    """
    _check_method(method, ig_steps)
    opts = _opts(options, keywords)
    groups = list(runs)
    if not groups or not all(isinstance(g, PatchRuns) for g in groups):
        raise InputError("runs must be a non-empty list of PatchRuns (hook, positions, heads, n_runs)")
    for g in groups:
        hook_name(model, g.hook)
    qk = method == "attribution_qk"
    names = _needed_hooks(model, groups, qk)
    ng = node_gradients(model, clean, corrupted, metric, names, ig_steps=ig_steps, memory_mb=opts.memory_mb,
                        chunk_size=opts.chunk_size, progress=opts.progress, desc=f"{desc} ({method})")
    B = corrupted.shape[0]
    all_b = slice(0, B)
    out = []
    for g in groups:
        layout = hook_layout(g.hook)
        if qk and g.hook.endswith(_QK_HOOKS):
            est = _qk_fixed(model, ng, g, all_b)
        else:
            est = _select(layout, _contributions(layout, ng.delta(g.hook) * ng.grads[g.hook]), g)
        out.append(est)
    km = ng.corrupted_metric
    vals = (km.double()[None] + torch.cat(out, 0)).to(km.dtype)
    return vals.cpu(), ng.clean_metric.cpu(), km.cpu()


# =============================================================================================
# neurons
# =============================================================================================
@dataclass
class NeuronRuns:
    """One patched run per neuron of one layer's ``mlp.hook_post``.

    Attributes:
        layer: the block.
        neurons: ``[n_runs]`` neuron indices (0 .. d_mlp - 1).
        positions: ``[pos]`` bool, where each run patches its neuron (None: every position).
    """

    layer: int
    neurons: Tensor
    positions: Optional[Tensor] = None

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.mlp.hook_post"

    @property
    def n_runs(self) -> int:
        return int(self.neurons.numel())


def neuron_attribution_sweep(
    model: "HookedViT",
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    runs: Sequence[NeuronRuns],
    *,
    method: str = "attribution",
    ig_steps: int = 1,
    options: Optional[SweepOptions] = None,
    desc: str = "attribution neurons",
    **keywords: Any,
) -> Tuple[Float[Tensor, "n_runs batch"], Float[Tensor, "batch"], Float[Tensor, "batch"]]:
    """Attribution estimate of patching each neuron of ``runs`` (``"attribution_qk"`` equals
    ``"attribution"`` here: no softmax lies between a neuron and the linearised rest)."""
    _check_method(method, ig_steps)
    opts = _opts(options, keywords)
    runs = list(runs)
    names = list(dict.fromkeys(r.hook for r in runs))
    ng = node_gradients(model, clean, corrupted, metric, names, ig_steps=ig_steps, memory_mb=opts.memory_mb,
                        chunk_size=opts.chunk_size, progress=opts.progress, desc=f"{desc} ({method})")
    out = []
    for r in runs:
        prod = (ng.delta(r.hook) * ng.grads[r.hook]).double()  # [b, P, N]
        if r.positions is not None:
            prod = prod[:, r.positions.to(prod.device)]
        c = prod.sum(1)  # [b, N]
        out.append(c[:, r.neurons.to(c.device)].T)
    km = ng.corrupted_metric
    vals = (km.double()[None] + torch.cat(out, 0)).to(km.dtype)
    return vals.cpu(), ng.clean_metric.cpu(), km.cpu()


def exact_neuron_sweep(
    model: "HookedViT",
    clean: Float[Tensor, "batch chans height width"],
    corrupted: Float[Tensor, "batch chans height width"],
    metric: Metric,
    runs: Sequence[NeuronRuns],
    *,
    options: Optional[SweepOptions] = None,
    desc: str = "patching neurons",
    **keywords: Any,
) -> Tuple[Float[Tensor, "n_runs batch"], Float[Tensor, "batch"], Float[Tensor, "batch"]]:
    """Exact patching of one neuron (at the chosen positions) per run: the sweep engine
    (:func:`vit_lens.patching.run_sweep`) with one :class:`~vit_lens.patching.PatchRuns` per layer
    whose ``features`` pick each run's neuron. Returns ``(values [total runs, batch], clean metric,
    corrupted metric)``."""
    _check_pairs(model, clean, corrupted)
    groups = []
    for r in runs:
        n, d_mlp = r.n_runs, model.cfg.d_mlp
        features = torch.zeros(n, d_mlp, dtype=torch.bool)
        features[torch.arange(n), r.neurons.reshape(-1).long().cpu()] = True
        pos = None if r.positions is None else r.positions.reshape(1, -1).cpu().expand(n, -1)
        groups.append(PatchRuns(r.hook, pos, None, n, features=features))
    return run_sweep(model, clean, corrupted, metric, groups, options=options, desc=desc, **keywords)


def resolve_method(method: Union[str, None]) -> str:
    """``method`` checked against :data:`METHODS`."""
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS} ('exact': patched runs; 'attribution': the first-order "
                         f"estimate from one backward pass; 'attribution_qk': with AtP*'s QK fix), got {method!r}")
    return str(method)


# =============================================================================================
# comparing an estimate with the exact sweep
# =============================================================================================
def _effects(res: Any) -> Tensor:
    """``values - corrupted`` as ``[batch, cells]`` (float64, on the CPU: the ranks go through pandas)."""
    i = res.dims.index("batch")
    v = res.values.detach().cpu().double().movedim(i, -1)
    return (v - res.corrupted.detach().cpu().double()).reshape(-1, v.shape[-1]).T


def _ranks(x: Tensor) -> Tensor:
    """Ranks along the last axis, ties averaged (for Spearman's rho)."""
    import pandas as pd

    return torch.as_tensor(pd.DataFrame(x.numpy().T).rank(method="average").to_numpy().T.copy())


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def agreement(reference: Any, estimate: Any, *, k: int = 10):
    r"""How well ``estimate`` (an attribution result) ranks the cells of ``reference`` (the exact
    result of the same sweep), per image.

    Both are :class:`~vit_lens.patching.PatchingResult`\ s of the same shape. The effect of a
    cell is ``value - corrupted``. Returns a tidy :class:`pandas.DataFrame`, one row per image:
    ``spearman`` (rank correlation of the effects over all cells), ``pearson``, ``topk`` (share of
    the ``k`` cells with the largest ``|effect|`` in ``reference`` that are also among the ``k``
    largest in ``estimate``), ``sign`` (share of those ``k`` reference cells whose estimated effect
    has the right sign), ``k``, ``n_cells``, plus ``hook``, ``method`` and ``metric``.
    """
    import pandas as pd

    if tuple(reference.values.shape) != tuple(estimate.values.shape) or reference.dims != estimate.dims:
        raise InputError(f"the two results must come from the same sweep: shapes {tuple(reference.values.shape)} "
                         f"{reference.dims} vs {tuple(estimate.values.shape)} {estimate.dims}")
    er, ee = _effects(reference), _effects(estimate)
    n = er.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise InputError(f"k must be an int in 1..{n} (the number of cells), got {k!r}")
    spear = _pearson(_ranks(er), _ranks(ee))
    pear = _pearson(er, ee)
    top_r = er.abs().topk(k, dim=-1).indices
    top_e = ee.abs().topk(k, dim=-1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_r, top_e)]
    sign = (torch.sign(er.gather(-1, top_r)) == torch.sign(ee.gather(-1, top_r))).double().mean(-1)
    return pd.DataFrame({
        "batch": reference.coords.get("batch", list(range(er.shape[0]))),
        "hook": reference.hook, "method": estimate.method, "metric": reference.metric,
        "spearman": spear.numpy(), "pearson": pear.numpy(), "topk": overlap, "sign": sign.numpy(),
        "k": k, "n_cells": n,
    })
