"""Make the README figures from the real ViT-Ti/16 checkpoint and the labelled photos in ../shared.

    python docs/make_figures.py            # writes docs/identifiability.svg/.png, docs/cat_identifiability.png
    python docs/make_figures.py --help     # this text; writes nothing

The figures are the very plotly figures :mod:`vit_lens.plot` returns, drawn to static files by
plotly's own static export (``vit_lens.plot.save_image``: kaleido with the machine's Chromium;
Debian / Ubuntu: ``apt-get install chromium``), the same path as every static figure of vit_lens.
The three free photos of the labelled set come from vit_lens's built-in samples (the same photos,
resized), so the cat map draws a sample. The numbers behind the figures are printed, so the README
can quote them.

Environment: ``VIT_LENS_CHECKPOINTS`` (default ``../shared/weights``), ``VIT_LENS_SHARED``
(default ``../shared``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
SHARED = Path(os.environ.get("VIT_LENS_SHARED", REPO.parent / "shared"))
os.environ.setdefault("VIT_LENS_CHECKPOINTS", str(SHARED / "weights"))
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python docs/make_figures.py",
        description=__doc__.split("\n\n")[0],
        epilog="Writes docs/identifiability.svg, docs/identifiability.png and docs/cat_identifiability.png and "
               "prints the numbers behind them. Environment: VIT_LENS_CHECKPOINTS (default ../shared/weights), "
               "VIT_LENS_SHARED (default ../shared).",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    parse_args(argv)  # --help prints and exits before anything is loaded or written
    import vit_lens
    from vit_lens import HookedViT, plot
    from vit_lens import class_space as cs

    problem = plot.static_export_problem()
    if problem is not None:
        sys.exit(f"docs/make_figures.py: {problem}")

    t0 = time.perf_counter()
    images_dir = SHARED / "images"
    if not (images_dir / "labels.csv").is_file():
        sys.exit(f"labelled photos not found in {images_dir}; set VIT_LENS_SHARED")
    torch.set_grad_enabled(False)
    model = HookedViT.from_pretrained("vit_tiny_patch16_224")
    twin = cs.random_twin(model, seed=0)
    with open(images_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    paths = [vit_lens.sample_image_path(Path(r["path"]).stem) if Path(r["path"]).stem in vit_lens.SAMPLE_IMAGES
             else images_dir / r["path"] for r in rows]
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    cat = next(i for i, r in enumerate(rows) if r["path"].endswith("chelsea.png"))
    images = model.preprocess(paths, mode="paper")  # the paper's preprocessing: resize, no crop

    result, logits = cs.identify(model, images, labels, progress=False)
    twin_result, _ = cs.identify(twin, images, labels, progress=False)
    acc = (logits.argmax(-1) == labels).float().mean().item()

    fig = plot.identifiability_lines(
        result, twin_result,
        title=f"ViT-Ti/16: class identifiability per block ({len(labels)} labelled photos)",
    )
    fig.update_layout(yaxis_title="share of tokens whose label is top-1")
    plot.save_image(fig, DOCS / "identifiability.svg")
    plot.save_image(fig, DOCS / "identifiability.png", scale=1.5)

    mean, std = model.data_config["mean"], model.data_config["std"]
    fig = plot.identifiability_map(result, images, index=cat, class_names=model.class_names, mean=mean, std=std,
                                   title="ViT-Ti/16, last block: identifiability of 'tabby cat' per token")
    plot.save_image(fig, DOCS / "cat_identifiability.png", scale=1.5)

    # the numbers behind the figures
    table = result.summary().pivot(index="layer", columns="tokens", values="top1_rate")
    table["image (random twin)"] = twin_result.summary().query("tokens == 'image'").set_index("layer")["top1_rate"]
    table["CLS (random twin)"] = twin_result.summary().query("tokens == 'CLS'").set_index("layer")["top1_rate"]
    print(f"top-1 accuracy (paper preprocessing): {acc:.2f} on {len(labels)} images")
    print("top-1 rate of the label, per block:")
    print(table.drop(columns=["readout"], errors="ignore").round(4).to_string())
    r = result.r[-1, cat, model.cfg.n_prefix_tokens:]
    print(f"cat photo, last block: {(r == 1).float().mean().item():.3f} of image tokens have 'tabby cat' top-1; "
          f"mean r {r.mean().item():.3f}")
    print(f"done in {time.perf_counter() - t0:.1f} s; wrote", ", ".join(
        p.name for p in (DOCS / "identifiability.svg", DOCS / "identifiability.png", DOCS / "cat_identifiability.png")))


if __name__ == "__main__":
    main()
