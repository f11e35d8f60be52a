"""The paper's attention-knockout result on the real ViT-Ti and the labelled images.

    python experiments/knockout_paper.py [--preprocess timm|paper] [--csv out.csv]

Vilas et al. (2023, Sec. 4) report, for ViT-B/32 on ImageNet, the percentage of image tokens
whose last-layer projection onto the class embeddings has the correct class as top-1
("identifiable"): 60.73% normally, 0.126% when image tokens may attend only to themselves in
every layer, 60.71% when image tokens may not attend to [CLS].

Here: ``vit_tiny_patch16_224.augreg_in21k_ft_in1k`` (../shared/weights) and the 20 labelled
photos in ../shared/images (all tokens of all images pooled), for the knockout modes of
:func:`vit_lens.ablation.attention_knockout` (``"paper"``: the paper's edit of the softmaxed
attention, one-hot image-token rows for ``self_only``, the [CLS] column zeroed without
renormalising for ``no_cls``; ``"mask"``: -inf before the softmax, renormalised;
``"zero_edges"``: removed probabilities zeroed after the softmax, nothing else changed).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("VIT_LENS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = Path(os.environ.get("VIT_LENS_CHECKPOINTS", SHARED / "weights"))
NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
PAPER = {"none": 60.73, "self_only": 0.126, "no_cls": 60.71}


def load_labelled(images_dir: Path):
    with open(images_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [str(images_dir / r["path"]) for r in rows], [int(r["class_index"]) for r in rows]


def knockout_rates(model, images, classes, *, edges=("none", "self_only", "no_cls"),
                   modes=("paper", "mask", "zero_edges")):
    """Last-layer class identifiability of the image tokens per (edges, mode), measured with
    :func:`vit_lens.class_space.identify` (paper projection) inside :func:`attention_knockout`.

    Returns a dict ``(edges, mode) -> (identifiable rate, n_tokens, [CLS] top-1 accuracy, mean
    identifiability score)``."""
    from vit_lens.ablation import attention_knockout
    from vit_lens.class_space import identify

    out = {}
    for mode in modes:
        for e in edges:
            if e == "none" and mode != modes[0]:
                out[(e, mode)] = out[(e, modes[0])]
                continue
            with attention_knockout(model, e, mode=mode), torch.inference_mode():
                res, logits = identify(model, images, classes, progress=False)
            acc = (logits.argmax(-1) == torch.as_tensor(classes)).float().mean().item()
            n_tokens = int(res.mask("image").sum())
            out[(e, mode)] = (res.rate("image")[-1].item(), n_tokens, acc, res.mean_r("image")[-1].item())
    return out


def main(argv=None) -> int:
    from vit_lens import HookedViT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preprocess", default="timm", choices=["timm", "paper"])
    p.add_argument("--csv", default=None, help="also write the table as CSV")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = WEIGHTS / f"{NAME}.safetensors"
    if not ckpt.exists():
        print(f"SKIPPED: {ckpt} not found (set VIT_LENS_CHECKPOINTS / VIT_LENS_SHARED)")
        return 0
    t0 = time.perf_counter()
    model = HookedViT.from_pretrained("vit_tiny_patch16_224", checkpoint_path=ckpt)
    paths, classes = load_labelled(SHARED / "images")
    images = model.preprocess(paths, mode=args.preprocess)
    res = knockout_rates(model, images, classes)
    print(f"{NAME}, {len(paths)} labelled images ({args.preprocess} preprocessing), "
          f"{model.cfg.n_patches} image tokens each; last-layer identifiable image tokens:\n")
    print("| knockout (all layers) | ours, mode='paper' | ours, mode='mask' | ours, mode='zero_edges' | "
          "paper ViT-B/32 | mean r, 'paper' / 'mask' / 'zero_edges' | [CLS] top-1, 'paper' / 'mask' / 'zero_edges' |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for e, label in (("none", "none"), ("self_only", "image tokens attend only to themselves (`self_only`)"),
                     ("no_cls", "image tokens cannot attend to [CLS] (`no_cls`)")):
        rp, n, ap, sp = res[(e, "paper")]
        rm, _, am, sm = res[(e, "mask")]
        rz, _, az, sz = res[(e, "zero_edges")]
        print(f"| {label} | {100 * rp:.2f}% | {100 * rm:.2f}% | {100 * rz:.2f}% | {PAPER[e]}% | "
              f"{sp:.3f} / {sm:.3f} / {sz:.3f} | {100 * ap:.0f}% / {100 * am:.0f}% / {100 * az:.0f}% |")
        rows.append(dict(edges=e, rate_paper_mode=rp, rate_mask_mode=rm, rate_zero_edges_mode=rz, n_tokens=n,
                         paper_vitb32=PAPER[e] / 100, score_paper_mode=sp, score_mask_mode=sm,
                         score_zero_edges_mode=sz, cls_top1_paper_mode=ap, cls_top1_mask_mode=am,
                         cls_top1_zero_edges_mode=az))
    print(f"\n({rows[0]['n_tokens']} image tokens in all. Identifiable: the correct class is the token's top-1 "
          "class after the final norm and classifier; mean r: mean class identifiability "
          f"r = 1 - rank / n_classes of the correct class, about 0.5 = chance. {time.perf_counter() - t0:.1f} s)")
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
