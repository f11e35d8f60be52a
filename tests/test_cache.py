"""run_with_cache gives a transformer_lens.ActivationCache whose residual-stream tools work unchanged:
decompose_resid, accumulated_resid, stack_head_results, apply_ln_to_stack, logit_attrs; stop_at_layer and
start_at_layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import ResPostBlock
from transformer_lens import ActivationCache

from conftest import make_timm
from vit_lens import HookedViT

IMG, PATCH, DEPTH, N_CLASSES = 32, 8, 3, 11
P = 1 + (IMG // PATCH) ** 2


@pytest.fixture(scope="module")
def model():
    t = make_timm("vit_tiny_patch16_224", seed=11, img_size=IMG, patch_size=PATCH, depth=DEPTH, num_classes=N_CLASSES)
    with torch.no_grad():  # timm zero-initialises biases and the LayerNorm affine: make every term count
        for name, p in t.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return HookedViT.from_timm(t)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(4, 3, IMG, IMG)


@pytest.fixture(scope="module")
def run(model, x):
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            logits, cache = model.run_with_cache(x)
    finally:
        model.set_use_attn_result(False)
    return logits, cache


def test_run_with_cache_returns_activation_cache(model, x, run):
    logits, cache = run
    assert isinstance(cache, ActivationCache)
    assert cache.model is model and cache.has_batch_dim
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert logits.shape == (4, N_CLASSES)
    assert set(cache.keys()) == set(model.hook_dict)  # use_attn_result was on: every hook point
    D, H, E = model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head
    shapes = {
        "hook_embed": (4, P, D),
        "hook_pos_embed": (4, P, D),
        "blocks.0.ln1.hook_scale": (4, P, 1),
        "blocks.1.attn.hook_q": (4, P, H, E),
        "blocks.1.attn.hook_attn_scores": (4, H, P, P),
        "blocks.1.attn.hook_pattern": (4, H, P, P),
        "blocks.2.attn.hook_result": (4, P, H, D),
        "blocks.2.mlp.hook_post": (4, P, model.cfg.d_mlp),
        "ln_final.hook_normalized": (4, P, D),
        "hook_pooled": (4, D),
    }
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    # TransformerLens's short keys work
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])
    assert torch.equal(cache["pattern", 0], cache["blocks.0.attn.hook_pattern"])


def test_cache_variants(model, x):
    with torch.no_grad():
        _, cache = model.run_with_cache(x[:1], remove_batch_dim=True, names_filter="blocks.0.hook_resid_post")
        assert list(cache.keys()) == ["blocks.0.hook_resid_post"] and cache["blocks.0.hook_resid_post"].shape == (P, 64 * 3)
        out, d = model.run_with_cache(x, return_cache_object=False, return_type=None, names_filter=["hook_pooled"])
        assert out is None and isinstance(d, dict) and d["hook_pooled"].shape == (4, 192)
        # default: every hook except hook_result (which needs use_attn_result)
        _, cache = model.run_with_cache(x)
        assert set(cache.keys()) == {n for n in model.hook_dict if not n.endswith("hook_result")}


def test_pos_slice_keeps_position_free_hooks_whole(model, x):
    """pos_slice slices positions; hook_pooled has none and must keep its batch axis."""
    with torch.no_grad():
        _, full = model.run_with_cache(x)
        _, cls = model.run_with_cache(x, pos_slice=0)
    assert torch.equal(cls["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][:, :1])
    assert torch.equal(cls["blocks.1.attn.hook_q"], full["blocks.1.attn.hook_q"][:, :1])
    assert torch.equal(cls["hook_pooled"], full["hook_pooled"])


# ------------------------------------------------------------------ decompositions
def test_decompose_resid_sums_to_final_residual(run):
    _, cache = run
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed"] + [f"{l}_{k}" for l in range(DEPTH) for k in ("attn_out", "mlp_out")]
    assert stack.shape == (2 + 2 * DEPTH, 4, P, 192)
    final = cache[f"blocks.{DEPTH - 1}.hook_resid_post"]
    assert (stack.sum(0) - final).abs().max() <= 1e-4
    assert final.abs().max() > 1  # not a trivially small residual stream


@settings(max_examples=20, deadline=None)
@given(layer=st.integers(0, DEPTH), mlp_input=st.booleans(), mode=st.sampled_from(["all", "attn", "mlp"]))
def test_decompose_resid_any_layer(run, layer, mlp_input, mode):
    _, cache = run
    if mlp_input and layer == DEPTH:
        return  # there is no block DEPTH
    stack = cache.decompose_resid(layer=layer, mlp_input=mlp_input, mode=mode)
    if mode == "all":
        target = cache[f"blocks.{layer}.hook_resid_mid"] if mlp_input else (
            cache[f"blocks.{layer}.hook_resid_pre"] if layer < DEPTH else cache[f"blocks.{DEPTH - 1}.hook_resid_post"]
        )
    else:  # embeddings plus only one kind of sublayer output
        kind = "hook_attn_out" if mode == "attn" else "hook_mlp_out"
        last = layer + 1 if (mlp_input and mode == "attn") else layer
        target = cache["hook_embed"] + cache["hook_pos_embed"]
        for l in range(last):
            target = target + cache[f"blocks.{l}.{kind}"]
    assert (stack.sum(0) - target).abs().max() <= 1e-4


def test_accumulated_resid_matches_block_outputs(run):
    _, cache = run
    acc, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    expected = []
    for l in range(DEPTH):
        expected += [cache[f"blocks.{l}.hook_resid_pre"], cache[f"blocks.{l}.hook_resid_mid"]]
    expected.append(cache[f"blocks.{DEPTH - 1}.hook_resid_post"])
    assert acc.shape[0] == len(expected) == len(labels)
    for a, e in zip(acc, expected):
        assert torch.equal(a, e)
    acc = cache.accumulated_resid()  # [resid_pre 0 .. resid_pre L-1, final]
    for l in range(1, DEPTH):
        assert torch.equal(acc[l], cache[f"blocks.{l - 1}.hook_resid_post"])


def test_stack_head_results_and_apply_ln(model, run):
    _, cache = run
    heads, labels = cache.stack_head_results(return_labels=True)
    H = model.cfg.n_heads
    assert labels == [f"L{l}H{h}" for l in range(DEPTH) for h in range(H)]
    assert heads.shape == (DEPTH * H, 4, P, 192)
    for l in range(DEPTH):
        attn_out = heads[l * H:(l + 1) * H].sum(0) + model.blocks[l].attn.b_O
        assert (attn_out - cache[f"blocks.{l}.hook_attn_out"]).abs().max() <= 1e-5
    # apply_ln_to_stack divides by the cached final-norm scale after centring: on the whole
    # decomposition this is the final LayerNorm without its affine map, computed here by hand
    stack = cache.decompose_resid()
    scaled = cache.apply_ln_to_stack(stack, layer=-1)
    r = cache[f"blocks.{DEPTH - 1}.hook_resid_post"].double()
    by_hand = (r - r.mean(-1, keepdim=True)) / (r.var(-1, unbiased=False, keepdim=True) + model.cfg.eps).sqrt()
    assert (scaled.sum(0).double() - by_hand).abs().max() <= 1e-4
    ln = model.ln_final
    assert (scaled.sum(0) * ln.w + ln.b - cache["ln_final.hook_normalized"]).abs().max() <= 1e-4
    # heads scaled with block 1's ln1 (input to block 1)
    scaled_heads = cache.stack_head_results(layer=1, apply_ln=True)
    assert torch.allclose(scaled_heads, heads[:H] / cache["blocks.1.ln1.hook_scale"]
                          - (heads[:H] / cache["blocks.1.ln1.hook_scale"]).mean(-1, keepdim=True), atol=1e-5)


def test_logit_attrs_sum_to_class_logit(model, run):
    """At [CLS], the attributions of the decomposition sum to the logit minus two explicit
    constants: the classifier bias b_U[c] and the final LayerNorm's bias read by the class
    embedding, ln_final.b . W_U[:, c]; the norm's weight is folded into the class directions."""
    logits, cache = run
    stack = cache.decompose_resid(pos_slice=0)  # [components, batch, d_model] at [CLS]
    classes = torch.tensor([0, 3, 7, 10])
    attrs = cache.logit_attrs(stack, classes, pos_slice=0)  # [components, batch]
    assert attrs.shape == (stack.shape[0], 4)
    constants = model.b_U[classes] + model.ln_final.b @ model.W_U[:, classes]
    assert (attrs.sum(0) + constants - logits[torch.arange(4), classes]).abs().max() <= 1e-4
    # the class direction is the class embedding with the final norm's weight folded in
    assert torch.allclose(model.tokens_to_residual_directions(3), model.ln_final.w * model.W_U[:, 3])
    # logit differences: the constants become differences too
    attrs_diff = cache.logit_attrs(stack, classes, incorrect_tokens=torch.tensor([1, 1, 1, 1]), pos_slice=0)
    const_diff = constants - (model.b_U[1] + model.ln_final.b @ model.W_U[:, 1])
    ref = logits[torch.arange(4), classes] - logits[:, 1]
    assert (attrs_diff.sum(0) + const_diff - ref).abs().max() <= 1e-4


@pytest.mark.real
def test_logit_attrs_real_model_by_class_name(real_vit, labelled_images):
    """On the real ViT-Ti: attributions of the true class over the decomposition, at [CLS]."""
    rows = labelled_images[:3]
    x = real_vit.preprocess([r["path"] for r in rows])
    y = torch.tensor([r["class_index"] for r in rows])
    with torch.no_grad():
        logits, cache = real_vit.run_with_cache(x)
    stack = cache.decompose_resid(pos_slice=0)
    attrs = cache.logit_attrs(stack, y, pos_slice=0)
    constants = real_vit.b_U[y] + real_vit.ln_final.b @ real_vit.W_U[:, y]
    assert (attrs.sum(0) + constants - logits[torch.arange(3), y]).abs().max() <= 1e-4
    # one class given by name for every image (TransformerLens's to_single_token path)
    name = real_vit.class_names[int(y[0])].split(",")[0]
    by_name = cache.logit_attrs(stack, name, pos_slice=0)
    assert by_name.shape == (stack.shape[0], 3)
    assert torch.allclose(by_name[:, 0], attrs[:, 0], atol=1e-5)
    assert torch.allclose(by_name, cache.logit_attrs(stack, int(y[0]), pos_slice=0))


# ------------------------------------------------------------------ stop_at_layer
def test_stop_at_layer_equals_resid_pre(model, x):
    with torch.no_grad():  # resid hooks keep the fused kernels, so equality is exact
        _, cache = model.run_with_cache(x, names_filter=lambda n: "hook_resid_p" in n)
        for l in range(DEPTH):
            assert torch.equal(model(x, stop_at_layer=l), cache[f"blocks.{l}.hook_resid_pre"])
            assert torch.equal(model(x, stop_at_layer=l - DEPTH), cache[f"blocks.{l}.hook_resid_pre"])
        assert torch.equal(model(x, stop_at_layer=DEPTH), cache[f"blocks.{DEPTH - 1}.hook_resid_post"])
        # the remaining blocks do not run (no hook fires past the stop)
        fired = []
        model.run_with_hooks(x, stop_at_layer=1, fwd_hooks=[(lambda n: True, lambda a, hook: fired.append(hook.name))])
    assert fired[-1] == "blocks.0.hook_resid_post" and not any(n.startswith("blocks.1.") for n in fired)


# ------------------------------------------------------------------ start_at_layer
def test_start_at_layer_resumes_the_forward_exactly(model, x):
    with torch.no_grad():
        full = model(x)
        _, cache = model.run_with_cache(x, names_filter=lambda n: "hook_resid_p" in n)
        for l in range(DEPTH):
            resid = cache[f"blocks.{l}.hook_resid_pre"]
            assert torch.equal(model(resid, start_at_layer=l), full)
            assert torch.equal(model(resid, start_at_layer=l - DEPTH), full)
        last = cache[f"blocks.{DEPTH - 1}.hook_resid_post"]
        assert torch.equal(model(last, start_at_layer=DEPTH), full)  # only the final norm and head
        # with stop_at_layer: a middle slice of the blocks
        mid = model(cache["blocks.0.hook_resid_pre"], start_at_layer=0, stop_at_layer=2)
        assert torch.equal(mid, cache["blocks.2.hook_resid_pre"])
        # hooks before the start do not fire, the ones after do
        fired = []
        model.run_with_hooks(cache["blocks.1.hook_resid_pre"], start_at_layer=1,
                             fwd_hooks=[(lambda n: True, lambda a, hook: fired.append(hook.name))])
    assert fired[0] == "blocks.1.hook_resid_pre" and "hook_pooled" in fired
    assert not any(n.startswith(("blocks.0.", "hook_embed", "hook_pos_embed")) for n in fired)


def test_start_at_layer_refuses_bad_input(model, x):
    resid = torch.zeros(2, P, model.cfg.d_model)
    with pytest.raises(ValueError, match="residual stream"):
        model(x, start_at_layer=1)  # images instead of a residual stream
    with pytest.raises(ValueError, match=r"start_at_layer must be an int in -3\.\.3"):
        model(resid, start_at_layer=4)
    with pytest.raises(ValueError, match="start_at_layer must be an int"):
        model(resid, start_at_layer=1.5)
    with pytest.raises(ValueError, match="comes before"):
        model(resid, start_at_layer=2, stop_at_layer=1)


def test_start_at_layer_avg_pool_needs_an_image_token():
    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", seed=0, img_size=IMG, patch_size=PATCH, depth=1,
                                      num_classes=N_CLASSES, global_pool="avg"))
    with pytest.raises(ValueError, match="at least one image token"):
        m(torch.zeros(1, 1, m.cfg.d_model), start_at_layer=1)
    assert m(torch.zeros(1, 2, m.cfg.d_model), start_at_layer=1).shape == (1, N_CLASSES)


def test_return_type_none(model, x):
    with torch.no_grad():
        assert model(x, return_type=None) is None


# ------------------------------------------------------------------ full decomposition (accumulated_bias)
def test_accumulated_bias_is_the_sum_of_the_sublayer_biases(model):
    """An independent sum over the weights, for every layer and flag."""
    for layer in range(DEPTH + 1):
        for mlp_input in (False, True):
            if mlp_input and layer == DEPTH:
                with pytest.raises(IndexError, match="mlp_input"):
                    model.accumulated_bias(layer, mlp_input=True)
                continue
            for with_mlp in (False, True):
                ref = torch.zeros(192)
                for l in range(layer + (1 if mlp_input else 0)):
                    ref = ref + model.blocks[l].attn.b_O
                    if with_mlp and l < layer:
                        ref = ref + model.blocks[l].mlp.b_out
                got = model.accumulated_bias(layer, mlp_input, include_mlp_biases=with_mlp)
                assert torch.allclose(got, ref, atol=1e-6), (layer, mlp_input, with_mlp)
    assert model.accumulated_bias(DEPTH).abs().max() > 0.05  # the fixture's biases are not zero
    with pytest.raises(IndexError, match=r"0\.\.3 "):
        model.accumulated_bias(DEPTH + 1)


@pytest.mark.parametrize("expand_neurons", [False, True])
@pytest.mark.parametrize("layer,mlp_input", [(None, False), (1, False), (1, True), (0, True)])
def test_get_full_resid_decomposition_sums_to_the_residual_stream(run, expand_neurons, layer, mlp_input):
    """heads + (MLP outputs or neurons) + embeddings + accumulated bias == the residual stream there."""
    _, cache = run
    stack, labels = cache.get_full_resid_decomposition(
        layer=layer, mlp_input=mlp_input, expand_neurons=expand_neurons, return_labels=True
    )
    L = DEPTH if layer is None else layer
    if mlp_input:
        target = cache[f"blocks.{L}.hook_resid_mid"]
    else:
        target = cache[f"blocks.{L}.hook_resid_pre"] if L < DEPTH else cache[f"blocks.{DEPTH - 1}.hook_resid_post"]
    assert labels[-1] == "bias" and "embed" in labels and "pos_embed" in labels
    n_heads = (L + (1 if mlp_input else 0)) * 3
    assert sum(lab.startswith("L") and "H" in lab for lab in labels) == n_heads
    assert stack.shape[1:] == target.shape
    assert (stack.sum(0) - target).abs().max() <= 1e-4
    assert target.abs().max() > 1


def test_accumulated_bias_refuses_post_norm_blocks():
    t = make_timm("vit_tiny_patch16_224", img_size=IMG, patch_size=PATCH, depth=1, num_classes=3,
                  block_fn=ResPostBlock)
    with pytest.raises(ValueError, match="post-norm"):
        HookedViT.from_timm(t).accumulated_bias(1)
