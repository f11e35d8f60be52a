"""Memory options of run_with_cache (issue 17): dtype= (half-precision caches), device=, pos_slice (an
owned token subset), stream_reductions (a dataset run that keeps only reductions); and the fast cached
forward (fused LayerNorm) against the explicit definition, with hook edits still taking effect."""

from __future__ import annotations

import pytest
import torch

from conftest import make_timm
from vit_lens import HookedViT
from vit_lens.core.errors import InputError, InputTypeError

IMG, PATCH = 32, 8
P = 1 + (IMG // PATCH) ** 2


@pytest.fixture(scope="module")
def model():
    t = make_timm("vit_tiny_patch16_224", seed=3, img_size=IMG, patch_size=PATCH, depth=2, num_classes=7)
    with torch.no_grad():  # non-trivial LayerNorm affine and biases
        for name, p in t.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return HookedViT.from_timm(t)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(5, 3, IMG, IMG)


@pytest.fixture(scope="module")
def full(model, x):
    with torch.inference_mode():
        return model.run_with_cache(x, return_cache_object=False)


def _explicit_ln(x, ln):
    x = x.double()
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    scale = (var + ln.eps).sqrt()
    out = (x - mean) / scale
    if ln.affine:
        out = out * ln.w.double() + ln.b.double()
    return scale, out


def test_fused_layernorm_cache_matches_the_definition(model, full):
    _, c = full
    for l in range(model.cfg.n_layers):
        for ln_name, inp in (("ln1", f"blocks.{l}.hook_resid_pre"), ("ln2", f"blocks.{l}.hook_resid_mid")):
            scale, out = _explicit_ln(c[inp], getattr(model.blocks[l], ln_name))
            assert torch.allclose(c[f"blocks.{l}.{ln_name}.hook_scale"].double(), scale, rtol=1e-6, atol=1e-7)
            assert torch.allclose(c[f"blocks.{l}.{ln_name}.hook_normalized"].double(), out, atol=1e-5)


def test_cached_forward_equals_the_explicit_gradient_path(model, x, full):
    """With gradients on, the LayerNorms run the explicit form; both paths give the same cache."""
    logits, c = full
    logits_g, cg = model.run_with_cache(x, return_cache_object=False)  # grad mode: explicit LayerNorm
    assert logits_g.requires_grad
    assert torch.allclose(logits, logits_g.detach(), atol=1e-5)
    assert set(c) == set(cg)
    for k in c:
        assert torch.allclose(c[k], cg[k], atol=2e-5), k


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
@pytest.mark.parametrize("how", ["in_place", "returned"])
def test_editing_the_scale_still_edits_the_forward(model, x, mode, how):
    """Doubling ln1's scale halves the centred output (the fast path must notice in-place edits too)."""
    ln = model.blocks[1].ln1
    names = ["blocks.1.hook_resid_pre", "blocks.1.ln1.hook_normalized"]

    def double(s, hook):
        if how == "in_place":
            s.mul_(2)
            return None
        return s * 2

    ctx = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with ctx:
        model.reset_hooks()
        model.add_hook("blocks.1.ln1.hook_scale", double)
        try:
            _, c = model.run_with_cache(x, names_filter=names)
        finally:
            model.reset_hooks()
    _, ref = _explicit_ln(c[names[0]], ln)
    want = (ref - ln.b.double()) / 2 + ln.b.double()
    assert torch.allclose(c[names[1]].double(), want, atol=1e-5)


def test_gradients_reach_the_scale_hook(model, x):
    grads = {}

    def grab(g, hook):
        grads[hook.name] = g

    model.reset_hooks()
    try:
        with model.hooks(bwd_hooks=[("blocks.0.ln2.hook_scale", grab)], reset_hooks_end=False):
            model(x).sum().backward()
    finally:
        model.reset_hooks(including_permanent=False)
        model.zero_grad(set_to_none=True)
    assert "blocks.0.ln2.hook_scale" in grads and grads["blocks.0.ln2.hook_scale"].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache(model, x, full, dtype):
    logits, c = full
    with torch.inference_mode():
        out, h = model.run_with_cache(x, dtype=dtype, return_cache_object=False)
    assert torch.equal(out, logits)  # the model still runs in float32
    assert set(h) == set(c)
    for k in c:
        assert h[k].dtype == dtype and torch.equal(h[k], c[k].to(dtype)), k
    with pytest.raises(InputTypeError, match="floating"):
        model.run_with_cache(x, dtype=torch.int8)


def test_device_option_stores_on_that_device(model, x, full):
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_q"]
    with torch.inference_mode():
        _, c = model.run_with_cache(x, names_filter=names)
        _, d = model.run_with_cache(x, device="cpu", dtype=torch.float64, names_filter=names)
    for n in names:
        assert d[n].device.type == "cpu" and d[n].dtype == torch.float64
        assert torch.equal(d[n], c[n].double())


@pytest.mark.parametrize("pos_slice", [0, [0, 3], (1, 4), slice(2, None, 3)])
def test_pos_slice_keeps_owned_copies_of_those_positions(model, x, full, pos_slice):
    _, c = full
    index = pos_slice if isinstance(pos_slice, (list, slice)) else \
        [pos_slice] if isinstance(pos_slice, int) else slice(*pos_slice)
    with torch.inference_mode():
        _, s = model.run_with_cache(x, pos_slice=pos_slice, return_cache_object=False)
    assert set(s) == set(c)
    for k, v in s.items():
        if k == "hook_pooled" or k.startswith("fc_norm."):
            want = c[k]
        elif k.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")):
            want = c[k][:, index]
        else:  # [batch, pos, ...] and the query axis of scores / pattern
            want = c[k][..., index, :]
        assert torch.equal(v, want), k
        # it owns its memory: the other positions' storage is not kept alive (an expanded view of the
        # position embedding holds less than its size)
        assert v.untyped_storage().nbytes() <= v.numel() * v.element_size(), k


def test_stream_reductions_equal_the_full_cache(model, x):
    names = {"blocks.0.hook_resid_post": "mean", "blocks.1.attn.hook_pattern": "max",
             "blocks.1.mlp.hook_post": "sum", "blocks.0.ln1.hook_scale": "min",
             "blocks.1.hook_resid_post": lambda a: a[:, 0]}
    batches = [x[:2], x[2:4], x[4:]]
    r = model.stream_reductions(batches, names, progress=False)
    with torch.inference_mode():  # reference: the full cache of each batch (same batches, same kernels)
        parts = [model.run_with_cache(b, names_filter=list(names), return_cache_object=False)[1] for b in batches]
    c = {n: torch.cat([p[n] for p in parts]) for n in names}
    assert set(r) == set(names)
    assert torch.allclose(r["blocks.0.hook_resid_post"], c["blocks.0.hook_resid_post"].double().mean(0), atol=1e-6)
    assert torch.equal(r["blocks.1.attn.hook_pattern"], c["blocks.1.attn.hook_pattern"].amax(0))
    assert torch.allclose(r["blocks.1.mlp.hook_post"], c["blocks.1.mlp.hook_post"].double().sum(0), atol=1e-5)
    assert torch.equal(r["blocks.0.ln1.hook_scale"], c["blocks.0.ln1.hook_scale"].amin(0))
    assert torch.equal(r["blocks.1.hook_resid_post"], c["blocks.1.hook_resid_post"][:, 0])


def test_stream_reductions_refuse_bad_input(model, x):
    with pytest.raises(InputError, match="unknown hook name"):
        model.stream_reductions([x], {"blocks.0.hook_resid_pst": "mean"}, progress=False)
    with pytest.raises(InputError, match="must be 'sum'"):
        model.stream_reductions([x], {"blocks.0.hook_resid_post": "median"}, progress=False)
    with pytest.raises(InputError, match="one row per image"):
        model.stream_reductions([x], {"blocks.0.hook_resid_post": lambda a: a.mean()}, progress=False)
    with pytest.raises(InputError, match="no batches"):
        model.stream_reductions([], {"blocks.0.hook_resid_post": "mean"}, progress=False)
    with pytest.raises(InputTypeError, match="non-empty dict"):
        model.stream_reductions([x], {}, progress=False)


def test_finite_check_still_refuses_nan_and_keeps_huge_finite_pixels(model, x):
    bad = x.clone()
    bad[3, 1, 2, 2] = float("nan")
    with pytest.raises(InputError, match=r"images \[3\]"):
        model(bad)
    huge = x.clone()
    huge[:, :, :4] = 3e38  # finite, but the batch's sum overflows: must not be refused
    with torch.inference_mode():
        assert model(huge).shape == (5, 7)
