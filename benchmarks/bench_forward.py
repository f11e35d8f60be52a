"""Speed of HookedViT against timm, measured in the same run.

    python benchmarks/bench_forward.py [--model vit_base_patch16_224] [--batch 8] [--reps 7]

Random-initialised weights, CPU, float32, ``torch.inference_mode``. Three variants are timed with
their repetitions interleaved (timm, HookedViT forward, HookedViT run_with_cache, timm, ...) so that
load from other processes on the machine hits all of them alike; the median of each is reported,
with the ratios against timm's forward:

* ``hooked forward``: ``model(images)`` with no hooks (fused attention and LayerNorm).
* ``run_with_cache``: ``model.run_with_cache(images)`` caching every hook point (attention
  patterns materialised, explicit LayerNorms).

Targets (issue 2): forward <= 1.10x timm, run_with_cache <= 1.6x timm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved  # noqa: E402  (benchmarks/_timing.py, the shared timing helper)

TARGETS = {"hooked forward": 1.10, "run_with_cache": 1.60}


def main(argv=None) -> int:
    import timm

    from vit_lens import HookedViT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=7, help="timed repetitions of each variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ref = timm.create_model(args.model, pretrained=False).eval()
    model = HookedViT.from_timm(ref)
    x = torch.randn(args.batch, model.cfg.in_chans, *model.cfg.image_size)

    def run_timm():
        return ref(x)

    def run_hooked():
        return model(x)

    def run_cache():
        _, cache = model.run_with_cache(x)
        return cache

    variants = {"timm forward": run_timm, "hooked forward": run_hooked, "run_with_cache": run_cache}
    with torch.inference_mode():
        # sanity: the thing we time is the thing we test
        diff = (run_timm() - run_hooked()).abs().max().item()
        cache = run_cache()
        n_hooks = len(cache)
        del cache
        # rotated order: no variant always runs first
        times = interleaved(variants, reps=args.reps, warmup=args.warmup, rotate=True)

    print(
        f"{args.model}, batch {args.batch}, CPU float32, {torch.get_num_threads()} threads, "
        f"{args.reps} interleaved reps; max |logit diff| vs timm {diff:.2e}; "
        f"run_with_cache caches {n_hooks} hook points"
    )
    print(f"{'variant':<16} {'median ms':>10} {'min ms':>8} {'ratio':>7} {'paired':>7}  target")
    ok = True
    for name in variants:
        med = times.median(name)
        ratio = times.ratio(name, "timm forward")
        # median over repetitions of (this variant / timm in the same repetition): robust to drifts in load
        paired = times.paired(name, "timm forward")
        target = TARGETS.get(name)
        flag = ""
        if target is not None:
            flag = f"<= {target:.2f}" + ("" if ratio <= target else "  MISSED")
            ok &= ratio <= target
        print(f"{name:<16} {med * 1e3:>10.1f} {times.min(name) * 1e3:>8.1f} {ratio:>6.2f}x {paired:>6.2f}x  {flag}")
    print("ratio = median / median of timm forward (the target); paired = median of per-repetition ratios")
    return 0 if ok else 1

if __name__ == "__main__":
    raise SystemExit(main())
