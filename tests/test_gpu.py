"""CUDA (issue 17): parity with timm on the GPU in float32, float64 and bfloat16, caches on the GPU and
to the CPU, half-precision caches, stream_reductions, and analyses (patching exact and attribution,
edges, class space, DLA, explain maps, knockout, the ``vit-lens run`` engine) that follow the model's
device. Random weights only (the GPU machine has no ../shared). Every CUDA test skips with a reason
when there is no CUDA device; `benchmarks/gpu_suite.sh` runs this file on a GPU machine.

The same battery of analyses also runs here on a CPU in bfloat16 against float32 (tests not marked
``needs_cuda``): a tensor created without following the model (a float32 constant meeting bfloat16
activations, a result kept in the wrong dtype) fails there the way a tensor created on the wrong device
fails on a GPU."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from conftest import make_timm
from test_parity import ARCHS, check_parity
from vit_lens import HookedViT

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device (runs in benchmarks/gpu_suite.sh)")

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


@needs_cuda
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


@needs_cuda
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


@needs_cuda
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


@needs_cuda
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


@needs_cuda
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


# ------------------------------------------------------------------ parity over architectures, float64
@needs_cuda
@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("batch", [1, 3])
def test_parity_random_timm_architectures_on_cuda(name, batch):
    """tests/test_parity.py's architectures, on the GPU: logits and every block, both HookedViT paths."""
    _no_tf32()
    t = make_timm(name.split("@")[0], seed=3, **ARCHS[name]).cuda()
    m = HookedViT.from_timm(t)
    assert m.device.type == "cuda"
    torch.manual_seed(100 + batch)
    check_parity(t, m, torch.randn(batch, 3, *m.cfg.image_size).cuda())


@needs_cuda
def test_float64_parity_on_cuda():
    t = make_timm("vit_tiny_patch16_224", depth=2).double().cuda()
    m = HookedViT.from_timm(t)
    assert m.dtype == torch.float64 and m.device.type == "cuda"
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64).cuda()
    assert check_parity(t, m, x, tol=1e-9)[2] <= 1e-9


# ------------------------------------------------------------------ every analysis: device and dtype following
def _tiny_timm():
    """A 2-block ViT on 32 x 32 images (4 x 4 patches), 3 heads, 7 classes, non-trivial biases."""
    t = make_timm("vit_small_patch16_224", seed=5, img_size=32, patch_size=8, depth=2, num_classes=7,
                  embed_dim=48, num_heads=3)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return t


def _images(dtype=torch.float32, device="cpu"):
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)


def battery(model: Any, x) -> Dict[str, Any]:
    """Every analysis family on ``model`` (its device and dtype) and ``x`` [4, 3, H, W]: name -> result
    tensor (as returned: on whatever device, in whatever dtype the analysis gives)."""
    from vit_lens import patching
    from vit_lens.ablation import attention_knockout
    from vit_lens.attribution import dla, memories
    from vit_lens.attribution_patching import agreement
    from vit_lens.class_space import identifiability, logit_lens
    from vit_lens.edges import edge_attribution, patch_edges
    from vit_lens.explain import (attention_rollout, chefer_relevance, class_space_importance, perturbation_auc,
                                  perturbation_curve)

    out: Dict[str, Any] = {}
    clean, corr = x[:2], x[2:4]
    metric = patching.logit_metric(3)
    ex = patching.patch_positions_sweep(model, clean, corr, metric, progress=False)
    at = patching.patch_positions_sweep(model, clean, corr, metric, method="attribution", progress=False)
    out["positions exact"], out["positions attribution"] = ex.values, at.values
    out["grid"] = ex.grid()[0]
    out["agreement"] = torch.tensor(agreement(ex, at, k=3).spearman.to_numpy().copy())
    out["heads exact"] = patching.patch_heads_sweep(model, clean, corr, metric, progress=False).values
    out["heads attribution"] = patching.patch_heads_sweep(model, clean, corr, metric, method="attribution",
                                                          progress=False).values
    with torch.inference_mode():
        _, cache = model.run_with_cache(x)
    out["identifiability"] = torch.as_tensor(identifiability(model, cache, 3).rank)
    out["logit lens"] = logit_lens(model, cache, positions=[0])
    d = dla(model, cache, 3)
    out["dla"] = torch.as_tensor(d.values)
    # the tidy tables (numpy takes neither CUDA nor bfloat16 tensors)
    out["dla table"] = torch.tensor(d.to_frame()["value"].to_numpy(dtype="float64"))
    out["patching table"] = torch.tensor(ex.to_frame()["value"].to_numpy(dtype="float64"))
    out["identifiability table"] = torch.tensor(identifiability(model, cache, 3).summary().select_dtypes("number")
                                                .to_numpy(dtype="float64"))
    out["memories"] = torch.tensor(memories(model, "mlp", layers=[1]).top_classes(3)["score"].to_numpy(dtype="float64"))
    out["edges attribution"] = edge_attribution(model, clean, corr, metric, progress=False).values
    out["edges exact"] = patch_edges(model, clean, corr, metric, progress=False).values
    out["class-space importance"] = class_space_importance(model, x, 3, progress=False)
    out["rollout"] = attention_rollout(model, x, progress=False)
    out["chefer"] = chefer_relevance(model, x, 3, progress=False)
    out["perturbation"] = perturbation_curve(model, x, 3, out["rollout"], steps=[1, 8], progress=False).mean_target_prob
    with attention_knockout(model, "self_only", layers=[1]), torch.inference_mode():
        out["knockout"] = model(x)
    # a curve in the model's dtype, on its device (an AUC of the knocked-out target probabilities)
    out["auc"] = torch.tensor([perturbation_auc(out["knockout"].softmax(-1)[:, 3], 5)])
    return out


RANKS = ("identifiability",)  # integer ranks: ties may swap under rounding


def _compare(ref: Dict[str, Any], got: Dict[str, Any], rel: float, rank_share: float) -> None:
    """``got`` against ``ref`` key by key: same shapes; values within ``rel`` x the reference's scale;
    ranks equal in all but ``rank_share`` of entries; NaNs (unswept grid cells) in the same places."""
    assert set(got) == set(ref)
    for k in ref:
        a, b = ref[k].detach().cpu().double(), got[k].detach().cpu().double()
        assert a.shape == b.shape, (k, a.shape, b.shape)
        assert torch.equal(a.isnan(), b.isnan()), k
        a, b = a.nan_to_num(), b.nan_to_num()
        assert torch.isfinite(b).all(), k
        if k in RANKS:
            assert (a != b).double().mean().item() <= rank_share, (k, (a != b).double().mean().item())
        elif k == "agreement":  # Spearman over 17 cells: a rank correlation, compared loosely
            assert (b.abs() <= 1).all() and (a - b).abs().max().item() <= max(0.5, 50 * rel), (k, a, b)
        elif k == "grid":  # normalised effects: (v - corrupted) / (clean - corrupted) amplify rounding
            assert (a - b).abs().max().item() <= 20 * rel * max(1.0, a.abs().max().item()), k
        else:
            scale = a.abs().max().item()
            assert scale > 0, k  # the test can fail: nothing is all zeros
            assert (a - b).abs().max().item() <= rel * scale + 1e-6, (k, (a - b).abs().max().item(), scale)


@pytest.fixture(scope="module")
def cpu_float32_battery():
    t = _tiny_timm()
    return battery(HookedViT.from_timm(t), _images())


def test_analyses_follow_bfloat16(cpu_float32_battery):
    """Every analysis runs on a bfloat16 model (CPU) and agrees with float32 to bfloat16's precision."""
    mb = HookedViT.from_timm(_tiny_timm(), dtype=torch.bfloat16)
    assert mb.dtype == torch.bfloat16
    got = battery(mb, _images(torch.bfloat16))
    _compare(cpu_float32_battery, got, rel=0.03, rank_share=0.2)


@needs_cuda
def test_analyses_follow_cuda(cpu_float32_battery):
    """Every analysis runs on a GPU model and agrees with the same model on the CPU (TF32 off)."""
    _no_tf32()
    m = HookedViT.from_timm(_tiny_timm().cuda())
    assert m.device.type == "cuda"
    got = battery(m, _images(device="cuda"))
    _compare(cpu_float32_battery, got, rel=1e-3, rank_share=0.05)


def _run_identifiability(model, tmp_path, name):
    """``vit-lens run identifiability`` over 6 random images in two class folders: its rows, sorted."""
    import numpy as np
    from PIL import Image

    from vit_lens.results import load
    from vit_lens.runs import read_manifest, run

    data = tmp_path / "images"
    if not data.exists():
        rng = np.random.default_rng(0)
        for i in range(6):
            (data / str(i % 2)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / str(i % 2) / f"{i}.png")
    out = tmp_path / name
    rep = run("identifiability", model, str(data), out, batch_size=4, chunk_size=4, progress=False, log=lambda m: None)
    assert rep.complete and rep.n_images_run == 6
    assert read_manifest(out)["config"]["dtype"] == str(model.dtype).replace("torch.", "")
    keys = ["path", "layer", "group", "index", "condition", "measure"]
    return load(out).sort_values(keys, na_position="first").reset_index(drop=True)


def test_run_engine_follows_bfloat16(tmp_path):
    import pandas as pd

    t = _tiny_timm()
    ref = _run_identifiability(HookedViT.from_timm(t), tmp_path, "f32")
    got = _run_identifiability(HookedViT.from_timm(t, dtype=torch.bfloat16), tmp_path, "bf16")
    assert len(ref) == len(got) > 0 and ref["value"].abs().max() > 0
    pd.testing.assert_frame_equal(ref.drop(columns="value"), got.drop(columns="value"))
    assert (ref["value"] - got["value"]).abs().mean() <= 0.05  # rates and ranks: a few ties swap


@needs_cuda
def test_run_engine_follows_cuda(tmp_path):
    import pandas as pd

    _no_tf32()
    t = _tiny_timm()
    ref = _run_identifiability(HookedViT.from_timm(t), tmp_path, "cpu")
    got = _run_identifiability(HookedViT.from_timm(t.cuda()), tmp_path, "cuda")
    pd.testing.assert_frame_equal(ref.drop(columns="value"), got.drop(columns="value"))
    assert (ref["value"] - got["value"]).abs().max() <= 1e-3
