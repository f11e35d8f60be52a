"""Tests for vit_lens.attribution: direct logit attribution and value-vector memories.

References are computed here from timm's own modules (forward hooks on ``attn.qkv``,
``attn.proj``, ``mlp.fc2``, the blocks) and timm's weights, never from vit_lens code.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import ResPostBlock

from conftest import make_timm, spread_families, spread_head
from vit_lens import HookedViT
from vit_lens import attribution as A

TINY = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
FAMILIES = {
    "token": ("vit_tiny_patch16_224", {}),
    "avg_fc_norm": ("vit_tiny_patch16_224", dict(global_pool="avg")),
    "avg_ln_final": ("vit_tiny_patch16_224", dict(global_pool="avg", fc_norm=False)),
    "no_cls_avg": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=2)),
    "layerscale": ("vit_tiny_patch16_224", dict(init_values=0.1)),
    "norm_pre": ("vit_tiny_patch16_224", dict(pre_norm=True)),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
}


@pytest.fixture(scope="module")
def families():
    return spread_families(FAMILIES, **TINY)


def _timm_record(t, x):
    """timm internals per block: qkv output, proj input (heads concatenated), fc2 input, outputs."""
    rec = {"qkv": [], "proj_in": [], "fc2_in": [], "attn": [], "mlp": [], "out": []}
    hooks = []
    for b in t.blocks:
        hooks.append(b.attn.qkv.register_forward_hook(lambda m, i, o: rec["qkv"].append(o)))
        hooks.append(b.attn.proj.register_forward_hook(lambda m, i, o: rec["proj_in"].append(i[0])))
        hooks.append(b.mlp.fc2.register_forward_hook(lambda m, i, o: rec["fc2_in"].append(i[0])))
        hooks.append(b.attn.register_forward_hook(lambda m, i, o: rec["attn"].append(o)))
        hooks.append(b.mlp.register_forward_hook(lambda m, i, o: rec["mlp"].append(o)))
        hooks.append(b.register_forward_hook(lambda m, i, o: rec["out"].append(o)))
    try:
        with torch.no_grad():
            logits = t(x)
    finally:
        for h in hooks:
            h.remove()
    return rec, logits


def _timm_dla(t, vec, final, target):
    """Reference DLA at [CLS] for a token-pooled timm model: (v - mean) / s . (norm.w * head.w[t])."""
    r = final[:, 0]
    s = (r.var(-1, unbiased=False) + t.norm.eps).sqrt()
    v = vec[:, 0] if vec.ndim >= 3 else vec
    v = v - v.mean(-1, keepdim=True)
    d = t.norm.weight * t.head.weight[target]  # [batch, d]
    shape = (v.shape[0],) + (1,) * (v.ndim - 2)
    return (v * d.reshape(v.shape[0], *([1] * (v.ndim - 2)), -1)).sum(-1) / s.reshape(shape)


# ------------------------------------------------------------------ exact sums, every family
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("by", ["component", "layer", "head", "neuron", "position", "head_position"])
def test_dla_parts_sum_to_timm_logit(families, family, by):
    t, h = families[family]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _, t_logits = _timm_record(t, x)
    _, cache = h.run_with_cache(x, names_filter=A.dla_hooks(h, by))
    target = torch.tensor([1, 4, 9])
    res = A.dla(h, cache, target, by=by)
    ref = t_logits[torch.arange(3), target]
    assert torch.allclose(res.logit, ref, atol=1e-4)
    assert torch.allclose(res.total(), ref, atol=1e-4)
    frame = res.to_frame()
    assert torch.allclose(torch.tensor(frame.groupby("image").value.sum().values, dtype=torch.float32), ref, atol=1e-4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 4), seed=st.integers(0, 10_000), family=st.sampled_from(["token", "avg_fc_norm", "distilled"]))
def test_dla_logit_difference_property(families, batch, seed, family):
    """For any batch and any pair of classes: parts of target - baseline sum to the logit difference."""
    t, h = families[family]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    tgt, base = torch.randint(0, 10, (batch,), generator=g), torch.randint(0, 10, (batch,), generator=g)
    _, t_logits = _timm_record(t, x)
    _, cache = h.run_with_cache(x, names_filter=A.dla_hooks(h, "head"))
    res = A.dla(h, cache, tgt, baseline=base, by="head")
    ref = t_logits.gather(1, tgt[:, None])[:, 0] - t_logits.gather(1, base[:, None])[:, 0]
    assert torch.allclose(res.total(), ref, atol=1e-4)
    assert res.values.shape == (h.cfg.n_layers, h.cfg.n_heads, batch)


# ------------------------------------------------------------------ each granularity against timm
def test_dla_granularities_equal_timm_references(families):
    t, h = families["token"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    rec, _ = _timm_record(t, x)
    final = rec["out"][-1]
    target = torch.tensor([3, 7])
    _, cache = h.run_with_cache(x)
    H, E = h.cfg.n_heads, h.cfg.d_head

    layer = A.dla(h, cache, target, by="layer")
    for l in range(h.cfg.n_layers):
        assert torch.allclose(layer.values[l, 0], _timm_dla(t, rec["attn"][l], final, target), atol=1e-5)
        assert torch.allclose(layer.values[l, 1], _timm_dla(t, rec["mlp"][l], final, target), atol=1e-5)

    heads = A.dla(h, cache, target, by="head")
    neurons = A.dla(h, cache, target, by="neuron")
    pos = A.dla(h, cache, target, by="head_position")
    for l, blk in enumerate(t.blocks):
        W = blk.attn.proj.weight  # [d, H*E]
        z = rec["proj_in"][l][:, 0]  # [batch, H*E] at [CLS]
        for hh in range(H):
            out = z[:, hh * E:(hh + 1) * E] @ W[:, hh * E:(hh + 1) * E].T
            assert torch.allclose(heads.values[l, hh], _timm_dla(t, out, final, target), atol=1e-5)
        assert torch.allclose(heads.rest[f"{l}_attn_bias"], _timm_dla(t, blk.attn.proj.bias.expand(2, -1), final, target), atol=1e-5)
        # neurons: activation times the fc2 column
        post = rec["fc2_in"][l][:, 0]  # [batch, d_mlp]
        for m in (0, 5, 100):
            out = post[:, m:m + 1] * blk.mlp.fc2.weight[:, m]
            assert torch.allclose(neurons.values[l, m], _timm_dla(t, out, final, target), atol=1e-5)
        # source positions: softmax(q k^T / sqrt(E)) computed here from timm's qkv
        qkv = rec["qkv"][l].reshape(2, -1, 3, H, E)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        pat = torch.softmax(torch.einsum("bqhe,bkhe->bhqk", q, k) / E ** 0.5, -1)
        for hh in range(H):
            src = pat[:, hh, 0, :, None] * (v[:, :, hh] @ W[:, hh * E:(hh + 1) * E].T)  # [batch, key, d]
            ref = torch.stack([_timm_dla(t, src[:, j], final, target) for j in range(src.shape[1])], -1)
            assert torch.allclose(pos.values[l, hh].T, ref, atol=1e-5)
    # heads of a layer + its bias == the layer's attention; positions summed == heads
    assert torch.allclose(heads.values.sum(1) + torch.stack([heads.rest[f"{l}_attn_bias"] for l in range(2)]), layer.values[:, 0], atol=1e-5)
    assert torch.allclose(pos.values.sum(2), heads.values, atol=1e-5)


@pytest.mark.real
def test_dla_on_real_vit(real_vit, labelled_images):
    rows = [r for r in labelled_images if "photos" in r["path"]][:2]
    x = real_vit.preprocess([r["path"] for r in rows])
    logits, cache = real_vit.run_with_cache(x, names_filter=A.dla_hooks(real_vit, "head"))
    target = torch.tensor([r["class_index"] for r in rows])
    res = A.dla(real_vit, cache, target, by="head")
    assert torch.allclose(res.total(), logits[torch.arange(len(rows)), target], atol=1e-3)
    assert res.values.shape == (12, 3, len(rows))
    top = res.top(5, image=0)
    assert len(top) == 5 and top.value.is_monotonic_decreasing


def test_dla_errors(families):
    t, h = families["token"]
    x = torch.randn(1, 3, 32, 32)
    _, cache = h.run_with_cache(x, names_filter=A.dla_hooks(h, "component"))
    with pytest.raises(ValueError, match="by must be"):
        A.dla(h, cache, 0, by="block")
    with pytest.raises(KeyError, match="names_filter"):
        A.dla(h, cache, 0, by="head")
    post = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", **TINY, block_fn=ResPostBlock))
    _, pc = post.run_with_cache(x)
    assert torch.allclose(A.dla(post, pc, 2, by="layer").total(), post(x)[:, 2], atol=1e-4)
    with pytest.raises(NotImplementedError, match="post-norm"):
        A.dla(post, pc, 2, by="head")
    headless = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0))
    _, hc = headless.run_with_cache(x)
    with pytest.raises(ValueError, match="set_class_directions"):
        A.dla(headless, hc, 0)


# ------------------------------------------------------------------ memories
def _centred_dirs(t):
    D = t.norm.weight[:, None] * t.head.weight.T  # [d, C]
    return D - D.mean(0, keepdim=True)


def test_memories_scores_from_timm_weights(families):
    t, h = families["token"]
    before = {k: v.clone() for k, v in h.state_dict().items()}
    D = _centred_dirs(t)
    mem_raw = A.memories(h, "mlp", metric="raw")
    mem_cos = A.memories(h, "mlp", metric="cosine")
    att = A.memories(h, "attn", metric="raw")
    for l, blk in enumerate(t.blocks):
        V = blk.mlp.fc2.weight.T  # [d_mlp, d] rows = value vectors
        Vc = V - V.mean(1, keepdim=True)
        assert torch.allclose(mem_raw.scores[l], Vc @ D, atol=1e-5)
        cos = torch.nn.functional.cosine_similarity(Vc[:, :, None], D[None], dim=1)
        assert torch.allclose(mem_cos.scores[l], cos, atol=1e-5)
        Wo = blk.attn.proj.weight.T.reshape(h.cfg.n_heads, h.cfg.d_head, -1)
        Woc = Wo - Wo.mean(-1, keepdim=True)
        assert torch.allclose(att.scores[l], Woc @ D, atol=1e-5)
    assert mem_cos.scores.abs().max() <= 1 + 1e-5
    for k, v in h.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified"
    tab = mem_cos.top_classes(3)
    assert list(tab.columns) == ["layer", "neuron", "rank", "class_index", "class_name", "score"]
    assert len(tab) == h.cfg.n_layers * h.cfg.d_mlp * 3
    row = tab[(tab.layer == 1) & (tab.neuron == 7) & (tab["rank"] == 0)].iloc[0]
    assert row.class_index == int(mem_cos.scores[1, 7].argmax())
    atab = att.top_classes(2)
    assert list(atab.columns[:3]) == ["layer", "head", "dim"]


def test_memory_planted_class_direction_is_found():
    """Known answer: a value vector set to class 6's direction has cosine 1 with class 6."""
    t = spread_head(make_timm("vit_tiny_patch16_224", **TINY))
    with torch.no_grad():
        d = t.norm.weight * t.head.weight[6]
        t.blocks[1].mlp.fc2.weight[:, 42] = 3.0 * (d - d.mean())
    h = HookedViT.from_timm(t)
    mem = A.memories(h, "mlp", metric="cosine", layers=[1])
    assert mem.scores[0, 42, 6].item() == pytest.approx(1.0, abs=1e-5)
    assert int(mem.scores[0, 42].argmax()) == 6
    agree = A.class_value_agreement(h, "mlp", layers=[1])
    assert agree.loc[1, "mean_best_score"] >= mem.scores[0, :, :].max(0).values.mean().item() - 1e-6
    assert 0 <= agree.loc[1, "agreement_rate"] <= 1


def test_class_value_agreement_brute_force(families):
    _, h = families["token"]
    mem = A.memories(h, "attn", metric="cosine")
    tab = A.class_value_agreement(h, "attn")
    for l in range(h.cfg.n_layers):
        S = mem.scores[l].reshape(-1, 10)
        agree = sum(int(S[:, c].argmax()) in [i for i in range(S.shape[0]) if int(S[i].argmax()) == c] for c in range(10))
        covered = len({int(S[i].argmax()) for i in range(S.shape[0])})
        assert tab.loc[l, "agreement_rate"] == pytest.approx(agree / 10)
        assert tab.loc[l, "classes_covered"] == pytest.approx(covered / 10)


def test_key_value_agreement_and_compositionality_brute_force(families):
    t, h = families["token"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    rec, _ = _timm_record(t, x)
    _, cache = h.run_with_cache(x)
    target = torch.tensor([2, 8])
    k = 4
    kv = A.key_value_agreement(h, cache, target, k=k)
    comp = A.memory_compositionality(h, cache, k=k, per_token=True)
    D = _centred_dirs(t)
    for l, blk in enumerate(t.blocks):
        V = blk.mlp.fc2.weight.T
        raw = (V - V.mean(1, keepdim=True)) @ D  # [d_mlp, C]
        coef = rec["fc2_in"][l]  # [batch, pos, d_mlp]
        out_top = (t.head(t.norm(rec["mlp"][l]))).argmax(-1)  # timm's norm + head on the MLP output
        for b in range(2):
            best = set(raw[:, target[b]].topk(k).indices.tolist())
            for p in range(0, coef.shape[1], 5):
                top = coef[b, p].topk(k).indices.tolist()
                assert kv.overlap[l, b, p].item() == pytest.approx(len(best & set(top)) / k)
                classes = {int(raw[m].argmax()) for m in top}
                assert bool(comp[l, b, p]) == (int(out_top[b, p]) not in classes)
    img = torch.zeros(2, h.cfg.n_ctx, dtype=torch.bool)
    img[:, 1:] = True
    assert torch.allclose(kv.rate(), ((kv.overlap > 0) & img).sum((1, 2)).float() / img.sum())
    assert torch.allclose(A.memory_compositionality(h, cache, k=k), (comp & img).sum((1, 2)).float() / img.sum())
    # chance level: two random k-subsets of n share >= 1 element with prob 1 - C(n-k, k) / C(n, k)
    n = h.cfg.d_mlp
    g = torch.Generator().manual_seed(0)
    sims = [len(set(torch.randperm(n, generator=g)[:k].tolist()) & set(torch.randperm(n, generator=g)[:k].tolist())) > 0
            for _ in range(4000)]
    assert kv.chance_rate == pytest.approx(sum(sims) / len(sims), abs=0.01)
    kva = A.key_value_agreement(h, cache, target, k=3, kind="attn")
    assert kva.overlap.shape == (2, 2, h.cfg.n_ctx) and ((kva.overlap >= 0) & (kva.overlap <= 1)).all()
    with pytest.raises(ValueError, match="k must be"):
        A.key_value_agreement(h, cache, target, k=10_000)
