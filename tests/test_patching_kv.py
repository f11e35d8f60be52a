"""Exact sweeps reuse, at the patched layer, what a patch leaves unchanged (issue 17 item 3): the
queries / keys / values (or the attention output) of the block a run starts in come from the clean
and corrupted runs instead of being recomputed per run. The results must be the naive loop's (one
full forward per patch, the hook doing plain indexing):

* bit for bit (``torch.equal``) where the arithmetic is the same: one run per chunk
  (``chunk_size=1``, so every matmul has the naive run's shape) and no pruned last block (average
  pooling, post-norm blocks);
* within float32 rounding otherwise: chunks batch several runs into one matmul, and the pruned last
  block of a token-pooled model projects only the pooled rows -- both round differently from a
  batch-1 forward (the engine without reuse does the same, and is compared too).

Reuse is seen to happen (the patched block's projections run once per group, not once per run),
falls back to the full computation where it could not be exact (``ln1.hook_scale`` of a pre-norm
block, a user's hook in the patched block, a metric reading a bypassed hook), and leaves the model
as it was, also when a sweep is interrupted.

Sweeps over many layers are bit for bit too, for every per-head hook: the baselines never cache a
pattern or scores (that would materialise the attention of every swept layer, which rounds
differently from the fused kernel, in the residual stream the later layers' runs start from). A
patch of the scores, the pattern, z or the per-head results starts each run at that hook, from the
corrupted run's value there (the attention before it runs once per group, not per run).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_timm
from timm.models.vision_transformer import ResPostBlock

import vit_lens.patching as patching
from vit_lens import HookedViT
from vit_lens.components.attention import Attention
from vit_lens.patching import (
    identifiability_metric,
    logit_diff_metric,
    patch_heads_sweep,
    patch_neurons_sweep,
    patch_positions_sweep,
)

KW = dict(img_size=16, patch_size=8, depth=2, num_classes=7, embed_dim=48, num_heads=3)
VARIANTS = {
    "token": ("vit_tiny_patch16_224", {}),
    "token_dist": ("deit_tiny_distilled_patch16_224", {}),
    "avg": ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False)),
    "reg": ("vit_tiny_patch16_224", dict(reg_tokens=2, no_embed_class=True)),
    "post_norm": ("vit_tiny_patch16_224", dict(block_fn=ResPostBlock)),
}
METRIC = logit_diff_metric([1, 2], [3, 4])
#: hooks with a position axis, one per kind of reuse (and fallback) at the patched layer
POS_HOOKS = ["resid_pre", "ln1.hook_normalized", "ln1.hook_scale", "attn.hook_q", "attn.hook_k", "attn.hook_v",
             "attn.hook_z", "attn_out", "resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp_out", "resid_post"]


def _model(kind: str, seed: int = 0) -> HookedViT:
    name, kw = VARIANTS[kind]
    return HookedViT.from_timm(make_timm(name, seed=seed, **{**KW, **kw}))


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request) -> HookedViT:
    return _model(request.param)


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)


def _full(name: str) -> str:
    return name if "." in name else f"hook_{name}"


def _naive(m, corrupted, name, src, pos=None, head=None):
    """One full forward with a raw hook doing plain indexing: the reference."""

    def hook(act, hook=None):
        act = act.clone()
        if head is None:
            act[:, pos] = src[:, pos]
        elif act.ndim == 4 and name.endswith(("hook_pattern", "hook_attn_scores")):
            act[:, head] = src[:, head]
        else:
            act[:, :, head] = src[:, :, head]
        return act

    with torch.inference_mode():
        return METRIC(m.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))


def _naive_positions(m, clean, corrupted, hook):
    L, P = m.cfg.n_layers, m.cfg.n_ctx
    names = [f"blocks.{l}.{_full(hook)}" for l in range(L)]
    with torch.inference_mode():
        _, cache = m.run_with_cache(clean, names_filter=names)
    return torch.stack([torch.stack([_naive(m, corrupted, n, cache[n], pos=p) for p in range(P)]) for n in names])


def _sweep(m, clean, corrupted, hook, reuse=True, sweep=patch_positions_sweep, **kw):
    """``sweep`` (positions by default) with the reuse at the patched layer on or off."""
    patching._REUSE_AT_PATCHED_LAYER = reuse
    try:
        return sweep(m, clean, corrupted, METRIC, hook=hook, progress=False, **kw)
    finally:
        patching._REUSE_AT_PATCHED_LAYER = True


def _no_overrides(m):
    return all("forward" not in b.attn.__dict__ and "project_qkv" not in b.attn.__dict__ for b in m.blocks)


def _interrupted_then_again(sweep, m, pair, hook, chunk_size, stop_at):
    """Run ``sweep`` with a metric that raises KeyboardInterrupt at its ``stop_at``-th call: the model
    must keep no override of the sweep's, and the sweep run again must give the uninterrupted values."""
    clean, corr = pair
    ref = sweep(m, clean, corr, METRIC, hook=hook, progress=False, chunk_size=chunk_size)
    calls = []

    def stops(logits):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return METRIC(logits)

    with pytest.raises(KeyboardInterrupt):
        sweep(m, clean, corr, stops, hook=hook, progress=False, chunk_size=chunk_size)
    assert len(calls) == stop_at  # it did stop in the middle
    assert _no_overrides(m)
    again = sweep(m, clean, corr, METRIC, hook=hook, progress=False, chunk_size=chunk_size)
    assert torch.equal(again.values, ref.values)


# ------------------------------------------------------------------ which patches reuse what
def test_reuse_entry_of_every_block_hook():
    """The case analysis, per hook of a block, for pre-norm and post-norm blocks."""
    pre, post = _model("token"), _model("post_norm")
    want = {
        "hook_resid_pre": ("rows", "rows"),
        "ln1.hook_normalized": ("rows", "attn"),  # pre-norm: the attention's input; post-norm: after the attention
        "ln1.hook_scale": (None, "attn"),  # pre-norm: a value neither run had
        "attn.hook_q": ("qkv", "qkv"), "attn.hook_k": ("qkv", "qkv"), "attn.hook_v": ("qkv", "qkv"),
        "attn.hook_attn_scores": ("qkv", "qkv"), "attn.hook_pattern": ("qkv", "qkv"),
        "attn.hook_z": ("qkv", "qkv"), "attn.hook_result": ("qkv", "qkv"),
        "hook_attn_out": ("attn", "attn"), "hook_resid_mid": ("attn", "attn"), "ln2.hook_scale": ("attn", "attn"),
        "mlp.hook_pre": ("attn", "attn"), "mlp.hook_post": ("attn", "attn"), "hook_mlp_out": ("attn", "attn"),
        "hook_resid_post": ("attn", "attn"),
    }
    seen = {n[len("blocks.1."):] for n in pre.hook_dict if n.startswith("blocks.1.")}
    assert seen == set(want) | {"ln2.hook_normalized"}  # every hook of a block is reasoned about
    for suffix, (a, b) in want.items():
        assert patching._reuse_entry(pre, f"blocks.1.{suffix}", 1) == a, suffix
        assert patching._reuse_entry(post, f"blocks.1.{suffix}", 1) == b, suffix
    assert patching._reuse_entry(pre, "blocks.1.hook_resid_pre", 0) is None  # another block's hook


# ------------------------------------------------------------------ identical to the naive loop
@pytest.mark.parametrize("kind", ["avg", "post_norm"])
def test_one_run_per_chunk_equals_the_naive_loop_bit_for_bit(kind, pair):
    """Same shapes, same kernels: the reused keys and values are exactly what the naive run computes."""
    m = _model(kind)
    clean, corr = pair
    for hook in POS_HOOKS:
        ref = _naive_positions(m, clean, corr, hook)
        got = _sweep(m, clean, corr, hook, chunk_size=1)
        assert torch.equal(got.values, ref), hook
    assert ref.std() > 1e-3  # the patches move the metric


def test_chunked_sweeps_equal_the_naive_loop_every_model(model, pair):
    """Chunks of runs share matmuls (and token pooling prunes the last block): float32 rounding, the
    same as the engine that recomputes the patched layer."""
    clean, corr = pair
    for hook in ("resid_pre", "ln1.hook_normalized", "attn.hook_k", "attn_out", "mlp.hook_post"):
        ref = _naive_positions(model, clean, corr, hook)
        got = _sweep(model, clean, corr, hook, chunk_size=5)
        full = _sweep(model, clean, corr, hook, reuse=False, chunk_size=5)
        assert (got.values - ref).abs().max() <= 1e-5, hook
        assert (full.values - ref).abs().max() <= 1e-5, hook
        assert (got.values - full.values).abs().max() <= 1e-5, hook
    assert _no_overrides(model)


@pytest.mark.parametrize("hook", ["attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_result", "attn.hook_q"])
def test_head_sweeps_equal_the_naive_loop(hook, pair):
    """Per-head patches of the queries, scores, pattern (materialised attention) and head results."""
    m = _model("avg")
    m.set_use_attn_result(True)
    clean, corr = pair
    L, H = m.cfg.n_layers, m.cfg.n_heads
    names = [f"blocks.{l}.{hook}" for l in range(L)]
    with torch.inference_mode():
        _, cache = m.run_with_cache(clean, names_filter=names)
    ref = torch.stack([torch.stack([_naive(m, corr, n, cache[n], head=h) for h in range(H)]) for n in names])
    # one layer per sweep (the reference caches every layer's clean activation in one run, which for a
    # pattern or scores materialises the earlier layers; sweeps over many layers: see below)
    got = torch.stack([patch_heads_sweep(m, clean, corr, METRIC, hook=hook, layers=[l], progress=False,
                                         chunk_size=1).values[0] for l in range(L)])
    assert torch.equal(got, ref)
    chunked = patch_heads_sweep(m, clean, corr, METRIC, hook=hook, progress=False)
    assert (chunked.values - ref).abs().max() <= 1e-5


def test_identifiability_metric_reading_the_patched_block(pair):
    """A metric reading ``resid_post`` of the patched block itself (the hook fires after the reuse)."""
    m = _model("token")
    clean, corr = pair
    metric = identifiability_metric(m, [1, 2], layer=0, kind="score")
    with torch.inference_mode():
        _, cache = m.run_with_cache(clean, names_filter=["blocks.0.hook_resid_pre"])
        ref = []
        for p in range(m.cfg.n_ctx):
            got = {}

            def patch(act, hook=None, p=p):
                act = act.clone()
                act[:, p] = cache["blocks.0.hook_resid_pre"][:, p]
                return act

            logits = m.run_with_hooks(corr, fwd_hooks=[("blocks.0.hook_resid_pre", patch),
                                                       ("blocks.0.hook_resid_post", lambda a, hook=None: got.update(x=a))])
            ref.append(metric(logits, got["x"]))
    res = patch_positions_sweep(m, clean, corr, metric, layers=[0], progress=False, chunk_size=1)
    assert torch.equal(res.values[0], torch.stack(ref))


# ------------------------------------------------------------------ reuse happens, and only where exact
class _CountProjections:
    """Rows of the residual stream (batch x pos) each block's q/k/v projection ran on."""

    def __init__(self, monkeypatch, m):
        self.rows = {l: 0 for l in range(m.cfg.n_layers)}
        self.layer_of = {id(b.attn): l for l, b in enumerate(m.blocks)}
        real = Attention.project_qkv
        counter = self

        def project_qkv(attn, x, n_queries=None):
            counter.rows[counter.layer_of[id(attn)]] += x.shape[0]
            return real(attn, x, n_queries)

        monkeypatch.setattr(Attention, "project_qkv", project_qkv)


@pytest.mark.parametrize("hook,per_group", [("resid_pre", 2), ("attn.hook_v", 1), ("mlp.hook_post", 1),
                                            ("ln1.hook_scale", None)])
def test_the_patched_block_projects_once_per_group_not_once_per_run(monkeypatch, pair, hook, per_group):
    """With reuse the patched block's projections run on the corrupted (and clean) batch once; per
    run they would run on every run's batch. ``ln1.hook_scale`` of a pre-norm block falls back."""
    m = _model("avg")
    clean, corr = pair
    B, P = clean.shape[0], m.cfg.n_ctx
    count = _CountProjections(monkeypatch, m)
    _sweep(m, clean, corr, hook, layers=[1], chunk_size=4)
    baselines = 2 * B  # the clean and corrupted runs of the sweep's baselines
    patched = per_group * B if per_group is not None else P * B
    assert count.rows[1] == baselines + patched
    count.rows[1] = 0
    _sweep(m, clean, corr, hook, reuse=False, layers=[1], chunk_size=4)
    assert count.rows[1] == baselines + P * B  # the engine without reuse: every run's batch
    assert _no_overrides(m)


def test_a_users_hook_in_the_patched_block_turns_reuse_off(pair):
    """A hook the caller set on the patched block fires in every run, as in the naive loop."""
    m = _model("avg")
    clean, corr = pair
    seen = []

    def user(act, hook=None):
        seen.append(act.shape[0])

    ref = _sweep(m, clean, corr, "resid_pre", layers=[1], chunk_size=1)
    with m.hooks(fwd_hooks=[("blocks.1.attn.hook_k", user)]):
        got = _sweep(m, clean, corr, "resid_pre", layers=[1], chunk_size=1)
    assert torch.equal(got.values, ref.values)
    assert len(seen) == 2 + m.cfg.n_ctx  # the two baselines, then every run


class _MeanZ:
    """A metric reading ``attn.hook_z`` of block 1: the mean of the heads' outputs of each image."""

    hook_name = "blocks.1.attn.hook_z"
    __name__ = "mean_z"

    def __call__(self, logits, z):
        return z.mean((-1, -2, -3))


def test_a_metric_reading_a_bypassed_hook_turns_reuse_off(pair):
    """Patching ``resid_mid`` reuses the attention output, bypassing ``attn.hook_z``: a metric reading
    it gets the full computation, and the value a naive run gives."""
    m = _model("avg")
    clean, corr = pair
    metric = _MeanZ()
    res = patch_positions_sweep(m, clean, corr, metric, hook="resid_mid", layers=[1], progress=False, chunk_size=1)
    with torch.inference_mode():
        _, cache = m.run_with_cache(clean, names_filter=["blocks.1.hook_resid_mid"])
        _, corr_cache = m.run_with_cache(corr, names_filter=["blocks.1.attn.hook_z"])
    # the patch comes after hook_z in the same block: the metric sees the corrupted run's z
    assert torch.equal(res.values[0], metric(None, corr_cache["blocks.1.attn.hook_z"]).expand(m.cfg.n_ctx, -1))


# ------------------------------------------------------------------ interruption and resume
def test_an_interrupted_sweep_leaves_the_model_as_it_was(pair):
    """A sweep stopped in the middle of a chunk (Ctrl-C) removes its overrides; the sweep run again
    gives the uninterrupted values."""
    _interrupted_then_again(patch_positions_sweep, _model("token"), pair, "attn_out", chunk_size=3,
                            stop_at=4)  # the two baselines, then two chunks


def test_neuron_sweep_reuses_the_attention_and_equals_the_naive_loop(pair):
    m = _model("avg")
    clean, corr = pair
    neurons = [0, 7, 191]
    res = patch_neurons_sweep(m, clean, corr, METRIC, neurons=neurons, progress=False, chunk_size=1)
    with torch.inference_mode():
        _, cache = m.run_with_cache(clean, names_filter=lambda n: n.endswith("mlp.hook_post"))
        for l in range(m.cfg.n_layers):
            name = f"blocks.{l}.mlp.hook_post"
            for j, n in enumerate(neurons):

                def hook(act, hook=None, n=n):
                    act = act.clone()
                    act[:, :, n] = cache[name][:, :, n]
                    return act

                assert torch.equal(res.values[l, j], METRIC(m.run_with_hooks(corr, fwd_hooks=[(name, hook)])))


# ------------------------------------------------------------------ many layers in one sweep
#: every per-head hook: the pattern and scores materialise the attention wherever they are hooked
HEAD_HOOKS = ["attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_q", "attn.hook_k", "attn.hook_v",
              "attn.hook_z", "attn.hook_result"]


def _deep(kind: str) -> HookedViT:
    name, kw = VARIANTS[kind]
    m = HookedViT.from_timm(make_timm(name, seed=1, **{**KW, **kw, "depth": 4}))
    m.set_use_attn_result(True)
    return m


@pytest.fixture(scope="module", params=["avg", "post_norm"])
def deep(request) -> HookedViT:
    return _deep(request.param)


def _naive_heads(m, clean, corr, hook, layers):
    """The naive loop of a layer x head sweep: per layer, the clean activation of a clean forward
    caching that hook only, then one full corrupted forward per head with only the patch hook (so
    only the patched layer materialises its attention, as in any single patched run)."""
    out = []
    for l in layers:
        n = f"blocks.{l}.{hook}"
        with torch.inference_mode():
            _, cache = m.run_with_cache(clean, names_filter=[n])
        out.append(torch.stack([_naive(m, corr, n, cache[n], head=h) for h in range(m.cfg.n_heads)]))
    return torch.stack(out)


@pytest.mark.parametrize("hook", HEAD_HOOKS)
def test_sweeps_over_many_layers_equal_the_naive_loop_bit_for_bit(deep, pair, hook):
    """One sweep over layers 0..3: the baselines must not materialise any swept layer's attention
    (caching its pattern or scores would): the runs of layer l start from the residual stream and
    take the clean activation a naive run computes, bit for bit, and the baselines are plain forwards."""
    clean, corr = pair
    layers = range(deep.cfg.n_layers)
    ref = _naive_heads(deep, clean, corr, hook, layers)
    got = patch_heads_sweep(deep, clean, corr, METRIC, hook=hook, progress=False, chunk_size=1)
    assert torch.equal(got.values, ref)
    with torch.inference_mode():
        assert torch.equal(got.corrupted, METRIC(deep(corr)))
        assert torch.equal(got.clean, METRIC(deep(clean)))
    assert ref.std() > 1e-3
    chunked = patch_heads_sweep(deep, clean, corr, METRIC, hook=hook, progress=False, chunk_size=3)
    assert (chunked.values - ref).abs().max() <= 1e-5


def test_pattern_position_sweep_over_many_layers_equals_the_naive_loop(pair):
    """Query positions of the pattern (one per run, every head), every layer in one sweep: the case
    issue 17 item 3 found inexact."""
    m = _deep("avg")
    clean, corr = pair
    L, P = m.cfg.n_layers, m.cfg.n_ctx
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    ref = []
    for n in names:
        with torch.inference_mode():
            _, cache = m.run_with_cache(clean, names_filter=[n])
        for p in range(P):

            def patch(act, hook=None, p=p, src=cache[n]):
                act = act.clone()
                act[:, :, p] = src[:, :, p]
                return act

            with torch.inference_mode():
                ref.append(METRIC(m.run_with_hooks(corr, fwd_hooks=[(n, patch)])))
    runs = [patching.PatchRuns(n, positions=torch.eye(P, dtype=torch.bool), n_runs=P) for n in names]
    values, clean_m, corr_m = patching.run_sweep(m, clean, corr, METRIC, runs, chunk_size=1, progress=False)
    assert torch.equal(values, torch.stack(ref))


# ------------------------------------------------------------------ runs that start at the patched hook
class _CountAttention:
    """Rows (batch) each block's attention core (``forward_qkv``: from the queries on) ran on."""

    def __init__(self, monkeypatch, m):
        self.rows = {l: 0 for l in range(m.cfg.n_layers)}
        layer_of = {id(b.attn): l for l, b in enumerate(m.blocks)}
        real = Attention.forward_qkv
        counter = self

        def forward_qkv(attn, q, k, v):
            counter.rows[layer_of[id(attn)]] += q.shape[0]
            return real(attn, q, k, v)

        monkeypatch.setattr(Attention, "forward_qkv", forward_qkv)


@pytest.mark.parametrize("hook,entry", [("attn.hook_attn_scores", "scores"), ("attn.hook_pattern", "pattern"),
                                        ("attn.hook_z", "z"), ("attn.hook_result", "result"), ("attn.hook_q", "qkv")])
def test_a_patch_inside_the_attention_starts_each_run_at_its_hook(monkeypatch, pair, hook, entry):
    """A patch of the scores, the pattern, z or the per-head results computes the attention before it
    once per group (the corrupted run's, at the hook), not once per run; a query patch still needs the
    attention per run."""
    m = _deep("avg")
    clean, corr = pair
    B, H = clean.shape[0], m.cfg.n_heads
    count = _CountAttention(monkeypatch, m)
    name = f"blocks.2.{hook}"
    with torch.inference_mode():
        plan = patching._reuse_plan(m, name, 2, m(corr, stop_at_layer=2), None, None)
    assert plan is not None and plan.entry == entry
    count.rows[2] = 0
    res = patch_heads_sweep(m, clean, corr, METRIC, hook=hook, layers=[2], progress=False, chunk_size=2)
    alone = 2 * B if entry in ("scores", "pattern") else 0  # the baselines' pattern / scores, block 2 alone
    plan_rows, per_run = (0, H * B) if entry == "qkv" else (B, 0)  # the plan: the corrupted run's value at the hook
    assert count.rows[2] == 2 * B + alone + plan_rows + per_run  # the two baselines, the plan, the runs
    count.rows[2] = 0
    full = _sweep_heads(m, clean, corr, hook, reuse=False, layers=[2], chunk_size=2)
    assert count.rows[2] == 2 * B + alone + H * B  # without reuse: every run's attention
    assert (res.values - full.values).abs().max() <= 1e-5
    assert _no_overrides(m)


def _sweep_heads(m, clean, corr, hook, reuse=True, **kw):
    return _sweep(m, clean, corr, hook, reuse, sweep=patch_heads_sweep, **kw)


def test_no_start_at_the_hook_under_an_attention_mask(pair):
    """An attention mask (knockout) keeps today's reuse of the queries, keys and values only."""
    from vit_lens.ablation import attention_knockout

    m = _deep("avg")
    clean, corr = pair
    with torch.inference_mode(), attention_knockout(m, "self_only", mode="mask"):
        plan = patching._reuse_plan(m, "blocks.1.attn.hook_z", 1, m(corr, stop_at_layer=1), None, None)
        assert plan is not None and plan.entry == "qkv"
        ref = _naive_heads(m, clean, corr, "attn.hook_z", [1])
        got = patch_heads_sweep(m, clean, corr, METRIC, hook="attn.hook_z", layers=[1], progress=False, chunk_size=1)
    assert torch.equal(got.values, ref)


def test_starting_from_the_wrong_run_is_caught(monkeypatch, pair):
    """The reference can tell: a plan that took the clean run's z where the corrupted z is due (every
    run then sees the clean z everywhere) no longer equals the naive loop."""
    m = _deep("avg")
    clean, corr = pair
    ref = _naive_heads(m, clean, corr, "attn.hook_z", [1])
    with torch.inference_mode():
        clean_x0 = m(clean, stop_at_layer=1)
    real = patching._reuse_plan
    monkeypatch.setattr(patching, "_reuse_plan", lambda model, name, layer, x0, src, tgt: real(model, name, layer, clean_x0, src, tgt))
    wrong = patch_heads_sweep(m, clean, corr, METRIC, hook="attn.hook_z", layers=[1], progress=False, chunk_size=1)
    assert (wrong.values - ref).abs().max() > 1e-4
    monkeypatch.setattr(patching, "_reuse_plan", real)
    right = patch_heads_sweep(m, clean, corr, METRIC, hook="attn.hook_z", layers=[1], progress=False, chunk_size=1)
    assert torch.equal(right.values, ref)


@pytest.mark.parametrize("hook", ["attn.hook_z", "attn.hook_pattern"])
def test_starting_at_the_hook_every_model(model, pair, hook):
    """Token / distilled / average pooling, registers, post-norm: per-head patches of z and the pattern,
    chunked (within float32 rounding of the naive loop, as the engine without reuse) and one run per
    chunk (bit for bit where nothing is pruned: the patched layer is the last)."""
    clean, corr = pair
    L = model.cfg.n_layers
    ref = _naive_heads(model, clean, corr, hook, range(L))
    got = patch_heads_sweep(model, clean, corr, METRIC, hook=hook, progress=False, chunk_size=2)
    full = _sweep_heads(model, clean, corr, hook, reuse=False, chunk_size=2)
    assert (got.values - ref).abs().max() <= 1e-5
    assert (got.values - full.values).abs().max() <= 1e-5
    last = patch_heads_sweep(model, clean, corr, METRIC, hook=hook, layers=[L - 1], progress=False, chunk_size=1)
    assert torch.equal(last.values[0], ref[L - 1])
    assert _no_overrides(model)


class _MetricWith:
    """The logit difference plus the mean of one attention hook's activation of the same run
    (``[..., batch, a, b, c]``)."""

    def __init__(self, name):
        self.hook_name = name
        self.__name__ = "with_" + name

    def __call__(self, logits, act):
        return METRIC(logits) + act.flatten(-3).mean(-1)


@pytest.mark.parametrize("hook,bypassed", [("attn.hook_z", "attn.hook_pattern"), ("attn.hook_result", "attn.hook_z"),
                                           ("attn.hook_pattern", "attn.hook_v")])
def test_a_hook_on_a_bypassed_point_turns_the_start_at_the_hook_off(monkeypatch, pair, hook, bypassed):
    """A metric reading a hook the run would skip (and, for ``hook_pattern``, would materialise the
    attention a z patch takes fused), or a user's hook there: the full computation, the naive values."""
    m = _deep("avg")
    clean, corr = pair
    layer, H = 1, m.cfg.n_heads
    metric = _MetricWith(f"blocks.{layer}.{bypassed}")
    name = f"blocks.{layer}.{hook}"
    with torch.inference_mode():
        _, cache = m.run_with_cache(clean, names_filter=[name])
    ref = []
    for h in range(H):
        got = {}

        def patch(act, hook=None, h=h):
            act = act.clone()
            if name.endswith("hook_pattern"):
                act[:, h] = cache[name][:, h]
            else:
                act[:, :, h] = cache[name][:, :, h]
            return act

        with torch.inference_mode():
            logits = m.run_with_hooks(corr, fwd_hooks=[(name, patch), (metric.hook_name, lambda a, hook=None: got.update(x=a))])
        ref.append(metric(logits, got["x"]))
    count = _CountAttention(monkeypatch, m)
    res = patch_heads_sweep(m, clean, corr, metric, hook=hook, layers=[layer], progress=False, chunk_size=1)
    assert torch.equal(res.values[0], torch.stack(ref))
    assert count.rows[layer] >= H * clean.shape[0]  # every run computed its attention
    seen = []
    with m.hooks(fwd_hooks=[(f"blocks.{layer}.{bypassed}", lambda a, hook=None: seen.append(a.shape[0]))]):
        patch_heads_sweep(m, clean, corr, METRIC, hook=hook, layers=[layer], progress=False, chunk_size=1)
    assert len(seen) >= H  # fired in every run
    assert _no_overrides(m)


def test_an_interrupted_z_sweep_resumes_to_the_same_values(pair):
    """Stopped in the middle (Ctrl-C in the metric), a sweep starting its runs at ``hook_z`` removes its
    override; run again it gives the uninterrupted values."""
    _interrupted_then_again(patch_heads_sweep, _deep("avg"), pair, "attn.hook_z", chunk_size=2, stop_at=5)


def test_starting_at_the_pattern_with_separate_projections(pair):
    """Weights that no longer share timm's fused buffer (three projections, three value tensors): the
    pattern and score patches take the values from the separate ``v``, still bit for bit."""
    m = _deep("avg")
    for b in m.blocks:
        b.attn.W_V.data = b.attn.W_V.data.clone()
    assert m.blocks[1].attn._fused_qkv_weight() is None
    clean, corr = pair
    with torch.inference_mode():
        plan = patching._reuse_plan(m, "blocks.1.attn.hook_pattern", 1, m(corr, stop_at_layer=1), None, None)
    assert plan is not None and plan.entry == "pattern" and len(plan.corrupted) == 4  # the pattern, q, k, v
    for hook in ("attn.hook_pattern", "attn.hook_attn_scores"):
        ref = _naive_heads(m, clean, corr, hook, [1, 3])
        got = patch_heads_sweep(m, clean, corr, METRIC, hook=hook, layers=[1, 3], progress=False, chunk_size=1)
        assert torch.equal(got.values, ref), hook
