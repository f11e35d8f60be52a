"""Direct logit attribution (DLA) and value vectors as key-value memories.

Direct logit attribution
------------------------
With the final norm's scale frozen at its value on the real input (``mode="dla"`` of
:mod:`vit_lens.class_space`), the model's logit of a class ``t`` is an exact sum::

    logit_t = sum over components c of DLA(c)  +  constant_t

where the components are the pieces the final residual stream is a sum of (``hook_embed``,
``hook_pos_embed``, every ``hook_attn_out`` and ``hook_mlp_out``; finer: every head, every MLP
neuron, every attention source position, plus the output biases), and

    DLA(c) = sum over readout positions p of  alpha_p * (c_p - mean(c_p)) / s_p . d_p[:, t]

with ``s_p`` the frozen final-norm scale at ``p`` (:func:`vit_lens.class_space.final_scale`),
``d_p`` the class directions ``norm.w[:, None] * W_U`` of the classifier reading ``p``, and
``alpha_p`` the pooling weight: 1 on [CLS] for ``"token"`` pooling, 1/2 on [CLS] (``cls`` head)
and 1/2 on the distillation token (``dist`` head) for distilled models, ``1 / n_patches`` on every
patch for ``"avg"`` pooling (the ``fc_norm`` scale of the pooled vector is then the same ``s`` for
every patch). The **constant** is what no component carries: the final norm's bias through the
classifier plus the classifier bias, ``sum_p alpha_p (norm.b . W_U[:, t] + b_U[t])``. Centring is
skipped for models without a final norm. For a logit difference ``t - b`` every term is the
difference. :class:`DLAResult` keeps the parts, the constant and the model's own logit, and
``values.sum() + rest + constant == logit`` holds to float precision (tested).

Value vectors as memories
-------------------------
Following Geva et al. and the seed paper, a sublayer's output is a weighted sum of fixed
*value vectors* with input-dependent *coefficients*:

* MLP of block ``l``: value vectors are the rows of ``W_out[l]`` [d_mlp, d_model]; the coefficients
  are the neuron activations ``blocks.{l}.mlp.hook_post``.
* Attention of block ``l``: value vectors are the rows of ``W_O[l, h]`` [d_head, d_model] of every
  head; the coefficients are ``blocks.{l}.attn.hook_z`` (the attention-weighted values), i.e. the
  match of the token with the keys, weighted by attention.

:func:`memories` projects the value vectors onto the class embeddings (``"raw"``: the logit change
per unit coefficient before the final scale, ``(v - mean(v)) . d_c``; ``"cosine"``: the same,
divided by ``|v - mean(v)| |d_c - mean(d_c)|``). No weight is ever modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple, cast, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from vit_lens.class_space import final_scale, project
from vit_lens.core import Positions, Target, TokenLayout, cache_get, position_mask, resolve_layers, resolve_targets
from vit_lens.core.errors import InputError, NotDefinedError

if TYPE_CHECKING:  # pragma: no cover  (annotations only: no import cycle at run time)
    from vit_lens.core.selection import CacheLike
    from vit_lens.model import HookedViT

By = Literal["component", "layer", "head", "neuron", "position", "head_position"]
Kind = Literal["mlp", "attn"]

__all__ = [
    "DLAResult",
    "KeyValueAgreement",
    "Memories",
    "class_value_agreement",
    "dla",
    "dla_hooks",
    "key_value_agreement",
    "memories",
    "memory_compositionality",
]


# =============================================================================================
# direct logit attribution
# =============================================================================================
def dla_hooks(model: HookedViT, by: By = "component") -> List[str]:
    """The hook names :func:`dla` needs in the cache, for ``run_with_cache(names_filter=...)``."""
    L = model.cfg.n_layers
    names = [f"blocks.{L - 1}.hook_resid_post"]
    if model.ln_final is not None:
        names.append("ln_final.hook_scale")
    names += ["hook_embed", "hook_pos_embed"] if model.ln_pre is None else ["blocks.0.hook_resid_pre"]
    for l in range(L):
        if by in ("component", "layer"):
            names += [f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"]
        elif by == "head":
            names += [f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out"]
        elif by == "neuron":
            names += [f"blocks.{l}.hook_attn_out", f"blocks.{l}.mlp.hook_post"]
        elif by in ("position", "head_position"):
            names += [f"blocks.{l}.attn.hook_pattern", f"blocks.{l}.attn.hook_v", f"blocks.{l}.hook_mlp_out"]
        else:
            raise InputError(f"by must be one of {list(get_args(By))}, got {by!r}")
    return names


@dataclass
class _Group:
    pos: Tensor  # [n] positions read by one classifier head
    weight: Tensor  # [batch, n] alpha_p / s_p
    direction: Tensor  # [batch, d_model] centred (target - baseline) class direction


def _readout(model, cache: Any, t: Tensor, b: Optional[Tensor]) -> Tuple[List[_Group], Tensor]:
    """Readout groups and the constant term [batch] (see the module docstring), from the model's
    readout: which positions each head reads with which pooling weight, its centred class
    directions and its input-independent logit part."""
    s = final_scale(model, cache)  # [batch, pos]
    B, P = s.shape
    dev = s.device
    readout = model.readout
    groups, constant = [], torch.zeros(B, device=dev, dtype=s.dtype)
    for g in readout.read_groups(P):
        pos = torch.arange(P, device=dev)[g.positions]
        D = readout.dla_directions(g.head)
        const = readout.constant(g.head)
        d, c = D[:, t].T, const[t]
        if b is not None:
            d, c = d - D[:, b].T, c - const[b]
        groups.append(_Group(pos=pos, weight=g.weight / s[:, pos], direction=d))
        constant = constant + g.weight * len(pos) * c
    return groups, constant


def _contrib(groups: List[_Group], comp: Tensor) -> Tensor:
    """DLA of a component [batch, pos, ..., d_model] -> [batch, ...]."""
    out: Any = 0  # becomes a tensor
    for g in groups:
        c = comp[:, g.pos]  # [batch, n, ..., d]
        proj = torch.einsum("bn...d,bd->bn...", c, g.direction)
        w = g.weight.reshape(*g.weight.shape, *([1] * (proj.ndim - 2)))
        out = out + (proj * w).sum(1)
    return out


def _bias_contrib(groups: List[_Group], bias: Tensor) -> Tensor:
    """DLA of a bias vector added at every position -> [batch]."""
    return cast(Tensor, sum((g.direction @ bias) * g.weight.sum(1) for g in groups))


@dataclass
class DLAResult:
    """Direct logit attribution of a class logit (or a difference of two).

    Attributes:
        values: the attributed parts, [*dims, batch] (batch last).
        dims: names of the leading axes, e.g. ``("component",)``, ``("layer", "head")``.
        coords: labels for each named axis (``component`` names, ``sublayer`` names); numeric
            axes (``layer``, ``head``, ``neuron``, ``pos``) are labelled by their index.
        rest: the other parts of the same sum, name -> [batch] (embeddings, output biases, the
            sublayers not split at this granularity).
        constant: [batch] the terms no component carries (final-norm bias through the classifier
            and the classifier bias).
        logit: [batch] the model's own logit (difference) for each image.
        target, baseline: [batch] classes (``baseline`` None for a plain logit).

    ``values`` summed over all axes but batch, plus every ``rest`` entry, plus ``constant`` equals
    ``logit`` (:meth:`total`).
    """

    values: Tensor
    dims: Tuple[str, ...]
    coords: Dict[str, list]
    rest: Dict[str, Tensor]
    constant: Tensor
    logit: Tensor
    target: Tensor
    baseline: Optional[Tensor] = None

    def total(self) -> Float[Tensor, "batch"]:
        """Sum of every part and the constant: equals :attr:`logit`."""
        s = self.values.reshape(-1, self.values.shape[-1]).sum(0) + self.constant
        for v in self.rest.values():
            s = s + v
        return s

    def to_frame(self, include_rest: bool = True) -> "Any":
        """Tidy table: one row per (image, part).

        Columns: ``image``, ``component`` (a readable name such as ``"L3H1"``, ``"L3N17"``,
        ``"L3 attn"``, ``"L3 pos 5"``, ``"embed"``, ``"constant"``), one column per axis of
        :attr:`dims` (missing for ``rest`` rows) and ``value``. Summing ``value`` per image gives
        the logit.
        """
        import numpy as np
        import pandas as pd

        lead = self.values.shape[:-1]
        B = self.values.shape[-1]
        idx = np.indices(lead).reshape(len(lead), -1).T if lead else np.zeros((1, 0), dtype=int)
        names = []
        for row in idx:
            names.append(_part_name(self.dims, self.coords, row))
        vals = _np(self.values.reshape(-1, B))  # [parts, batch]
        frames = []
        data = {"image": np.repeat(np.arange(B)[None], len(names), 0).T.reshape(-1),
                "component": np.tile(np.array(names, dtype=object), B)}
        for j, d in enumerate(self.dims):
            col = idx[:, j]
            data[d] = np.tile(np.array([self.coords[d][i] for i in col], dtype=object) if d in self.coords else col, B)
        data["value"] = vals.T.reshape(-1)
        frames.append(pd.DataFrame(data))
        if include_rest:
            extra = dict(self.rest)
            extra["constant"] = self.constant
            for name, v in extra.items():
                frames.append(pd.DataFrame({"image": np.arange(B), "component": name, "value": _np(v)}))
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10, image: int = 0, largest: bool = True) -> "Any":
        """The ``k`` parts with the largest (or smallest) attribution for one image."""
        df = self.to_frame(include_rest=True)
        df = df[df.image == image]
        return (df.nlargest(k, "value") if largest else df.nsmallest(k, "value")).reset_index(drop=True)


def _part_name(dims: Tuple[str, ...], coords: Dict[str, list], row) -> str:
    d = dict(zip(dims, (int(i) for i in row)))
    if dims == ("component",):
        return coords["component"][d["component"]]
    if dims == ("layer", "sublayer"):
        return f"L{d['layer']} {coords['sublayer'][d['sublayer']]}"
    if dims == ("layer", "head"):
        return f"L{d['layer']}H{d['head']}"
    if dims == ("layer", "neuron"):
        return f"L{d['layer']}N{d['neuron']}"
    if dims == ("layer", "pos"):
        return f"L{d['layer']} pos {d['pos']}"
    if dims == ("layer", "head", "pos"):
        return f"L{d['layer']}H{d['head']} pos {d['pos']}"
    return " ".join(f"{k}{v}" for k, v in d.items())


def dla(
    model: HookedViT,
    cache: CacheLike,
    target: Target,
    baseline: Optional[Target] = None,
    *,
    by: By = "component",
) -> DLAResult:
    """Direct logit attribution of the target logit (minus the baseline's) to the model's parts.

    Args:
        model: a HookedViT with a class space.
        cache: the run's cache with the hooks of :func:`dla_hooks` ``(model, by)`` (a full cache works).
        target: the class(es) to attribute: one, or one per image.
        baseline: optional second class(es): attribute the logit difference ``target - baseline``.
        by: the granularity:

            - ``"component"``: [component, batch] over ``embed``, ``pos_embed`` and every
              ``{l}_attn_out`` / ``{l}_mlp_out`` (rest: none).
            - ``"layer"``: [layer, sublayer (attn, mlp), batch] (rest: embeddings).
            - ``"head"``: [layer, head, batch] from ``hook_z`` and ``W_O`` (rest: embeddings, the
              attention output biases ``{l}_attn_bias``, the MLPs ``{l}_mlp_out``).
            - ``"neuron"``: [layer, neuron, batch] from ``mlp.hook_post`` and ``W_out`` (rest:
              embeddings, ``{l}_mlp_bias``, ``{l}_attn_out``).
            - ``"position"``: [layer, pos, batch], the attention outputs split by the *source*
              position they read (heads summed), from ``hook_pattern`` and ``hook_v``; and
              ``"head_position"``: [layer, head, pos, batch] (rest: embeddings, attention biases,
              MLPs).

    Returns:
        a :class:`DLAResult`; ``result.total()`` equals ``result.logit``.
    """
    model.readout.require_head()
    cfg = model.cfg
    L = cfg.n_layers
    dla_hooks(model, by)  # validates `by`
    if cfg.post_norm and by not in ("component", "layer"):
        raise NotDefinedError(
            f"{cfg.model_name} normalises sublayer outputs (post-norm blocks), so they are not sums over "
            f"heads/neurons/positions; use by='component' or by='layer'"
        )
    last = cache_get(cache, f"blocks.{L - 1}.hook_resid_post", "the final residual stream")
    B = last.shape[0]
    t = resolve_targets(model, target, B).to(last.device)
    base = resolve_targets(model, baseline, B).to(last.device) if baseline is not None else None

    with torch.no_grad():
        groups, constant = _readout(model, cache, t, base)
        final = model.readout.logits(last)
        logit = final.gather(1, t[:, None])[:, 0]
        if base is not None:
            logit = logit - final.gather(1, base[:, None])[:, 0]
        if not bool(torch.isfinite(logit).all()):
            bad = (~torch.isfinite(logit)).nonzero().flatten().tolist()
            raise InputError(
                f"the cache gives NaN / inf target logits for images {bad}: their attributions would be meaningless. "
                "HookedViT refuses non-finite pixels, so check a hand-made cache, a hook that edits activations, or a "
                "float16 overflow (run the model in float32)."
            )

        rest: Dict[str, Tensor] = {}
        if model.ln_pre is None:
            emb = {"embed": _contrib(groups, cache_get(cache, "hook_embed")),
                   "pos_embed": _contrib(groups, cache_get(cache, "hook_pos_embed"))}
        else:
            emb = {"embed": _contrib(groups, cache_get(cache, "blocks.0.hook_resid_pre", "the embedding after ln_pre"))}

        def attn_out(l):
            return _contrib(groups, cache_get(cache, f"blocks.{l}.hook_attn_out"))

        def mlp_out(l):
            return _contrib(groups, cache_get(cache, f"blocks.{l}.hook_mlp_out"))

        coords: Dict[str, list] = {}
        dims: Tuple[str, ...]
        attn: Any  # model.blocks[l].attn / .mlp (nn.Module attributes)
        mlp: Any
        if by == "component":
            parts = list(emb.values())
            labels = list(emb)
            for l in range(L):
                parts += [attn_out(l), mlp_out(l)]
                labels += [f"{l}_attn_out", f"{l}_mlp_out"]
            values, dims, coords = torch.stack(parts), ("component",), {"component": labels}
        elif by == "layer":
            rest.update(emb)
            values = torch.stack([torch.stack([attn_out(l), mlp_out(l)]) for l in range(L)])
            dims, coords = ("layer", "sublayer"), {"sublayer": ["attn", "mlp"]}
        elif by == "head":
            rest.update(emb)
            per = []
            for l in range(L):
                attn = model.blocks[l].attn
                z = cache_get(cache, f"blocks.{l}.attn.hook_z")  # [batch, pos, head, d_head]
                per.append(_head_contrib(groups, z, attn.W_O))
                rest[f"{l}_attn_bias"] = _bias_contrib(groups, attn.b_O)
                rest[f"{l}_mlp_out"] = mlp_out(l)
            values, dims = torch.stack(per).permute(0, 2, 1), ("layer", "head")  # [layer, head, batch]
        elif by == "neuron":
            rest.update(emb)
            per = []
            for l in range(L):
                mlp = model.blocks[l].mlp
                post = cache_get(cache, f"blocks.{l}.mlp.hook_post")  # [batch, pos, d_mlp]
                per.append(_neuron_contrib(groups, post, mlp.W_out))  # [batch, d_mlp]
                rest[f"{l}_attn_out"] = attn_out(l)
                rest[f"{l}_mlp_bias"] = _bias_contrib(groups, mlp.b_out)
            values, dims = torch.stack(per).permute(0, 2, 1), ("layer", "neuron")
        else:  # position / head_position
            rest.update(emb)
            per = []
            for l in range(L):
                attn = model.blocks[l].attn
                pattern = torch.nan_to_num(cache_get(cache, f"blocks.{l}.attn.hook_pattern"))  # [b, h, q, k]
                v = cache_get(cache, f"blocks.{l}.attn.hook_v")  # [b, k, h, e]
                per.append(_source_contrib(groups, pattern, v, attn.W_O))  # [batch, head, pos]
                rest[f"{l}_attn_bias"] = _bias_contrib(groups, attn.b_O)
                rest[f"{l}_mlp_out"] = mlp_out(l)
            values = torch.stack(per)  # [layer, batch, head, pos]
            if by == "position":
                values, dims = values.sum(2).permute(0, 2, 1), ("layer", "pos")
            else:
                values, dims = values.permute(0, 2, 3, 1), ("layer", "head", "pos")
    return DLAResult(values=values, dims=dims, coords=coords, rest=rest, constant=constant, logit=logit,
                     target=t, baseline=base)


def _head_contrib(groups: List[_Group], z: Tensor, W_O: Tensor) -> Tensor:
    """Per-head DLA [batch, head] from z [batch, pos, head, d_head] and W_O [head, d_head, d_model]."""
    out: Any = 0  # becomes a tensor
    for g in groups:
        u = torch.einsum("hed,bd->bhe", W_O, g.direction)  # what each z unit writes, projected
        proj = torch.einsum("bnhe,bhe->bnh", z[:, g.pos], u)
        out = out + (proj * g.weight[..., None]).sum(1)
    return out


def _neuron_contrib(groups: List[_Group], post: Tensor, W_out: Tensor) -> Tensor:
    """Per-neuron DLA [batch, d_mlp] from post [batch, pos, d_mlp] and W_out [d_mlp, d_model]."""
    out: Any = 0  # becomes a tensor
    for g in groups:
        u = g.direction @ W_out.T  # [batch, d_mlp]
        out = out + (post[:, g.pos] * g.weight[..., None]).sum(1) * u
    return out


def _source_contrib(groups: List[_Group], pattern: Tensor, v: Tensor, W_O: Tensor) -> Tensor:
    """Per (head, source position) DLA [batch, head, pos] of the attention output (no bias)."""
    out: Any = 0  # becomes a tensor
    for g in groups:
        u = torch.einsum("hed,bd->bhe", W_O, g.direction)
        vu = torch.einsum("bkhe,bhe->bhk", v, u)  # [batch, head, key]
        a = torch.einsum("bhnk,bn->bhk", pattern[:, :, g.pos], g.weight)  # readout-weighted attention
        out = out + a * vu
    return out


# =============================================================================================
# value vectors as memories
# =============================================================================================
def _value_vectors(model, kind: Kind, l: int) -> Tensor:
    """[n_values, d_model] value vectors of block l (attention: rows of W_O, head-major)."""
    blk = model.blocks[l]
    if kind == "mlp":
        return blk.mlp.W_out
    if kind == "attn":
        W_O = blk.attn.W_O
        return W_O.reshape(-1, W_O.shape[-1])
    raise InputError(f"kind must be 'mlp' or 'attn', got {kind!r}")


def _scores(model, V: Tensor, metric: str) -> Tensor:
    D = model.readout.dla_directions()
    raw = V @ D
    if metric == "raw":
        return raw
    if metric == "cosine":
        Vc = V - V.mean(-1, keepdim=True) if model.readout.final_norms else V
        return raw / (Vc.norm(dim=-1, keepdim=True) * D.norm(dim=0, keepdim=True)).clamp_min(1e-12)
    raise InputError(f"metric must be 'raw' or 'cosine', got {metric!r}")


@dataclass
class Memories:
    """Value vectors projected onto the class embeddings.

    Attributes:
        scores: MLP: [layer, d_mlp, n_classes]; attention: [layer, head, d_head, n_classes].
        kind: ``"mlp"`` or ``"attn"``.
        metric: ``"raw"`` or ``"cosine"``.
        layers: block index of each entry of the first axis.
        class_names: names of the classes (or None).
    """

    scores: Tensor
    kind: str
    metric: str
    layers: List[int]
    class_names: Optional[List[str]] = None

    def top_classes(self, k: int = 5) -> "Any":
        """Top-``k`` classes of every value vector as a tidy table.

        Columns: MLP ``layer, neuron``; attention ``layer, head, dim`` (the row of ``W_O[layer, head]``);
        then ``rank`` (0 = top-1), ``class_index``, ``class_name``, ``score``.
        """
        import numpy as np
        import pandas as pd

        C = self.scores.shape[-1]
        k = min(int(k), C)
        vals, idx = self.scores.topk(k, dim=-1)
        lead = vals.shape[:-1]
        grid = np.indices(tuple(lead) + (k,)).reshape(len(lead) + 1, -1)
        cols = ["layer", "neuron"] if self.kind == "mlp" else ["layer", "head", "dim"]
        data = {c: grid[i] for i, c in enumerate(cols)}
        data["layer"] = np.array(self.layers)[data["layer"]]
        data["rank"] = grid[-1]
        ci = idx.reshape(-1).cpu().numpy()
        data["class_index"] = ci
        names = self.class_names or [f"class {i}" for i in range(C)]
        data["class_name"] = [names[i] for i in ci]
        data["score"] = _np(vals.reshape(-1))
        return pd.DataFrame(data)


def memories(
    model: HookedViT,
    kind: Kind = "mlp",
    *,
    metric: Literal["raw", "cosine"] = "cosine",
    layers: Optional[Sequence[int]] = None,
) -> Memories:
    """Project every value vector of the MLPs (rows of ``W_out``) or of the attention heads (rows
    of ``W_O``) onto the class embeddings.

    Args:
        kind: ``"mlp"`` or ``"attn"``.
        metric: ``"cosine"`` (default) or ``"raw"`` (see the module docstring).
        layers: block indices (default all).

    Returns:
        :class:`Memories` (``.scores``, ``.top_classes(k)``). The weights are read, never modified.
    """
    model.readout.require_head()
    ls = resolve_layers(layers, model)
    with torch.no_grad():
        s = torch.stack([_scores(model, _value_vectors(model, kind, l), metric) for l in ls])
    if kind == "attn":
        s = s.reshape(len(ls), model.cfg.n_heads, model.cfg.d_head, -1)
    return Memories(scores=s, kind=kind, metric=metric, layers=ls, class_names=model.class_names)


def class_value_agreement(
    model: HookedViT,
    kind: Kind = "mlp",
    *,
    metric: Literal["raw", "cosine"] = "cosine",
    layers: Optional[Sequence[int]] = None,
) -> "Any":
    """How many classes have a dedicated memory in each layer.

    For every class ``c`` take the value vector of the layer that scores highest for ``c``; the
    class *agrees* with that memory when ``c`` is also that vector's own top-1 class (a mutual best
    match). Weights only, no data.

    Returns:
        DataFrame indexed by ``layer`` with ``agreement_rate`` (share of classes that agree),
        ``classes_covered`` (share of classes that are the top-1 class of at least one value
        vector) and ``mean_best_score`` (mean over classes of the best score).
    """
    import pandas as pd

    mem = memories(model, kind, metric=metric, layers=layers)
    rows = []
    for i, l in enumerate(mem.layers):
        S = mem.scores[i].reshape(-1, mem.scores.shape[-1])  # [n_values, C]
        best_vec = S.argmax(0)  # [C]
        top_of_vec = S.argmax(1)  # [n_values]
        C = S.shape[1]
        agree = top_of_vec[best_vec] == torch.arange(C, device=S.device)
        covered = torch.zeros(C, dtype=torch.bool, device=S.device)
        covered[top_of_vec] = True
        rows.append(dict(layer=l, agreement_rate=agree.float().mean().item(),
                         classes_covered=covered.float().mean().item(), mean_best_score=S.max(0).values.mean().item()))
    return pd.DataFrame(rows).set_index("layer")


def _coefficients(cache: Any, kind: Kind, l: int) -> Tensor:
    """[batch, pos, n_values] memory coefficients of block l."""
    if kind == "mlp":
        return cache_get(cache, f"blocks.{l}.mlp.hook_post", "the MLP coefficients")
    z = cache_get(cache, f"blocks.{l}.attn.hook_z", "the attention coefficients")
    return z.reshape(*z.shape[:2], -1)


@dataclass
class KeyValueAgreement:
    """Overlap between the most activated memories of each token and the target's best memories.

    Attributes:
        overlap: [layer, batch, pos] ``|top-k by coefficient  ∩  top-k value vectors for the target| / k``.
        k: the ``k`` used.
        kind: ``"mlp"`` or ``"attn"``.
        layers: block indices.
        n_prefix_tokens: for position masks.
    """

    overlap: Tensor
    k: int
    kind: str
    layers: List[int]
    n_prefix_tokens: int
    n_values: int = 0

    @property
    def chance_rate(self) -> float:
        """The agreement rate two random k-subsets of the ``n_values`` memories would have:
        ``1 - C(n - k, k) / C(n, k)`` (compare :meth:`rate` with it; it grows with ``k / n``)."""
        import math

        n, k = self.n_values, self.k
        return 1.0 - math.comb(n - k, k) / math.comb(n, k) if n else float("nan")

    def rate(self, positions: Positions = "image") -> Float[Tensor, "layer"]:
        """Key-value agreement rate: share of the chosen tokens with at least one shared memory."""
        _, B, P = self.overlap.shape
        m = position_mask(TokenLayout.from_counts(self.n_prefix_tokens, P), positions, batch=B).to(self.overlap.device)
        return ((self.overlap > 0) & m).sum((1, 2)).float() / m.sum().clamp_min(1)

    def mean_overlap(self, positions: Positions = "image") -> Float[Tensor, "layer"]:
        """Mean overlap fraction over the chosen tokens."""
        _, B, P = self.overlap.shape
        m = position_mask(TokenLayout.from_counts(self.n_prefix_tokens, P), positions, batch=B).to(self.overlap.device)
        return (self.overlap * m).sum((1, 2)) / m.sum().clamp_min(1)


def key_value_agreement(
    model: HookedViT,
    cache: CacheLike,
    target: Target,
    *,
    k: int = 10,
    kind: Kind = "mlp",
    layers: Optional[Sequence[int]] = None,
) -> KeyValueAgreement:
    """Do the memories a token activates most promote its target class?

    For each token and layer: the ``k`` memories with the largest coefficients (signed: most
    positive activation; MLP ``hook_post``, attention ``hook_z``) are compared with the ``k``
    value vectors with the largest raw class score for the image's target class
    (:func:`memories` ``metric="raw"``). The overlap is the shared fraction; a token *agrees* when
    the overlap is non-empty (:meth:`KeyValueAgreement.rate`).

    Args:
        cache: with ``blocks.{l}.mlp.hook_post`` (MLP) or ``blocks.{l}.attn.hook_z`` (attention).
        target: one class, or one per image.
        k: how many memories on each side.
        kind: ``"mlp"`` or ``"attn"``.
        layers: block indices (default all).
    """
    model.readout.require_head()
    ls = resolve_layers(layers, model)
    out = []
    with torch.no_grad():
        for l in ls:
            coef = _coefficients(cache, kind, l)  # [batch, pos, n]
            B, P, n = coef.shape
            if not 1 <= k <= n:
                raise InputError(f"k must be in 1..{n} (the number of value vectors), got {k}")
            t = resolve_targets(model, target, B).to(coef.device)
            raw = _scores(model, _value_vectors(model, kind, l), "raw")  # [n, C]
            best = raw[:, t].T.topk(k, dim=-1).indices  # [batch, k]
            member = torch.zeros(B, n, dtype=torch.bool, device=coef.device)
            member.scatter_(1, best, True)
            top = coef.topk(k, dim=-1).indices  # [batch, pos, k]
            hits = member[:, None, :].expand(B, P, n).gather(-1, top)
            out.append(hits.float().mean(-1))
    return KeyValueAgreement(overlap=torch.stack(out), k=k, kind=kind, layers=ls,
                             n_prefix_tokens=model.cfg.n_prefix_tokens, n_values=n)


def memory_compositionality(
    model: HookedViT,
    cache: CacheLike,
    *,
    k: int = 10,
    kind: Kind = "mlp",
    mode: Literal["paper", "dla"] = "paper",
    positions: Positions = "image",
    layers: Optional[Sequence[int]] = None,
    per_token: bool = False,
) -> Tensor:
    """Share of tokens whose sublayer output predicts a class none of its top memories predicts.

    For each token and layer, the top-1 class of the sublayer's output (``hook_mlp_out`` /
    ``hook_attn_out``, projected with ``mode``) is compared with the top-1 classes (raw score) of
    its ``k`` most activated value vectors (largest signed coefficients). The output is
    *compositional* when its class is not among them: the prediction is composed from several
    memories rather than copied from one.

    Returns:
        [layer] shares over the chosen tokens, or per-token booleans [layer, batch, pos] with
        ``per_token=True``.
    """
    model.readout.require_head()
    ls = resolve_layers(layers, model)
    comp = []
    with torch.no_grad():
        for l in ls:
            coef = _coefficients(cache, kind, l)
            n = coef.shape[-1]
            if not 1 <= k <= n:
                raise InputError(f"k must be in 1..{n} (the number of value vectors), got {k}")
            vec_top1 = _scores(model, _value_vectors(model, kind, l), "raw").argmax(-1)  # [n]
            top = coef.topk(k, dim=-1).indices  # [batch, pos, k]
            mem_classes = vec_top1[top]  # [batch, pos, k]
            out = cache_get(cache, f"blocks.{l}.hook_{'mlp' if kind == 'mlp' else 'attn'}_out")
            pred = project(model, out, mode, cache).argmax(-1)  # [batch, pos]
            comp.append(~(mem_classes == pred[..., None]).any(-1))
    c = torch.stack(comp)
    if per_token:
        return c
    _, B, P = c.shape
    m = position_mask(TokenLayout.for_positions(model, P), positions, batch=B).to(c.device)
    return (c & m).sum((1, 2)).float() / m.sum().clamp_min(1)


def _np(t: Tensor) -> "Any":
    """A tensor on any device as a numpy array (bfloat16, which numpy lacks, as float32)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
