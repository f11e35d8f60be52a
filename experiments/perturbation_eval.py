"""Token-removal (perturbation) evaluation of importance maps, and linear probes vs class-space projection.

    python experiments/perturbation_eval.py [--models vit_tiny_patch16_224.augreg_in21k_ft_in1k,deit_tiny_patch16_224.fb_in1k]
        [--steps all|K] [--seeds 5] [--mode paper|timm] [--views 8] [--images ../shared/images] [--threads 2]

For every model (real checkpoints from ``$VIT_LENS_CHECKPOINTS``, default ``../shared/weights``)
and the labelled photos (``labels.csv``), it computes the importance maps for the true class --

* ``class-space (ours)``: :func:`vit_lens.explain.class_space_importance` (single softmax, the default);
* ``class-space, double softmax``: the same with the paper code's double softmax;
* ``direct attribution``: :func:`vit_lens.explain.direct_patch_attribution`;
* ``Chefer et al.``: :func:`vit_lens.explain.chefer_relevance`;
* ``attention rollout``: :func:`vit_lens.explain.attention_rollout`;
* ``probe ranking``: :func:`vit_lens.probing.probe_importance` -- ridge probes per layer and patch
  position trained on ``--views`` seeded random crops of the *same* photos (the shipped data have one
  image per class, so the probes cannot be trained on other images of the test classes; this
  ranking is therefore optimistic, see the README);

-- then runs the token-removal test (keep n = 1..N-1 patch tokens, negative = least important
removed first, positive = most important first; ``--steps K`` evaluates K evenly spaced n) with the
random-order baseline over ``--seeds`` seeds, and prints the AUC table (the paper's definition:
sum of accuracies / (max accuracy x number of tokens)) beside the paper's ViT-B/32 numbers.

It also prints the linear-probe comparison: probes trained on the augmented views and tested on
the original photos, per layer, for the [CLS] token and averaged over patch tokens, beside the
class-space projection's top-1 on the same tokens; and the cost of each map in units of one timm
forward pass (timm forward / forward+backward measured in the same run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VIT_LENS_SHARED", REPO.parent / "shared"))
WEIGHTS = Path(os.environ.get("VIT_LENS_CHECKPOINTS", SHARED / "weights"))
DEFAULT_MODELS = "vit_tiny_patch16_224.augreg_in21k_ft_in1k,deit_tiny_patch16_224.fb_in1k"
#: Vilas et al. (2023), ViT-B/32 on ImageNet-S, negative-perturbation AUC
PAPER_NEG_AUC = {"class-space (ours)": 0.836, "Chefer et al.": 0.845, "probe ranking": 0.739, "random": 0.716}


def _median_time(fn, reps: int = 3) -> float:
    """Median wall time of ``reps`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_model(name: str, args) -> None:
    import timm

    from vit_lens import HookedViT
    from vit_lens import explain as E
    from vit_lens.data import augmented_views, load_image_set
    from vit_lens.probing import linear_probe_sweep, probe_importance

    ckpt = WEIGHTS / f"{name}.safetensors"
    if not ckpt.exists():
        print(f"skipping {name}: no checkpoint at {ckpt}")
        return
    arch = name.split(".")[0]
    model = HookedViT.from_pretrained(arch, checkpoint_path=ckpt)
    ref = timm.create_model(arch, pretrained=False, num_classes=model.cfg.n_classes).eval()
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(str(ckpt)))
    data = load_image_set(args.images)
    x = data.load(model, mode=args.mode)
    y = data.label_tensor()
    B = len(x)
    rows, cols = model.cfg.grid_size
    N = rows * cols
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    print(f"\n## {name}: {B} images, {N} patch tokens, full-image top-1 {acc:.2f} (preprocessing mode={args.mode!r})")

    # ---- probes: trained on augmented views of the same photos (the only labelled data here)
    t0 = time.perf_counter()
    views = augmented_views([str(p) for p in data.paths], args.views, seed=0)
    x_views = model.preprocess(views, mode=args.mode)
    y_views = y.repeat_interleave(args.views)
    t_views = time.perf_counter() - t0

    # ---- maps, timed against timm in the same run (repetitions interleaved, medians reported,
    # so that load from other processes hits every variant alike)
    fns = {
        "class-space (ours)": lambda: E.class_space_importance(model, x, y, progress=False),
        "class-space, double softmax": lambda: E.class_space_importance(model, x, y, double_softmax=True, progress=False),
        "direct attribution": lambda: E.direct_patch_attribution(model, x, y, progress=False),
        "Chefer et al.": lambda: E.chefer_relevance(model, x, y, progress=False),
        "attention rollout": lambda: E.attention_rollout(model, x, progress=False),
    }

    def timm_fwd():
        with torch.no_grad():
            ref(x)

    def timm_fwd_bwd():
        xi = x.clone().requires_grad_(True)
        ref(xi)[torch.arange(B), y].sum().backward()
        ref.zero_grad(set_to_none=True)

    timed = {"timm forward": timm_fwd, "timm forward+backward": timm_fwd_bwd, **fns}
    maps, times = {}, {k: [] for k in timed}
    for k, fn in timed.items():  # warm-up (and the maps themselves)
        out = fn()
        if k in fns:
            maps[k] = out
    for _ in range(args.reps):
        for k, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    cost = {k: statistics.median(v) for k, v in times.items()}
    t_fwd, t_fb = cost.pop("timm forward"), cost.pop("timm forward+backward")
    t0 = time.perf_counter()
    maps["probe ranking"] = probe_importance(model, x_views, y_views, x, y, progress=False)
    cost["probe ranking (incl. training)"] = time.perf_counter() - t0
    print(f"\ntimm forward of the {B} images: {t_fwd * 1e3:.0f} ms; forward+backward: {t_fb * 1e3:.0f} ms "
          f"(medians of {args.reps}, interleaved with the maps; augmenting {len(views)} views: {t_views:.1f} s)\n")
    print("| map | time (s) | x timm forward | x timm forward+backward |")
    print("|---|---|---|---|")
    for k, v in cost.items():
        print(f"| {k} | {v:.2f} | {v / t_fwd:.1f} | {v / t_fb:.1f} |")

    # ---- the perturbation test
    steps = None if args.steps == "all" else int(args.steps)
    t0 = time.perf_counter()
    table, curves = E.compare_perturbation(model, x, y, maps, random_seeds=range(args.seeds), steps=steps,
                                           batch_size=args.batch, progress=not args.quiet)
    t_pert = time.perf_counter() - t0
    n_steps = int(table.n_steps.iloc[0])
    n_curves = len(maps) * 2 + 2 * args.seeds
    with torch.no_grad():
        t_after = _median_time(lambda: ref(x), args.reps)
    print(f"\nperturbation: {n_steps} steps x {n_curves} curves in {t_pert:.0f} s = "
          f"{t_pert / (n_steps * n_curves) / t_after:.2f} timm forwards of the full images per step (timm forward "
          f"re-measured after the sweep: {t_after * 1e3:.0f} ms; a step keeps {N // 2} of {N} tokens on average)\n")
    print("| method | negative AUC (higher = better) | positive AUC (lower = better) | neg. prob-AUC | pos. prob-AUC | paper ViT-B/32 neg. AUC |")
    print("|---|---|---|---|---|---|")
    for method in list(maps) + ["random"]:
        neg = table[(table.method == method) & (table["mode"] == "negative")].iloc[0]
        pos = table[(table.method == method) & (table["mode"] == "positive")].iloc[0]
        sd = lambda r: f" ± {r.auc_std:.3f}" if method == "random" else ""  # noqa: E731
        paper = PAPER_NEG_AUC.get(method)
        print(f"| {method} | {neg.auc:.3f}{sd(neg)} | {pos.auc:.3f}{sd(pos)} | {neg.prob_auc:.3f} | {pos.prob_auc:.3f} | "
              f"{paper if paper is not None else '--'} |")
    if args.curves:
        import pandas as pd

        frames = []
        for (method, mode), c in curves.items():
            for i, ci in enumerate(c if isinstance(c, list) else [c]):
                f = ci.to_frame()
                f.insert(0, "seed", i if isinstance(c, list) else -1)
                f.insert(0, "mode", mode)
                f.insert(0, "method", method)
                frames.append(f)
        out = Path(args.curves) / f"perturbation_{name}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(frames).to_csv(out, index=False)
        print(f"\ncurves written to {out}")

    # ---- linear probes vs class-space projection on the same tokens
    df = linear_probe_sweep(model, x_views, y_views, x, y, alpha=1.0, progress=False)
    cls = df[df.position == 0]
    patches = df[df.position >= model.cfg.n_prefix_tokens].groupby(["component", "layer"], as_index=False).mean(
        numeric_only=True)
    print(f"\nlinear probes (ridge, alpha=1, trained on {len(views)} augmented views of the same {B} photos, "
          f"{int(df.n_probe_classes.iloc[0])} classes) vs class-space projection, top-1 on the {B} original photos:\n")
    print("| layer | component | [CLS] probe | [CLS] class-space (1000 cl.) | [CLS] class-space (probe's classes) "
          "| patches probe | patches class-space (1000 cl.) | patches class-space (probe's classes) |")
    print("|---|---|---|---|---|---|---|---|")
    for comp in ("resid", "attn_out", "mlp_out"):
        for layer in sorted(df.layer.unique()):
            c = cls[(cls.component == comp) & (cls.layer == layer)].iloc[0]
            p = patches[(patches.component == comp) & (patches.layer == layer)].iloc[0]
            print(f"| {layer} | {comp} | {c.probe_top1:.2f} | {c.class_space_top1:.2f} | "
                  f"{c.class_space_top1_probe_classes:.2f} | {p.probe_top1:.2f} | {p.class_space_top1:.2f} | "
                  f"{p.class_space_top1_probe_classes:.2f} |")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated checkpoint names in $VIT_LENS_CHECKPOINTS")
    p.add_argument("--images", default=str(SHARED / "images"), help="labels CSV, folder with labels.csv, or ImageFolder tree")
    p.add_argument("--mode", default="paper", choices=("paper", "timm"), help="preprocessing (paper: resize, no crop)")
    p.add_argument("--steps", default="all", help="'all' (n = 1..N-1, the paper's curve) or a number of evenly spaced n")
    p.add_argument("--seeds", type=int, default=5, help="random-order baseline seeds")
    p.add_argument("--views", type=int, default=8, help="augmented views per photo for the probes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (interleaved)")
    p.add_argument("--curves", default=None, help="folder to write the curves (CSV) to")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# token-removal evaluation and linear probes (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for name in args.models.split(","):
        run_model(name.strip(), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
