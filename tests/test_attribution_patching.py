"""Tests for attribution patching (vit_lens.attribution_patching, method= on the patching sweeps).

References: exact patching (the batched sweeps, themselves tested against a naive hook loop) and a
naive ``run_with_hooks`` loop for the neuron sweep. On a model made linear (frozen attention
patterns and LayerNorm scales, identity MLP nonlinearity) attribution equals exact patching to
float tolerance; on tiny perturbations it agrees with exact patching in sign and size (first order);
on the real checkpoints it ranks cells like exact patching, to the level measured in the README.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_timm

from vit_lens import HookedViT
from vit_lens.attribution_patching import METHODS, agreement, node_gradients
from vit_lens.core.errors import InputError, NotDefinedError, OutOfRangeError, VitLensError
from vit_lens.patching import (
    identifiability_metric,
    logit_diff_metric,
    logit_metric,
    patch_block_every,
    patch_components_sweep,
    patch_heads_sweep,
    patch_neurons_sweep,
    patch_positions_sweep,
    prob_metric,
)

KW = dict(img_size=24, patch_size=8, depth=3, num_classes=7, embed_dim=48, num_heads=3)  # 10 tokens, d_mlp 192


def _model(dtype=torch.float32, seed: int = 0, **extra) -> HookedViT:
    return HookedViT.from_timm(make_timm("vit_tiny_patch16_224", seed=seed, **{**KW, **extra}), dtype=dtype)


def _images(n: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _freeze_hooks(model, x):
    """Hooks that make ``model`` affine in its residual stream: every attention pattern and every
    LayerNorm scale replaced by its value on ``x[:1]`` (constants), with the MLP nonlinearity made
    the identity by the caller."""
    with torch.no_grad():
        _, cache = model.run_with_cache(x[:1], names_filter=lambda n: n.endswith(("hook_pattern", "hook_scale")))
    return [(n, lambda a, hook=None, _v=v: _v.expand_as(a).clone()) for n, v in cache.items()]


@pytest.fixture()
def linear_model():
    m = _model(torch.float64)
    m.set_use_attn_result(True)
    x = _images(1, 9, torch.float64)
    for b in m.blocks:
        b.mlp.act = lambda t: t
    return m, _freeze_hooks(m, x)


def _eff(res):
    return res.values - res.corrupted


# ------------------------------------------------------------------ exact on a linear model
@pytest.mark.parametrize("sweep,kw", [
    (patch_positions_sweep, dict(hook="resid_pre")),
    (patch_positions_sweep, dict(hook="resid_mid")),
    (patch_positions_sweep, dict(hook="resid_post")),
    (patch_positions_sweep, dict(hook="attn_out")),
    (patch_positions_sweep, dict(hook="mlp_out")),
    (patch_positions_sweep, dict(hook="attn.hook_v")),
    (patch_heads_sweep, dict(hook="attn.hook_z")),
    (patch_heads_sweep, dict(hook="attn.hook_result", positions="patches")),
    (patch_components_sweep, dict(components=("resid_pre", "attn_out", "mlp_out", "mlp.hook_pre"))),
    (patch_block_every, dict()),
    (patch_neurons_sweep, dict(neurons=[0, 5, 17, 100, 191])),
    (patch_neurons_sweep, dict(neurons=[3, 64], positions=[0, 2, 9])),
])
def test_attribution_equals_exact_on_a_linear_model(linear_model, sweep, kw):
    m, freeze = linear_model
    clean, corr = _images(3, 1, torch.float64), _images(3, 2, torch.float64)
    metric = logit_diff_metric([1, 2, 3], [4, 5, 6])
    with m.hooks(fwd_hooks=freeze):
        exact = sweep(m, clean, corr, metric, progress=False, **kw)
        attr = sweep(m, clean, corr, metric, progress=False, method="attribution", **kw)
    assert attr.method == "attribution" and exact.method == "exact"
    assert attr.dims == exact.dims and attr.coords == exact.coords
    torch.testing.assert_close(attr.corrupted, exact.corrupted, rtol=0, atol=1e-10)
    torch.testing.assert_close(attr.clean, exact.clean, rtol=0, atol=1e-10)
    scale = _eff(exact).abs().max()
    assert scale > 1e-3  # the sweep moves the metric
    torch.testing.assert_close(attr.values, exact.values, rtol=0, atol=1e-9 * max(1.0, float(scale)))


def test_the_linear_model_is_not_linear_without_the_freeze(linear_model):
    """The identity above is not vacuous: the same sweep on the original (nonlinear) model differs."""
    clean, corr = _images(3, 1, torch.float64), _images(3, 2, torch.float64)
    metric = logit_diff_metric([1, 2, 3], [4, 5, 6])
    m = _model(torch.float64)
    exact = patch_positions_sweep(m, clean, corr, metric, progress=False)
    attr = patch_positions_sweep(m, clean, corr, metric, progress=False, method="attribution")
    assert (attr.values - exact.values).abs().max() > 1e-3


def test_whole_component_patch_on_a_linear_model_recovers_the_clean_metric(linear_model):
    """Patching all of resid_pre of block 0 is the clean run: on the linear model the estimate is
    clean - corrupted exactly (completeness of a first-order estimate of an affine map)."""
    m, freeze = linear_model
    clean, corr = _images(2, 3, torch.float64), _images(2, 4, torch.float64)
    with m.hooks(fwd_hooks=freeze):
        res = patch_components_sweep(m, clean, corr, logit_metric([0, 6]), components=("resid_pre",), layers=[0],
                                     progress=False, method="attribution")
    torch.testing.assert_close(res.values[0, 0], res.clean, rtol=0, atol=1e-9)


# ------------------------------------------------------------------ sign convention
@pytest.mark.parametrize("hook", ["resid_pre", "attn_out", "attn.hook_q", "attn.hook_k"])
def test_sign_and_size_match_exact_patching_of_tiny_perturbations(hook):
    """clean = corrupted + a tiny change: exact effects are first order, and the estimate matches them
    in sign and size (so 'values = corrupted + estimate' patches clean into corrupted, as exact)."""
    m = _model(torch.float64, seed=3)
    corr = _images(2, 5, torch.float64)
    clean = corr + 1e-4 * _images(2, 6, torch.float64)
    metric = logit_diff_metric([1, 2], [3, 4])
    exact = _eff(patch_positions_sweep(m, clean, corr, metric, hook=hook, progress=False))
    for method in ("attribution", "attribution_qk"):
        est = _eff(patch_positions_sweep(m, clean, corr, metric, hook=hook, progress=False, method=method))
        big = exact.abs() > 0.01 * exact.abs().max()
        assert big.sum() >= 4
        assert bool((torch.sign(est[big]) == torch.sign(exact[big])).all())
        rel = ((est - exact).abs().max() / exact.abs().max()).item()
        assert rel < 1e-3, (method, rel)  # second order in a 1e-4 perturbation
        # the opposite convention (gradient on the clean run, corrupted patched in) is not what we compute
        assert ((-est) - exact).abs().max() > 0.5 * exact.abs().max()


# ------------------------------------------------------------------ the QK fix
def test_qk_fix_is_exact_where_the_softmax_is_the_only_nonlinearity():
    """With everything after the patched layer's pattern made linear (later patterns, every LayerNorm
    scale and the MLPs frozen / linear), patching queries, keys or scores is linear in the pattern:
    the QK fix equals exact patching, while plain attribution does not."""
    m = _model(torch.float64, seed=4)
    x = _images(1, 9, torch.float64)
    for b in m.blocks:
        b.mlp.act = lambda t: t
    freeze = [h for h in _freeze_hooks(m, x) if not h[0].startswith("blocks.1.attn.")]
    clean, corr = 3 * _images(2, 1, torch.float64), 3 * _images(2, 2, torch.float64)
    metric = logit_diff_metric([1, 2], [3, 4])
    with m.hooks(fwd_hooks=freeze):
        for sweep, hook in ((patch_heads_sweep, "attn.hook_q"), (patch_heads_sweep, "attn.hook_k"),
                            (patch_heads_sweep, "attn.hook_attn_scores"), (patch_positions_sweep, "attn.hook_q"),
                            (patch_positions_sweep, "attn.hook_k")):
            kw = dict(hook=hook, layers=[1], progress=False)
            exact = sweep(m, clean, corr, metric, **kw)
            qk = sweep(m, clean, corr, metric, method="attribution_qk", **kw)
            plain = sweep(m, clean, corr, metric, method="attribution", **kw)
            scale = _eff(exact).abs().max()
            assert scale > 1e-3
            torch.testing.assert_close(qk.values, exact.values, rtol=0, atol=1e-9 * float(scale))
            assert (plain.values - exact.values).abs().max() > 1e-4 * scale, (sweep.__name__, hook)
        # a pattern patch is linear in the pattern: plain attribution is exact there already
        exact = patch_heads_sweep(m, clean, corr, metric, hook="attn.hook_pattern", layers=[1], progress=False)
        plain = patch_heads_sweep(m, clean, corr, metric, hook="attn.hook_pattern", layers=[1], progress=False,
                                  method="attribution")
        torch.testing.assert_close(plain.values, exact.values, rtol=0, atol=1e-9 * float(_eff(exact).abs().max()))


def test_qk_fix_changes_nothing_for_hooks_past_the_softmax():
    m = _model()
    clean, corr = _images(2, 1), _images(2, 2)
    metric = logit_metric([1, 2])
    for hook in ("resid_pre", "mlp_out", "attn.hook_z"):
        a = patch_positions_sweep(m, clean, corr, metric, hook=hook, progress=False, method="attribution")
        b = patch_positions_sweep(m, clean, corr, metric, hook=hook, progress=False, method="attribution_qk")
        assert torch.equal(a.values, b.values)


def test_qk_fix_respects_an_attention_mask():
    """Under attention knockout (masked scores) the recomputed softmax is masked as the model masks it."""
    from vit_lens.ablation import attention_knockout

    m = _model(torch.float64, seed=4)
    x = _images(1, 9, torch.float64)
    for b in m.blocks:
        b.mlp.act = lambda t: t
    freeze = [h for h in _freeze_hooks(m, x) if not h[0].startswith("blocks.1.attn.")]
    clean, corr = 3 * _images(2, 1, torch.float64), 3 * _images(2, 2, torch.float64)
    metric = logit_metric([1, 2])
    with attention_knockout(m, "no_cls", mode="mask", layers=[1]), m.hooks(fwd_hooks=freeze):
        exact = patch_heads_sweep(m, clean, corr, metric, hook="attn.hook_k", layers=[1], progress=False)
        qk = patch_heads_sweep(m, clean, corr, metric, hook="attn.hook_k", layers=[1], progress=False,
                               method="attribution_qk")
    torch.testing.assert_close(qk.values, exact.values, rtol=0, atol=1e-8)


# ------------------------------------------------------------------ batching, options, gradients
def test_batched_over_pairs_equals_one_pair_at_a_time():
    m = _model()
    clean, corr = _images(4, 1), _images(4, 2)
    metric = logit_diff_metric([0, 1, 2, 3], [4, 5, 6, 0])
    for method in ("attribution", "attribution_qk"):
        allp = patch_heads_sweep(m, clean, corr, metric, hook="attn.hook_k", progress=False, method=method)
        chunked = patch_heads_sweep(m, clean, corr, metric, hook="attn.hook_k", progress=False, method=method,
                                    chunk_size=1)
        torch.testing.assert_close(chunked.values, allp.values, rtol=1e-5, atol=1e-5)
        for i in range(4):
            one = patch_heads_sweep(m, clean[i : i + 1], corr[i : i + 1], logit_diff_metric(i, [4, 5, 6, 0][i]),
                                    hook="attn.hook_k", progress=False, method=method)
            torch.testing.assert_close(one.values[..., 0], allp.values[..., i], rtol=1e-5, atol=1e-5)


def test_no_gradient_is_left_on_the_parameters_and_flags_are_restored():
    from conftest import weights_hash

    m = _model()
    m.blocks[0].attn.W_Q.requires_grad_(False)  # a user's own choice survives too
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    before = weights_hash(m)
    clean, corr = _images(2, 1), _images(2, 2)
    patch_positions_sweep(m, clean, corr, prob_metric([1, 2]), progress=False, method="attribution_qk")
    patch_neurons_sweep(m, clean, corr, prob_metric([1, 2]), progress=False, method="attribution", ig_steps=2)
    assert all(p.grad is None for p in m.parameters())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert weights_hash(m) == before
    # also when the metric raises half way
    with pytest.raises(NotDefinedError):
        patch_positions_sweep(m, clean, corr, identifiability_metric(m, [1, 2]), progress=False, method="attribution")
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags and all(p.grad is None for p in m.parameters())


def test_metrics_the_exact_sweeps_accept():
    """Names, per-image classes, prob and a metric reading a hook all work; a metric without a gradient
    (ranks) is refused instead of estimating 0 everywhere."""
    m = _model()
    m.class_names = [f"class {i}" for i in range(7)]
    clean, corr = _images(2, 1), _images(2, 2)
    by_name = patch_heads_sweep(m, clean, corr, logit_metric("class 3"), progress=False, method="attribution")
    by_idx = patch_heads_sweep(m, clean, corr, logit_metric(3), progress=False, method="attribution")
    assert torch.equal(by_name.values, by_idx.values)

    class SumMetric:  # reads the last block's output, like identifiability_metric, but differentiable
        hook_name = "blocks.2.hook_resid_post"
        __name__ = "cls_sum"

        def __call__(self, logits, act):
            return act[..., 0, :].sum(-1)

    lin = _model(torch.float64)
    for b in lin.blocks:
        b.mlp.act = lambda t: t
    c64, k64 = clean.double(), corr.double()
    with lin.hooks(fwd_hooks=_freeze_hooks(lin, _images(1, 9, torch.float64))):  # linear: estimate = exact
        exact = patch_positions_sweep(lin, c64, k64, SumMetric(), layers=[1, 2], progress=False)
        est = patch_positions_sweep(lin, c64, k64, SumMetric(), layers=[1, 2], progress=False, method="attribution")
    assert _eff(exact).abs().max() > 1e-3
    torch.testing.assert_close(est.values, exact.values, rtol=0, atol=1e-9)
    with pytest.raises(NotDefinedError, match="method='exact'"):
        patch_heads_sweep(m, clean, corr, identifiability_metric(m, [1, 2]), progress=False, method="attribution")


def test_ig_steps():
    """ig_steps=1 is plain attribution; with many steps the estimate of patching all of resid_pre of
    block 0 (= the clean run; affine in the pixels) approaches clean - corrupted (completeness)."""
    m = _model(torch.float64, seed=2)
    clean, corr = 2 * _images(2, 1, torch.float64), 2 * _images(2, 2, torch.float64)
    metric = logit_diff_metric([1, 2], [3, 4])
    kw = dict(components=("resid_pre",), layers=[0], progress=False, method="attribution")
    one = patch_components_sweep(m, clean, corr, metric, **kw)
    one_b = patch_components_sweep(m, clean, corr, metric, ig_steps=1, **kw)
    assert torch.equal(one.values, one_b.values)
    gap = (one.clean - one.corrupted).abs()
    err1 = (one.values[0, 0] - one.clean).abs()
    err64 = (patch_components_sweep(m, clean, corr, metric, ig_steps=64, **kw).values[0, 0] - one.clean).abs()
    assert bool((err1 > 0.05 * gap).all())  # plain attribution misses the full patch
    assert bool((err64 < err1 / 10).all())
    with pytest.raises(InputError, match="ig_steps"):
        patch_components_sweep(m, clean, corr, metric, ig_steps=4, progress=False, method="attribution_qk")
    with pytest.raises(InputError, match="ig_steps"):
        patch_components_sweep(m, clean, corr, metric, ig_steps=4, progress=False)


def test_bad_input_is_refused():
    m = _model()
    clean, corr = _images(2, 1), _images(2, 2)
    metric = logit_metric(1)
    with pytest.raises(InputError, match="method must be one of"):
        patch_positions_sweep(m, clean, corr, metric, method="gradient", progress=False)
    with pytest.raises(InputError, match="same shape"):
        patch_positions_sweep(m, clean, corr[:1], metric, method="attribution", progress=False)
    with pytest.raises(InputError, match="inference_mode"):
        with torch.inference_mode():
            patch_positions_sweep(m, clean, corr, metric, method="attribution", progress=False)
    with pytest.raises(OutOfRangeError):
        patch_neurons_sweep(m, clean, corr, metric, neurons=[192], progress=False)
    with pytest.raises(VitLensError):
        patch_heads_sweep(m, clean, corr, metric, hook="attn.hook_result", method="attribution", progress=False)
    with pytest.raises(InputError, match="ig_steps"):
        node_gradients(m, clean, corr, metric, ["blocks.0.hook_resid_pre"], ig_steps=0)
    assert METHODS == ("exact", "attribution", "attribution_qk")


# ------------------------------------------------------------------ the exact neuron sweep
def test_exact_neuron_sweep_equals_naive_loop():
    m = _model()
    clean, corr = _images(2, 1), _images(2, 2)
    metric = logit_diff_metric([1, 2], [3, 4])
    neurons, positions = [0, 7, 191], [0, 3, 9]
    res = patch_neurons_sweep(m, clean, corr, metric, neurons=neurons, progress=False)
    part = patch_neurons_sweep(m, clean, corr, metric, neurons=neurons, positions=positions, layers=[1, 2],
                               progress=False, chunk_size=2)
    assert res.dims == ("layer", "neuron", "batch") and res.shape == (3, 3, 2)
    with torch.inference_mode():
        _, cache = m.run_with_cache(clean, names_filter=lambda n: n.endswith("mlp.hook_post"))
        for l in range(3):
            name = f"blocks.{l}.mlp.hook_post"
            for j, n in enumerate(neurons):
                for pos, out, li in ((slice(None), res, l), (positions, part, l - 1)):
                    if li < 0:
                        continue

                    def hook(act, hook=None, n=n, pos=pos):
                        act = act.clone()
                        act[:, pos, n] = cache[name][:, pos, n]
                        return act

                    want = metric(m.run_with_hooks(corr, fwd_hooks=[(name, hook)]))
                    torch.testing.assert_close(out.values[li, j], want, rtol=0, atol=1e-5)
    assert (res.values - res.corrupted).abs().max() > 1e-3


# ------------------------------------------------------------------ agreement helper
def test_agreement_of_a_result_with_itself_and_with_its_negative():
    m = _model()
    clean, corr = _images(2, 1), _images(2, 2)
    ex = patch_positions_sweep(m, clean, corr, logit_metric([1, 2]), progress=False)
    same = agreement(ex, ex, k=5)
    assert (same.spearman > 0.999).all() and (same.topk == 1).all() and (same.sign == 1).all()
    neg = type(ex)(**{**ex.__dict__, "values": 2 * ex.corrupted - ex.values})
    opp = agreement(ex, neg, k=5)
    assert (opp.spearman < -0.999).all() and (opp.topk == 1).all() and (opp.sign == 0).all()
    with pytest.raises(InputError, match="k must be"):
        agreement(ex, ex, k=0)


# ------------------------------------------------------------------ the comparison figure
def test_comparison_figure():
    from vit_lens.plot import attribution_comparison_figure

    m = _model()
    clean, corr = _images(2, 1), _images(2, 2)
    metric = logit_diff_metric([1, 2], [3, 4])
    ex = patch_heads_sweep(m, clean, corr, metric, progress=False)
    est = patch_heads_sweep(m, clean, corr, metric, progress=False, method="attribution_qk")
    fig = attribution_comparison_figure(ex, est, index=1)
    scatter, line, h_ex, h_est = fig.data
    import numpy as np

    assert np.allclose(np.asarray(h_ex.z), ex.normalized()[..., 1].numpy())
    assert np.allclose(np.asarray(h_est.z), est.normalized()[..., 1].numpy())
    assert np.allclose(scatter.x, ex.normalized()[..., 1].reshape(-1).numpy())
    assert "attribution_qk" in fig.layout.title.text
    both = patch_block_every(m, clean, corr, metric, layers=[0, 1], progress=False)
    both_a = patch_block_every(m, clean, corr, metric, layers=[0, 1], progress=False, method="attribution")
    assert len(attribution_comparison_figure(both, both_a, component="attn_out").data) == 4
    with pytest.raises(InputError, match="component"):
        attribution_comparison_figure(both, both_a)
    with pytest.raises(InputError, match="same sweep"):
        attribution_comparison_figure(ex, both_a)


# ------------------------------------------------------------------ the real checkpoints
def _real_pairs(model, labelled_images, n=2):
    rows = labelled_images
    a, b = rows[:n], rows[len(rows) // 2 : len(rows) // 2 + n]
    clean = model.preprocess([r["path"] for r in a])
    corr = model.preprocess([r["path"] for r in b])
    return clean, corr, logit_diff_metric([r["class_index"] for r in a], [r["class_index"] for r in b])


# measured levels (experiments/attribution_agreement.py, README "Attribution patching"), minus a margin
# (hook, method): minimum mean Spearman over the 2 pairs of the layer x head sweep; measured (2026-12-01):
# ViT-Ti 0.656 / 0.567 / 0.712, DeiT-Ti 0.723 / 0.721 / 0.854 (mean top-5 overlap 0.5 / 0.3 / 0.4, 0.6 / 0.6 / 0.8)
REAL_LEVELS = {
    ("attn.hook_z", "attribution"): {"real_vit": 0.5, "real_deit": 0.55},
    ("attn.hook_k", "attribution"): {"real_vit": 0.4, "real_deit": 0.55},
    ("attn.hook_k", "attribution_qk"): {"real_vit": 0.55, "real_deit": 0.7},
}


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("which", ["real_vit", "real_deit"])
def test_real_checkpoints_rank_heads_like_exact_patching(request, labelled_images, which):
    model = request.getfixturevalue(which)
    clean, corr, metric = _real_pairs(model, labelled_images)
    got = {}
    for hook in ("attn.hook_z", "attn.hook_k"):
        ex = patch_heads_sweep(model, clean, corr, metric, hook=hook, progress=False)
        for method in ("attribution", "attribution_qk"):
            est = patch_heads_sweep(model, clean, corr, metric, hook=hook, progress=False, method=method)
            got[(hook, method)] = agreement(ex, est, k=5)
    for key, level in REAL_LEVELS.items():
        assert got[key].spearman.mean() >= level[which], (key, got[key])
    # the QK fix helps key patches (measured +0.15 / +0.13 in mean Spearman); it changes nothing for hook_z
    assert got[("attn.hook_k", "attribution_qk")].spearman.mean() > got[("attn.hook_k", "attribution")].spearman.mean()
    assert (got[("attn.hook_z", "attribution_qk")].spearman == got[("attn.hook_z", "attribution")].spearman).all()
