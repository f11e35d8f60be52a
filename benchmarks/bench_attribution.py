"""Attribution patching vs the exact batched sweep vs a naive run_with_hooks loop, in one run.

    python benchmarks/bench_attribution.py [--models vit_base_patch16_224 real_vit_tiny] [--reps 3]
                                           [--naive-runs 12] [--exact-layers 3] [--threads 2] [--device cpu|cuda]
                                           [--dtype float32|bfloat16|float16]

The sweep: ``blocks.{l}.hook_resid_pre`` at every layer and every position (12 x 197 = 2364 runs on
ViT-B/16 and ViT-Ti/16), one clean/corrupted pair (the sample photos chelsea / coffee when present,
else random images), metric: the logit of the clean image's top class.

* attribution: ``patch_positions_sweep(..., method="attribution")`` -- the whole sweep from a clean
  forward, a corrupted forward and one backward pass (timed whole, ``--reps`` times).
* exact batched: ``patch_positions_sweep(..., layers=[l])`` (the exact engine) for ``--exact-layers``
  evenly spaced layers (0 .. L-1; 0 = all layers), each timed once per repetition; the full sweep's time
  is extrapolated as mean time per layer x L (a run starting at layer l costs ~L - l blocks, so evenly
  spaced layers including the first and last average to the full sweep).
* naive: ``model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])`` per (layer, position) for a random
  subset of ``--naive-runs`` runs per repetition; extrapolated as mean time per run x L x P.

Models: a timm name (random weights; the hub is unreachable and speed does not depend on the weights)
or ``real_vit_tiny`` (the real ViT-Ti checkpoint from ../shared/weights). Variants take turns in a balanced
order within every repetition (benchmarks/_timing.py). Prints the ratios and the agreement (Spearman,
top-10 overlap) of the attribution estimate with the exact values of the timed layers, and checks the
exact sweep against the naive runs that fall in those layers: within 1e-4 of the clean-corrupted gap
in float32; in bfloat16 / float16 (``--dtype``: the model, the images and the naive loop in that
precision) within ``_common.tolerance`` (4 x eps(dtype) x the largest |metric|: the two differ by
rounding). A lower precision also gets the attribution and exact sweeps on a float32 copy of the
same model (untimed) and prints the largest deviation of its results from them.

Target (issue 14): attribution >= 50x faster than the naive loop on ViT-B/16 on a CPU.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WEIGHTS, add_common_args, photo_pair, random_timm, setup, tolerance, where  # noqa: E402
from _timing import Timings  # noqa: E402  (benchmarks/_timing.py, the shared timing helper)

TARGET = 50.0


def _model(name: str, device, dtype=torch.float32):
    """(model in ``dtype``, its float32 twin (None when ``dtype`` is float32), what its weights are)."""
    from vit_lens import HookedViT

    twin = dtype != torch.float32
    if name == "real_vit_tiny":
        path = WEIGHTS / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
        if not path.exists():
            return None, None, f"skipped: {path} not found (set VIT_LENS_CHECKPOINTS)"

        def load(dt):
            return HookedViT.from_pretrained("vit_tiny_patch16_224", checkpoint_path=path, device=device, dtype=dt)

        return load(dtype), load(torch.float32) if twin else None, "real weights"
    tm = random_timm(name, seed=0)
    return (HookedViT.from_timm(tm, device=device, dtype=dtype),
            HookedViT.from_timm(tm, device=device) if twin else None, "random weights")


def _merged(rows: dict, ls: list):
    """The one-layer results ``rows[l]`` of the layers ``ls`` as one result ``[layer, pos, batch]``."""
    from vit_lens.patching import PatchingResult

    return PatchingResult(**{**rows[ls[0]].__dict__, "values": torch.cat([rows[l].values for l in ls]),
                             "coords": {**rows[ls[0]].coords, "layer": ls}})


def bench(name: str, args, device, dtype=torch.float32) -> dict:
    from vit_lens.attribution_patching import agreement
    from vit_lens.patching import PatchingResult, logit_metric, patch_positions_sweep

    model, ref32, what = _model(name, device, dtype)
    if model is None:
        print(f"{name}: {what}")
        return {}
    clean32, corrupted32, names = photo_pair(model if ref32 is None else ref32, device)  # float32
    clean, corrupted = clean32.to(dtype), corrupted32.to(dtype)
    pair = "photos chelsea / coffee" if names else "random images"
    with torch.inference_mode():
        metric = logit_metric(int(model(clean).argmax(-1)))
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    L, P = model.cfg.n_layers, model.cfg.n_ctx
    n_ex = L if args.exact_layers <= 0 else min(L, args.exact_layers)
    ex_layers = sorted({round(i * (L - 1) / max(1, n_ex - 1)) for i in range(n_ex)})
    rng = random.Random(0)
    cells = [(l, p) for l in range(L) for p in range(P)]
    print(f"\n{name} ({what}): {L} x {P} = {L * P} runs; pair: {pair}; {where(device)}; dtype {str(dtype)[6:]}")

    def naive(l: int, p: int) -> float:
        hn = f"blocks.{l}.hook_resid_pre"

        def hook(act, hook=None):
            act = act.clone()
            act[:, p] = cache[hn][:, p]
            return act

        with torch.inference_mode():
            return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(hn, hook)]))[0])

    times = Timings(["attribution", "exact layer", "naive run"])
    exact_rows = {}
    naive_vals = {}
    attr = None
    naive(0, 1)
    patch_positions_sweep(model, clean, corrupted, metric, layers=[L - 1], method="attribution", progress=False)  # warm-up
    load0 = os.getloadavg()[0]
    for r in range(args.reps):
        def v_attr():
            nonlocal attr
            attr, _ = times.timed("attribution", lambda: patch_positions_sweep(
                model, clean, corrupted, metric, method="attribution", progress=False), device)

        def v_exact():
            todo = ex_layers if args.reps == 1 else ex_layers[r::args.reps] or [ex_layers[r % len(ex_layers)]]
            for l in todo:
                res, _ = times.timed("exact layer", lambda: patch_positions_sweep(
                    model, clean, corrupted, metric, layers=[l], progress=False), device)
                exact_rows[l] = res

        def v_naive():
            for l, p in rng.sample(cells, args.naive_runs):
                naive_vals[(l, p)], _ = times.timed("naive run", lambda: naive(l, p), device)

        order = [v_attr, v_exact, v_naive]
        for fn in order[r % 3:] + order[: r % 3]:
            fn()
    load1 = os.getloadavg()[0]
    t_attr = times.median("attribution")
    t_exact = times.mean("exact layer") * L
    t_naive = times.mean("naive run") * L * P
    print("| variant | timed | full sweep | ratio: naive / variant |")
    print("|---|---|---|---|")
    print(f"| naive run_with_hooks loop (extrapolated) | {times.count('naive run')} runs | {t_naive:.1f} s | 1.0x |")
    print(f"| exact batched sweep (extrapolated) | layers {sorted(exact_rows)} | {t_exact:.1f} s | "
          f"{t_naive / t_exact:.1f}x |")
    print(f"| attribution (method='attribution') | {times.count('attribution')} full sweeps | {t_attr:.2f} s "
          f"(min {times.min('attribution'):.2f}, max {times.max('attribution'):.2f}) | {t_naive / t_attr:.0f}x |")
    print(f"attribution vs exact batched: {t_exact / t_attr:.0f}x faster; load average {load0:.1f} -> {load1:.1f}")
    ls = sorted(exact_rows)
    ex = _merged(exact_rows, ls)
    est = PatchingResult(**{**attr.__dict__, "values": attr.values[ls], "coords": {**attr.coords, "layer": ls}})
    a = agreement(ex, est, k=10)
    # the exact engine against the naive runs that fall in its layers (the same dtype)
    clean_m, corr_m = float(ex.clean[0]), float(ex.corrupted[0])
    both = [(l, p, v) for (l, p), v in naive_vals.items() if l in exact_rows]
    diffs = [abs(float(exact_rows[l].values[0, p, 0]) - v) for l, p, v in both]
    scale = max([abs(clean_m), abs(corr_m)] + [abs(v) for _, _, v in both])
    tol = 1e-4 * abs(clean_m - corr_m) if dtype == torch.float32 else tolerance(dtype, scale)
    how = "1e-4 of the clean-corrupted gap" if dtype == torch.float32 else f"4 eps x largest |metric|, {str(dtype)[6:]}"
    if diffs:
        print(f"naive runs vs the exact sweep on the {len(diffs)} naive runs in layers {ls}: max |metric diff| "
              f"{max(diffs):.2e} ({'within' if max(diffs) <= tol else 'NOT within'} {tol:.2e} = {how})")
    else:
        print(f"naive runs vs the exact sweep: none of the {len(naive_vals)} naive runs fell in layers {ls}")
    if ref32 is not None:  # how much the dtype changes the answer: the same sweeps in float32 (untimed)
        attr32 = patch_positions_sweep(ref32, clean32, corrupted32, metric, method="attribution", progress=False)
        ex32 = _merged({l: patch_positions_sweep(ref32, clean32, corrupted32, metric, layers=[l], progress=False)
                        for l in ls}, ls)
        d_attr = float((attr.values.float().cpu() - attr32.values.float().cpu()).abs().max())
        d_ex = float((ex.values.float().cpu() - ex32.values.float().cpu()).abs().max())
        a32 = agreement(ex32, est, k=10)
        gap32 = abs(float(ex32.clean[0]) - float(ex32.corrupted[0]))
        print(f"deviation from float32 (the same sweeps on the float32 model, untimed): attribution max |diff| "
              f"{d_attr:.2e}, exact (layers {ls}) max |diff| {d_ex:.2e} (largest |metric| {scale:.3f}, float32 gap "
              f"{gap32:.4f}); Spearman of the {str(dtype)[6:]} estimate vs the float32 exact values {a32.spearman[0]:.3f}")
    print(f"agreement with the exact values of layers {ls}: Spearman {a.spearman[0]:.3f}, top-10 overlap "
          f"{a.topk[0]:.2f}, sign of the top 10 {a.sign[0]:.2f}")
    ratio = t_naive / t_attr
    if name.startswith("vit_base"):
        print(f"target: attribution >= {TARGET:.0f}x faster than the naive loop: "
              f"{'MET' if ratio >= TARGET else 'NOT MET'} ({ratio:.0f}x)")
    return dict(model=name, naive_s=t_naive, exact_s=t_exact, attribution_s=t_attr, ratio=ratio)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "real_vit_tiny"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--naive-runs", type=int, default=12, help="naive runs timed per repetition")
    p.add_argument("--exact-layers", type=int, default=3, help="layers of the exact sweep timed (0: all)")
    add_common_args(p, device="cpu", threads=2, dtype="float32")
    args = p.parse_args(argv)
    device, dtype = setup(args, p)
    for m in args.models:
        bench(m, args, device, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
