"""Tests for vit_lens.ablation: attention knockout against timm's own masked attention, against
timm with the paper's edit of the softmaxed attention applied by a forward hook (random models and
the real ViT-Ti) and against a hand-written post-softmax zeroing reference, exact no-op knockouts,
context ablation against timm with tokens cut out, the two context-ablation methods agree, masks
from boxes and segmentations, which masks are accepted, hostile inputs (library errors, no weight
changed), and the paper's knockout result on the real ViT-Ti."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_timm, weights_hash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vit_lens import HookedViT
from vit_lens.ablation import (
    attention_knockout,
    context_ablation,
    context_ablation_hooks,
    context_comparison,
    grid_mask_from_box,
    grid_mask_from_segmentation,
    knockout_edges,
    knockout_hooks,
    token_mask_from_grid,
)
from vit_lens.config import rowcol_to_patch_index
from vit_lens.patching import logit_metric, patch_positions_sweep, position_mask

KW = dict(img_size=32, patch_size=8, depth=3, num_classes=7)
VARIANTS = {
    "cls": ("vit_tiny_patch16_224", {}),
    "dist": ("deit_tiny_distilled_patch16_224", {}),
    "reg": ("vit_tiny_patch16_224", dict(reg_tokens=2, no_embed_class=True)),
    "avg": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False)),
}


def _pair(kind: str = "cls", seed: int = 0):
    name, kw = VARIANTS[kind]
    t = make_timm(name, seed=seed, **{**KW, **kw})
    return t, HookedViT.from_timm(t)


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    return _pair("cls")


@pytest.fixture(scope="module", params=["cls", "dist", "reg"])
def any_pair(request):
    return _pair(request.param)


# ------------------------------------------------------------------ references written from timm
def _timm_masked(t, x, allow_per_layer):
    """timm's own forward, block by block, with timm's attention mask (True = may attend)."""
    with torch.inference_mode():
        h = t.norm_pre(t._pos_embed(t.patch_embed(x)))
        for l, blk in enumerate(t.blocks):
            h = blk(h, attn_mask=allow_per_layer.get(l))
        return t.forward_head(t.norm(h))


def _timm_paper(t, x, blocked_per_layer):
    """A hand-written forward from timm's modules that zeroes attention probabilities after the
    softmax, without renormalising."""
    with torch.inference_mode():
        h = t.norm_pre(t._pos_embed(t.patch_embed(x)))
        for l, blk in enumerate(t.blocks):
            a = blk.norm1(h)
            B, N, C = a.shape
            H = blk.attn.num_heads
            q, k, v = blk.attn.qkv(a).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
            p = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)
            if l in blocked_per_layer:
                p = p * (~blocked_per_layer[l]).float()
            o = blk.attn.proj((p @ v).transpose(1, 2).reshape(B, N, C))
            h = h + blk.ls1(o)
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        return t.forward_head(t.norm(h))


def _timm_removed(t, x, keep_positions):
    """timm with tokens cut out of the sequence right after the position embedding."""
    with torch.inference_mode():
        h = t.norm_pre(t._pos_embed(t.patch_embed(x)))
        h = h[:, keep_positions]
        outs = []
        for blk in t.blocks:
            h = blk(h)
            outs.append(h)
        return t.forward_head(t.norm(h)), outs


# ------------------------------------------------------------------ knockout: exact no-ops
@pytest.mark.parametrize("mode", ["mask", "paper"])
def test_knockout_of_no_edge_is_the_plain_forward_exactly(pair, mode):
    _, m = pair
    x = _images(2, 1)
    plain = m(x)
    for kwargs in (dict(edges="none"), dict(edges="self_only", layers=[]), dict(edges="no_cls", heads=[]),
                   dict(edges=torch.zeros(17, 17, dtype=torch.bool))):
        with attention_knockout(m, mode=mode, **kwargs):
            assert torch.equal(m(x), plain)
    assert knockout_hooks(m, "none", mode=mode) == []


# ------------------------------------------------------------------ knockout: mode "mask" vs timm
@pytest.mark.parametrize("edges", ["self_only", "no_cls", "cls_no_image", "random"])
def test_mask_knockout_all_layers_matches_timm(any_pair, edges):
    t, m = any_pair
    x = _images(2, 2)
    P = m.cfg.n_ctx
    if edges == "random":
        e = torch.rand(P, P, generator=torch.Generator().manual_seed(0)) < 0.3
    else:
        e = knockout_edges(m, edges)
    assert e.any()
    ref = _timm_masked(t, x, {l: ~e for l in range(m.cfg.n_layers)})
    with attention_knockout(m, e):
        got = m(x)
    assert (got - ref).abs().max() <= 1e-4
    # and it does something
    assert (got - t(x)).abs().max() > 1e-3


def test_mask_knockout_layer_and_head_subsets_match_timm(pair):
    t, m = pair
    x = _images(2, 3)
    H = m.cfg.n_heads
    e = knockout_edges(m, "self_only")
    heads = {0: [1], 2: [0, 2]}
    allow = {}
    for l, hs in heads.items():
        a = torch.ones(1, H, 17, 17, dtype=torch.bool)
        a[:, hs] = ~e
        allow[l] = a
    ref = _timm_masked(t, x, allow)
    with attention_knockout(m, e, layers=[0, 2], heads=heads):
        got = m(x)
    assert (got - ref).abs().max() <= 1e-4
    with attention_knockout(m, e, layers=[-1], heads=[0, 2]):  # the same heads in one layer
        got = m(x)
    assert (got - _timm_masked(t, x, {2: allow[2]})).abs().max() <= 1e-4


def test_mask_knockout_fused_equals_materialised_and_hook_list(pair):
    _, m = pair
    x = _images(2, 4)
    with attention_knockout(m, "self_only", layers=[0, 1]):
        fused = m(x)
        logits, cache = m.run_with_cache(x)  # caching hook_pattern materialises it
    assert (fused - logits).abs().max() <= 1e-5
    hooked = m.run_with_hooks(x, fwd_hooks=knockout_hooks(m, "self_only", layers=[0, 1], mode="mask"))
    assert (fused - hooked).abs().max() <= 1e-5
    # image tokens attend only to themselves: z == v at every image token, exactly one-hot patterns
    for l in (0, 1):
        z, v = cache[f"blocks.{l}.attn.hook_z"], cache[f"blocks.{l}.attn.hook_v"]
        assert torch.allclose(z[:, 1:], v[:, 1:], atol=1e-6)
        pat = cache[f"blocks.{l}.attn.hook_pattern"][:, :, 1:]
        assert torch.equal(pat, torch.eye(17)[1:].expand_as(pat))
    assert not torch.allclose(cache["blocks.2.attn.hook_z"][:, 1:], cache["blocks.2.attn.hook_v"][:, 1:], atol=1e-3)


# ------------------------------------------------------------------ knockout: mode "zero_edges"
@pytest.mark.parametrize("edges", ["self_only", "no_cls", "cls_no_image", "random"])
def test_zero_edges_knockout_matches_post_softmax_reference(any_pair, edges):
    """mode="zero_edges" (what mode="paper" used to compute) against a hand-written forward that
    zeroes the removed probabilities after the softmax."""
    t, m = any_pair
    x = _images(2, 5)
    P = m.cfg.n_ctx
    if edges == "random":
        e = torch.rand(P, P, generator=torch.Generator().manual_seed(1)) < 0.3
    else:
        e = knockout_edges(m, edges)
    ref = _timm_paper(t, x, {l: e for l in range(m.cfg.n_layers)})
    with attention_knockout(m, e if edges == "random" else edges, mode="zero_edges"):
        got = m(x)
    assert (got - ref).abs().max() <= 1e-4
    # the same hooks work as a hook list
    hooked = m.run_with_hooks(x, fwd_hooks=knockout_hooks(m, e if edges == "random" else edges, mode="zero_edges"))
    assert torch.equal(hooked, got)


# ------------------------------------------------------------------ knockout: mode "paper"
def _paper_edit(edges, n_prefix, heads=None):
    """The paper's edit of the softmaxed attention A [B, H, Q, K], written from its definition:
    "self_only": A[:, :, t, :] = 0; A[:, :, t, t] = 1 for every image token t;
    "no_cls": A[:, :, t, 0] = 0 for every image token t (not renormalised)."""

    def edit(a):
        a = a.clone()
        hs = list(range(a.shape[1])) if heads is None else list(heads)
        for t in range(n_prefix, a.shape[2]):
            for h in hs:
                if edges == "self_only":
                    a[:, h, t, :] = 0
                    a[:, h, t, t] = 1
                elif edges == "no_cls":
                    a[:, h, t, 0] = 0
                else:
                    raise AssertionError(edges)
        return a

    return edit


def _timm_with_edit(t, x, edit_per_layer):
    """timm's own forward, unfused attention, with a plain forward hook on each block's
    ``attn_drop`` (which receives the softmaxed attention) applying ``edit_per_layer[l]``."""
    handles, fused = [], [blk.attn.fused_attn for blk in t.blocks]
    try:
        for l, blk in enumerate(t.blocks):
            blk.attn.fused_attn = False
            if l in edit_per_layer:
                handles.append(blk.attn.attn_drop.register_forward_hook(
                    lambda mod, inp, out, f=edit_per_layer[l]: f(out)))
        with torch.inference_mode():
            return t(x)
    finally:
        for h in handles:
            h.remove()
        for blk, f in zip(t.blocks, fused):
            blk.attn.fused_attn = f


@pytest.mark.parametrize("edges", ["self_only", "no_cls"])
def test_paper_knockout_matches_timm_with_the_papers_edit(any_pair, edges):
    t, m = any_pair
    x = _images(2, 5)
    n_pre = m.cfg.n_prefix_tokens
    ref = _timm_with_edit(t, x, {l: _paper_edit(edges, n_pre) for l in range(m.cfg.n_layers)})
    with attention_knockout(m, edges, mode="paper"):
        got = m(x)
    assert (got - ref).abs().max() <= 1e-4
    assert (got - t(x)).abs().max() > 1e-3  # it does something
    # the same hooks work as a hook list, and a boolean mask equal to the edge set gets the same edit
    assert torch.equal(m.run_with_hooks(x, fwd_hooks=knockout_hooks(m, edges, mode="paper")), got)
    with attention_knockout(m, knockout_edges(m, edges), mode="paper"):
        assert torch.equal(m(x), got)
    # layer and head subsets
    ref = _timm_with_edit(t, x, {0: _paper_edit(edges, n_pre, heads=[1]), 2: _paper_edit(edges, n_pre, heads=[0, 2])})
    with attention_knockout(m, edges, layers=[0, 2], heads={0: [1], 2: [0, 2]}, mode="paper"):
        got = m(x)
    assert (got - ref).abs().max() <= 1e-4


def test_paper_self_only_rows_are_one_hot(pair):
    """The issue's check: paper-mode self_only rows of image-token queries sum to 1 (one-hot on
    the diagonal); "zero_edges" leaves A[t, t] at its softmax value (rows sum to about 0 when the
    diagonal is small); "mask" mode gives the same one-hot rows and the same logits."""
    _, m = pair
    x = _images(2, 6)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    plain_logits, plain = m.run_with_cache(x, names_filter=names)
    runs = {}
    for mode in ("paper", "mask", "zero_edges"):
        with attention_knockout(m, "self_only", mode=mode):
            runs[mode] = m.run_with_cache(x, names_filter=names)
    eye = torch.eye(17)[1:].expand(2, 3, 16, 17)
    for l in range(3):
        pp = runs["paper"][1][names[l]]
        assert torch.allclose(pp[:, :, 1:].sum(-1), torch.ones(2, 3, 16), atol=1e-6)
        assert torch.equal(pp[:, :, 1:], eye)
        assert torch.equal(runs["mask"][1][names[l]][:, :, 1:], eye)
    p0 = plain[names[0]]
    pp, pz = runs["paper"][1][names[0]], runs["zero_edges"][1][names[0]]
    assert torch.equal(pp[:, :, 0], p0[:, :, 0])  # the [CLS] query is not touched (layer 0: same input)
    diag = torch.diagonal(p0, dim1=-2, dim2=-1)[:, :, 1:]
    assert torch.allclose(pz[:, :, 1:].sum(-1), diag, atol=1e-7)  # zero_edges: only A[t, t] is left
    assert (pz[:, :, 1:].sum(-1) < 0.9).all()
    assert (runs["paper"][0] - runs["mask"][0]).abs().max() <= 1e-5
    assert (runs["paper"][0] - runs["zero_edges"][0]).abs().max() > 1e-3
    assert (runs["paper"][0] - plain_logits).abs().max() > 1e-3


def test_paper_mode_refuses_edges_the_paper_does_not_define(pair):
    t, m = pair
    x = _images(2, 17)
    for edges in ("cls_no_image", torch.rand(17, 17, generator=torch.Generator().manual_seed(2)) < 0.3):
        with pytest.raises(ValueError, match="mode='mask'.*mode='zero_edges'"):
            with attention_knockout(m, edges, mode="paper"):
                pass
        with pytest.raises(ValueError, match="defined only for the edge sets"):
            knockout_hooks(m, edges, mode="paper")
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[:2] = True
    with pytest.raises(ValueError, match="edges='within' is none of them"):
        with attention_knockout(m, "within", token_mask=grid, mode="paper"):
            pass
    # per-image masks made of the paper's edge sets get each image's edit
    e = torch.stack([knockout_edges(m, "self_only"), knockout_edges(m, "no_cls")])
    with attention_knockout(m, e, mode="paper"):
        both = m(x)
    for i, name in enumerate(["self_only", "no_cls"]):
        ref = _timm_with_edit(t, x[i : i + 1], {l: _paper_edit(name, 1) for l in range(3)})
        assert (both[i] - ref[0]).abs().max() <= 1e-4
    bad = torch.stack([knockout_edges(m, "self_only"), knockout_edges(m, "cls_no_image")])
    with pytest.raises(ValueError, match=r"image 1"):
        with attention_knockout(m, bad, mode="paper"):
            pass


@pytest.mark.real
def test_paper_knockout_matches_timm_on_the_real_checkpoint(real_vit, labelled_images):
    """The real ViT-Ti: attention_knockout(mode="paper") against timm's own model loaded from the
    same checkpoint, with the paper's edit applied by a forward hook."""
    import timm
    from conftest import WEIGHTS, REAL_VIT

    t = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(WEIGHTS / f"{REAL_VIT}.safetensors"))
    ).eval()
    m = real_vit
    x = m.preprocess([r["path"] for r in labelled_images[:2]])
    for edges in ("self_only", "no_cls"):
        ref = _timm_with_edit(t, x, {l: _paper_edit(edges, 1) for l in range(m.cfg.n_layers)})
        with attention_knockout(m, edges, mode="paper"), torch.inference_mode():
            got = m(x)
        assert (got - ref).abs().max() <= 1e-4
        with torch.inference_mode():
            assert (got - t(x)).abs().max() > 0.1


def test_paper_knockout_zeroes_without_renormalising(pair):
    _, m = pair
    x = _images(1, 6)
    _, plain = m.run_with_cache(x, names_filter=["blocks.0.attn.hook_pattern"])
    with attention_knockout(m, "no_cls", layers=[0], mode="paper"):
        _, paper = m.run_with_cache(x, names_filter=["blocks.0.attn.hook_pattern"])
    with attention_knockout(m, "no_cls", layers=[0], mode="mask"):
        _, mask = m.run_with_cache(x, names_filter=["blocks.0.attn.hook_pattern"])
    p0, pp, pm = (c["blocks.0.attn.hook_pattern"] for c in (plain, paper, mask))
    expected = p0.clone()
    expected[:, :, 1:, 0] = 0
    assert torch.equal(pp, expected)  # zeroed, nothing else changed
    assert torch.allclose(pp[:, :, 1:].sum(-1), 1 - p0[:, :, 1:, 0], atol=1e-6)  # rows no longer sum to 1
    assert torch.equal(pm[:, :, 1:, 0], torch.zeros_like(pm[:, :, 1:, 0]))
    assert torch.allclose(pm.sum(-1), torch.ones(1, 3, 17), atol=1e-6)  # renormalised
    assert torch.allclose(pm[:, :, 1:, 1:], p0[:, :, 1:, 1:] / (1 - p0[:, :, 1:, :1]), atol=1e-6)


# ------------------------------------------------------------------ knockout: composition & errors
def test_knockout_composes_nests_and_restores(pair):
    t, m = pair
    x = _images(2, 7)
    a, b = knockout_edges(m, "no_cls"), knockout_edges(m, "cls_no_image")
    with attention_knockout(m, "no_cls"):
        with attention_knockout(m, "cls_no_image", layers=[1]):
            nested = m(x)
        outer = m(x)
    ref_nested = _timm_masked(t, x, {0: ~a, 1: ~(a | b), 2: ~a})
    assert (nested - ref_nested).abs().max() <= 1e-4
    assert (outer - _timm_masked(t, x, {l: ~a for l in range(3)})).abs().max() <= 1e-4
    assert all(blk.attn.attn_mask is None for blk in m.blocks)
    with pytest.raises(RuntimeError, match="boom"):
        with attention_knockout(m, "self_only"):
            raise RuntimeError("boom")
    assert all(blk.attn.attn_mask is None for blk in m.blocks)
    assert torch.equal(m(x), m(x)) and (m(x) - t(x)).abs().max() <= 1e-4


def test_a_query_with_no_key_left_attends_to_nothing(pair):
    _, m = pair
    x = _images(2, 16)
    e = torch.zeros(17, 17, dtype=torch.bool)
    e[0] = True  # [CLS] may attend to no token at all
    with attention_knockout(m, e, layers=[1]):
        fused, cache = m.run_with_cache(x, names_filter=["blocks.1.attn.hook_z", "blocks.1.attn.hook_v"])
        plain_fused = m(x)
    assert torch.equal(cache["blocks.1.attn.hook_z"][:, 0], torch.zeros(2, 3, 64))
    hooked = m.run_with_hooks(x, fwd_hooks=knockout_hooks(m, e, layers=[1]))
    assert torch.isfinite(hooked).all()
    assert (hooked - plain_fused).abs().max() <= 1e-5 and (fused - plain_fused).abs().max() <= 1e-5


def test_per_image_edges(pair):
    _, m = pair
    x = _images(2, 8)
    e = torch.stack([knockout_edges(m, "self_only"), knockout_edges(m, "no_cls")])
    with attention_knockout(m, e):
        both = m(x)
    for i, name in enumerate(["self_only", "no_cls"]):
        with attention_knockout(m, name):
            assert (both[i] - m(x[i : i + 1])[0]).abs().max() <= 1e-5


def test_within_edges(pair):
    _, m = pair
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[:2, :2] = True
    e = knockout_edges(m, "within", token_mask=grid)
    inside = token_mask_from_grid(grid, m)  # CLS counts as inside
    assert inside.sum() == 5
    for q in range(17):
        for k in range(17):
            assert bool(e[q, k]) == bool(inside[q] and not inside[k])


def test_knockout_inside_a_patching_sweep(pair):
    _, m = pair
    clean, corr = _images(1, 9), _images(1, 10)
    metric = logit_metric(2)
    with attention_knockout(m, "no_cls"):
        res = patch_positions_sweep(m, clean, corr, metric, layers=[1], positions=[0, 3], progress=False)
        _, cache = m.run_with_cache(clean, names_filter=["blocks.1.hook_resid_pre"])
        src = cache["blocks.1.hook_resid_pre"]
        for j, p in enumerate([0, 3]):
            def hook(act, hook=None, p=p):
                act = act.clone()
                act[:, p] = src[:, p]
                return act

            ref = metric(m.run_with_hooks(corr, fwd_hooks=[("blocks.1.hook_resid_pre", hook)]))
            assert torch.allclose(res.values[0, j], ref, atol=1e-5)


def test_knockout_errors(pair):
    _, m = pair
    x = _images(3, 11)
    with pytest.raises(ValueError, match="unknown edge set"):
        knockout_edges(m, "self")
    with pytest.raises(ValueError, match="needs token_mask"):
        knockout_edges(m, "within")
    with pytest.raises(TypeError, match="boolean"):
        knockout_edges(m, torch.zeros(17, 17))
    with pytest.raises(ValueError, match=r"\[17, 17\]"):
        knockout_edges(m, torch.zeros(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode must be"):
        with attention_knockout(m, "self_only", mode="zero"):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with attention_knockout(m, "self_only", heads=[3]):
            pass
    with pytest.raises(ValueError, match="not knocked out"):
        with attention_knockout(m, "self_only", layers=[0], heads={1: [0]}):
            pass
    e = knockout_edges(m, "self_only")[None].expand(2, -1, -1)
    with attention_knockout(m, e):
        with pytest.raises(ValueError, match="one entry per image for 2 images"):
            m(x)
    avg = _pair("avg")[1]
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        knockout_edges(avg, "no_cls")


# ------------------------------------------------------------------ context ablation
def test_context_ablation_keeping_everything_is_the_plain_forward(any_pair):
    _, m = any_pair
    x = _images(2, 12)
    plain = m(x)
    everything = torch.ones(4, 4, dtype=torch.bool)
    for method in ("remove", "attention"):
        with context_ablation(m, everything, method=method) as info:
            assert torch.equal(m(x), plain)
        assert info.positions.shape == (1, m.cfg.n_ctx)


def test_context_removal_matches_timm_and_attention_masking(any_pair):
    t, m = any_pair
    x = _images(2, 13)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[1:3, 0:3] = True
    n_pre = m.cfg.n_prefix_tokens
    kept = list(range(n_pre)) + [rowcol_to_patch_index(r, c, m.cfg) for r in (1, 2) for c in (0, 1, 2)]
    ref_logits, ref_blocks = _timm_removed(t, x, kept)
    with context_ablation(m, keep) as info:
        logits, cache = m.run_with_cache(x)
    assert info.positions.tolist() == [kept]
    assert (logits - ref_logits).abs().max() <= 1e-4
    K = len(kept)
    for l in range(m.cfg.n_layers):
        assert (cache[f"blocks.{l}.hook_resid_post"] - ref_blocks[l]).abs().max() <= 1e-4
    # the caches are consistently shorter, from the embeddings on
    assert cache["hook_embed"].shape == (2, K, m.cfg.d_model) == cache["hook_pos_embed"].shape
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, m.cfg.n_heads, K, K)
    assert torch.allclose(cache["hook_embed"] + cache["hook_pos_embed"], cache["blocks.0.hook_resid_pre"])
    # attention masking gives the kept tokens the same values
    with context_ablation(m, keep, method="attention") as info2:
        logits2, cache2 = m.run_with_cache(x)
    assert cache2["hook_embed"].shape[1] == m.cfg.n_ctx
    for l in range(m.cfg.n_layers):
        a = cache[f"blocks.{l}.hook_resid_post"]
        b = cache2[f"blocks.{l}.hook_resid_post"][:, info2.positions[0]]
        assert (a - b).abs().max() <= 1e-5
    assert (logits - logits2).abs().max() <= 1e-5  # [CLS]-pooled models read a kept token
    # scatter puts values back on the full sequence
    full = info.scatter(cache["blocks.2.hook_resid_post"])
    assert full.shape == (2, m.cfg.n_ctx, m.cfg.d_model)
    assert torch.equal(full[:, kept], cache["blocks.2.hook_resid_post"])
    assert torch.isnan(full[:, [p for p in range(m.cfg.n_ctx) if p not in kept]]).all()


def test_context_ablation_per_image_masks(pair):
    _, m = pair
    x = _images(2, 14)
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    keep[0, 0, :3] = True
    keep[1, 3, 1:] = True
    for method in ("remove", "attention"):
        with context_ablation(m, keep, method=method):
            both = m(x)
        for i in range(2):
            with context_ablation(m, keep[i], method=method):
                assert (both[i] - m(x[i : i + 1])[0]).abs().max() <= 1e-5
    uneven = keep.clone()
    uneven[1, 0, 0] = True
    with pytest.raises(ValueError, match="method='attention'"):
        with context_ablation(m, uneven):
            pass
    with context_ablation(m, uneven, method="attention"):  # any masks work with attention masking
        m(x)
    hooks, info = context_ablation_hooks(m, keep)
    assert [h[0] for h in hooks] == ["hook_embed", "hook_pos_embed"]
    with pytest.raises(ValueError, match="per-image masks"):
        m.run_with_hooks(_images(3, 1), fwd_hooks=hooks)
    with pytest.raises(TypeError, match="boolean"):
        with context_ablation(m, torch.ones(4, 4)):
            pass


# ------------------------------------------------------------------ masks from boxes and segmentations
def test_grid_mask_from_box(pair):
    _, m = pair  # 32x32 images, 8x8 patches, 4x4 grid
    g = grid_mask_from_box((0, 0, 8, 8), m)
    assert g.shape == (4, 4) and g.nonzero().tolist() == [[0, 0]]
    # x 4..20 covers half of col 0, all of col 1, half of col 2; y 4..12 half of rows 0 and 1
    g = grid_mask_from_box((4, 4, 20, 12), m)  # area fractions 1/4 or 1/2: only col 1 reaches 0.5
    assert g.nonzero().tolist() == [[0, 1], [1, 1]]
    assert grid_mask_from_box((4, 4, 20, 12), m, min_overlap=0).nonzero().tolist() == [
        [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert grid_mask_from_box((4, 4, 20, 12), m, min_overlap=1.0).sum() == 0
    # coordinates of a 64x64 original are scaled to the 32x32 input
    assert torch.equal(grid_mask_from_box((0, 0, 16, 16), m, image_size=(64, 64)), grid_mask_from_box((0, 0, 8, 8), m))
    with pytest.raises(ValueError, match="empty"):
        grid_mask_from_box((5, 5, 5, 9), m)


def test_grid_mask_from_segmentation(pair, tmp_path):
    from PIL import Image

    _, m = pair
    seg = np.zeros((64, 96), dtype=np.uint8)  # any resolution: resized to the 4x4 grid
    seg[0:32, 48:96] = 3  # top-right quarter: rows 0-1, cols 2-3
    seg[48:64, 0:24] = 5  # bottom-left: row 3, col 0 (centre samples at x = 12, y = 56)
    g = grid_mask_from_segmentation(seg, m)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 2:4] = True
    expected[3, 0] = True
    assert torch.equal(g, expected)
    only3 = grid_mask_from_segmentation(seg, m, label=3)
    assert only3.sum() == 4 and not only3[3, 0]
    assert torch.equal(grid_mask_from_segmentation(seg, m, label=[3, 5]), expected)
    Image.fromarray(seg).save(tmp_path / "seg.png")
    assert torch.equal(grid_mask_from_segmentation(tmp_path / "seg.png", m), expected)
    assert torch.equal(grid_mask_from_segmentation(Image.fromarray(seg), m), expected)
    batch = grid_mask_from_segmentation(torch.as_tensor(np.stack([seg, seg == 5])), m)
    assert batch.shape == (2, 4, 4) and torch.equal(batch[1], expected & ~only3)


def test_context_comparison(pair):
    from vit_lens.class_space import identify

    _, m = pair
    x = _images(2, 15)
    classes = m(x).argmax(-1)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 1:, 1:] = True
    df = context_comparison(m, x, classes, masks, progress=False)
    assert set(df.columns) == {"image", "tokens", "context", "layer", "n_tokens", "identifiable_rate", "mean_r"}
    assert len(df) == 2 * 2 * 2 * m.cfg.n_layers
    # "with" rows are the plain run's identifiability of those tokens (class_space, independently)
    for i in range(2):
        single, _ = identify(m, x[i : i + 1], classes[i : i + 1], progress=False)
        by = single.by_mask(masks[i].flatten(), names=("class", "context"))
        for _, row in by.iterrows():
            got = df[(df.image == i) & (df.tokens == row.tokens) & (df.context == "with") & (df.layer == row.layer)]
            assert got.identifiable_rate.item() == pytest.approx(row.top1_rate)
            assert got.mean_r.item() == pytest.approx(row.mean_r)
    # "without" rows: the same with either removal method
    df2 = context_comparison(m, x, classes, masks, method="attention", progress=False)
    without = df[df.context == "without"].reset_index(drop=True)
    without2 = df2[df2.context == "without"].reset_index(drop=True)
    assert np.allclose(without.mean_r, without2.mean_r, atol=1e-6)
    assert (without.n_tokens.to_numpy() == np.array([4, 12, 9, 7]).repeat(m.cfg.n_layers)).all()


# ------------------------------------------------------------------ the paper's result, real weights
@pytest.mark.real
def test_knockout_paper_result_on_real_vit(real_vit, labelled_images):
    """`self_only` knockout in all layers collapses the image tokens' last-layer identifiability;
    `no_cls` barely moves their mean identifiability (Vilas et al. 2023, Sec. 4)."""
    from vit_lens.class_space import identify

    m = real_vit
    images = m.preprocess([r["path"] for r in labelled_images])
    classes = [r["class_index"] for r in labelled_images]
    out = {}
    for edges in ("none", "self_only", "no_cls"):
        with attention_knockout(m, edges, mode="paper"), torch.inference_mode():
            res, _ = identify(m, images, classes, progress=False)
        out[edges] = (res.rate("image")[-1].item(), res.mean_r("image")[-1].item())
    (base_rate, base_r), (self_rate, self_r), (nocls_rate, nocls_r) = out["none"], out["self_only"], out["no_cls"]
    assert base_rate > 0.03 and base_r > 0.75  # identifiable image tokens exist without knockout
    assert self_rate < 0.1 * base_rate  # self_only: collapse of the identifiable share ...
    assert self_r < 0.55  # ... and of the mean identifiability, to about chance (0.5)
    assert base_r - nocls_r < 0.1  # no_cls: mean identifiability barely moves
    assert (base_r - self_r) > 5 * (base_r - nocls_r)
    assert nocls_rate > 5 * self_rate


# ------------------------------------------------------------------ context ablation: which masks are accepted
@pytest.mark.parametrize("method", ["remove", "attention"])
@pytest.mark.parametrize("fill", ["mixed", "all_true", "all_false"])
@pytest.mark.parametrize("shape", [(3, 3), (5, 5), (4, 5), (15,), (18,), (2, 3, 3), (1, 2, 4, 4), ()])
def test_context_ablation_refuses_wrong_size_masks_whatever_their_values(pair, method, fill, shape):
    """A keep mask that is not [4, 4] / [16] / [17] (optionally with a batch axis) is refused with
    a message that names the expected shapes and the one given, also when it keeps or removes
    everything (issue 12: "mask is for 1 tokens" was reported, and a wrong-size all-True mask
    was accepted)."""
    _, m = pair
    keep = {"mixed": torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5,
            "all_true": torch.ones(shape, dtype=torch.bool), "all_false": torch.zeros(shape, dtype=torch.bool)}[fill]
    with pytest.raises(ValueError) as err:
        with context_ablation(m, keep, method=method):
            m(_images(2, 1))
    msg = str(err.value)
    assert f"keep has shape {tuple(shape)}" in msg
    assert "[rows, cols] = [4, 4]" in msg and "[n_patches] = [16]" in msg and "[17]" in msg and "[batch, ...]" in msg
    assert "for 1 tokens" not in msg


@pytest.mark.parametrize("method", ["remove", "attention"])
def test_context_ablation_accepted_shapes_agree(pair, method):
    """[rows, cols], [n_patches], [pos] and their batched forms are the same mask."""
    _, m = pair
    x = _images(2, 3)
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[1:3, :3] = True
    seq = torch.cat([torch.zeros(1, dtype=torch.bool), grid.flatten()])  # prefix False: kept anyway
    outs = []
    for keep in (grid, grid.flatten(), seq, grid[None].expand(2, 4, 4), grid.flatten()[None].expand(2, 16),
                 seq[None].expand(2, 17), grid.tolist()):
        with context_ablation(m, keep, method=method) as info:
            outs.append(m(x))
        assert info.keep[0, 0] and info.keep.shape[-1] == 17
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() <= 1e-6


@pytest.mark.parametrize("method", ["remove", "attention"])
def test_context_ablation_checks_the_run_also_when_keeping_everything(pair, method):
    _, m = pair
    per_image = torch.ones(3, 4, 4, dtype=torch.bool)  # keeps everything, but for 3 images
    with context_ablation(m, per_image, method=method):
        with pytest.raises(ValueError, match="3 per-image masks.*batch has 2"):
            m(_images(2, 1))
        assert m(_images(3, 1)).shape == (3, 7)
    part = torch.ones(3, 4, 4, dtype=torch.bool)
    part[:, 0, 0] = False
    with context_ablation(m, part, method=method):
        with pytest.raises(ValueError, match="3 per-image masks.*batch has 2"):
            m(_images(2, 1))
    with pytest.raises(ValueError, match="empty batch axis"):
        with context_ablation(m, torch.ones(0, 4, 4, dtype=torch.bool), method=method):
            pass


def test_context_ablation_with_nothing_but_the_prefix_tokens(pair):
    """Keeping no patch: a [CLS]-pooled model classifies from its prefix tokens alone (timm with
    only [CLS] left agrees); a model that averages patches, or has no prefix token, is refused."""
    t, m = pair
    x = _images(2, 4)
    nothing = torch.zeros(4, 4, dtype=torch.bool)
    ref, _ = _timm_removed(t, x, [0])
    for method in ("remove", "attention"):
        with context_ablation(m, nothing, method=method) as info:
            assert (m(x) - ref).abs().max() <= 1e-4
        assert info.keep.sum() == 1
    avg = _pair("avg")[1]  # no prefix token, average pooling
    for method in ("remove", "attention"):
        with pytest.raises(ValueError, match="no token at all.*keep at least one patch"):
            with context_ablation(avg, nothing, method=method):
                pass
    ta = make_timm("vit_tiny_patch16_224", **{**KW, "reg_tokens": 2, "global_pool": "avg", "class_token": False,
                                               "no_embed_class": True})
    reg_avg = HookedViT.from_timm(ta)
    with pytest.raises(ValueError, match="averages the patch tokens.*keep at least one patch"):
        with context_ablation(reg_avg, nothing):
            pass
    one = nothing.clone()
    one[2, 1] = True
    with context_ablation(reg_avg, one):
        assert torch.isfinite(reg_avg(x)).all()


def test_context_ablation_and_knockout_for_another_image_size():
    """grid_size= builds the masks for images of another size (a dynamic-size model); masks for
    the native size are refused on such images, and the other way round."""
    t = make_timm("vit_tiny_patch16_224", **KW, dynamic_img_size=True)
    m = HookedViT.from_timm(t)
    x = _images(2, 5).repeat(1, 1, 2, 2)[:, :, :48, :48]  # 48 x 48: a 6 x 6 grid
    keep = torch.zeros(6, 6, dtype=torch.bool)
    keep[1:4, 2:5] = True
    kept = [0] + [1 + r * 6 + c for r in range(1, 4) for c in range(2, 5)]
    ref, _ = _timm_removed(t, x, kept)
    for method in ("remove", "attention"):
        with context_ablation(m, keep, method=method, grid_size=(6, 6)):
            assert (m(x) - ref).abs().max() <= 1e-4
            with pytest.raises(ValueError, match="for 37 tokens per image but this run has 17"):
                m(_images(2, 5))
    with pytest.raises(ValueError, match=r"\[rows, cols\] = \[4, 4\]"):
        with context_ablation(m, keep):
            pass
    with attention_knockout(m, "self_only", mode="paper"):
        with pytest.raises(ValueError, match="for 17 tokens per image but this run has 37.*grid_size"):
            m(x)
    with attention_knockout(m, "self_only", mode="paper", grid_size=(6, 6)), torch.inference_mode():
        got = m(x)
    assert (got - _timm_with_edit(t, x, {l: _paper_edit("self_only", 1) for l in range(3)})).abs().max() <= 1e-4


# ------------------------------------------------------------------ hostile inputs: clear errors, weights untouched
def _hostile_cases():
    B4 = torch.ones(4, 4, dtype=torch.bool)

    def ko(**kw):
        def run(m):
            with attention_knockout(m, **kw):
                m(_images(2, 1))
        return run

    def ca(keep, **kw):
        def run(m):
            with context_ablation(m, keep, **kw):
                m(_images(2, 1))
        return run

    from vit_lens.core.errors import InputError, InputTypeError, OutOfRangeError

    return {
        # layers and heads
        "layer out of range": (ko(edges="self_only", layers=[3]), OutOfRangeError, "out of range.*0..2"),
        "negative layer out of range": (ko(edges="self_only", layers=-4), OutOfRangeError, "out of range"),
        "layer as a string": (ko(edges="self_only", layers="0"), InputTypeError, "layers must be an int or a sequence"),
        "layer as a float": (ko(edges="self_only", layers=[1.5]), InputTypeError, "layers must be an int"),
        "head out of range": (ko(edges="self_only", heads=[3]), OutOfRangeError, "out of range for 3 heads"),
        "negative head out of range": (ko(edges="self_only", heads=-4), OutOfRangeError, "out of range for 3 heads"),
        "head as a float": (ko(edges="self_only", heads=[0.5]), InputTypeError, "heads must be an int"),
        "head as a string": (ko(edges="self_only", heads="all"), InputTypeError, "heads must be an int"),
        "heads dict, layer out of range": (ko(edges="self_only", heads={3: [0]}), OutOfRangeError,
                                           "layer 3 out of range.*blocks that exist"),
        "heads dict, head out of range": (ko(edges="self_only", heads={0: [5]}), OutOfRangeError, "out of range"),
        "heads dict, layer not knocked out": (ko(edges="self_only", layers=[0], heads={1: [0]}), InputError,
                                              "not knocked out"),
        "head mask of the wrong size": (ko(edges="self_only", heads=torch.ones(4, dtype=torch.bool)), InputError,
                                        r"shape \[3\]"),
        # edge sets and modes
        "unknown edge set": (ko(edges="selfonly"), InputError, "unknown edge set 'selfonly'; did you mean 'self_only'"),
        "edges of the wrong type": (ko(edges=3), InputTypeError, "edges must be one of"),
        "edge mask not boolean": (ko(edges=torch.zeros(17, 17)), InputTypeError, "must be boolean"),
        "edge mask of the wrong size": (ko(edges=torch.zeros(16, 16, dtype=torch.bool)), InputError,
                                        r"\[17, 17\].*grid_size"),
        "edge mask with an empty batch": (ko(edges=torch.zeros(0, 17, 17, dtype=torch.bool)), InputError,
                                          r"\[batch, 17, 17\]"),
        "edge mask for 3 images, batch of 2": (ko(edges=knockout_edges_3()), InputError,
                                               "3 per-image masks.*batch has 2"),
        "no-op edge mask for 3 images, batch of 2": (ko(edges=torch.zeros(3, 17, 17, dtype=torch.bool)), InputError,
                                                     "3 per-image masks.*batch has 2"),
        "paper mode, 3 images, batch of 2": (ko(edges=knockout_edges_3(), mode="paper"), InputError,
                                             "3 per-image masks.*batch has 2"),
        "unknown mode": (ko(edges="self_only", mode="zero"), InputError, "mode must be 'mask'.*'zero_edges'"),
        "paper mode, cls_no_image": (ko(edges="cls_no_image", mode="paper"), InputError,
                                     "defined only for the edge sets.*mode='zero_edges'"),
        "within without token_mask": (ko(edges="within"), InputError, "needs token_mask"),
        "within, wrong-size token_mask": (ko(edges="within", token_mask=torch.ones(3, 3, dtype=torch.bool)),
                                          InputError, r"\[4, 4\].*got \(3, 3\)"),
        "within, float token_mask": (ko(edges="within", token_mask=torch.ones(4, 4)), InputTypeError, "boolean"),
        "within, 3 masks for a batch of 2": (ko(edges="within", token_mask=B4[None].expand(3, 4, 4)), InputError,
                                             "3 per-image masks.*batch has 2"),
        "bad grid_size": (ko(edges="self_only", grid_size=(4,)), InputTypeError, r"grid_size must be \(rows, cols\)"),
        "zero grid_size": (ko(edges="self_only", grid_size=(0, 4)), InputError, "positive"),
        # context ablation
        "keep of the wrong size": (ca(torch.ones(3, 3, dtype=torch.bool)), InputError, r"keep has shape \(3, 3\)"),
        "keep as floats": (ca(torch.ones(4, 4)), InputTypeError, "keep must be a boolean mask.*float32"),
        "keep as ints": (ca(torch.ones(4, 4, dtype=torch.long)), InputTypeError, "keep must be a boolean mask.*int64"),
        "keep is None": (ca(None), InputTypeError, "keep is None"),
        "keep of strings": (ca("all"), InputTypeError, "keep must be a boolean mask"),
        "keep, a scalar": (ca(torch.tensor(True)), InputError, r"keep has shape \(\)"),
        "keep for 3 images, batch of 2": (ca(~torch.eye(4, dtype=torch.bool)[None].expand(3, 4, 4)), InputError,
                                          "3 per-image masks.*batch has 2"),
        "keep for 3 images, batch of 2, attention": (ca(~torch.eye(4, dtype=torch.bool)[None].expand(3, 4, 4),
                                                        method="attention"), InputError,
                                                     "3 per-image masks.*batch has 2"),
        "keep, unknown method": (ca(B4, method="drop"), InputError, "method must be 'remove' or 'attention'"),
        "keep, uneven counts with remove": (ca(torch.stack([B4, ~B4 | torch.eye(4, dtype=torch.bool)])), InputError,
                                            "same number of kept tokens.*method='attention'"),
        # masks and comparisons
        "box with a non-number": (lambda m: grid_mask_from_box((0, 0, "a", 3), m), InputTypeError, "four numbers"),
        "box with NaN": (lambda m: grid_mask_from_box((0, 0, float("nan"), 3), m), InputError, "non-finite"),
        "box, min_overlap > 1": (lambda m: grid_mask_from_box((0, 0, 8, 8), m, min_overlap=2), InputError, r"\[0, 1\]"),
        "grid mask of the wrong size": (lambda m: token_mask_from_grid(torch.ones(3, 3, dtype=torch.bool), m),
                                        InputError, r"\[4, 4\].*got \(3, 3\)"),
        "comparison, wrong-size masks": (lambda m: context_comparison(m, _images(2), 0, torch.ones(3, 3, dtype=torch.bool),
                                                                       progress=False), InputError, r"got \(3, 3\)"),
        "comparison, 3 masks for 2 images": (lambda m: context_comparison(m, _images(2), 0, B4[None].expand(3, 4, 4),
                                                                           progress=False), InputError,
                                             "3 per-image masks for a batch of 2"),
        "comparison, 3 classes for 2 images": (lambda m: context_comparison(m, _images(2), [0, 1, 2], B4, progress=False),
                                               InputError, "3 targets for a batch of 2"),
        "comparison, layer out of range": (lambda m: context_comparison(m, _images(2), 0, B4, layers=[9],
                                                                         progress=False), OutOfRangeError, "layer 9"),
        "comparison, class out of range": (lambda m: context_comparison(m, _images(2), 9, B4, progress=False),
                                           OutOfRangeError, "class index 9 out of range"),
        "comparison, float masks": (lambda m: context_comparison(m, _images(2), 0, torch.ones(4, 4), progress=False),
                                    InputTypeError, "class_masks must be a boolean mask"),
        "comparison, images not a tensor": (lambda m: context_comparison(m, [[0.0]], 0, B4, progress=False),
                                            InputTypeError, "preprocessed batch tensor"),
    }


def knockout_edges_3():
    """self_only for a 1 + 16 token model (image tokens attend only to themselves), for 3 images."""
    e = torch.zeros(17, 17, dtype=torch.bool)
    e[1:] = True
    return (e & ~torch.eye(17, dtype=torch.bool))[None].expand(3, 17, 17)


_HOSTILE = _hostile_cases()


@pytest.mark.parametrize("case", list(_HOSTILE))
def test_hostile_inputs_raise_library_errors_and_touch_no_weight(pair, case):
    from vit_lens.core.errors import VitLensError

    _, m = pair
    run, exc, pattern = _HOSTILE[case]
    before = weights_hash(m)
    with pytest.raises(exc, match=pattern) as err:
        run(m)
    assert isinstance(err.value, VitLensError)
    assert weights_hash(m) == before
    assert all(blk.attn.attn_mask is None for blk in m.blocks)  # nothing left behind
    assert not any(hp._forward_hooks for _, hp in m.hook_dict.items())


def test_knockout_and_context_ablation_touch_no_weight(pair):
    _, m = pair
    before = weights_hash(m)
    x = _images(2, 2)
    for mode in ("mask", "paper", "zero_edges"):
        for edges in ("self_only", "no_cls"):
            with attention_knockout(m, edges, mode=mode, layers=[0, 2], heads=[1]):
                m.run_with_cache(x)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[0] = True
    for method in ("remove", "attention"):
        with context_ablation(m, keep, method=method):
            m.run_with_cache(x)
    context_comparison(m, x, 0, keep, progress=False)
    assert weights_hash(m) == before
