"""Tests for vit_lens.class_space: projections and identifiability, checked against timm's own modules.

Reference values are computed here from timm (forward hooks on ``model.blocks``, timm's ``norm``,
``fc_norm`` and ``head``), never from vit_lens code.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import ResPostBlock

from conftest import REAL_VIT, WEIGHTS, make_timm, spread_families
from vit_lens import HookedViT
from vit_lens import class_space as cs
from vit_lens.core import TokenLayout, position_mask

TINY = dict(img_size=32, patch_size=8, depth=2)
FAMILIES = {
    "token": ("vit_tiny_patch16_224", dict(num_classes=10)),
    "avg_fc_norm": ("vit_tiny_patch16_224", dict(num_classes=10, global_pool="avg")),
    "avg_ln_final": ("vit_tiny_patch16_224", dict(num_classes=10, global_pool="avg", fc_norm=False)),
    "no_cls_avg": ("vit_tiny_patch16_224", dict(num_classes=10, class_token=False, global_pool="avg")),
    "registers": ("vit_tiny_patch16_224", dict(num_classes=10, reg_tokens=2)),
    "token_fc_norm": ("vit_tiny_patch16_224", dict(num_classes=10, fc_norm=True)),
    "layerscale": ("vit_tiny_patch16_224", dict(num_classes=10, init_values=0.1)),
    "post_norm": ("vit_tiny_patch16_224", dict(num_classes=10, block_fn=ResPostBlock)),
    "norm_pre": ("vit_tiny_patch16_224", dict(num_classes=10, pre_norm=True)),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(num_classes=10)),
    "three_classes": ("vit_tiny_patch16_224", dict(num_classes=3)),
}


@pytest.fixture(scope="module")
def families():
    return spread_families(FAMILIES, **TINY)


def _timm_blocks(t, x):
    """Block outputs [layer, batch, pos, d] and logits from timm's own forward."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for b in t.blocks]
    try:
        with torch.no_grad():
            logits = t(x)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(outs), logits


def _timm_token_logits(t, resid):
    """timm's final norm(s) and head applied to every token vector on its own."""
    with torch.no_grad():
        y = t.fc_norm(t.norm(resid))
        if hasattr(t, "head_dist") and t.head_dist is not None and getattr(t, "dist_token", None) is not None:
            return (t.head(y) + t.head_dist(y)) / 2
        return t.head(y)


def _ref_rank(logits, target):
    tgt = logits.gather(-1, target.expand(logits.shape[:-1]).unsqueeze(-1))
    return (logits > tgt).sum(-1)


# ------------------------------------------------------------------ the known answer on a real model
@pytest.fixture(scope="module")
def real_run(real_vit, labelled_images):
    import timm

    paths = [r["path"] for r in labelled_images]
    labels = torch.tensor([r["class_index"] for r in labelled_images])
    x = real_vit.preprocess(paths, mode="paper")
    logits, cache = real_vit.run_with_cache(x, names_filter=cs.hook_names(real_vit, "resid_post"))
    tm = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(WEIGHTS / f"{REAL_VIT}.safetensors")),
    ).eval()
    blocks, t_logits = _timm_blocks(tm, x)
    ref_logits = _timm_token_logits(tm, blocks)  # [layer, batch, pos, classes]
    return dict(x=x, labels=labels, logits=logits, cache=cache, tm=tm, ref_logits=ref_logits, t_logits=t_logits)


@pytest.mark.real
def test_paper_identifiability_equals_timm_on_real_vit(real_vit, real_run):
    """Per-layer identifiability ("paper" mode) == timm's norm + head on every block's output tokens."""
    labels, ref_logits = real_run["labels"], real_run["ref_logits"]
    res = cs.identifiability(real_vit, real_run["cache"], labels)
    ref_rank = _ref_rank(ref_logits, labels.view(1, -1, 1))
    ref_r = 1 - ref_rank.double() / 1000
    L = real_vit.cfg.n_layers
    assert res.rank.shape == ref_rank.shape == (L, len(labels), 197)
    # per-layer summaries (the reported numbers) agree within 1e-4
    for pos in ("cls", "image"):
        m = position_mask(TokenLayout.from_counts(1, 197), pos, batch=len(labels))
        ref_mean = (ref_r * m).sum((1, 2)) / m.sum()
        ref_rate = ((ref_rank == 0) & m).sum((1, 2)).double() / m.sum()
        ref_any = ((ref_rank == 0) & m).any(2).double().mean(1)
        assert torch.allclose(res.mean_r(pos).double(), ref_mean, atol=1e-4)
        assert torch.allclose(res.rate(pos).double(), ref_rate, atol=1e-4)
        assert torch.allclose(res.image_share(pos).double(), ref_any, atol=1e-4)
    # per token: identical ranks, except where timm itself has a near-tie (< 1e-4) at the target
    diff = res.rank != ref_rank
    if diff.any():
        tgt = ref_logits.gather(-1, labels.view(1, -1, 1, 1).expand(*ref_logits.shape[:3], 1))
        gap = (ref_logits - tgt).abs()
        gap.scatter_(-1, labels.view(1, -1, 1, 1).expand(*ref_logits.shape[:3], 1), float("inf"))
        assert (gap.min(-1).values[diff] < 1e-4).all()
    assert diff.float().mean() < 1e-3
    # the summary table reports the same numbers
    tab = res.summary()
    last = tab[(tab.layer == L - 1) & (tab.tokens == "image")].iloc[0]
    assert last.top1_rate == pytest.approx(float(res.rate("image")[-1]))


@pytest.mark.real
def test_final_cls_identifiability_is_model_ranking_real(real_vit, real_run, labelled_images):
    labels = real_run["labels"]
    res = cs.identifiability(real_vit, real_run["cache"], labels)
    own = _ref_rank(real_run["logits"], labels)
    timm_rank = _ref_rank(real_run["t_logits"], labels)
    assert torch.equal(res.rank[-1, :, 0], own)
    assert torch.equal(res.readout_rank[-1], own)
    assert torch.equal(own, timm_rank)
    # with timm's own preprocessing the real model classifies 19/20 labelled images correctly
    # (../shared/README.md): so does the last block's [CLS] in class space
    paths = [r["path"] for r in labelled_images]
    _, cache = real_vit.run_with_cache(real_vit.preprocess(paths), names_filter=cs.hook_names(real_vit, "resid_post"))
    assert int((cs.identifiability(real_vit, cache, labels, layers=[-1]).rank[0, :, 0] == 0).sum()) == 19


@pytest.mark.real
def test_real_model_beats_its_random_twin(real_vit, real_run):
    idx = torch.arange(0, 20, 2)  # 10 of the 20 images keep the test fast
    labels = real_run["labels"][idx]
    twin = cs.random_twin(real_vit, seed=0)
    _, cache = twin.run_with_cache(real_run["x"][idx], names_filter=cs.hook_names(twin, "resid_post"))
    base = cs.identifiability(twin, cache, labels)
    real = cs.identifiability(real_vit, {k: v[idx] for k, v in real_run["cache"].cache_dict.items()}, labels)
    # last block: [CLS] identifies the label for most images, the random twin's for almost none
    assert real.rate("cls")[-1] >= 0.8 and base.rate("cls")[-1] <= 0.2
    assert real.mean_r("image")[-1] > base.mean_r("image")[-1] + 0.2
    # few image tokens are top-1 on ViT-Ti, but every image has some; random weights: chance level
    assert real.rate("image")[-1] > 0.02 and base.rate("image")[-1] < 0.01
    assert real.image_share("image")[-1] >= 0.9 and base.image_share("image")[-1] <= 0.3


@pytest.mark.real
def test_top_classes_names_real(real_vit, real_run):
    tab = cs.top_classes(real_vit, real_run["logits"], k=3)
    assert list(tab.columns) == ["image", "rank", "class_index", "class_name", "logit"]
    assert len(tab) == 3 * len(real_run["labels"])
    top1 = tab[tab["rank"] == 0]
    assert top1.class_index.tolist() == real_run["logits"].argmax(-1).tolist()
    assert all(real_vit.class_names[i] == n for i, n in zip(top1.class_index, top1.class_name))


# ------------------------------------------------------------------ every family, against timm
@pytest.mark.parametrize("family", list(FAMILIES))
def test_identifiability_matches_timm_every_family(families, family):
    t, h = families[family]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blocks, t_logits = _timm_blocks(t, x)
    target = torch.tensor([0, 1, 2])
    logits, cache = h.run_with_cache(x, names_filter=cs.hook_names(h, "resid_post"))
    res = cs.identifiability(h, cache, target)
    ref = _ref_rank(_timm_token_logits(t, blocks), target.view(1, -1, 1))
    assert torch.equal(res.rank, ref)
    # the pooled readout of the last block is the model's own ranking (timm's logits)
    assert torch.equal(res.readout_rank[-1], _ref_rank(t_logits, target))
    if h.cfg.pooling == "token":
        assert torch.equal(res.rank[-1, :, 0], _ref_rank(t_logits, target))


@pytest.mark.parametrize("family", ["token", "avg_fc_norm", "avg_ln_final", "distilled", "registers", "no_cls_avg"])
def test_readout_logits_equal_timm(families, family):
    t, h = families[family]
    x = torch.randn(2, 3, 32, 32)
    blocks, t_logits = _timm_blocks(t, x)
    assert torch.allclose(cs.readout_logits(h, blocks[-1]), t_logits, atol=1e-4)


def test_project_paper_equals_timm_norm_head(families):
    for family in ("token", "avg_fc_norm", "distilled", "token_fc_norm"):
        t, h = families[family]
        v = torch.randn(2, 5, h.cfg.d_model)
        assert torch.allclose(cs.project(h, v, "paper"), _timm_token_logits(t, v), atol=1e-4), family


@pytest.mark.parametrize("family", ["token", "avg_fc_norm", "avg_ln_final", "distilled", "no_cls_avg", "layerscale", "norm_pre"])
def test_dla_projection_of_parts_sums_to_logits(families, family):
    """mode='dla': projections of embed + every attn_out / mlp_out sum to the whole (plus constants)."""
    t, h = families[family]
    x = torch.randn(3, 3, 32, 32)
    _, t_logits = _timm_blocks(t, x)
    _, cache = h.run_with_cache(x)
    parts = [cache["blocks.0.hook_resid_pre"]] + [cache[f"blocks.{l}.hook_{s}"] for l in range(h.cfg.n_layers) for s in ("attn_out", "mlp_out")]
    proj = sum(cs.project(h, p, "dla", cache) for p in parts)  # [batch, pos, classes]
    whole = cs.project(h, cache[f"blocks.{h.cfg.n_layers - 1}.hook_resid_post"], "dla", cache)
    assert torch.allclose(proj, whole, atol=1e-4)
    # the constant terms: final norm bias through W_U, plus the classifier bias
    norm = h.fc_norm if h.fc_norm is not None else h.ln_final
    n = h.cfg.n_prefix_tokens
    if h.cfg.pooling == "token":
        readout = whole[:, 0]
    elif h.cfg.pooling == "avg":
        readout = whole[:, n:].mean(1)
    else:  # distilled: [CLS] through the cls head, DIST through the dist head, averaged
        readout = None
    if readout is not None:
        const = norm.b @ t.head.weight.T + t.head.bias
        assert torch.allclose(readout + const, t_logits, atol=1e-4)
    else:
        s = cs.final_scale(h, cache)
        r = cache[f"blocks.{h.cfg.n_layers - 1}.hook_resid_post"]
        rc = r - r.mean(-1, keepdim=True)
        w = h.ln_final.w
        cls = (rc[:, 0] / s[:, 0:1]) @ (w[:, None] * t.head.weight.T) + h.ln_final.b @ t.head.weight.T + t.head.bias
        dist = (rc[:, 1] / s[:, 1:2]) @ (w[:, None] * t.head_dist.weight.T) + h.ln_final.b @ t.head_dist.weight.T + t.head_dist.bias
        assert torch.allclose((cls + dist) / 2, t_logits, atol=1e-4)


def test_final_scale_cached_equals_recomputed(families):
    for family in ("token", "avg_fc_norm"):
        _, h = families[family]
        x = torch.randn(2, 3, 32, 32)
        _, full = h.run_with_cache(x)
        _, light = h.run_with_cache(x, names_filter=cs.hook_names(h, "resid_post"))
        assert torch.allclose(cs.final_scale(h, full), cs.final_scale(h, light), atol=1e-5)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 5), split=st.integers(1, 4), seed=st.integers(0, 1000))
def test_identifiability_is_batch_independent(families, batch, split, seed):
    """Any batch size: ranks of a batch == ranks of its parts; per-image targets respected."""
    _, h = families["registers"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)
    full = cs.identify(h, x, target, progress=False)[0]
    parts = cs.identify(h, x, target, batch_size=split, progress=False)[0]
    assert torch.equal(full.rank, parts.rank) and torch.equal(full.target, target)
    assert full.r.min() >= 1 / 10 and full.r.max() <= 1


def test_identify_default_target_is_prediction(families):
    t, h = families["token"]
    x = torch.randn(4, 3, 32, 32)
    res, logits = cs.identify(h, x, progress=False)
    assert torch.equal(res.target, t(x).argmax(-1))
    assert (res.rank[-1, :, 0] == 0).all()


# ------------------------------------------------------------------ evolution measures vs timm
def _timm_sublayers(t, x):
    """Per block: input, attention output, resid_mid, MLP output, output (timm modules, no LayerScale)."""
    rec = {"in": [], "attn": [], "mlp": [], "out": []}
    hooks = []

    def block_hook(m, i, o):
        rec["in"].append(i[0])
        rec["out"].append(o)

    for b in t.blocks:
        hooks.append(b.register_forward_hook(block_hook))
        hooks.append(b.attn.register_forward_hook(lambda m, i, o: rec["attn"].append(o)))
        hooks.append(b.mlp.register_forward_hook(lambda m, i, o: rec["mlp"].append(o)))
    try:
        with torch.no_grad():
            t(x)
    finally:
        for hk in hooks:
            hk.remove()
    return {k: torch.stack(v) for k, v in rec.items()}


def test_change_rate_categorical_updates_composition_vs_timm(families):
    t, h = families["token"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1, 2, 3, 4])
    rec = _timm_sublayers(t, x)
    lg = {k: _timm_token_logits(t, v) for k, v in rec.items()}
    lg["mid"] = _timm_token_logits(t, rec["in"] + rec["attn"])
    _, cache = h.run_with_cache(x)
    tv = target.view(1, -1, 1)
    tl = {k: v.gather(-1, tv.unsqueeze(-1).expand(*v.shape[:3], 1))[..., 0] for k, v in lg.items()}
    rk = {k: _ref_rank(v, tv) for k, v in lg.items()}
    img = position_mask(h, "image", batch=4)

    # change rate: target logit after the block > before it, share of image tokens
    up = tl["out"] > tl["in"]
    assert torch.allclose(cs.change_rate(h, cache, target), (up & img).sum((1, 2)).float() / img.sum())
    assert torch.equal(cs.change_rate(h, cache, target, per_token=True), up)

    # categorical updates (default: the paper's quantity, the target LOGIT of the sublayer output's own
    # projection vs the reference's): attention vs resid_pre, MLP vs resid_mid (corrected) or resid_pre (paper)
    cu = cs.categorical_updates(h, cache, target)
    assert cu.quantity == "logit" and cu.variant == "corrected"
    assert torch.equal(cu.attn, tl["attn"] > tl["in"])
    assert torch.equal(cu.mlp, tl["mlp"] > tl["mid"])
    torch.testing.assert_close(cu.attn_change, tl["attn"] - tl["in"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cu.mlp_change, tl["mlp"] - tl["mid"], rtol=1e-4, atol=1e-4)
    cpl = cs.categorical_updates(h, cache, target, variant="paper")
    assert torch.equal(cpl.mlp, tl["mlp"] > tl["in"])
    assert torch.equal(cu.attn_top1, rk["attn"] == 0) and torch.equal(cu.mlp_top1, rk["mlp"] == 0)
    # ranks, as an explicit option (the former default; these assertions were the default's before)
    cr = cs.categorical_updates(h, cache, target, quantity="rank")
    assert torch.equal(cr.attn, rk["attn"] < rk["in"])
    assert torch.equal(cr.mlp, rk["mlp"] < rk["mid"])
    cp = cs.categorical_updates(h, cache, target, variant="paper", quantity="rank")
    assert torch.equal(cp.mlp, rk["mlp"] < rk["in"])
    assert torch.equal(cr.mlp_change, (rk["mid"] - rk["mlp"]).float())
    tab = cu.summary()
    assert len(tab) == 2 * h.cfg.n_layers and tab.update_rate.between(0, 1).all()
    assert list(tab.columns) == ["layer", "sublayer", "update_rate", "top1_rate", "mean_change"]

    # residual composition: first matching of input / attn / mlp, else none; shares sum to 1
    top = {k: v.argmax(-1) for k, v in lg.items()}
    comp = cs.residual_composition(h, cache)
    expect = torch.full_like(top["out"], 3)
    expect[top["out"] == top["mlp"]] = 2
    expect[top["out"] == top["attn"]] = 1
    expect[top["out"] == top["in"]] = 0
    assert torch.equal(comp.category, expect)
    shares = comp.shares()
    assert list(shares.columns) == list(cs.COMPOSITION_CATEGORIES)
    assert torch.allclose(torch.tensor(shares.sum(axis=1).values), torch.ones(h.cfg.n_layers, dtype=torch.float64))


def test_identifiability_rate_metric(families):
    t, h = families["token"]
    x = torch.randn(3, 3, 32, 32)
    blocks, _ = _timm_blocks(t, x)
    target = torch.tensor([5, 6, 7])
    ref = _ref_rank(_timm_token_logits(t, blocks[-1]), target.view(-1, 1)) == 0  # [batch, pos]
    assert float(cs.identifiability_rate(h, blocks[-1], target)) == pytest.approx(ref[:, 1:].float().mean().item())
    pos = [0, 3, 5]
    assert float(cs.identifiability_rate(h, blocks[-1], target, positions=pos)) == pytest.approx(ref[:, pos].float().mean().item())


def test_logit_lens_and_sublayer_hooks(families):
    t, h = families["avg_fc_norm"]
    x = torch.randn(2, 3, 32, 32)
    rec = _timm_sublayers(t, x)
    _, cache = h.run_with_cache(x)
    lens = cs.logit_lens(h, cache)
    assert lens.shape == (h.cfg.n_layers, 2, h.cfg.n_ctx, 10)
    assert torch.allclose(lens, _timm_token_logits(t, rec["out"]), atol=1e-4)
    assert torch.allclose(cs.logit_lens(h, cache, positions=[0, 2]), lens[:, :, [0, 2]], atol=1e-5)
    res = cs.identifiability(h, cache, 4, hook="attn_out")
    assert torch.equal(res.rank, _ref_rank(_timm_token_logits(t, rec["attn"]), torch.tensor(4)))
    assert res.readout_rank is None


def test_by_mask_and_patch_mask(families):
    _, h = families["token"]
    pix = torch.zeros(2, 32, 32, dtype=torch.bool)
    pix[:, :16, :16] = True  # top-left quarter: patches (0,0),(0,1),(1,0),(1,1) of a 4x4 grid
    pm = cs.patch_mask(pix, h)
    assert pm.shape == (2, 16) and pm.sum() == 8
    assert pm[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    x = torch.randn(2, 3, 32, 32)
    _, cache = h.run_with_cache(x, names_filter=cs.hook_names(h, "resid_post"))
    res = cs.identifiability(h, cache, [1, 2])
    tab = res.by_mask(pm)
    lab = tab[tab.tokens == "labelled"].mean_r.values
    full_mask = torch.zeros(2, h.cfg.n_ctx, dtype=torch.bool)
    full_mask[:, 1 + torch.tensor([0, 1, 4, 5])] = True
    assert torch.allclose(torch.tensor(lab, dtype=torch.float32), res.mean_r(full_mask))
    # labelled and context tokens together are the image tokens
    n_lab, n_ctx_ = 8, 2 * 16 - 8
    both = (torch.tensor(lab) * n_lab + torch.tensor(tab[tab.tokens == "context"].mean_r.values) * n_ctx_) / 32
    assert torch.allclose(both.float(), res.mean_r("image"), atol=1e-6)


# ------------------------------------------------------------------ categorical updates, explicitly
CU_HOOKS = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post")


def _explicit_categorical_updates(model, cache, target):
    """The definition written out from cached tensors and model.project_to_classes: per block, the
    target logit and rank of each projection; attention vs resid_pre; MLP vs resid_mid / resid_pre."""
    t = target.view(-1, 1)
    out = {k: [] for k in ("attn", "mlp_corr", "mlp_paper", "attn_rank", "mlp_rank_corr", "attn_top1", "mlp_top1",
                           "d_attn", "d_mlp_corr", "d_mlp_paper")}
    for l in range(model.cfg.n_layers):
        lg = {k: model.project_to_classes(cache[f"blocks.{l}.hook_{k}"]) for k in ("resid_pre", "resid_mid", "attn_out", "mlp_out")}
        tl = {k: v[torch.arange(v.shape[0])[:, None], torch.arange(v.shape[1])[None, :], t] for k, v in lg.items()}
        rk = {k: (v > tl[k][..., None]).sum(-1) for k, v in lg.items()}
        out["attn"].append(tl["attn_out"] > tl["resid_pre"])
        out["mlp_corr"].append(tl["mlp_out"] > tl["resid_mid"])
        out["mlp_paper"].append(tl["mlp_out"] > tl["resid_pre"])
        out["d_attn"].append(tl["attn_out"] - tl["resid_pre"])
        out["d_mlp_corr"].append(tl["mlp_out"] - tl["resid_mid"])
        out["d_mlp_paper"].append(tl["mlp_out"] - tl["resid_pre"])
        out["attn_rank"].append(rk["attn_out"] < rk["resid_pre"])
        out["mlp_rank_corr"].append(rk["mlp_out"] < rk["resid_mid"])
        out["attn_top1"].append(rk["attn_out"] == 0)
        out["mlp_top1"].append(rk["mlp_out"] == 0)
    return {k: torch.stack(v) for k, v in out.items()}


def _check_categorical_updates(model, cache, target):
    ref = _explicit_categorical_updates(model, cache, target)
    cu = cs.categorical_updates(model, cache, target)
    cp = cs.categorical_updates(model, cache, target, variant="paper")
    cr = cs.categorical_updates(model, cache, target, quantity="rank")
    assert torch.equal(cu.attn, ref["attn"]) and torch.equal(cu.mlp, ref["mlp_corr"])
    assert torch.equal(cp.mlp, ref["mlp_paper"])
    torch.testing.assert_close(cu.attn_change, ref["d_attn"], rtol=0, atol=1e-5)
    torch.testing.assert_close(cu.mlp_change, ref["d_mlp_corr"], rtol=0, atol=1e-5)
    torch.testing.assert_close(cp.mlp_change, ref["d_mlp_paper"], rtol=0, atol=1e-5)
    assert torch.equal(cr.attn, ref["attn_rank"]) and torch.equal(cr.mlp, ref["mlp_rank_corr"])
    for c in (cu, cp, cr):
        assert torch.equal(c.attn_top1, ref["attn_top1"]) and torch.equal(c.mlp_top1, ref["mlp_top1"])
    # variant="paper" and the default differ only in the MLP's reference
    assert torch.equal(cp.attn, cu.attn) and torch.equal(cp.attn_change, cu.attn_change)
    assert torch.equal(cp.attn_top1, cu.attn_top1) and torch.equal(cp.mlp_top1, cu.mlp_top1)
    return cu, cp, cr


def test_categorical_updates_explicit_small_random_model(families):
    for family in ("token", "registers", "layerscale"):
        _, h = families[family]
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        _, cache = h.run_with_cache(x, names_filter=cs.hook_names(h, *CU_HOOKS))
        cu, cp, _ = _check_categorical_updates(h, cache, torch.tensor([0, 4, 9]))
        assert not torch.equal(cp.mlp_change, cu.mlp_change), family  # the two MLP references do differ here


@pytest.mark.real
def test_categorical_updates_explicit_real_vit(real_vit, labelled_images):
    rows = labelled_images[:3]
    x = real_vit.preprocess([r["path"] for r in rows], mode="paper")
    target = torch.tensor([r["class_index"] for r in rows])
    _, cache = real_vit.run_with_cache(x, names_filter=cs.hook_names(real_vit, *CU_HOOKS))
    cu, cp, cr = _check_categorical_updates(real_vit, cache, target)
    # logits and ranks are different definitions: they disagree on some of the 3 x 12 x 197 tokens
    assert (cu.attn != cr.attn).any() or (cu.mlp != cr.mlp).any()


# ------------------------------------------------------------------ NaN is never top-1
def _sorted_rank(row, t):
    """Independent reference: the target's place in a descending sort, ties in the target's favour."""
    return sorted(row, reverse=True).index(row[t])


@settings(max_examples=60, deadline=None)
@given(row=st.lists(st.sampled_from([-math.inf, -2.0, -0.5, 0.0, 0.5, 3.0, math.inf]), min_size=2, max_size=8),
       data=st.data())
def test_class_rank_with_infinities_matches_a_sort(row, data):
    t = data.draw(st.integers(0, len(row) - 1))
    got = cs.class_rank(torch.tensor(row), torch.tensor(t))
    assert int(got) == _sorted_rank(row, t)
    assert float(cs.class_identifiability(torch.tensor(row), torch.tensor(t))) == pytest.approx(1 - _sorted_rank(row, t) / len(row))


def test_class_rank_nan_is_refused_and_inf_is_ranked():
    from vit_lens.core.errors import InputError

    nan, inf = float("nan"), float("inf")
    # a NaN target logit, or a NaN in another class: refused, never rank 0
    for logits, t in (([nan, 1.0, 2.0], 0), ([1.0, nan, 2.0], 2), ([nan, nan, nan], 1)):
        with pytest.raises(InputError, match="NaN"):
            cs.class_rank(torch.tensor(logits), torch.tensor(t))
        with pytest.raises(InputError, match="NaN"):
            cs.class_identifiability(torch.tensor(logits), torch.tensor(t))
    # one NaN anywhere in a batch refuses the whole batch (no partial answers)
    batch = torch.zeros(2, 3, 5)
    batch[1, 2, 4] = nan
    with pytest.raises(InputError, match=r"\[1, 2\]"):
        cs.class_rank(batch, torch.zeros(2, 1, dtype=torch.long))
    # +inf in another class is larger than the finite target; a +inf target is top-1
    assert int(cs.class_rank(torch.tensor([1.0, inf, 0.0]), torch.tensor(0))) == 1
    assert int(cs.class_rank(torch.tensor([inf, 5.0, 0.0]), torch.tensor(0))) == 0
    # a -inf target is a valid last rank (r = 1 / n_classes)
    assert int(cs.class_rank(torch.tensor([-inf, 1.0, 2.0, 3.0]), torch.tensor(0))) == 3
    assert float(cs.class_identifiability(torch.tensor([-inf, 1.0, 2.0, 3.0]), torch.tensor(0))) == pytest.approx(0.25)


def _nan_cache(h, x, names):
    """A cache whose every activation is NaN from the embedding on (what a NaN image used to give):
    a hook writes NaN into hook_embed, past the forward's own check of the pixels."""
    with h.hooks(fwd_hooks=[("hook_embed", lambda t, hook: torch.full_like(t, float("nan")))]):
        _, cache = h.run_with_cache(x, names_filter=names)
    return cache


def test_nan_image_is_refused_everywhere(families):
    from vit_lens.core.errors import InputError

    _, h = families["token"]
    x = torch.randn(2, 3, 32, 32)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    names = cs.hook_names(h, *CU_HOOKS)
    # the image itself: identify, and getting a cache for identifiability / categorical_updates
    with pytest.raises(InputError, match="NaN"):
        cs.identify(h, bad, progress=False)
    with pytest.raises(InputError, match="NaN"):
        cs.identify(h, bad, [1, 2], progress=False)
    with pytest.raises(InputError, match="NaN"):
        h.run_with_cache(bad, names_filter=names)
    inf = x.clone()
    inf[0, 2, 0, 0] = float("inf")
    with pytest.raises(InputError, match="inf"):
        cs.identify(h, inf, [1, 2], progress=False)
    # NaN activations that get past the forward's check: every class-space function refuses them
    cache = _nan_cache(h, x, names)
    assert torch.isnan(cache["blocks.1.hook_attn_out"]).all()
    for call in (
        lambda: cs.identifiability(h, cache, [1, 2]),
        lambda: cs.identifiability(h, cache, [1, 2], hook="attn_out"),
        lambda: cs.categorical_updates(h, cache, [1, 2]),
        lambda: cs.categorical_updates(h, cache, [1, 2], variant="paper"),
        lambda: cs.categorical_updates(h, cache, [1, 2], quantity="rank"),
        lambda: cs.change_rate(h, cache, [1, 2]),
        lambda: cs.residual_composition(h, cache),
        lambda: cs.identifiability_rate(h, cache["blocks.1.hook_resid_post"], [1, 2]),
    ):
        with pytest.raises(InputError, match="NaN"):
            call()
    # one NaN token in an otherwise clean cache is enough: categorical_updates never reports it as top-1
    _, clean = h.run_with_cache(x, names_filter=names)
    poisoned = dict(clean.cache_dict)
    a = poisoned["blocks.0.hook_attn_out"].clone()
    a[0, 3, 5] = float("nan")
    poisoned["blocks.0.hook_attn_out"] = a
    with pytest.raises(InputError, match="NaN"):
        cs.categorical_updates(h, poisoned, [1, 2])
    with pytest.raises(InputError, match="NaN"):
        cs.categorical_updates(h, poisoned, [1, 2], quantity="rank")


def test_categorical_updates_bad_options(families):
    _, h = families["token"]
    _, cache = h.run_with_cache(torch.randn(2, 3, 32, 32), names_filter=cs.hook_names(h, *CU_HOOKS))
    with pytest.raises(ValueError, match="quantity must be 'logit'"):
        cs.categorical_updates(h, cache, 1, quantity="prob")
    with pytest.raises(ValueError, match="variant must be"):
        cs.categorical_updates(h, cache, 1, variant="fixed")
    with pytest.raises(ValueError, match="mode must be"):
        cs.categorical_updates(h, cache, 1, mode="lens")


# ------------------------------------------------------------------ errors and the baseline
def test_headless_model_clear_error_then_directions():
    t = make_timm("vit_tiny_patch16_224", **TINY, num_classes=0)
    h = HookedViT.from_timm(t)
    x = torch.randn(2, 3, 32, 32)
    _, cache = h.run_with_cache(x, names_filter=cs.hook_names(h, "resid_post"))
    with pytest.raises(ValueError, match="set_class_directions"):
        cs.identifiability(h, cache, 0)
    with pytest.raises(ValueError, match="set_class_directions"):
        cs.project(h, cache["blocks.0.hook_resid_post"])
    W = torch.randn(h.cfg.d_model, 4)
    h.set_class_directions(W, labels=["a", "b", "c", "d"])
    res = cs.identifiability(h, cache, "c")
    ref = _ref_rank(torch.nn.functional.layer_norm(cache["blocks.1.hook_resid_post"], (192,), t.norm.weight, t.norm.bias, 1e-6) @ W, torch.tensor(2))
    assert torch.equal(res.rank[-1], ref)


def test_bad_inputs_have_clear_errors(families):
    _, h = families["token"]
    _, cache = h.run_with_cache(torch.randn(2, 3, 32, 32), names_filter=cs.hook_names(h, "resid_post"))
    with pytest.raises(ValueError, match="2 images"):
        cs.identifiability(h, cache, [1, 2, 3])
    with pytest.raises(IndexError, match="out of range"):
        cs.identifiability(h, cache, torch.tensor([1, 10]))
    with pytest.raises(KeyError, match="names_filter"):
        cs.identifiability(h, cache, 1, hook="attn_out")
    with pytest.raises(ValueError, match="hook must be"):
        cs.identifiability(h, cache, 1, hook="pattern")
    with pytest.raises(ValueError, match="mode must be"):
        cs.identifiability(h, cache, 1, mode="lens")
    with pytest.raises(ValueError, match="cache="):
        cs.project(h, cache["blocks.0.hook_resid_post"], "dla")
    with pytest.raises(IndexError, match="layer 5"):
        cs.identifiability(h, cache, 1, layers=[5])


def test_random_twin_is_seeded_and_leaves_model_alone(families):
    t, h = families["token"]
    before = {k: v.clone() for k, v in h.state_dict().items()}
    a, b, c = cs.random_twin(h, seed=0), cs.random_twin(h, seed=0), cs.random_twin(h, seed=1)
    for k, v in h.state_dict().items():
        assert torch.equal(v, before[k])
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == before.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.W_Q"], sc["blocks.0.attn.W_Q"])
    assert not torch.equal(sa["blocks.0.attn.W_Q"], before["blocks.0.attn.W_Q"])
    assert sa["blocks.0.attn.W_Q"].std().item() == pytest.approx(0.02, rel=0.2)
    assert a.cfg == h.cfg and a.cfg is not h.cfg
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == h(x).shape
