"""Cost of attention knockout in every layer vs a plain HookedViT forward, in one run.

    python benchmarks/bench_knockout.py [--model vit_base_patch16_224] [--batch 8] [--reps 7] [--threads 2]

Random-initialised weights (speed does not depend on them), CPU, float32, ``torch.inference_mode``.
Variants are timed with their repetitions interleaved, in rotated order (``benchmarks/_timing.py``,
so that load from other processes on the machine hits all of them alike); the median of each is
reported with its ratio to the plain HookedViT forward:

* ``timm forward`` -- the reference model itself;
* ``HookedViT forward`` -- ``model(images)``, no hooks (fused attention);
* ``knockout self_only, mode="mask"`` / ``no_cls, mode="mask"`` -- inside
  :func:`vit_lens.ablation.attention_knockout` in every layer; the pattern is not hooked, so the
  fused kernel runs with a boolean attention mask;
* ``knockout self_only, mode="paper"`` -- the paper's edit of the softmaxed pattern (one-hot
  image-token rows) needs the pattern (a hook on ``hook_pattern``), so attention is materialised
  (for reference; no target);
* ``knockout self_only, mode="zero_edges"`` -- removed probabilities zeroed after the softmax, also
  on the materialised pattern (for reference; no target);
* ``context ablation, method="attention"`` -- half the patches masked out in every layer.

Target (issue 5): knockout in every layer (mode "mask", pattern not hooked) <= 1.3x the plain forward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, random_timm, setup  # noqa: E402  (benchmarks/_common.py: the shared flags)
from _timing import interleaved  # noqa: E402  (benchmarks/_timing.py, the shared timing helper)

TARGET = 1.3


def main(argv=None) -> int:
    from vit_lens import HookedViT
    from vit_lens.ablation import attention_knockout, context_ablation

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    add_common_args(p, device=False, threads=2)
    args = p.parse_args(argv)
    setup(args, p)

    ref = random_timm(args.model, seed=0)
    model = HookedViT.from_timm(ref)
    x = torch.randn(args.batch, model.cfg.in_chans, *model.cfg.image_size)
    half = torch.zeros(model.cfg.grid_size, dtype=torch.bool)
    half[:, : model.cfg.grid_size[1] // 2] = True

    def knock(edges, mode):
        def run():
            with attention_knockout(model, edges, mode=mode):
                return model(x)

        return run

    def ctx():
        with context_ablation(model, half, method="attention"):
            return model(x)

    variants = {
        "timm forward": lambda: ref(x),
        "HookedViT forward": lambda: model(x),
        'knockout self_only, mode="mask" (all layers)': knock("self_only", "mask"),
        'knockout no_cls, mode="mask" (all layers)': knock("no_cls", "mask"),
        'knockout self_only, mode="paper" (all layers, pattern materialised)': knock("self_only", "paper"),
        'knockout self_only, mode="zero_edges" (all layers, pattern materialised)': knock("self_only", "zero_edges"),
        'context ablation, method="attention" (half the patches)': ctx,
    }
    with torch.inference_mode():
        times = interleaved(variants, reps=args.reps, warmup=args.warmup, rotate=True)
    med = {k: times.median(k) for k in variants}
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.reps} interleaved reps\n")
    print("| variant | median | vs HookedViT forward | vs timm |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.0f} ms | {times.ratio(k, 'HookedViT forward'):.2f}x | {times.ratio(k, 'timm forward'):.2f}x |")
    base = med["HookedViT forward"]
    worst = max(med[k] for k in variants if 'mode="mask"' in k) / base
    print(f"\ntarget: knockout in every layer (mask mode, pattern not hooked) <= {TARGET}x the plain forward: "
          f"{'MET' if worst <= TARGET else 'NOT MET'} ({worst:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
