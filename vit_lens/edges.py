"""Edge attribution patching and exact edge patching between components, and circuit faithfulness.

The computational graph
    The residual stream entering a block is the sum of everything written before it: the *input*
    (``blocks.0.hook_resid_pre``: embeddings + position embeddings, after ``ln_pre`` where the model
    has one), every earlier head's output (``blocks.{l}.attn.hook_result``, one per head), every
    earlier MLP's output (``blocks.{l}.hook_mlp_out``) and constant biases (``b_O``), which are the same
    in every run and are never patched. *Senders* are ``"input"``, ``"a{l}.h{h}"`` (head ``h`` of
    block ``l``) and ``"m{l}"``. *Receivers* read a sum of sender outputs: the query, key and value
    inputs of each head (``"a{l}.h{h}<q>"``, ``"<k>"``, ``"<v>"``: what ``ln1`` normalises for that head),
    each MLP's input (``"m{l}"``, what ``ln2`` normalises: it includes block ``l``'s own heads) and the
    readout (``"logits"``: the last block's output, which the final norm and the classifier read).
    An edge ``"a0.h1->a3.h2<q>"`` is one sender's contribution to one receiver's input, summed over
    every token position.

Patching an edge (denoising, as the node sweeps of :mod:`vit_lens.patching`)
    The model runs on the *corrupted* images; one receiver's input gets one sender's clean output in
    place of its corrupted output: ``input_r += s_clean - s_corrupted``; nothing else is touched, and
    the receiver's changed output flows on through every ordinary path. :func:`patch_edges` does
    exactly this (many edges per forward pass, one edge per batch row); :func:`edge_attribution`
    estimates every edge at once from two forward passes and one backward pass,
    ``(s_clean - s_corrupted) . dM/d(input_r)`` at the corrupted run (Nanda 2023; Syed et al. 2023),
    optionally with integrated gradients along the input (``ig_steps``: EAP-IG, Hanna et al. 2024).
    Both return :class:`EdgeResult` with ``values = corrupted metric + (estimated) effect``, so
    ``normalized()`` means the same for both: 0 = corrupted, 1 = clean.

Faithfulness (exact)
    :func:`circuit_faithfulness` runs the *clean* images with every edge outside a candidate circuit
    ablated: each receiver's input gets, for every sender whose edge to it is not kept, that
    sender's corrupted output in place of its output in this run; kept edges carry this run's
    values. It reports the share of the clean-corrupted gap the circuit recovers (1 = clean,
    0 = corrupted). Keeping every edge gives the clean run, keeping none the corrupted one, exactly.
    :func:`faithfulness_curve` does this for the top ``k`` edges of a ranking, for several ``k``.

Receivers are edited through the model's own hooks and modules (``hook_q/k/v`` recomputed from the
receiver's own input with the block's ``ln1`` and ``W_Q/W_K/W_V``, ``mlp.hook_pre`` from ``ln2`` and
``W_in``), so the model's forward is unchanged for everyone else, and hooks the caller has on the
LayerNorms or the pattern apply to the edited inputs too. Post-norm blocks (timm ``ResPostBlock``)
are refused: there the heads' outputs are normalised together and are not additive in the residual
stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union, cast

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.core import as_batch, progress_bar
from vit_lens.core.errors import InputError, InputTypeError, NotDefinedError, UnknownNameError
from vit_lens.patching import bind_metric, call_metric

if TYPE_CHECKING:  # pragma: no cover
    from vit_lens.model import HookedViT

__all__ = [
    "Edge",
    "EdgeGraph",
    "EdgeResult",
    "circuit_faithfulness",
    "edge_attribution",
    "edge_graph",
    "faithfulness_curve",
    "patch_edges",
]

PORTS = ("q", "k", "v")

#: On a CPU, the most tokens (runs x batch x positions) one chunk of exact edge runs holds, unless
#: ``chunk_size`` says otherwise (as :data:`vit_lens.patching.CPU_CHUNK_TOKENS`).
CPU_CHUNK_TOKENS = 1600


class Edge(NamedTuple):
    """One edge: ``sender`` (``"input"``, ``"a{l}.h{h}"``, ``"m{l}"``) -> ``receiver``
    (``"a{l}.h{h}<q|k|v>"``, ``"m{l}"``, ``"logits"``)."""

    sender: str
    receiver: str

    def __str__(self) -> str:
        return f"{self.sender}->{self.receiver}"


EdgeLike = Union[Edge, str, Tuple[str, str]]


# =============================================================================================
# the graph
# =============================================================================================
@dataclass(frozen=True)
class EdgeGraph:
    """Senders, receivers and edges of a model (see the module docstring).

    Attributes:
        senders: names in forward order (index ``s``): ``"input"``, then per block its heads and its MLP.
        receivers: names in forward order (index ``r``): per block the q, k, v inputs of each head
            (``"a{l}.h{h}<q>"`` for every head, then ``<k>``, then ``<v>``), the MLP, then ``"logits"``.
        n_upstream: for every receiver, how many senders (the first ones) write to its input.
        edges: every edge, by receiver then sender.
    """

    n_layers: int
    n_heads: int
    senders: Tuple[str, ...]
    receivers: Tuple[str, ...]
    n_upstream: Tuple[int, ...]
    edges: Tuple[Edge, ...]

    def sender_index(self, name: str) -> int:
        return self._index(self.senders, name, "sender", "'input', 'a{l}.h{h}', 'm{l}'")

    def receiver_index(self, name: str) -> int:
        return self._index(self.receivers, name, "receiver", "'a{l}.h{h}<q>' / '<k>' / '<v>', 'm{l}', 'logits'")

    @staticmethod
    def _index(names: Tuple[str, ...], name: str, what: str, forms: str) -> int:
        try:
            return names.index(name)
        except ValueError:
            import difflib

            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(f"unknown {what} {name!r}.{hint} {what.capitalize()}s are named {forms}") from None

    def edge(self, e: EdgeLike) -> Edge:
        """An :class:`Edge` from an edge, a ``"sender->receiver"`` string or a pair, checked to exist."""
        if isinstance(e, str):
            parts = e.split("->")
            if len(parts) != 2:
                raise InputError(f"an edge is written 'sender->receiver' (e.g. 'a0.h1->m3'), got {e!r}")
            e = Edge(parts[0].strip(), parts[1].strip())
        elif isinstance(e, tuple) and len(e) == 2 and all(isinstance(x, str) for x in e):
            e = Edge(*e)
        else:
            raise InputTypeError(f"an edge is an Edge, a 'sender->receiver' string or a (sender, receiver) pair, got {e!r}")
        s, r = self.sender_index(e.sender), self.receiver_index(e.receiver)
        if s >= self.n_upstream[r]:
            raise InputError(
                f"there is no edge {e}: {e.sender} comes after {e.receiver} reads the residual stream; a receiver's "
                f"senders are the input and the components before it ({self.senders[self.n_upstream[r] - 1]!r} is its last)"
            )
        return e

    def index(self, e: EdgeLike) -> Tuple[int, int]:
        """(sender index, receiver index) of an edge."""
        e = self.edge(e)
        return self.sender_index(e.sender), self.receiver_index(e.receiver)

    def mask(self, edges: Iterable[EdgeLike]) -> Tensor:
        """Bool ``[n_senders, n_receivers]``: True at the given edges."""
        m = torch.zeros(len(self.senders), len(self.receivers), dtype=torch.bool)
        for e in edges:
            m[self.index(e)] = True
        return m

    def valid_mask(self) -> Tensor:
        """Bool ``[n_senders, n_receivers]``: True where an edge exists."""
        up = torch.tensor(self.n_upstream)
        return torch.arange(len(self.senders))[:, None] < up[None, :]


def edge_graph(model: "HookedViT") -> EdgeGraph:
    """The edge graph of ``model`` (ViT-Ti/16: 49 senders, 121 receivers, 2845 edges)."""
    _check_model(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    senders: List[str] = ["input"]
    receivers: List[str] = []
    up: List[int] = []
    for layer in range(L):
        n_before = len(senders)
        for p in PORTS:
            for h in range(H):
                receivers.append(f"a{layer}.h{h}<{p}>")
                up.append(n_before)
        senders += [f"a{layer}.h{h}" for h in range(H)]
        receivers.append(f"m{layer}")
        up.append(len(senders))
        senders.append(f"m{layer}")
    receivers.append("logits")
    up.append(len(senders))
    edges = tuple(Edge(senders[s], r) for ri, r in enumerate(receivers) for s in range(up[ri]))
    return EdgeGraph(L, H, tuple(senders), tuple(receivers), tuple(up), edges)


def _check_model(model: Any) -> None:
    if getattr(model.cfg, "post_norm", False):
        raise NotDefinedError(
            f"{model.cfg.model_name} has post-norm blocks: the heads' outputs are normalised together, so they are not "
            "additive in the residual stream and have no edges; use the node sweeps of vit_lens.patching instead"
        )


# =============================================================================================
# results
# =============================================================================================
@dataclass
class EdgeResult:
    """Metric values of patching each edge alone (exact or estimated).

    Attributes:
        edges: the edges, one per row of ``values``.
        values: ``[edge, batch]``: the corrupted metric plus the (estimated) effect of patching the
            edge (its clean value into the corrupted run).
        clean, corrupted: the metric of the unpatched clean / corrupted runs ``[batch]``.
        method: ``"exact"``, ``"attribution"`` or ``"attribution_ig"``.
        metric: the metric's name.
    """

    edges: List[Edge]
    values: Tensor
    clean: Tensor
    corrupted: Tensor
    method: str = "exact"
    metric: str = ""

    @property
    def effects(self) -> Float[Tensor, "edge batch"]:
        """``values - corrupted``: the (estimated) change of the metric."""
        return self.values - self.corrupted

    def normalized(self) -> Float[Tensor, "edge batch"]:
        """``(value - corrupted) / (clean - corrupted)`` per image: 0 = corrupted, 1 = clean (NaN
        where an image's clean and corrupted metrics are equal)."""
        gap = self.clean - self.corrupted
        out = self.effects / gap
        return torch.where(gap == 0, torch.full_like(out, float("nan")), out)

    def scores(self) -> Float[Tensor, "edge"]:
        """The effect averaged over the batch: one score per edge (what :meth:`top` ranks by)."""
        return self.effects.mean(-1)

    def top(self, k: int, *, by: str = "abs") -> List[Edge]:
        """The ``k`` edges with the largest ``|score|`` (``by="abs"``) or score (``by="signed"``)."""
        if by not in ("abs", "signed"):
            raise InputError(f"by must be 'abs' or 'signed', got {by!r}")
        s = self.scores()
        s = s.abs() if by == "abs" else s
        k = int(k)
        if not 0 <= k <= len(self.edges):
            raise InputError(f"k must be in 0..{len(self.edges)} (the number of edges), got {k}")
        order = torch.argsort(s, descending=True, stable=True)[:k]
        return [self.edges[i] for i in order.tolist()]

    def to_frame(self):
        """Tidy table: one row per edge x image (sender, receiver, batch, value, effect, normalized)."""
        import pandas as pd

        E, B = self.values.shape
        norm = self.normalized()
        return pd.DataFrame({
            "edge": [str(e) for e in self.edges for _ in range(B)],
            "sender": [e.sender for e in self.edges for _ in range(B)],
            "receiver": [e.receiver for e in self.edges for _ in range(B)],
            "batch": list(range(B)) * E,
            "value": self.values.reshape(-1).tolist(),
            "effect": self.effects.reshape(-1).tolist(),
            "normalized": norm.reshape(-1).tolist(),
            "method": self.method,
            "metric": self.metric,
        })

    def __repr__(self) -> str:
        return f"EdgeResult({len(self.edges)} edges x {self.values.shape[-1]} images, method={self.method!r}, metric={self.metric!r})"


# =============================================================================================
# the edited forward
# =============================================================================================
@contextlib.contextmanager
def _edge_mode(model: Any) -> Iterator[None]:
    """Per-head results on, parameters frozen (no gradient is ever computed for, or left on, them);
    both restored on exit."""
    use = model.cfg.use_attn_result
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.set_use_attn_result(True)
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        model.set_use_attn_result(use)
        for p, f in flags:
            p.requires_grad_(f)


Deltas = Dict[Tuple[int, str], Tensor]  # (layer, "q"|"k"|"v") -> [H, N, P, D]; (layer, "m") -> [N, P, D]; (L, "logits")
DeltaFn = Callable[[Tuple[int, str], List[Tensor]], Optional[Tensor]]


def _edge_hooks(model: Any, *, start: int, deltas: Optional[Deltas] = None, delta_fn: Optional[DeltaFn] = None,
                senders: Optional[List[Tensor]] = None) -> List[Tuple[str, Callable]]:
    """Forward hooks that add ``deltas[key]`` (or ``delta_fn(key, senders so far)``) to each
    receiver's input, and (with ``senders``, a list to fill) record every sender's output
    ``[N, P, D]`` in forward order. Blocks before ``start`` are not run."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    resid: Dict[str, Tensor] = {}

    def delta(key: Tuple[int, str]) -> Optional[Tensor]:
        if deltas is not None and key in deltas:
            return deltas[key]
        if delta_fn is not None:
            return delta_fn(key, senders if senders is not None else [])
        return None

    hooks: List[Tuple[str, Callable]] = []

    def keep(name: str):
        def hook(x: Tensor, hook: Any) -> None:
            resid[name] = x
        return hook

    def record_input(x: Tensor, hook: Any) -> None:
        if senders is not None:
            senders.append(x)

    def qkv(layer: int, port: str):
        attn = model.blocks[layer].attn
        ln1 = model.blocks[layer].ln1

        def hook(x: Tensor, hook: Any) -> Optional[Tensor]:
            d = delta((layer, port))
            if d is None:
                return None
            W = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[port]  # [H, D, E]
            b = {"q": attn.b_Q, "k": attn.b_K, "v": attn.b_V}[port]  # [H, E]
            inp = ln1(resid["pre"].unsqueeze(0) + d)  # [H, N, P, D]: each head's own input
            return torch.einsum("hnpd,hde->nphe", inp, W) + b
        return hook

    def record_heads(x: Tensor, hook: Any) -> None:
        if senders is not None:
            senders.extend(x.unbind(-2))  # [N, P, H, D] -> H x [N, P, D]

    def mlp_in(layer: int):
        mlp = model.blocks[layer].mlp
        ln2 = model.blocks[layer].ln2

        def hook(x: Tensor, hook: Any) -> Optional[Tensor]:
            d = delta((layer, "m"))
            if d is None:
                return None
            return torch.nn.functional.linear(ln2(resid["mid"] + d), mlp.W_in.T, mlp.b_in)
        return hook

    def record_mlp(x: Tensor, hook: Any) -> None:
        if senders is not None:
            senders.append(x)

    def readout(x: Tensor, hook: Any) -> Optional[Tensor]:
        d = delta((L, "logits"))
        return None if d is None else x + d

    if start == 0:
        hooks.append(("blocks.0.hook_resid_pre", record_input))
    for layer in range(start, L):
        hooks.append((f"blocks.{layer}.hook_resid_pre", keep("pre")))
        for p in PORTS:
            hooks.append((f"blocks.{layer}.attn.hook_{p}", qkv(layer, p)))
        hooks.append((f"blocks.{layer}.attn.hook_result", record_heads))
        hooks.append((f"blocks.{layer}.hook_resid_mid", keep("mid")))
        hooks.append((f"blocks.{layer}.mlp.hook_pre", mlp_in(layer)))
        hooks.append((f"blocks.{layer}.hook_mlp_out", record_mlp))
    hooks.append((f"blocks.{L - 1}.hook_resid_post", readout))
    return hooks


def _run(model: Any, x: Tensor, hooks: List[Tuple[str, Callable]], metric: Any, start: Optional[int] = None,
         runs: int = 1) -> Tensor:
    """Run (from images, or from block ``start`` on a residual stream) with ``hooks``; returns the
    metric ``[runs, batch]`` (the batch axis holds ``runs`` copies of the images)."""
    act: Dict[str, Tensor] = {}
    name = getattr(metric, "hook_name", None)
    if name is not None:
        hooks = hooks + [(name, lambda t, hook: act.__setitem__("x", t))]
    with model.hooks(fwd_hooks=hooks):
        logits = model(x) if start is None else model(x, start_at_layer=start)
    logits = logits.reshape(runs, -1, logits.shape[-1])
    a = act["x"].reshape(runs, -1, *act["x"].shape[1:]) if name is not None else None
    return call_metric(metric, logits, a)  # the sweeps' one metric call (and its shape check)


def _pair(model: Any, clean: Any, corrupted: Any) -> Tuple[Tensor, Tensor]:
    clean, corrupted = as_batch(model, clean), as_batch(model, corrupted)
    if clean.shape != corrupted.shape:
        raise InputError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must have the same shape: one corrupted "
            "image per clean image (repeat a single corrupted image with corrupted.expand_as(clean))"
        )
    return clean, corrupted


def _senders_of(model: Any, images: Tensor, metric: Any) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """Sender outputs ``[n_senders, B, P, D]``, the metric ``[B]`` and the residual stream entering
    every block (``"blocks.{l}.hook_resid_pre"``) of one plain run."""
    senders: List[Tensor] = []
    pre: Dict[str, Tensor] = {}
    hooks = _edge_hooks(model, start=0, senders=senders)
    hooks += [(f"blocks.{layer}.hook_resid_pre", lambda t, hook: pre.__setitem__(hook.name, t))
              for layer in range(model.cfg.n_layers)]
    m = _run(model, images, hooks, metric)[0]
    return torch.stack(senders), m, pre


def _group_of(graph: EdgeGraph, r: int) -> Tuple[Tuple[int, str], Optional[int]]:
    """The delta key of receiver ``r`` and its head (None for an MLP or the readout)."""
    name = graph.receivers[r]
    if name == "logits":
        return (graph.n_layers, "logits"), None
    if name.startswith("m"):
        return (int(name[1:]), "m"), None
    layer, rest = name[1:].split(".h")
    head, port = rest[:-3], rest[-2]
    return (int(layer), port), int(head)


def _receiver_slices(graph: EdgeGraph) -> Dict[Tuple[int, str], List[int]]:
    out: Dict[Tuple[int, str], List[int]] = {}
    for r in range(len(graph.receivers)):
        out.setdefault(_group_of(graph, r)[0], []).append(r)
    return out


# =============================================================================================
# attribution
# =============================================================================================
def edge_attribution(
    model: "HookedViT",
    clean: Any,
    corrupted: Any,
    metric: Callable[..., Tensor],
    *,
    ig_steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
) -> EdgeResult:
    """Estimate the effect of patching every edge from gradients (edge attribution patching).

    For edge ``s -> r``: ``(s_clean - s_corrupted) . dM/d(input_r)``, summed over positions and
    ``d_model``, with the gradient taken at the corrupted run (``ig_steps=None``) or averaged over
    ``ig_steps`` runs whose input (``blocks.0.hook_resid_pre``) lies at the midpoints
    ``corrupted + (i + 0.5) / ig_steps * (clean - corrupted)`` (EAP-IG). Exact on a model that is
    linear in its residual stream (frozen patterns and LayerNorm scales, linear MLPs); compare
    with :func:`patch_edges`, which runs every edge.

    Args:
        model: a pre-norm :class:`~vit_lens.HookedViT`.
        clean, corrupted: images ``[batch, chans, H, W]`` (or anything ``model.preprocess``
            takes), one corrupted image per clean one.
        metric: logits ``[..., batch, n_classes]`` -> ``[..., batch]``, differentiable
            (:func:`vit_lens.patching.logit_metric`, ``logit_diff_metric``, ``prob_metric``, a lambda).
        ig_steps: integrated-gradient steps (None: the plain gradient at the corrupted run).
        batch_size: images per forward/backward pass (default all at once).
        progress: show a progress bar over the passes.

    Returns:
        :class:`EdgeResult` over every edge of :func:`edge_graph`, ``values`` = corrupted metric
        + estimated effect, ``method="attribution"`` (``"attribution_ig"`` with ``ig_steps``).
        No gradient is left on the model's parameters.
    """
    graph = edge_graph(model)
    metric = bind_metric(metric, model)
    clean, corrupted = _pair(model, clean, corrupted)
    if ig_steps is not None and (isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1):
        raise InputError(f"ig_steps must be a positive int (or None for the plain gradient), got {ig_steps!r}")
    B = clean.shape[0]
    bs = B if batch_size is None else int(batch_size)
    if bs < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    steps = [None] if ig_steps is None else [(i + 0.5) / ig_steps for i in range(ig_steps)]
    groups = _receiver_slices(graph)
    n_s, n_r = len(graph.senders), len(graph.receivers)
    up = torch.tensor(graph.n_upstream)
    values, m_clean, m_corr = [], [], []
    chunks = [slice(i, min(i + bs, B)) for i in range(0, B, bs)]
    bar = progress_bar(total=len(chunks) * (2 + len(steps)), progress=progress, desc="edge attribution", unit="pass")
    with _edge_mode(model), bar:
        for sl in chunks:
            c, k = clean[sl], corrupted[sl]
            with torch.no_grad():
                s_clean, mc, _ = _senders_of(model, c, metric)
                bar.update()
                s_corr, mk, _ = _senders_of(model, k, metric)
                bar.update()
            diff = s_clean - s_corr  # [n_s, b, P, D]
            b, P, D = diff.shape[1:]
            grads: Dict[Tuple[int, str], Tensor] = {}
            for alpha in steps:
                deltas: Deltas = {}
                for key in groups:
                    shape = (model.cfg.n_heads, b, P, D) if key[1] in PORTS else (b, P, D)
                    deltas[key] = torch.zeros(shape, dtype=diff.dtype, device=diff.device, requires_grad=True)
                hooks = _edge_hooks(model, start=0, deltas=deltas)
                if alpha is not None:
                    x0 = s_corr[0] + alpha * (s_clean[0] - s_corr[0])
                    hooks = hooks[1:]  # the input is given, not recorded
                    with torch.enable_grad():
                        m = _run(model, x0, hooks, metric, start=0)
                else:
                    with torch.enable_grad():
                        m = _run(model, k, hooks, metric)
                if not m.requires_grad:
                    raise InputError(
                        f"the metric {getattr(metric, '__name__', metric)!r} has no gradient (it is not a differentiable "
                        "function of the logits, e.g. a rank or a top-1 rate); edge attribution needs one: use a logit, "
                        "logit-difference or probability metric, or patch_edges for exact values"
                    )
                keys = list(deltas)
                g = torch.autograd.grad(m.sum(), [deltas[kk] for kk in keys], allow_unused=True)
                for kk, gg in zip(keys, g):
                    gg = torch.zeros_like(deltas[kk]) if gg is None else gg
                    grads[kk] = gg / len(steps) if kk not in grads else grads[kk] + gg / len(steps)
                bar.update()
            est = torch.zeros(n_s, n_r, b, dtype=diff.dtype, device=diff.device)
            for key, rs in groups.items():
                gk = grads[key]
                if key[1] not in PORTS:
                    gk = gk.unsqueeze(0)
                n = int(up[rs[0]])
                est[:n, rs] = torch.einsum("sbpd,rbpd->srb", diff[:n], gk)
            values.append(_flatten(est, graph))
            m_clean.append(mc)
            m_corr.append(mk)
    corr = torch.cat(m_corr).detach()
    eff = torch.cat(values, dim=-1).detach()
    return EdgeResult(list(graph.edges), corr + eff, torch.cat(m_clean).detach(), corr,
                      "attribution" if ig_steps is None else "attribution_ig", getattr(metric, "__name__", type(metric).__name__))


def _flatten(est: Tensor, graph: EdgeGraph) -> Tensor:
    """``[n_s, n_r, b]`` -> ``[edge, b]`` in the order of ``graph.edges`` (by receiver, then sender)."""
    return torch.cat([est[: graph.n_upstream[r], r] for r in range(len(graph.receivers))])


# =============================================================================================
# exact edge patching
# =============================================================================================
def patch_edges(
    model: "HookedViT",
    clean: Any,
    corrupted: Any,
    metric: Callable[..., Tensor],
    edges: Optional[Sequence[EdgeLike]] = None,
    *,
    chunk_size: Optional[int] = None,
    progress: bool = True,
) -> EdgeResult:
    """Patch each edge alone, exactly: the corrupted run with one receiver's input given one
    sender's clean output (``input_r + s_clean - s_corrupted``).

    Runs are batched (``chunk_size`` edges per forward pass, each on its own copy of the batch;
    each pass starts at the earliest patched block from the cached corrupted residual stream).

    Args:
        model, clean, corrupted, metric: as :func:`edge_attribution` (any metric the exact sweeps
            take, differentiable or not).
        edges: the edges to patch (:class:`Edge`, ``"sender->receiver"`` strings or pairs);
            default every edge of :func:`edge_graph`.
        chunk_size: edges per forward pass (default: about :data:`CPU_CHUNK_TOKENS` tokens on a CPU, 64 on a GPU).
        progress: show a progress bar.

    Returns:
        :class:`EdgeResult` (``method="exact"``), ``values [edge, batch]`` in the order given.
    """
    graph = edge_graph(model)
    metric = bind_metric(metric, model)
    clean, corrupted = _pair(model, clean, corrupted)
    edge_list = list(graph.edges) if edges is None else [graph.edge(e) for e in edges]
    idx = [graph.index(e) for e in edge_list]
    B, P = clean.shape[0], None
    with _edge_mode(model), torch.no_grad():
        s_clean, mc, _ = _senders_of(model, clean, metric)
        s_corr, mk, pre = _senders_of(model, corrupted, metric)
        diff = s_clean - s_corr
        P, D = diff.shape[2], diff.shape[3]
        if chunk_size is None:
            chunk = 64 if clean.device.type != "cpu" else max(1, CPU_CHUNK_TOKENS // (B * P))
        else:
            chunk = int(chunk_size)
            if chunk < 1:
                raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
        order = sorted(range(len(idx)), key=lambda i: idx[i][1])  # by receiver: chunks start late
        out = torch.empty(len(idx), B, dtype=mk.dtype, device=mk.device)
        L, H = graph.n_layers, graph.n_heads
        parts = [order[i:i + chunk] for i in range(0, len(order), chunk)]
        for part in progress_bar(parts, progress=progress, desc="edge patching", unit="chunk"):
            R = len(part)
            deltas: Deltas = {}
            start = L
            for j, i in enumerate(part):
                s, r = idx[i]
                key, head = _group_of(graph, r)
                start = min(start, key[0])
                if key not in deltas:
                    shape = (H, R * B, P, D) if key[1] in PORTS else (R * B, P, D)
                    deltas[key] = diff.new_zeros(shape)
                rows = slice(j * B, (j + 1) * B)
                if head is None:
                    deltas[key][rows] = diff[s]
                else:
                    deltas[key][head, rows] = diff[s]
            start = min(start, L - 1)
            x = pre[f"blocks.{start}.hook_resid_pre"].repeat(R, 1, 1)
            hooks = _edge_hooks(model, start=start, deltas=deltas)
            out[part] = _run(model, x, hooks, metric, start=start, runs=R)
    return EdgeResult(edge_list, out, mc, mk, "exact", getattr(metric, "__name__", type(metric).__name__))


# =============================================================================================
# faithfulness
# =============================================================================================
def circuit_faithfulness(
    model: "HookedViT",
    clean: Any,
    corrupted: Any,
    metric: Callable[..., Tensor],
    circuits: Union[Sequence[EdgeLike], Sequence[Sequence[EdgeLike]]],
    *,
    chunk_size: Optional[int] = None,
    progress: bool = True,
):
    """The share of the clean-corrupted metric gap each circuit recovers, exactly.

    The clean images run with every edge outside the circuit ablated: each receiver's input gets,
    for each sender whose edge to it is not kept, that sender's corrupted output in place of its
    output in this run (kept edges carry this run's values, so ablations propagate). Every edge
    kept gives the clean run, none kept the corrupted run.

    Args:
        model, clean, corrupted, metric: as :func:`patch_edges`.
        circuits: one circuit (a list of edges) or a list of circuits.
        chunk_size: circuits per forward pass (default about :data:`CPU_CHUNK_TOKENS` tokens on a CPU, 16 on a GPU).

    Returns:
        A pandas DataFrame, one row per circuit x image: ``circuit`` (its index), ``n_edges``,
        ``batch``, ``value`` (the metric), ``clean``, ``corrupted``, ``recovered``
        ``= (value - corrupted) / (clean - corrupted)`` (NaN where clean equals corrupted).
    """
    import pandas as pd

    graph = edge_graph(model)
    metric = bind_metric(metric, model)
    clean, corrupted = _pair(model, clean, corrupted)
    if isinstance(circuits, (str, Edge)) or (isinstance(circuits, tuple) and len(circuits) == 2
                                             and all(isinstance(x, str) for x in circuits)):
        raise InputTypeError("circuits is a list of edges (one circuit) or a list of such lists, got a single edge; wrap it: [edge]")
    circuits = list(circuits)
    one = len(circuits) == 0 or not isinstance(circuits[0], (list, tuple, set, frozenset)) or (
        isinstance(circuits[0], tuple) and len(circuits[0]) == 2 and all(isinstance(x, str) for x in circuits[0]))
    circ_list = [circuits] if one else circuits
    masks = torch.stack([graph.mask(cast(Sequence[EdgeLike], c)) for c in circ_list])  # [C, n_s, n_r] kept
    values = _faithfulness_runs(model, graph, clean, corrupted, metric, masks, chunk_size, progress)
    v, mc, mk = values
    gap = mc - mk
    rec = (v - mk) / gap
    rec = torch.where(gap == 0, torch.full_like(rec, float("nan")), rec)
    C, B = v.shape
    return pd.DataFrame({
        "circuit": [c for c in range(C) for _ in range(B)],
        "n_edges": [int(masks[c].sum()) for c in range(C) for _ in range(B)],
        "batch": list(range(B)) * C,
        "value": v.reshape(-1).tolist(),
        "clean": mc.repeat(C).tolist(),
        "corrupted": mk.repeat(C).tolist(),
        "recovered": rec.reshape(-1).tolist(),
    })


def _faithfulness_runs(model: Any, graph: EdgeGraph, clean: Tensor, corrupted: Tensor, metric: Any, kept: Tensor,
                       chunk_size: Optional[int], progress: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Metric ``[C, B]`` of the clean run under each kept mask ``[C, n_s, n_r]``, and the clean /
    corrupted metrics ``[B]``."""
    B = clean.shape[0]
    groups = _receiver_slices(graph)
    with _edge_mode(model), torch.no_grad():
        s_corr, mk, _ = _senders_of(model, corrupted, metric)
        s_clean, mc, _ = _senders_of(model, clean, metric)
        P = s_corr.shape[2]
        C = kept.shape[0]
        chunk = (16 if clean.device.type != "cpu" else max(1, CPU_CHUNK_TOKENS // (B * P))) if chunk_size is None else int(chunk_size)
        if chunk < 1:
            raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
        ablated = (~kept) & graph.valid_mask()[None]
        ablated = ablated.to(device=s_corr.device, dtype=s_corr.dtype)
        out = torch.empty(C, B, dtype=mk.dtype, device=mk.device)
        parts = [list(range(i, min(i + chunk, C))) for i in range(0, C, chunk)]
        for part in progress_bar(parts, progress=progress, desc="faithfulness", unit="chunk"):
            R = len(part)
            A = ablated[part]  # [R, n_s, n_r]

            # sender minus its corrupted output, filled in as the senders fire: [n_s, R, B, P, D]
            buf = s_corr.new_empty(s_corr.shape[0], R, *s_corr.shape[1:])
            filled = [0]

            def delta_fn(key: Tuple[int, str], senders: List[Tensor], A: Tensor = A, R: int = R,
                         buf: Tensor = buf, filled: List[int] = filled) -> Optional[Tensor]:
                rs = groups[key]
                n = len(senders)
                for i in range(filled[0], n):
                    torch.sub(senders[i].view(R, *s_corr.shape[1:]), s_corr[i], out=buf[i])
                filled[0] = n
                a = A[:, :n][:, :, rs]  # [R, n, k]
                if not bool(a.any()):
                    return None
                delta = -torch.einsum("Rsk,sRbpd->kRbpd", a, buf[:n]).reshape(len(rs), R * B, *s_corr.shape[2:])
                return delta if key[1] in PORTS else delta[0]

            senders: List[Tensor] = []
            hooks = _edge_hooks(model, start=0, delta_fn=delta_fn, senders=senders)
            out[part] = _run(model, clean.repeat(R, 1, 1, 1), hooks, metric, runs=R)
    return out, mc, mk


def faithfulness_curve(
    model: "HookedViT",
    clean: Any,
    corrupted: Any,
    metric: Callable[..., Tensor],
    scores: EdgeResult,
    ks: Sequence[int],
    *,
    by: str = "abs",
    chunk_size: Optional[int] = None,
    progress: bool = True,
):
    """Share of the gap recovered by the top ``k`` edges of ``scores`` (e.g. an
    :func:`edge_attribution` result), for each ``k`` in ``ks``, exactly (:func:`circuit_faithfulness`).

    Returns:
        A pandas DataFrame, one row per ``k`` x image: ``k``, ``batch``, ``value``, ``clean``,
        ``corrupted``, ``recovered``; ``df.groupby("k").recovered.mean()`` is the curve.
    """
    ks = [int(k) for k in ks]
    circuits = [scores.top(k, by=by) for k in ks]
    df = circuit_faithfulness(model, clean, corrupted, metric, [list(c) for c in circuits], chunk_size=chunk_size,
                              progress=progress)
    df.insert(0, "k", [ks[c] for c in df["circuit"]])
    return df.drop(columns=["circuit", "n_edges"])
