"""CUDA (issue 17): parity with timm on the GPU in float32 and bfloat16, caches on the GPU and to the CPU,
half-precision caches, stream_reductions, and analyses that follow the model's device. Random weights
only (the GPU machine has no ../shared). Every test skips with a reason when there is no CUDA device;
`benchmarks/gpu_suite.sh` runs this file on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from conftest import make_timm
from vit_lens import HookedViT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (runs in benchmarks/gpu_suite.sh)")

IMG, PATCH = 64, 16


@pytest.fixture(scope="module")
def pair():
    """(timm model, HookedViT) on the GPU, float32, non-trivial biases and LayerNorm affines."""
    t = make_timm("vit_small_patch16_224", seed=5, img_size=IMG, patch_size=PATCH, depth=4, num_classes=13)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    t = t.cuda()
    return t, HookedViT.from_timm(t)


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(2)
    return torch.randn(6, 3, IMG, IMG, generator=g).cuda()


def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_float32_parity_on_cuda(pair, x):
    _no_tf32()
    t, m = pair
    assert m.device.type == "cuda"
    with torch.inference_mode():
        ref_blocks = []
        hooks = [b.register_forward_hook(lambda mod, i, o: ref_blocks.append(o)) for b in t.blocks]
        try:
            ref = t(x)
        finally:
            for h in hooks:
                h.remove()
        logits = m(x)
        logits_c, cache = m.run_with_cache(x)
    assert (logits - ref).abs().max().item() <= 1e-4
    assert (logits_c - ref).abs().max().item() <= 1e-4
    for l, r in enumerate(ref_blocks):
        c = cache[f"blocks.{l}.hook_resid_post"]
        assert c.device.type == "cuda"
        assert (c - r).abs().max().item() <= 1e-4, l


def test_bfloat16_model_tracks_timm(pair, x):
    t, m = pair
    tb = make_timm("vit_small_patch16_224", seed=5, img_size=IMG, patch_size=PATCH, depth=4, num_classes=13)
    tb.load_state_dict(t.state_dict())
    tb = tb.cuda().to(torch.bfloat16)
    mb = HookedViT.from_timm(tb)
    assert mb.dtype == torch.bfloat16
    with torch.inference_mode():
        ref32 = t(x)
        ref = tb(x.to(torch.bfloat16)).float()
        out = mb(x.to(torch.bfloat16)).float()
        _, cache = mb.run_with_cache(x.to(torch.bfloat16))
    # both bf16 runs are as far from float32 as bf16 allows; ours no further than twice timm's own error
    own = (ref - ref32).abs().max().item()
    assert (out - ref32).abs().max().item() <= 2 * own + 1e-2
    assert all(v.dtype == torch.bfloat16 for v in cache.values())


def test_cache_to_cpu_and_half_precision(pair, x):
    _, m = pair
    with torch.inference_mode():
        _, on_gpu = m.run_with_cache(x, return_cache_object=False)
        _, to_cpu = m.run_with_cache(x, device="cpu", return_cache_object=False)
        _, half = m.run_with_cache(x, dtype=torch.bfloat16, return_cache_object=False)
        _, cls = m.run_with_cache(x, device="cpu", pos_slice=0, return_cache_object=False)
    assert set(to_cpu) == set(on_gpu) == set(half)
    for k, v in on_gpu.items():
        assert to_cpu[k].device.type == "cpu" and torch.equal(to_cpu[k], v.cpu()), k
        assert half[k].device.type == "cuda" and torch.equal(half[k], v.to(torch.bfloat16)), k
        assert cls[k].device.type == "cpu"
    assert torch.equal(cls["blocks.1.hook_resid_post"], on_gpu["blocks.1.hook_resid_post"][:, :1].cpu())


def test_stream_reductions_on_cuda(pair, x):
    _, m = pair
    names = {"blocks.2.hook_resid_post": "mean", "blocks.3.hook_resid_post": lambda a: a[:, 0]}
    batches = [x[:3].cpu(), x[3:].cpu()]  # moved to the model's device batch by batch
    r = m.stream_reductions(batches, names, device="cpu", progress=False)
    with torch.inference_mode():
        parts = [m.run_with_cache(b.cuda(), names_filter=list(names))[1] for b in batches]
    mean = torch.cat([p["blocks.2.hook_resid_post"] for p in parts]).double().mean(0).cpu()
    assert r["blocks.2.hook_resid_post"].device.type == "cpu"
    assert torch.allclose(r["blocks.2.hook_resid_post"], mean, atol=1e-5)
    assert torch.equal(r["blocks.3.hook_resid_post"], torch.cat([p["blocks.3.hook_resid_post"][:, 0] for p in parts]).cpu())


def test_analyses_follow_the_device(pair, x):
    """A patching sweep, identifiability and DLA run on the GPU model and agree with the CPU model."""
    from vit_lens import patching
    from vit_lens.attribution import dla
    from vit_lens.class_space import identifiability

    _no_tf32()
    t, m = pair
    cpu = HookedViT.from_timm(t.cpu())
    t.cuda()
    xc = x.cpu()
    metric = patching.logit_metric(3)
    g = patching.patch_positions_sweep(m, x[:2], x[2:4], metric, layers=[1, 3], progress=False)
    c = patching.patch_positions_sweep(cpu, xc[:2], xc[2:4], metric, layers=[1, 3], progress=False)
    assert torch.allclose(g.values.cpu(), c.values, atol=1e-3)
    with torch.inference_mode():
        _, gc = m.run_with_cache(x)
        _, cc = cpu.run_with_cache(xc)
    gi, ci = identifiability(m, gc, 3), identifiability(cpu, cc, 3)
    assert torch.allclose(torch.as_tensor(gi.rank).cpu().float(), torch.as_tensor(ci.rank).float(), atol=1)
    gd, cd = dla(m, gc, 3), dla(cpu, cc, 3)
    assert torch.allclose(torch.as_tensor(gd.values).cpu(), torch.as_tensor(cd.values), atol=1e-3)
