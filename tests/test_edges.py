"""Edge attribution, exact edge patching and circuit faithfulness (vit_lens.edges, issue 14 part B).

References: exact edge patching against a re-computation from the definition (a receiver head's
output recomputed by hand from its own q / k / v inputs, an MLP's from its own input, the readout from
the final residual stream plus one sender's difference), patched in at other hook points than the
module uses; attribution against exact patching on a model made linear (frozen patterns and LayerNorm
scales, identity MLP activation), where they must agree to float tolerance, and on tiny perturbations
(first order: same sign and nearly the same value); faithfulness against its exact identities (every
edge kept = clean, none = corrupted, one readout edge dropped = a hand-computed readout).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock

from conftest import make_timm
from vit_lens import HookedViT
from vit_lens.core.errors import InputError, InputTypeError, NotDefinedError, UnknownNameError
from vit_lens.edges import (
    Edge,
    EdgeResult,
    circuit_faithfulness,
    edge_attribution,
    edge_graph,
    faithfulness_curve,
    patch_edges,
)
from vit_lens.patching import identifiability_metric, logit_diff_metric, logit_metric, prob_metric

TINY = dict(img_size=32, patch_size=8, depth=3, num_classes=7)  # 17 tokens, 3 heads, d_model 192


def _model(seed: int = 0, **kw) -> HookedViT:
    return HookedViT.from_timm(make_timm("vit_tiny_patch16_224", seed=seed, **{**TINY, **kw}))


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit() -> HookedViT:
    return _model()


@pytest.fixture(scope="module")
def pair():
    return _images(2, 0), _images(2, 1)


# =============================================================================================
# the graph
# =============================================================================================
def test_graph_counts_and_order(vit):
    g = edge_graph(vit)
    L, H = 3, 3
    assert len(g.senders) == 1 + L * (H + 1) and g.senders[:5] == ("input", "a0.h0", "a0.h1", "a0.h2", "m0")
    assert len(g.receivers) == L * (3 * H + 1) + 1 and g.receivers[-1] == "logits"
    # receivers of block l read the input and everything before block l; the MLP also block l's heads
    expected = sum(3 * H * (1 + l * (H + 1)) + (1 + l * (H + 1) + H) for l in range(L)) + 1 + L * (H + 1)
    assert len(g.edges) == expected
    assert g.index("a0.h1->m0") == (2, g.receiver_index("m0"))
    assert Edge("input", "a0.h0<q>") in g.edges and "input->a0.h0<q>" == str(Edge("input", "a0.h0<q>"))
    assert int(g.valid_mask().sum()) == len(g.edges)


def test_graph_refuses_edges_that_do_not_exist(vit):
    g = edge_graph(vit)
    with pytest.raises(InputError, match="no edge"):
        g.edge("a1.h0->a1.h2<k>")  # same block: a head does not read its neighbours
    with pytest.raises(InputError, match="no edge"):
        g.edge("m1->m0")
    with pytest.raises(UnknownNameError, match="Did you mean"):
        g.edge("a0.h1->a1.h0<x>")
    with pytest.raises(InputError, match="sender->receiver"):
        g.edge("a0.h1 m0")
    with pytest.raises(InputTypeError):
        g.edge(3)


def test_post_norm_models_are_refused():
    post = _model(block_fn=ResPostBlock)
    with pytest.raises(NotDefinedError, match="post-norm"):
        edge_graph(post)


# =============================================================================================
# exact edge patching against a re-computation from the definition
# =============================================================================================
def _senders(model, images):
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(images)
    finally:
        model.set_use_attn_result(False)
    out = {"input": cache["blocks.0.hook_resid_pre"]}
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            out[f"a{l}.h{h}"] = cache[f"blocks.{l}.attn.hook_result"][:, :, h]
        out[f"m{l}"] = cache[f"blocks.{l}.hook_mlp_out"]
    return out, cache


def _ln(ln, x):
    return F.layer_norm(x, (x.shape[-1],), ln.w, ln.b, ln.eps)


def _head_out(model, l, h, xq, xk, xv):
    """Head h of block l on its own query / key / value inputs (residual streams [B, P, D])."""
    blk, a = model.blocks[l], model.blocks[l].attn
    q = _ln(blk.ln1, xq) @ a.W_Q[h] + a.b_Q[h]
    k = _ln(blk.ln1, xk) @ a.W_K[h] + a.b_K[h]
    v = _ln(blk.ln1, xv) @ a.W_V[h] + a.b_V[h]
    pattern = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return pattern @ v @ a.W_O[h]


def _reference_patch(model, corrupted, runs, metric, edge):
    """The corrupted run with one sender's clean-minus-corrupted output added to one receiver's input,
    by hand: the receiver's output is recomputed from the definition and swapped in at its sublayer."""
    (sc, _), (sk, cache) = runs
    diff = sc[edge.sender] - sk[edge.sender]
    r = edge.receiver
    if r == "logits":
        return metric(model.readout.logits(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"] + diff))
    if r.startswith("m"):
        l = int(r[1:])
        blk = model.blocks[l]

        def mlp(out, hook):
            mid = cache[f"blocks.{l}.hook_resid_mid"]  # blocks <= l are unchanged
            return F.linear(blk.mlp.act(F.linear(_ln(blk.ln2, mid + diff), blk.mlp.W_in.T, blk.mlp.b_in)),
                            blk.mlp.W_out.T, blk.mlp.b_out)

        return metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.hook_mlp_out", mlp)]))
    l, rest = r[1:].split(".h")
    l, h, port = int(l), int(rest[:-3]), rest[-2]
    x = cache[f"blocks.{l}.hook_resid_pre"]
    ins = [x + diff if p == port else x for p in "qkv"]

    def attn(out, hook):
        return out - _head_out(model, l, h, x, x, x) + _head_out(model, l, h, *ins)

    return metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{l}.hook_attn_out", attn)]))


EDGES = ["input->a0.h1<q>", "input->a0.h2<k>", "input->a0.h0<v>", "a0.h2->a1.h0<q>", "m0->a2.h1<k>",
         "a1.h1->a2.h2<v>", "input->m0", "a0.h1->m0", "a2.h0->m2", "m1->m2", "input->logits", "a1.h2->logits",
         "m2->logits"]


def test_patch_edges_equals_the_definition(vit, pair):
    clean, corrupted = pair
    metric = logit_diff_metric(3, 5)
    res = patch_edges(vit, clean, corrupted, metric, EDGES, chunk_size=4, progress=False)
    assert [str(e) for e in res.edges] == EDGES
    with torch.no_grad():
        runs = (_senders(vit, clean), _senders(vit, corrupted))
        ref = torch.stack([_reference_patch(vit, corrupted, runs, metric, Edge(*e.split("->"))) for e in EDGES])
    assert torch.allclose(res.values, ref, atol=1e-4), (res.values - ref).abs().max()
    assert torch.allclose(res.corrupted, metric(vit(corrupted)).detach(), atol=1e-5)
    assert torch.allclose(res.clean, metric(vit(clean)).detach(), atol=1e-5)
    assert res.effects.abs().max() > 1e-3  # the edges do something: the comparison can fail


def test_patch_edges_chunking_and_identity(vit, pair):
    clean, corrupted = pair
    metric = logit_metric(2)
    a = patch_edges(vit, clean, corrupted, metric, EDGES, chunk_size=1, progress=False)
    b = patch_edges(vit, clean, corrupted, metric, EDGES, chunk_size=50, progress=True)
    assert torch.allclose(a.values, b.values, atol=1e-5)
    same = patch_edges(vit, clean, clean, metric, EDGES, progress=False)  # clean == corrupted: nothing changes
    assert torch.allclose(same.values, same.corrupted.expand_as(same.values), atol=1e-5)
    assert torch.isnan(same.normalized()).all()


# =============================================================================================
# attribution against exact patching
# =============================================================================================
def _linearised(model, corrupted):
    """Hooks freezing every attention pattern and LayerNorm scale at the corrupted run's values
    (for any number of copies of the batch), with the MLP activations set to the identity: the
    model is then affine in its residual stream."""
    names = lambda n: n.endswith("hook_scale") or n.endswith("hook_pattern")  # noqa: E731
    _, cache = model.run_with_cache(corrupted, names_filter=names)
    frozen = {n: cache[n].clone() for n in cache.keys()}

    def freeze(x, hook):
        f = frozen[hook.name]
        copies = x.shape[x.ndim - f.ndim] // f.shape[0]
        return f.repeat(copies, *([1] * (f.ndim - 1))).expand_as(x)

    for b in model.blocks:
        b.mlp.act = lambda x: x
    return [(n, freeze) for n in frozen]


def test_attribution_is_exact_on_a_linearised_model(pair):
    clean, corrupted = pair
    model = _model(seed=1)
    hooks = _linearised(model, corrupted)
    metric = logit_diff_metric([1, 4], [6, 0])
    with model.hooks(fwd_hooks=hooks):
        exact = patch_edges(model, clean, corrupted, metric, progress=False)
        att = edge_attribution(model, clean, corrupted, metric, progress=False)
        ig = edge_attribution(model, clean, corrupted, metric, ig_steps=2, progress=False)
    scale = exact.effects.abs().max()
    assert scale > 1e-2
    assert torch.allclose(att.effects, exact.effects, atol=1e-5 * float(scale) + 1e-6), (att.effects - exact.effects).abs().max()
    assert torch.allclose(ig.effects, exact.effects, atol=1e-5 * float(scale) + 1e-6)
    assert att.method == "attribution" and ig.method == "attribution_ig" and exact.method == "exact"
    # and the model is really non-linear without the hooks: there attribution is only an estimate
    plain = _model(seed=1)
    est = edge_attribution(plain, clean, corrupted, metric, progress=False)
    est = est.effects[[est.edges.index(Edge(*e.split("->"))) for e in EDGES]]
    gap = (est - patch_edges(plain, clean, corrupted, metric, EDGES, progress=False).effects).abs().max()
    assert gap > 1e-3 * float(scale)


def test_sign_and_size_pinned_by_tiny_perturbations(vit):
    clean = _images(2, 3)
    corrupted = clean + 1e-3 * _images(2, 4)
    metric = logit_metric(4)
    exact = patch_edges(vit, clean, corrupted, metric, progress=False).effects
    att = edge_attribution(vit, clean, corrupted, metric, progress=False).effects
    big = exact.abs() > 0.1 * exact.abs().max()
    assert big.sum() >= 5
    assert (torch.sign(att[big]) == torch.sign(exact[big])).all()  # values = corrupted + effect, same direction
    assert torch.allclose(att, exact, atol=0.02 * float(exact.abs().max()))


def test_attribution_batching_metrics_and_no_gradients_left(vit, pair):
    clean, corrupted = pair
    assert not vit.cfg.use_attn_result
    a = edge_attribution(vit, clean, corrupted, prob_metric(3), progress=False)
    b = edge_attribution(vit, clean, corrupted, lambda logits: logits.softmax(-1)[..., 3], batch_size=1, progress=True)
    assert torch.allclose(a.values, b.values, atol=1e-6)
    assert all(p.grad is None and p.requires_grad for p in vit.parameters())
    assert not vit.cfg.use_attn_result
    vit.set_use_attn_result(True)
    try:
        edge_attribution(vit, clean, corrupted, prob_metric(3), progress=False)
        assert vit.cfg.use_attn_result  # restored as found
    finally:
        vit.set_use_attn_result(False)
    df = a.to_frame()
    assert len(df) == len(a.edges) * 2 and set(df.columns) >= {"edge", "sender", "receiver", "batch", "value", "effect"}
    top = a.top(5)
    assert len(top) == 5 and a.scores()[[a.edges.index(e) for e in top]].abs().min() >= a.scores().abs().sort().values[-5]


def test_integrated_gradients_are_complete(vit, pair):
    """EAP-IG integrates the gradient along the input from corrupted to clean: the scores of the edges out
    of the input (every reader of the input) sum to the whole clean-corrupted gap (Riemann error only)."""
    clean, corrupted = pair
    ig = edge_attribution(vit, clean, corrupted, logit_metric(3), ig_steps=8, progress=False)
    out_of_input = [i for i, e in enumerate(ig.edges) if e.sender == "input"]
    gap = ig.clean - ig.corrupted
    assert gap.abs().min() > 0.05
    assert torch.allclose(ig.effects[out_of_input].sum(0), gap, atol=0.01 * float(gap.abs().max()))
    plain = edge_attribution(vit, clean, corrupted, logit_metric(3), progress=False)  # the plain gradient is not
    assert not torch.allclose(plain.effects[out_of_input].sum(0), gap, atol=0.05 * float(gap.abs().max()))


def test_non_differentiable_metrics_are_refused_by_attribution_but_patched_exactly(vit, pair):
    clean, corrupted = pair
    top1 = identifiability_metric(vit, [3, 3], kind="rate", positions="all")
    with pytest.raises(InputError, match="no gradient"):
        edge_attribution(vit, clean, corrupted, top1, progress=False)
    res = patch_edges(vit, clean, corrupted, top1, EDGES[:3], progress=False)
    assert ((res.values >= 0) & (res.values <= 1)).all()
    with pytest.raises(InputError, match="same shape"):
        patch_edges(vit, clean, corrupted[:1], logit_metric(0), EDGES[:1], progress=False)
    with pytest.raises(InputError, match="ig_steps"):
        edge_attribution(vit, clean, corrupted, logit_metric(0), ig_steps=0, progress=False)


# =============================================================================================
# faithfulness
# =============================================================================================
def test_faithfulness_identities(vit, pair):
    clean, corrupted = pair
    metric = logit_diff_metric(2, 6)
    g = edge_graph(vit)
    everything = list(g.edges)
    drop = Edge("a1.h2", "logits")
    df = circuit_faithfulness(vit, clean, corrupted, metric, [everything, [], [e for e in everything if e != drop]],
                              chunk_size=2, progress=False)
    v = torch.tensor(df["value"].tolist()).reshape(3, 2)
    mc, mk = metric(vit(clean)).detach(), metric(vit(corrupted)).detach()
    assert torch.allclose(v[0], mc, atol=1e-4) and torch.allclose(v[1], mk, atol=1e-4)
    assert torch.allclose(torch.tensor(df["recovered"].tolist()).reshape(3, 2)[:2], torch.tensor([[1.0, 1.0], [0.0, 0.0]]), atol=1e-4)
    # dropping one readout edge: the readout sees the clean stream with that sender's corrupted output
    sc, cache = _senders(vit, clean)
    sk, _ = _senders(vit, corrupted)
    with torch.no_grad():
        ref = metric(vit.readout.logits(cache["blocks.2.hook_resid_post"] - sc["a1.h2"] + sk["a1.h2"]))
    assert torch.allclose(v[2], ref, atol=1e-4) and (v[2] - mc).abs().max() > 1e-4
    assert df["n_edges"].tolist() == [len(everything)] * 2 + [0] * 2 + [len(everything) - 1] * 2
    one = circuit_faithfulness(vit, clean, corrupted, metric, everything, progress=False)  # a single circuit
    assert torch.allclose(torch.tensor(one["value"].tolist()), mc, atol=1e-4)


def test_faithfulness_curve_ends_at_the_clean_run(vit, pair):
    clean, corrupted = pair
    metric = logit_diff_metric(2, 6)
    att = edge_attribution(vit, clean, corrupted, metric, progress=False)
    n = len(att.edges)
    df = faithfulness_curve(vit, clean, corrupted, metric, att, [0, 10, n], progress=False)
    curve = df.groupby("k").recovered.mean()
    assert curve[0] == pytest.approx(0.0, abs=1e-4) and curve[n] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(InputError, match="k must be"):
        att.top(n + 1)


# =============================================================================================
# the real ViT-Ti on labelled photos
# =============================================================================================
def _spearman(a, b):
    ra, rb = torch.argsort(torch.argsort(a)).double(), torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.slow
def test_real_vit_attribution_ranks_edges_like_exact_patching(real_vit, labelled_images):
    """One labelled-photo pair, 24 random edges (benchmarks/bench_edges.py measures 4 pairs x 400 edges)."""
    rows = labelled_images[:2]
    images = real_vit.preprocess([r["path"] for r in rows])
    labels = [r["class_index"] for r in rows]
    clean, corrupted = images[:1], images[1:2]
    metric = logit_diff_metric(labels[:1], labels[1:2])
    att = edge_attribution(real_vit, clean, corrupted, metric, progress=False)
    g = torch.Generator().manual_seed(0)
    sample = [att.edges[i] for i in torch.randperm(len(att.edges), generator=g)[:24].tolist()]
    exact = patch_edges(real_vit, clean, corrupted, metric, sample, progress=False)
    est = att.scores()[[att.edges.index(e) for e in sample]]
    rho = _spearman(est, exact.scores())
    assert rho > 0.8, rho  # measured 0.927 on this sample


@pytest.mark.parametrize("kind", ["dist", "avg"])
def test_other_token_layouts(kind):
    """Distilled (two prefix tokens, two heads read) and average-pooled models: the same definition."""
    name, kw = {"dist": ("deit_tiny_distilled_patch16_224", {}),
                "avg": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False))}[kind]
    model = HookedViT.from_timm(make_timm(name, seed=2, **{**TINY, **kw}))
    clean, corrupted = _images(2, 5), _images(2, 6)
    metric = logit_metric(1)
    edges = ["input->a0.h1<k>", "a0.h0->m1", "m1->a2.h2<q>", "a2.h1->logits"]
    res = patch_edges(model, clean, corrupted, metric, edges, progress=False)
    with torch.no_grad():
        runs = (_senders(model, clean), _senders(model, corrupted))
        ref = torch.stack([_reference_patch(model, corrupted, runs, metric, Edge(*e.split("->"))) for e in edges])
    assert torch.allclose(res.values, ref, atol=1e-4)
    df = circuit_faithfulness(model, clean, corrupted, metric, [list(edge_graph(model).edges), []], progress=False)
    v = torch.tensor(df["value"].tolist()).reshape(2, 2)
    assert torch.allclose(v[0], res.clean, atol=1e-4) and torch.allclose(v[1], res.corrupted, atol=1e-4)


def test_plots(vit, pair):
    from vit_lens import plot as P

    clean, corrupted = pair
    metric = logit_metric(0)
    att = edge_attribution(vit, clean, corrupted, metric, progress=False)
    exact = patch_edges(vit, clean, corrupted, metric, EDGES, progress=False)
    fig = P.edge_scatter(att, exact)
    xs = [x for t in fig.data[:-1] for x in t.x]
    assert sorted(xs) == pytest.approx(sorted(exact.scores().tolist()))
    df = faithfulness_curve(vit, clean, corrupted, metric, att, [0, len(att.edges)], progress=False)
    fig = P.faithfulness_figure({"attribution": df})
    assert list(fig.data[0].y) == pytest.approx([0.0, 1.0], abs=1e-4)
    with pytest.raises(InputError):
        P.faithfulness_figure({"x": df.drop(columns=["recovered"])})
