"""Throughput of ``vit-lens run identifiability`` vs a plain timm forward over the same images and
the same DataLoader, in one run.

    python benchmarks/bench_run.py [--model vit_base_patch16_224] [--batch 32] [--images 64] [--workers 0]
        [--reps 2] [--warmup 1] [--threads N] [--preprocess timm] [--device cpu] [--dtype float32]

Random-initialised weights (speed does not depend on them; the hub is unreachable), float32, CPU
(``--device cuda`` / ``--dtype bfloat16``: both variants on that device and dtype, the device
synchronised around every timed pass).
``--images`` random JPEGs (a 2-class ImageFolder tree, 320 x 256 pixels) are written to a temporary
folder. Variants, repetitions interleaved in rotated order (benchmarks/_timing.py):

* ``timm forward``: every batch of a ``DataLoader`` over the run's own dataset (the model's eval
  transform, the same batch size and workers) through ``timm_model(images)`` under
  ``torch.inference_mode``: reading + preprocessing + forward, nothing else.
* ``vit-lens run``: :func:`vit_lens.runs.run` ``("identifiability", ...)`` into a fresh folder:
  the same reading and preprocessing, a cached forward, identifiability of every block, token
  and class, the rows, the Parquet shards, the manifest (hash of the weights included).

Reported: images/s of each and the throughput ratio (run / timm). Target (issue 15) on ViT-B/16 at
batch 32: >= 0.8x timm's throughput (analysis, IO and bookkeeping <= 25% on top of the forward).
On small models (ViT-Ti) ranking 1000 classes for every token costs about 0.7x of a forward by
itself, so the ratio is reported without a target there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, random_timm, setup  # noqa: E402  (benchmarks/_common.py: the shared flags)
from _timing import interleaved  # noqa: E402  (benchmarks/_timing.py, the shared timing helper)

TARGET = 0.8
TARGET_MODELS = ("vit_base_patch16_224",)


def _write_images(folder: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / str(i % 2)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


def main(argv=None) -> int:
    from vit_lens import HookedViT
    from vit_lens.runs import open_source, run
    from vit_lens.runs.sources import ImageItems, collate

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=64, help="images per pass (default 64: two batches)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (both variants)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions of each variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--preprocess", choices=("timm", "paper"), default="timm")
    add_common_args(p, device="cpu", threads=None, dtype="float32",
                    device_help="cpu (default) or cuda: both variants run there")
    args = p.parse_args(argv)
    device, dtype = setup(args, p)

    tm = random_timm(args.model, seed=0).to(device=device, dtype=dtype)
    model = HookedViT.from_timm(tm)
    tmp = Path(tempfile.mkdtemp(prefix="bench_run_"))
    try:
        _write_images(tmp / "images", args.images)
        source = open_source(str(tmp / "images"), model)
        items = ImageItems(source, model.data_config, args.preprocess)
        batches = [list(range(s, min(s + args.batch, len(source)))) for s in range(0, len(source), args.batch)]
        runs = iter(range(10**6))

        def timm_pass() -> None:
            loader = torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=args.workers,
                                                 collate_fn=collate)
            with torch.inference_mode():
                for b in loader:
                    tm(b["images"].to(device=device, dtype=dtype))

        def run_pass() -> None:
            out = tmp / f"out{next(runs)}"
            rep = run("identifiability", model, source, out, batch_size=args.batch, chunk_size=args.batch,
                      workers=args.workers, preprocess=args.preprocess, target="label", progress=False,
                      log=lambda m: None)
            assert rep.complete and rep.n_images_run == len(source)
            shutil.rmtree(out)

        t = interleaved({"timm forward": timm_pass, "vit-lens run": run_pass}, reps=args.reps, warmup=args.warmup,
                        device=device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.images
    cfg = model.cfg
    print(f"{args.model} {args.dtype} on {args.device}, {n} images, batch {args.batch}, {args.workers} workers, {cfg.n_layers} layers x {cfg.n_ctx} "
          f"tokens x {cfg.n_classes} classes, {torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'variant':<16}{'seconds':>10}{'images/s':>10}")
    for k in ("timm forward", "vit-lens run"):
        print(f"{k:<16}{t.median(k):>10.3f}{n / t.median(k):>10.2f}")
    ratio = t.median("timm forward") / t.median("vit-lens run")
    paired = 1.0 / t.paired("vit-lens run", "timm forward")
    line = f"throughput vit-lens run / timm forward = {ratio:.2f}x (paired {paired:.2f}x)"
    if args.model in TARGET_MODELS and args.batch == 32:
        ok = ratio >= TARGET
        print(f"{line} (target >= {TARGET:.1f}x): {'OK' if ok else 'MISSED'}")
        return 0 if ok else 1
    print(f"{line} (no target for this model / batch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
