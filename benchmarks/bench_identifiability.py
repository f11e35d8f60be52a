"""Class identifiability over all layers and tokens vs a plain timm forward, in one run.

    python benchmarks/bench_identifiability.py [--model vit_base_patch16_224] [--batch 32] [--reps 3]

Random-initialised weights (speed does not depend on them; the hub is unreachable), float32, CPU,
``torch.inference_mode``. Variants, with their repetitions interleaved (timm, ours, timm, ours, ...)
so that load from other processes on the machine hits all alike; the median of each is reported:

* ``timm forward``: ``timm_model(images)``.
* ``cached forward``: ``model.run_with_cache(images, names_filter=<every block's hook_resid_post>)``.
* ``identifiability``: :func:`vit_lens.class_space.identifiability` on that cache alone: every
  block output, every token (12 x 32 x 197 vectors on ViT-B/16) projected onto all classes in
  ``"paper"`` mode and the target ranked, one layer at a time.
* ``total``: cached forward + identifiability, as a user runs it.

Target (issue 4): total <= 2x the timm forward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, random_timm, setup  # noqa: E402  (benchmarks/_common.py: the shared flags)
from _timing import Timings  # noqa: E402  (benchmarks/_timing.py, the shared timing helper)

TARGET = 2.0


def main(argv=None) -> int:
    from vit_lens import HookedViT
    from vit_lens import class_space as cs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant")
    p.add_argument("--warmup", type=int, default=1)
    add_common_args(p, device=False, threads=None)
    p.add_argument("--mode", choices=("paper", "dla"), default="paper")
    args = p.parse_args(argv)
    setup(args, p)

    tm = random_timm(args.model, seed=0)
    model = HookedViT.from_timm(tm)
    cfg = model.cfg
    x = torch.randn(args.batch, cfg.in_chans, *cfg.image_size)
    target = torch.randint(0, cfg.n_classes, (args.batch,))
    names = cs.hook_names(model, "resid_post")
    if args.mode == "dla" and model.ln_final is not None:
        names.append("ln_final.hook_scale")

    times = Timings(["timm forward", "cached forward", "identifiability", "total"])
    with torch.inference_mode():
        # correctness first: the last block's [CLS] ranks equal timm's own ranking
        _, cache = model.run_with_cache(x, names_filter=names)
        res = cs.identifiability(model, cache, target, mode=args.mode)
        ref = cs.class_rank(tm(x), target)
        if cfg.pooling == "token" and args.mode == "paper":
            assert torch.equal(res.rank[-1, :, 0], ref), "identifiability disagrees with timm's ranking"
        del cache, res
        # the steps of one pipeline, in turns per repetition (the analysis needs that repetition's cache)
        for i in range(args.warmup + args.reps):
            keep = i >= args.warmup
            times.timed("timm forward" if keep else None, lambda: tm(x))
            (_, cache), t_cache = times.timed("cached forward" if keep else None,
                                              lambda: model.run_with_cache(x, names_filter=names))
            _, t_ident = times.timed("identifiability" if keep else None,
                                     lambda: cs.identifiability(model, cache, target, mode=args.mode))
            del cache
            if keep:
                times.add("total", t_cache + t_ident)

    print(f"{args.model}, batch {args.batch}, {cfg.n_layers} layers x {cfg.n_ctx} tokens x {cfg.n_classes} classes, "
          f"mode {args.mode}, {torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'variant':<18}{'seconds':>10}{'x timm':>9}")
    for k in times:
        print(f"{k:<18}{times.median(k):>10.3f}{times.ratio(k, 'timm forward'):>9.2f}")
    ratio = times.ratio("total", "timm forward")
    ok = ratio <= TARGET
    print(f"identifiability (cached forward + analysis) / timm forward = {ratio:.2f} "
          f"(target <= {TARGET:.1f}): {'OK' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
