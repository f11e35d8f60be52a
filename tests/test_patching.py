"""Tests for vit_lens.patching: batched sweeps equal a naive hook loop, self-patching is exact,
results keep the token grid, the resumable sweep script resumes without loss or repetition."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_timm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vit_lens import HookedViT
from vit_lens.config import rowcol_to_patch_index
from vit_lens.patching import (
    PatchingResult,
    identifiability_metric,
    logit_diff_metric,
    logit_metric,
    patch_block_every,
    patch_components_sweep,
    patch_heads_sweep,
    patch_positions_sweep,
    patching_hooks,
    position_labels,
    position_mask,
    prob_metric,
    run_patched,
)

REPO = Path(__file__).resolve().parents[1]
KW = dict(img_size=32, patch_size=8, depth=3, num_classes=7)
VARIANTS = {
    "cls": ("vit_tiny_patch16_224", {}),
    "dist": ("deit_tiny_distilled_patch16_224", {}),
    "avg": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False)),
    "reg": ("vit_tiny_patch16_224", dict(reg_tokens=2, no_embed_class=True)),
}


def _model(kind: str = "cls", seed: int = 0, **extra) -> HookedViT:
    name, kw = VARIANTS[kind]
    return HookedViT.from_timm(make_timm(name, seed=seed, **{**KW, **kw, **extra}))


def _images(n: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit() -> HookedViT:
    return _model("cls")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> HookedViT:
    return _model(request.param)


def _naive(model, corrupted, name, src, pos=None, head=None):
    """One run with plain indexing in a raw hook: the reference for every sweep."""

    def hook(act, hook=None):
        act = act.clone()
        if head is None:
            act[:, pos] = src[:, pos]
        elif pos is None:
            act[:, :, head] = src[:, :, head]
        else:
            act[:, pos, head] = src[:, pos, head]
        return act

    with torch.inference_mode():
        return model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])


# ------------------------------------------------------------------ sweeps vs naive loop
def test_position_sweep_equals_naive_loop_every_variant(variant):
    m = variant
    clean, corr = _images(2, 1), _images(2, 2)
    metric = logit_diff_metric([1, 2], [3, 4])
    L, P, n_pre = m.cfg.n_layers, m.cfg.n_ctx, m.cfg.n_prefix_tokens
    # every position for the [CLS] model; prefix tokens, the first, a middle and the last patch otherwise
    pos = list(range(P)) if m.cfg.n_prefix_tokens == 1 and m.cfg.pooling == "token" else sorted(
        {0, max(n_pre - 1, 0), n_pre, n_pre + 5, P - 1}
    )
    res = patch_positions_sweep(m, clean, corr, metric, positions=pos, progress=False)
    assert res.dims == ("layer", "pos", "batch") and res.shape == (L, len(pos), 2)
    assert res.positions.tolist() == pos
    with torch.inference_mode():
        _, cache = m.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        assert torch.allclose(res.clean, metric(m(clean)), atol=1e-6)
        assert torch.allclose(res.corrupted, metric(m(corr)), atol=1e-6)
    expected = torch.empty(L, len(pos), 2)
    for l in range(L):
        name = f"blocks.{l}.hook_resid_pre"
        for j, p in enumerate(pos):
            expected[l, j] = metric(_naive(m, corr, name, cache[name], pos=p))
    assert (res.values - expected).abs().max() <= 1e-5
    # a non-trivial sweep: patches move the metric, and differently per position
    assert expected.std() > 1e-3


@pytest.mark.parametrize("hook", ["resid_mid", "resid_post", "attn_out", "mlp_out", "attn.hook_z", "mlp.hook_post"])
def test_position_sweep_other_hooks_equal_naive(vit, hook):
    clean, corr = _images(2, 3), _images(2, 4)
    metric = logit_metric([0, 5])
    res = patch_positions_sweep(vit, clean, corr, metric, hook=hook, layers=[0, 2], positions=[0, 1, 7, 16],
                                progress=False)
    for i, l in enumerate([0, 2]):
        name = f"blocks.{l}.{hook if '.' in hook else 'hook_' + hook}"
        with torch.inference_mode():
            _, cache = vit.run_with_cache(clean, names_filter=[name])
        for j, p in enumerate([0, 1, 7, 16]):
            assert torch.allclose(res.values[i, j], metric(_naive(vit, corr, name, cache[name], pos=p)), atol=1e-5)


@pytest.mark.parametrize("hook", ["attn.hook_z", "attn.hook_v", "attn.hook_pattern"])
def test_heads_sweep_equals_naive(vit, hook):
    clean, corr = _images(2, 5), _images(2, 6)
    metric = logit_metric(3)
    res = patch_heads_sweep(vit, clean, corr, metric, hook=hook, progress=False)
    H = vit.cfg.n_heads
    assert res.dims == ("layer", "head", "batch") and res.shape == (3, H, 2)
    for l in range(3):
        name = f"blocks.{l}.{hook}"
        with torch.inference_mode():
            _, cache = vit.run_with_cache(clean, names_filter=[name])
        for h in range(H):
            src = cache[name]
            if hook == "attn.hook_pattern":  # [B, H, Pq, Pk]: patch the whole head
                def hk(act, hook=None, h=h):
                    act = act.clone()
                    act[:, h] = src[:, h]
                    return act

                with torch.inference_mode():
                    ref = metric(vit.run_with_hooks(corr, fwd_hooks=[(name, hk)]))
            else:
                ref = metric(_naive(vit, corr, name, src, head=h))
            assert torch.allclose(res.values[l, h], ref, atol=1e-5)


def test_heads_sweep_at_chosen_positions(vit):
    clean, corr = _images(1, 7), _images(1, 8)
    metric = logit_metric(2)
    pos = [0, 3]
    res = patch_heads_sweep(vit, clean, corr, metric, layers=[1], heads=[0, 2], positions=pos, progress=False)
    assert res.coords["head"] == [0, 2]
    name = "blocks.1.attn.hook_z"
    _, cache = vit.run_with_cache(clean, names_filter=[name])
    for j, h in enumerate([0, 2]):
        ref = metric(_naive(vit, corr, name, cache[name], pos=torch.tensor(pos)[:, None], head=h))
        assert torch.allclose(res.values[0, j], ref, atol=1e-5)


def test_components_sweep_known_answers(vit):
    """Patching the whole residual stream entering block 0 (or leaving the last block) gives the
    clean run: normalised value 1."""
    clean, corr = _images(2, 9), _images(2, 10)
    metric = logit_diff_metric(1, 2)
    res = patch_components_sweep(vit, clean, corr, metric, components=("resid_pre", "resid_post", "attn_out"),
                                 progress=False)
    assert res.dims == ("component", "layer", "batch")
    norm = res.normalized()
    assert torch.allclose(norm[0, 0], torch.ones(2), atol=1e-4)  # resid_pre of block 0
    assert torch.allclose(norm[1, -1], torch.ones(2), atol=1e-4)  # resid_post of the last block
    # attention output of a middle block: equals the naive whole-activation patch
    name = "blocks.1.hook_attn_out"
    _, cache = vit.run_with_cache(clean, names_filter=[name])
    ref = metric(_naive(vit, corr, name, cache[name], pos=slice(None)))
    assert torch.allclose(res.values[2, 1], ref, atol=1e-5)


def test_block_every_stacks_position_sweeps(vit):
    clean, corr = _images(1, 11), _images(1, 12)
    metric = prob_metric(4)
    every = patch_block_every(vit, clean, corr, metric, positions="patches", progress=False)
    assert every.dims == ("component", "layer", "pos", "batch")
    assert every.shape == (3, 3, vit.cfg.n_patches, 1)
    one = patch_positions_sweep(vit, clean, corr, metric, hook="mlp_out", positions="patches", progress=False)
    assert torch.allclose(every.values[2], one.values, atol=1e-6)


# ------------------------------------------------------------------ self-patching changes nothing
HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
         "attn.hook_z", "attn.hook_v", "attn.hook_q", "attn.hook_pattern", "mlp.hook_post", "ln2.hook_normalized"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hook=st.sampled_from(HOOKS),
    layer=st.integers(0, 2),
    positions=st.one_of(st.none(), st.lists(st.integers(-17, 16), min_size=1, max_size=6)),
    heads=st.one_of(st.none(), st.lists(st.integers(0, 2), min_size=1, max_size=3)),
)
def test_patching_a_run_with_its_own_activations_changes_nothing(vit, hook, layer, positions, heads):
    x = _images(2, 13)
    name = f"blocks.{layer}.{hook}"
    if not hook.startswith("attn.") or hook == "attn.hook_out":
        heads = None
    _, cache = vit.run_with_cache(x, names_filter=[name])
    # the reference runs with an identity hook on the same point (same code path)
    ref = vit.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook=None: a)])
    out = run_patched(vit, x, name, cache, positions=positions, heads=heads)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("hook", ["resid_pre", "attn_out", "attn.hook_z"])
def test_sweep_of_a_run_with_itself_gives_the_baseline(vit, hook):
    x = _images(2, 14)
    metric = logit_metric([1, 6])
    exact = patch_positions_sweep(vit, x, x, metric, hook=hook, progress=False)
    assert torch.equal(exact.values, exact.corrupted.expand_as(exact.values))  # skipped: nothing changes
    run = patch_positions_sweep(vit, x, x, metric, hook=hook, progress=False, skip_unchanged=False)
    assert (run.values - run.corrupted).abs().max() <= 1e-5  # actually run: same up to float rounding
    with pytest.warns(UserWarning, match="equal"):
        assert torch.isnan(run.normalized()).all()


def test_chunking_does_not_change_results(vit):
    clean, corr = _images(2, 15), _images(2, 16)
    metric = logit_metric(0)
    kw = dict(layers=[0, 2], positions=list(range(0, 17, 2)), progress=False)
    a = patch_positions_sweep(vit, clean, corr, metric, chunk_size=1, **kw)
    b = patch_positions_sweep(vit, clean, corr, metric, chunk_size=4, **kw)
    c = patch_positions_sweep(vit, clean, corr, metric, memory_mb=1e-3, **kw)  # one run per chunk
    d = patch_positions_sweep(vit, clean, corr, metric, memory_mb=4096, **kw)  # all runs of a layer at once
    for r in (b, c, d):
        assert torch.allclose(a.values, r.values, atol=1e-5)


def test_progress_bar(vit, capsys):
    patch_positions_sweep(vit, _images(1, 1), _images(1, 2), logit_metric(0), layers=[2], progress=True)
    assert "patching resid_pre" in capsys.readouterr().err


# ------------------------------------------------------------------ metrics
def test_metrics_known_answers():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    assert torch.equal(logit_metric(1)(logits), torch.tensor([3.0, -1.0]))
    assert torch.equal(logit_metric([2, 0])(logits), torch.tensor([2.0, 0.0]))
    assert torch.equal(logit_diff_metric([1, 2], 0)(logits), torch.tensor([2.0, 5.0]))
    p = prob_metric(1)(logits)
    assert torch.allclose(p, torch.tensor([np.exp(3) / (np.e + np.exp(3) + np.exp(2)), np.exp(-1) / (1 + np.exp(-1) + np.exp(5))]).float())
    runs = logits.expand(4, 2, 3)  # leading axes (the runs of a sweep) broadcast
    assert logit_metric([2, 0])(runs).shape == (4, 2)
    with pytest.raises(ValueError, match="one class per image"):
        logit_metric([1, 2, 0])(logits)
    with pytest.raises(IndexError, match="out of range"):
        logit_metric(5)(logits)


def test_identifiability_metric_against_argmax(vit):
    """The rate is the share of image tokens whose top-1 class (argmax of the projection) is the target."""
    x = _images(2, 17)
    _, cache = vit.run_with_cache(x, names_filter=["blocks.2.hook_resid_post"])
    resid = cache["blocks.2.hook_resid_post"][:, 1:]
    top1 = vit.project_to_classes(resid).argmax(-1)  # [batch, patches]
    target = top1[:, 0]  # a class that is top-1 for at least one token per image
    expected = (top1 == target[:, None]).float().mean(-1)
    metric = identifiability_metric(vit, target)
    got = run_patched(vit, x, "blocks.0.hook_resid_pre", cache, value="zero", positions=[], metric=metric)
    assert torch.allclose(got, expected)
    assert (expected > 0).all()
    score = identifiability_metric(vit, target, kind="score")
    s = run_patched(vit, x, "blocks.0.hook_resid_pre", cache, value="zero", positions=[], metric=score)
    assert ((s > 0) & (s <= 1)).all()


def test_sweep_with_identifiability_metric_equals_naive(vit):
    clean, corr = _images(2, 18), _images(2, 19)
    metric = identifiability_metric(vit, [1, 2], kind="score")
    res = patch_positions_sweep(vit, clean, corr, metric, layers=[0, 2], positions=[0, 5], progress=False)
    for i, l in enumerate([0, 2]):
        name = f"blocks.{l}.hook_resid_pre"
        _, cache = vit.run_with_cache(clean, names_filter=[name])
        for j, p in enumerate([0, 5]):
            ref = run_patched(vit, corr, name, cache, positions=[p], metric=metric)
            assert torch.allclose(res.values[i, j], ref, atol=1e-6)
    # a metric read before the patched layer cannot change: the corrupted run's value
    early = identifiability_metric(vit, [1, 2], layer=0, kind="score")
    res = patch_positions_sweep(vit, clean, corr, early, layers=[2], progress=False)
    assert torch.equal(res.values[0], res.corrupted.expand(res.shape[1], 2))


# ------------------------------------------------------------------ generic patching
def test_run_patched_values(vit):
    x, other = _images(3, 20), _images(3, 21)
    name = "blocks.1.hook_attn_out"
    _, src = vit.run_with_cache(other, names_filter=[name])

    def manual(new):
        def hook(act, hook=None):
            act = act.clone()
            act[:, 2:5] = new[:, 2:5] if new.shape[0] == act.shape[0] else new[:, 2:5].expand(act.shape[0], -1, -1)
            return act

        return vit.run_with_hooks(x, fwd_hooks=[(name, hook)])

    assert torch.equal(run_patched(vit, x, name, src, positions=[2, 3, 4]), manual(src[name]))
    assert torch.equal(run_patched(vit, x, name, src, value="zero", positions=[2, 3, 4]),
                       manual(torch.zeros_like(src[name])))
    assert torch.allclose(run_patched(vit, x, name, src, value="mean", positions=[2, 3, 4]),
                          manual(src[name].mean(0, keepdim=True)), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(run_patched(vit, x, name, src, value="resample", positions=[2, 3, 4], generator=g),
                       manual(src[name][idx]))
    # a source given as images is run here
    assert torch.equal(run_patched(vit, x, name, other, positions=[2, 3, 4]), manual(src[name]))
    # a grid mask names the same patches
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[0, 1:4] = True  # positions 2, 3, 4
    assert torch.equal(run_patched(vit, x, name, src, positions=grid), manual(src[name]))


def test_patching_hooks_compose_with_run_with_cache(vit):
    x, other = _images(1, 22), _images(1, 23)
    _, src = vit.run_with_cache(other, names_filter=["blocks.0.hook_resid_post"])
    with vit.hooks(fwd_hooks=patching_hooks(vit, "blocks.0.hook_resid_post", src)):
        _, cache = vit.run_with_cache(x, names_filter=["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
    assert torch.equal(cache["blocks.0.hook_resid_post"], src["blocks.0.hook_resid_post"])
    assert torch.equal(cache["blocks.1.hook_resid_pre"], src["blocks.0.hook_resid_post"])


def test_errors_say_what_to_do(vit):
    a, b = _images(2, 1), _images(1, 2)
    with pytest.raises(ValueError, match="same shape"):
        patch_positions_sweep(vit, a, b, logit_metric(0), progress=False)
    with pytest.raises(ValueError, match="unknown hook name"):
        patch_positions_sweep(vit, a, a, logit_metric(0), hook="resid_prex", progress=False)
    with pytest.raises(ValueError, match="one value per image"):
        patch_positions_sweep(vit, a, _images(2, 3), lambda logits: logits.sum(), layers=[0], progress=False)
    with pytest.raises(ValueError, match="no head axis"):
        patch_heads_sweep(vit, a, a, logit_metric(0), hook="attn_out", progress=False)
    with pytest.raises(ValueError, match="needs a source"):
        run_patched(vit, a, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="heads can only"):
        run_patched(vit, a, "blocks.0.hook_resid_pre", value="zero", heads=[0])
    with pytest.raises(IndexError, match="out of range"):
        position_mask(vit, [17])
    with pytest.raises(ValueError, match="set_use_attn_result"):
        patch_heads_sweep(vit, a, a, logit_metric(0), hook="attn.hook_result", progress=False)


# ------------------------------------------------------------------ positions and result layout
def test_position_mask_forms(vit):
    cfg = vit.cfg
    assert position_mask(vit, None).all() and position_mask(vit, "all").sum() == 17
    assert position_mask(vit, "patches").tolist() == [False] + [True] * 16
    assert position_mask(vit, "cls").nonzero().flatten().tolist() == [0]
    assert position_mask(vit, [-1, 0]).nonzero().flatten().tolist() == [0, 16]
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[2, 3] = True
    assert position_mask(vit, grid).nonzero().flatten().tolist() == [rowcol_to_patch_index(2, 3, cfg)]
    assert position_labels(vit)[:3] == ["CLS", "0,0", "0,1"]
    dist = _model("dist")
    assert position_labels(dist)[:3] == ["CLS", "DIST", "0,0"]


def test_result_grid_and_table_follow_the_token_grid():
    m = _model("reg")  # 3 prefix tokens: CLS, REG0, REG1
    clean, corr = _images(2, 24), _images(2, 25)
    res = patch_positions_sweep(m, clean, corr, logit_metric(1), layers=[1, 2], progress=False)
    norm = res.normalized()
    grid, dims = res.grid()
    assert dims == ("layer", "row", "col", "batch") and grid.shape == (2, 4, 4, 2)
    for r in range(4):
        for c in range(4):
            p = rowcol_to_patch_index(r, c, m.cfg)
            assert torch.equal(grid[:, r, c], norm[:, p])
    pre, names = res.prefix()
    assert names == ["CLS", "REG0", "REG1"] and torch.equal(pre, norm[:, :3])
    df = res.to_frame()
    assert len(df) == 2 * m.cfg.n_ctx * 2
    assert set(df.columns) >= {"layer", "pos", "token", "row", "col", "batch", "value", "normalized"}
    row = df[(df.layer == 2) & (df.token == "3,1") & (df.batch == 1)].iloc[0]
    p = rowcol_to_patch_index(3, 1, m.cfg)
    assert row.pos == p and row.row == 3 and row.col == 1
    assert row.value == pytest.approx(float(res.values[1, p, 1]))
    assert row.normalized == pytest.approx(float(norm[1, p, 1]))
    assert df[df.token == "REG1"].row.isna().all()
    mean = res.mean("batch")
    assert mean.shape == (2, m.cfg.n_ctx, 1)
    assert torch.allclose(mean.values[..., 0], res.values.mean(-1))
    assert isinstance(res, PatchingResult) and "resid_pre" in repr(res)


def test_any_number_of_classes_and_batch_sizes():
    m = _model("cls", num_classes=3)
    res = patch_positions_sweep(m, _images(5, 26), _images(5, 27), logit_diff_metric(0, 2),
                                layers=[2], positions=[0, 1], progress=False)
    assert res.shape == (1, 2, 5)


# ------------------------------------------------------------------ the resumable sweep script
def _load_script():
    path = REPO / "benchmarks" / "patching_sweep.py"
    spec = importlib.util.spec_from_file_location("patching_sweep_script", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_sweep_script_resumes_without_loss_or_repetition(tmp_path, monkeypatch):
    """benchmarks/patching_sweep.py is a driver over `vit-lens run patching` (issue 15): an interrupted
    sweep resumes where it stopped, every image is swept exactly once, the values equal an uninterrupted
    run's, and another configuration is refused rather than mixed in."""
    from PIL import Image

    from vit_lens import results
    from vit_lens.runs import ANALYSES, ConfigMismatchError

    script = _load_script()
    vit = _model("cls", depth=2)
    vit.data_config["input_size"] = (3, 32, 32)  # timm's pretrained config says 224 for any img_size
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    assert len(script.find_images(folder)) == 3
    kw = dict(progress=False, corruption="blur")

    # reference: one uninterrupted run
    ref_out = tmp_path / "ref"
    script.run_sweep(vit, folder, ref_out, **kw)
    ref = results.load(ref_out, complete=True)
    assert ref.path.nunique() == 3 and (ref_out / "figures").exists()

    # interrupted after the second image, then resumed: each image swept exactly once
    spec = ANALYSES["patching"]
    real, calls = spec.fn, []

    def stops_on_image_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(spec, "fn", stops_on_image_2)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        script.run_sweep(vit, folder, out, **kw)
    assert results.load(out).path.nunique() == 1
    script.run_sweep(vit, folder, out, **kw)
    assert len(calls) == 2 + 2  # only the two images left were swept
    script.run_sweep(vit, folder, out, **kw)  # a further run has nothing to do
    assert len(calls) == 4
    got = results.load(out, complete=True)
    cols = [c for c in ref.columns if c != "value"]
    assert not got.duplicated(cols).any()
    merged = ref.merge(got, on=cols, suffixes=("_ref", "_got"))
    assert len(merged) == len(ref) == len(got)
    assert (merged.value_ref == merged.value_got).all()
    # another configuration is refused rather than mixed in
    with pytest.raises(ConfigMismatchError):
        script.run_sweep(vit, folder, out, **{**kw, "corruption": "noise"})
    # a folder with images at the top and in a subfolder is refused, never read in part
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "sub" / "a.png")
    with pytest.raises(ValueError, match="subfolders"):
        script.run_sweep(vit, folder, tmp_path / "mixed", **kw)


# ------------------------------------------------------------------ the last-block pruning goes through the components
@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", {}), ("deit_tiny_distilled_patch16_224", {})])
def test_block_with_n_queries_equals_the_full_block_at_those_rows(name, kw):
    """TransformerBlock(x, n_queries=n) == TransformerBlock(x)[:, :n] (keys and values from every token),
    with and without an attention mask; what the batched sweeps run in the last block."""
    m = HookedViT.from_timm(make_timm(name, img_size=32, depth=2, num_classes=6, **kw).eval())
    x = torch.randn(3, m.cfg.n_ctx, m.cfg.d_model)
    block = m.blocks[-1]
    n = m.readout.n_pooled_prefix
    with torch.no_grad():
        assert torch.allclose(block(x, n_queries=n), block(x)[:, :n], atol=1e-5)
        mask = torch.rand(m.cfg.n_ctx, m.cfg.n_ctx) > 0.3
        mask[:, 0] = True
        block.attn.attn_mask = mask
        try:
            assert torch.allclose(block(x, n_queries=n), block(x)[:, :n], atol=1e-5)
        finally:
            block.attn.attn_mask = None
