"""Batched layer x position patching sweep vs a naive one-run-per-patch loop, in one run.

    python benchmarks/bench_patching.py [--model vit_base_patch16_224] [--naive-runs 48] [--threads 2]
                                        [--device cpu|cuda] [--dtype float32|bfloat16|float16]

Setup: a random-initialised timm model (the hub is unreachable; speed does not depend on the
weights) converted to a HookedViT, float32 (``--dtype``: the model and the images in that
precision, the naive loop too), CPU, ``torch.inference_mode``. One clean/corrupted
pair (batch 1): two different photos (``../shared/images/photos`` when present, else random
images). Metric: the logit of the clean image's top class. The full sweep patches
``blocks.{l}.hook_resid_pre`` at every layer and every position (12 x 197 = 2364 runs on ViT-B/16).

* batched: :func:`vit_lens.patching.patch_positions_sweep` (runs start at the patched layer from
  the corrupted run's cached residual stream; chunks of runs share a forward pass).
* batched, full patched layer: the same sweep with the patched layer computed in full (the engine
  before issue 17 item 3: every run recomputes the queries, keys and values of the block it starts
  in; now they are reused from the clean and corrupted runs, see ``vit_lens.patching._reuse_plan``).
  Timed in the same turn as the batched sweep, in alternating order; the script prints the ratio
  of the totals, the median of the per-layer ratios, and the largest difference of their values.
* naive: for each (layer, position) one ``model.run_with_hooks(corrupted, fwd_hooks=[(name,
  hook)])`` whose hook writes the clean activation at that position -- the TransformerLens way.
  The naive loop takes tens of minutes on 2 cores, so only a random subset of ``--naive-runs``
  (layer, position) pairs (the same number per layer) is timed; its total is extrapolated as mean
  time per run x number of runs. The results of the subset are compared with the batched sweep's
  (max abs difference of the raw metric and of the normalised value).

The batched sweep is run one layer at a time (one call per layer, each including its own clean and
corrupted baseline runs, so slightly pessimistic), and each layer's naive runs are timed right
before and after it, so that load from other processes on the machine hits both alike.

It also prints the ratio of matmul FLOPs (naive loop / batched sweep), counted from the config:
the speed-up an exact batched sweep can reach where both are compute-bound, as on a CPU, where a
batch-1 forward already keeps the cores busy. Starting at the patched layer and computing only
[CLS] in the last block leave about 2.1x fewer FLOPs on ViT-B/16; the rest of any larger
speed-up must come from batching runs that a device cannot fill one at a time (a GPU).

Target (issue 5): batched >= 4x faster than naive, identical results: in float32 within 1e-4 of
the clean-corrupted gap (normalised). In bfloat16 / float16 the batched sweep and the naive loop
(both in that dtype) differ by rounding, so they must agree within ``_common.tolerance``: 4 x
eps(dtype) x the largest |metric| (bfloat16: 3% of it; see that function for why). A lower
precision also gets the sweep on a float32 copy of the same model (untimed) and prints the largest
deviation from it: how much the dtype itself changes the answer, weights rounded included.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, photo_pair, random_timm, setup, tolerance, where  # noqa: E402
from _timing import Timings  # noqa: E402  (benchmarks/_timing.py, the shared timing helper)

TARGET = 4.0


def matmul_flops(cfg, n_pos: int) -> dict:
    """Multiply-add FLOPs (x2) of the pieces of a forward pass, batch 1, ``n_pos`` tokens."""
    d, m, P = cfg.d_model, cfg.d_mlp, n_pos
    hd = cfg.n_heads * cfg.d_head
    per_token = 2 * (3 * d * hd + hd * d + 2 * d * m)  # q, k, v, o, mlp in/out
    attn = 2 * 2 * P * hd  # scores and pattern @ v, per query token
    patch = 2 * cfg.in_chans * cfg.patch_size[0] * cfg.patch_size[1] * d
    head = 2 * d * max(cfg.n_classes, 0)
    block = P * (per_token + attn)
    # last block for the pooled token(s) only: k, v of every token, the rest for n rows
    n = 1 if cfg.pooling == "token" else 2
    pruned = P * 2 * 2 * d * hd + n * (per_token - 2 * 2 * d * hd + attn)
    return dict(block=block, pruned_block=pruned, embed=(P - cfg.n_prefix_tokens) * patch, head=head)


def flop_ratio(cfg, n_pos: int) -> float:
    """FLOPs of the naive loop (one full forward per patch) / those of the batched sweep (runs
    start at the patched layer, last block pruned to the pooled tokens, plus two baseline runs)."""
    f = matmul_flops(cfg, n_pos)
    L = cfg.n_layers
    full = f["embed"] + L * f["block"] + f["head"]
    naive = L * n_pos * full
    batched = 2 * full + n_pos * sum((L - 1 - l) * f["block"] + f["pruned_block"] + f["head"] for l in range(L))
    return naive / batched


def float32_sweep(ref32, clean, corrupted, metric, layers, memory_mb: float):
    """The exact sweep of ``layers`` (one call per layer, as timed) on the float32 model ``ref32`` and the
    float32 images ``clean`` / ``corrupted`` ``[1, C, H, W]``: (values ``[layer, pos, batch]``, float32 on
    the CPU; |clean - corrupted| of the metric in float32)."""
    from vit_lens.patching import patch_positions_sweep

    rows, gap = [], float("nan")
    for l in layers:
        r = patch_positions_sweep(ref32, clean, corrupted, metric, layers=[l], memory_mb=memory_mb, progress=False)
        rows.append(r.values[0].float().cpu())
        gap = abs(float(r.clean[0]) - float(r.corrupted[0]))
    return torch.stack(rows), gap


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from vit_lens import HookedViT
    from vit_lens import patching as patching_module
    from vit_lens.patching import logit_metric, patch_positions_sweep

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--naive-runs", type=int, default=48,
                   help="naive runs timed (random subset, the same number per layer); 0 times all of them")
    p.add_argument("--memory-mb", type=float, default=512, help="memory budget of one batched chunk")
    add_common_args(p, device="cpu", threads=2, seed=0, dtype="float32", device_help="cpu (default) or cuda")
    p.add_argument("--layers", default=None,
                   help="comma-separated layers to sweep (default all), for a shorter run; totals then cover those only")
    args = p.parse_args(argv)
    device, dtype = setup(args, p)

    tm = random_timm(args.model, seed=args.seed)
    model = HookedViT.from_timm(tm, device=device, dtype=dtype)
    # a lower precision is also compared with the same model in float32 (untimed)
    ref32 = HookedViT.from_timm(tm, device=device) if dtype != torch.float32 else None
    del tm
    clean32, corrupted32, names = photo_pair(model if ref32 is None else ref32, device)  # float32 (the float32 reference sweeps these)
    clean, corrupted = clean32.to(dtype), corrupted32.to(dtype)
    what = f"photos {names[0]} / {names[1]}" if names else "random images"
    with torch.inference_mode():
        target = int(model(clean).argmax(-1))
    metric = logit_metric(target)
    L, P = model.cfg.n_layers, model.cfg.n_ctx
    print(f"{args.model}: {L} layers x {P} positions = {L * P} patched runs; pair: {what}; {where(device)}; "
          f"dtype {args.dtype}")

    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        clean_m = metric(model(clean))
        corr_m = metric(model(corrupted))

    def naive(layer: int, pos: int) -> float:
        name = f"blocks.{layer}.hook_resid_pre"
        src = clean_cache[name]

        def hook(act, hook=None):
            act = act.clone()
            act[:, pos] = src[:, pos]
            return act

        with torch.inference_mode():
            return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))[0])

    rng = random.Random(args.seed)
    layers = list(range(L)) if args.layers is None else [int(x) % L for x in args.layers.split(",")]
    per_layer = P if args.naive_runs <= 0 else max(1, args.naive_runs // len(layers))
    subset = {l: rng.sample(range(P), min(per_layer, P)) for l in layers}
    naive(0, 1)  # warm-up
    naive_vals, values, full_values = {}, [], []
    times = Timings(["naive run", "batched layer", "full patched layer", "plain forward"])  # seconds per naive run / per layer's sweep

    def sweep_layer(l: int, reuse: bool):
        patching_module._REUSE_AT_PATCHED_LAYER = reuse
        try:
            return patch_positions_sweep(model, clean, corrupted, metric, layers=[l], memory_mb=args.memory_mb, progress=False)
        finally:
            patching_module._REUSE_AT_PATCHED_LAYER = True

    def time_naive(pairs):
        for l, q in pairs:
            naive_vals[(l, q)], _ = times.timed("naive run", lambda: naive(l, q), device)  # float(): waits

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for l in tqdm(layers, desc="layers (batched sweep + naive subset, interleaved)"):
        half = len(subset[l]) // 2
        time_naive([(l, q) for q in subset[l][:half]])
        order = ["batched layer", "full patched layer"][:: 1 if l % 2 == 0 else -1]  # alternate who goes first
        for name in order:
            r, _ = times.timed(name, lambda: sweep_layer(l, reuse=name == "batched layer"), device)
            (values if name == "batched layer" else full_values).append(r.values[0])  # results come back on the CPU: synchronised
        time_naive([(l, q) for q in subset[l][half:]])
        with torch.inference_mode():
            times.timed("plain forward", lambda: model(corrupted), device)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    res_values = torch.stack(values)  # [layer, pos, batch]
    full_diff = float((res_values - torch.stack(full_values)).abs().max())
    batched_s = times.total("batched layer")
    full_s = times.total("full patched layer")
    per_run = times.mean("naive run")
    n_naive = times.count("naive run")
    nL = len(layers)
    naive_total = per_run * nL * P
    diffs = [abs(res_values[layers.index(l), q, 0].item() - v) for (l, q), v in naive_vals.items()]
    denom = float(clean_m - corr_m)
    ndiffs = [d / abs(denom) for d in diffs]
    print()
    print("| variant | runs timed | time | per patched run | ratio vs naive |")
    print("|---|---|---|---|---|")
    how = "" if n_naive == nL * P else " (extrapolated)"
    print(f"| naive run_with_hooks loop{how} | {n_naive} of {nL * P} | {naive_total:.0f} s | "
          f"{per_run * 1e3:.0f} ms | 1.00x |")
    print(f"| batched patch_positions_sweep | {nL * P} | {batched_s:.0f} s | {batched_s / (nL * P) * 1e3:.0f} ms | "
          f"{naive_total / batched_s:.2f}x faster |")
    print(f"| batched, full patched layer (no K/V reuse) | {nL * P} | {full_s:.0f} s | {full_s / (nL * P) * 1e3:.0f} ms | "
          f"{naive_total / full_s:.2f}x faster |")
    print()
    per_layer = [a / b for a, b in zip(times["batched layer"], times["full patched layer"])]
    print(f"K/V reuse at the patched layer: batched / full patched layer = {batched_s / full_s:.3f} (totals), "
          f"median per-layer ratio {times.paired('batched layer', 'full patched layer'):.3f} "
          f"(per layer: {' '.join(f'{x:.2f}' for x in per_layer)}); max |value diff| between the two = {full_diff:.2e}")
    print(f"batched sweep timed per layer (one patch_positions_sweep call per layer, baselines included), "
          f"interleaved with the naive runs of that layer; load average {load0:.1f} -> {load1:.1f}")
    print(f"naive per-run time: median {times.median('naive run') * 1e3:.0f} ms, "
          f"min {times.min('naive run') * 1e3:.0f} ms, max {times.max('naive run') * 1e3:.0f} ms; "
          f"a plain batch-1 forward (no hooks), timed alongside: median {times.median('plain forward') * 1e3:.0f} ms")
    print(f"identical results on the {len(diffs)} naive runs: max |metric diff| = {max(diffs):.2e}, "
          f"max |normalised diff| = {max(ndiffs):.2e} (clean {float(clean_m):.4f}, corrupted {float(corr_m):.4f})")
    print(f"matmul FLOPs, naive loop / batched sweep: {flop_ratio(model.cfg, P):.2f}x (the most an exact "
          f"batched sweep gains where a batch-1 forward is already compute-bound)")
    speedup = naive_total / batched_s
    if ref32 is None:
        ok = speedup >= TARGET and max(ndiffs) <= 1e-4
        print(f"target >= {TARGET}x and identical results (normalised diff <= 1e-4): {'MET' if ok else 'NOT MET'} "
              f"({speedup:.2f}x)")
        return 0
    # a lower precision: the naive loop in the same dtype within rounding, and the deviation from float32
    scale = max([abs(float(clean_m)), abs(float(corr_m))] + [abs(v) for v in naive_vals.values()])
    tol = tolerance(dtype, scale)
    gap = abs(float(clean_m) - float(corr_m))
    ref_values, ref_gap = float32_sweep(ref32, clean32, corrupted32, metric, layers, args.memory_mb)
    dev32 = float((res_values.float().cpu() - ref_values).abs().max())
    print(f"deviation from float32 (the same sweep on the float32 model, untimed): max |metric diff| = {dev32:.2e} "
          f"= {dev32 / max(scale, 1e-30):.2e} of the largest |metric|; normalised by the float32 gap {ref_gap:.4f}: "
          f"{dev32 / max(ref_gap, 1e-30):.2e}")
    if gap <= tol:
        print(f"note: the clean-corrupted gap ({gap:.4f}) is within {args.dtype} rounding (tolerance {tol:.2e}): "
              f"in {args.dtype} this check cannot tell a right patch from a wrong one on this pair")
    ok = speedup >= TARGET and max(diffs) <= tol
    print(f"target >= {TARGET}x and the naive loop matched within {args.dtype} rounding (max |metric diff| "
          f"{max(diffs):.2e} <= 4 eps x largest |metric| = {tol:.2e}): {'MET' if ok else 'NOT MET'} ({speedup:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
