"""Categorical updates of the attention and MLP sublayers on the real tiny checkpoints.

    python benchmarks/categorical_updates_real.py [--models vit_tiny_patch16_224 deit_tiny_patch16_224]

The computation of notebooks/02_class_embedding_space.ipynb ("Categorical updates"): the 20
labelled photos in ../shared/images, paper preprocessing, target = the label,
:func:`vit_lens.class_space.categorical_updates` summarised over the image tokens. Per block it
prints the share of image tokens that each sublayer updates towards the label for

* ``attn`` / ``mlp``: the default (``quantity="logit"``, ``variant="corrected"``): the label logit
  of the sublayer output's own projection is larger than that of the stream it reads
  (``resid_pre`` for attention, ``resid_mid`` for the MLP);
* ``mlp_paper``: the MLP against the block input ``resid_pre``, as the paper's code does;
* ``attn_rank`` / ``mlp_rank``: ranks compared instead of logits (``quantity="rank"``);

and how many token decisions (all positions, all blocks) the rank comparison changes.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, WEIGHTS  # noqa: E402  (benchmarks/_common.py: where ../shared and the weights are)


def main(argv=None) -> int:
    from vit_lens import HookedViT
    from vit_lens import class_space as cs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
    args = p.parse_args(argv)
    os.environ.setdefault("VIT_LENS_CHECKPOINTS", str(WEIGHTS))
    images_dir = SHARED / "images"
    rows = list(csv.DictReader(open(images_dir / "labels.csv")))
    paths = [images_dir / r["path"] for r in rows]
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    torch.set_grad_enabled(False)
    for name in args.models:
        model = HookedViT.from_pretrained(name)
        images = model.preprocess(paths, mode="paper")
        hooks = cs.hook_names(model, "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
        _, cache = model.run_with_cache(images, names_filter=hooks)
        res = {(q, v): cs.categorical_updates(model, cache, labels, quantity=q, variant=v)
               for q in ("logit", "rank") for v in ("corrected", "paper")}
        rate = {k: r.summary().pivot(index="layer", columns="sublayer", values="update_rate") for k, r in res.items()}
        table = rate["logit", "corrected"].copy()
        table["mlp_paper"] = rate["logit", "paper"]["mlp"]
        table["attn_rank"] = rate["rank", "corrected"]["attn"]
        table["mlp_rank"] = rate["rank", "corrected"]["mlp"]
        print(f"{name}: {len(paths)} photos, image tokens, share updated towards the label")
        print(table.round(3).to_string())
        lc, rc, lp, rp = res["logit", "corrected"], res["rank", "corrected"], res["logit", "paper"], res["rank", "paper"]
        n = lc.attn.numel()
        diff = {"attn": (lc.attn != rc.attn).sum().item(), "mlp": (lc.mlp != rc.mlp).sum().item(),
                "mlp_paper": (lp.mlp != rp.mlp).sum().item()}
        print(f"logit vs rank, tokens decided differently of {n}: "
              + ", ".join(f"{k} {v} ({100 * v / n:.1f}%)" for k, v in diff.items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
