"""Attribution patching vs exact patching on the real ViT-Ti / DeiT-Ti and the labelled photos.

    python experiments/attribution_agreement.py [--models vit deit] [--pairs 3] [--neurons 32]
                                                [--positions sample|all] [--csv out.csv] [--quick]

For several clean/corrupted pairs of the labelled photos in ../shared/images (clean photo ``i``,
corrupted photo ``i + 10``; metric: logit of the clean label minus logit of the corrupted label,
per pair), every sweep is run exactly (``method="exact"``) and estimated (``"attribution"``,
``"attribution_qk"``), and :func:`vit_lens.attribution_patching.agreement` compares them per pair:
Spearman rank correlation over all cells and top-k overlap of the largest ``|effect|`` cells
(k = 10 for layer x position and layer x neuron, 5 for layer x head and component x layer).
Layer x position sweeps cover every layer at ``--positions sample`` (default: [CLS] and every 8th
patch, 26 of 197 positions; ``all``: every position, 8x slower); layer x neuron sweeps a fixed
random sample of ``--neurons`` neurons per layer (seed 0), every position patched at once.
Prints the mean (and min) over pairs per model, granularity, hook and method; ``--csv`` writes
every row. ``--quick``: 2 pairs, fewer hooks (a smoke run).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("VIT_LENS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = Path(os.environ.get("VIT_LENS_CHECKPOINTS", SHARED / "weights"))
MODELS = {"vit": ("vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
          "deit": ("deit_tiny_patch16_224", "deit_tiny_patch16_224.fb_in1k")}
POSITION_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn.hook_q", "attn.hook_k")
HEAD_HOOKS = ("attn.hook_z", "attn.hook_result", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
              "attn.hook_attn_scores")
METHODS = ("attribution", "attribution_qk")


def labelled_pairs(model, n_pairs: int):
    """(clean, corrupted, clean labels, corrupted labels): photo i vs photo i + 10, i < n_pairs."""
    with open(SHARED / "images" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if n_pairs > len(rows) // 2:
        raise SystemExit(f"--pairs must be at most {len(rows) // 2}")
    a, b = rows[:n_pairs], rows[len(rows) // 2 : len(rows) // 2 + n_pairs]
    path = lambda r: str(SHARED / "images" / r["path"])  # noqa: E731
    return (model.preprocess([path(r) for r in a]), model.preprocess([path(r) for r in b]),
            torch.tensor([int(r["class_index"]) for r in a]), torch.tensor([int(r["class_index"]) for r in b]))


def sweeps(quick: bool, neurons: int, d_mlp: int, positions, position_hooks=None):
    """(granularity, hook, function(model, clean, corrupted, metric, method) -> PatchingResult, k)."""
    from vit_lens.patching import patch_components_sweep, patch_heads_sweep, patch_neurons_sweep, patch_positions_sweep

    pos_hooks = ("resid_pre", "attn_out", "attn.hook_k") if quick else POSITION_HOOKS
    if position_hooks is not None:
        pos_hooks = tuple(position_hooks)
    head_hooks = ("attn.hook_z", "attn.hook_q", "attn.hook_k") if quick else HEAD_HOOKS
    out = []
    for h in pos_hooks:
        out.append(("layer x position", h, lambda m, c, k, f, meth, h=h: patch_positions_sweep(
            m, c, k, f, hook=h, positions=positions, method=meth, progress=False), 10))
    for h in head_hooks:
        out.append(("layer x head", h, lambda m, c, k, f, meth, h=h: _heads(m, c, k, f, h, meth), 5))
    out.append(("component x layer", "resid_pre / attn_out / mlp_out", lambda m, c, k, f, meth: patch_components_sweep(
        m, c, k, f, method=meth, progress=False), 5))
    g = torch.Generator().manual_seed(0)
    sample = torch.randperm(d_mlp, generator=g)[:neurons].sort().values
    out.append(("layer x neuron", f"mlp.hook_post ({neurons} of {d_mlp} per layer)",
                lambda m, c, k, f, meth: patch_neurons_sweep(m, c, k, f, neurons=sample, method=meth, progress=False), 10))
    return out


def _heads(model, clean, corrupted, metric, hook, method):
    from vit_lens.patching import patch_heads_sweep

    model.set_use_attn_result(hook.endswith("hook_result"))  # per-head results only where swept (slower forward)
    try:
        return patch_heads_sweep(model, clean, corrupted, metric, hook=hook, method=method, progress=False)
    finally:
        model.set_use_attn_result(False)


def run(model_key: str, n_pairs: int, neurons: int, quick: bool, positions, csv_path=None, position_hooks=None):
    from vit_lens import HookedViT
    from vit_lens.attribution_patching import agreement
    from vit_lens.patching import logit_diff_metric

    arch, tag = MODELS[model_key]
    model = HookedViT.from_pretrained(arch, checkpoint_path=WEIGHTS / f"{tag}.safetensors")
    clean, corr, yc, yk = labelled_pairs(model, n_pairs)
    metric = logit_diff_metric(yc, yk)
    rows = []
    if positions == "sample":
        n_pre, n_patch = model.cfg.n_prefix_tokens, model.cfg.n_ctx - model.cfg.n_prefix_tokens
        positions = [0] + [n_pre + p for p in range(0, n_patch, 8)]
    else:
        positions = None
    for gran, hook, fn, k in sweeps(quick, neurons, model.cfg.d_mlp, positions, position_hooks):
        t0 = time.perf_counter()
        exact = fn(model, clean, corr, metric, "exact")
        t_exact = time.perf_counter() - t0
        for meth in METHODS:
            t0 = time.perf_counter()
            est = fn(model, clean, corr, metric, meth)
            t_est = time.perf_counter() - t0
            df = agreement(exact, est, k=k)
            rows.append(dict(model=tag, granularity=gran, hook=hook, method=meth, k=k, n_cells=int(df.n_cells[0]),
                             spearman_mean=df.spearman.mean(), spearman_min=df.spearman.min(),
                             topk_mean=df.topk.mean(), topk_min=df.topk.min(), sign_mean=df.sign.mean(),
                             exact_s=t_exact, estimate_s=t_est))
            r = rows[-1]
            print(f"{model_key:4s} {gran:17s} {hook:32s} {meth:15s} spearman {r['spearman_mean']:.3f} "
                  f"(min {r['spearman_min']:.3f})  top-{k} {r['topk_mean']:.2f} (min {r['topk_min']:.2f})  "
                  f"sign {r['sign_mean']:.2f}  exact {t_exact:.1f}s / estimate {t_est:.1f}s", flush=True)
            if csv_path is not None:
                new = not csv_path.exists()
                with open(csv_path, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(r))
                    if new:
                        w.writeheader()
                    w.writerow(r)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["vit", "deit"], choices=list(MODELS))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--neurons", type=int, default=32)
    ap.add_argument("--positions", choices=["sample", "all"], default="sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--position-hooks", nargs="*", help=f"layer x position hooks (default {' '.join(POSITION_HOOKS)})")
    ap.add_argument("--csv", type=Path, help="append one row per (model, sweep, method) as it is measured")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_pairs = 2 if args.quick else args.pairs
    for m in args.models:
        run(m, n_pairs, args.neurons, args.quick, args.positions, args.csv, args.position_hooks)
    if args.csv:
        print(f"appended to {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
