"""A resumable layer x position activation-patching sweep over a folder of images: a thin driver
over ``vit-lens run patching`` (:func:`vit_lens.runs.run`), writing the same Parquet results.

    python benchmarks/patching_sweep.py IMAGES_DIR --out OUT_DIR [--model vit_tiny_patch16_224]
        [--checkpoint PATH] [--hook resid_pre] [--corruption blur|noise|gray|other] [--layers 0 5 11]
        [--preprocess timm|paper] [--limit N] [--chunk-size 1] [--memory-mb 512]

For every image (clean) a corrupted copy is made (``blur``: a strong Gaussian blur, ``noise``:
Gaussian noise seeded by the image id, ``gray``: the all-zero normalised image, ``other``: a seeded
image of another class, for labelled folders), the metric is the logit of the clean image's top-1
class (``--target pred``), and :func:`vit_lens.patching.patch_positions_sweep` patches
``blocks.{l}.hook_<hook>`` of every layer at every position (prefix tokens included). It is the
same as::

    vit-lens run patching --data IMAGES_DIR --out OUT_DIR --target pred --corruption blur --chunk-size 1

Results (see :mod:`vit_lens.runs`): ``OUT_DIR/shards/chunk-*.parquet``, one tidy Parquet shard per
chunk of ``--chunk-size`` images (default 1: an interrupted sweep loses at most the image in
progress), rows ``image, path, label, target, layer, group ('pos' / 'baseline'), index (the
position), condition (the corruption), measure ('value' / 'normalized' / 'clean' / 'corrupted'),
value``; ``pandas.read_parquet(OUT_DIR / "shards")`` or :func:`vit_lens.results.load` reads them.
``OUT_DIR/manifest.json`` holds the configuration: a rerun with other options is refused, the same
command resumes. Unreadable images are skipped, reported, listed in ``OUT_DIR/failures.csv`` and
tried again by the next run. ``OUT_DIR/figures/patching.html``: the mean normalised effect, layer x
position. Ctrl-C stops after dropping the chunk in progress (exit 130); temporary files of a killed
run are removed by the next one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup  # noqa: E402  (benchmarks/_common.py: the shared flags)
from vit_lens.core.errors import InputError, VitLensError  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class SweepError(InputError):
    """A problem with the command line or the output folder, reported in one line (no traceback)."""


def find_images(folder: Any) -> List[Path]:
    """Image files under ``folder`` (recursively), in a stable order (checked before the model loads)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "does not exist"
        raise SweepError(f"{str(folder)!r} {what}; give the folder of images to sweep")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SweepError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(folder)!r}; give the folder of images to sweep")
    return files


def run_sweep(model: Any, images: Any, out_dir: Any, *, hook: str = "resid_pre", corruption: str = "blur",
              layers: Optional[Sequence[int]] = None, preprocess: str = "timm", memory_mb: float = 512,
              limit: Optional[int] = None, chunk_size: int = 1, progress: bool = True, figure: bool = True):
    """``vit-lens run patching`` over the folder ``images`` (target: each image's top-1 class),
    retrying unreadable images of earlier runs; writes the figure. Returns the
    :class:`~vit_lens.runs.RunReport`."""
    from vit_lens import results
    from vit_lens.runs import run

    opts = dict(sweep="positions", hook=hook, corruption=corruption, memory_mb=float(memory_mb),
                layers=None if layers is None else [int(l) for l in layers])
    report = run("patching", model, str(images), out_dir, options=opts, batch_size=1, chunk_size=chunk_size,
                 preprocess=preprocess, limit=limit, target="pred", retry_failed=True, progress=progress,
                 log=lambda m: print(f"patching_sweep: {m}", file=sys.stderr))
    if figure and report.n_done:
        results.write_figures(out_dir)
    return report


def _say(msg: str) -> None:
    print(f"patching_sweep: {msg}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; returns the exit status (0 done, 2 a usage / folder problem, 130 Ctrl-C)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("images", help="folder of images (searched recursively; an ImageFolder tree gives labels)")
    p.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--checkpoint", default=None, help="local weights file (else $VIT_LENS_CHECKPOINTS or the hub)")
    p.add_argument("--hook", default="resid_pre")
    p.add_argument("--corruption", default="blur", choices=["blur", "noise", "gray", "other"])
    p.add_argument("--layers", type=int, nargs="*", default=None)
    p.add_argument("--preprocess", default="timm", choices=["timm", "paper"])
    p.add_argument("--memory-mb", type=float, default=512)
    p.add_argument("--chunk-size", type=int, default=1, help="images per Parquet shard (default 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the folder")
    add_common_args(p, device=False, threads=None)
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    setup(args, p)
    files: List[Path] = []
    out = Path(args.out)
    try:
        files = find_images(args.images)  # before the (slow) model load
        from vit_lens import HookedViT

        try:
            model = HookedViT.from_pretrained(args.model, checkpoint_path=args.checkpoint)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise SweepError(f"cannot load model {args.model!r}: {e}") from e
        t = time.perf_counter()
        rep = run_sweep(model, args.images, out, hook=args.hook, corruption=args.corruption, layers=args.layers,
                        preprocess=args.preprocess, memory_mb=args.memory_mb, limit=args.limit,
                        chunk_size=args.chunk_size)
    except KeyboardInterrupt:
        from vit_lens.runs import read_manifest

        n = 0
        try:
            m = read_manifest(out)
            n = sum(c["stop"] - c["start"] for c in m["chunks"] if (out / c["shard"]).exists())
        except Exception:
            pass
        _say(f"interrupted after {n} of {len(files)} images; rerun the same command to resume")
        return 130
    except VitLensError as e:  # SweepError, a changed configuration, bad options
        if args.traceback:
            raise
        _say(f"error: {e}")
        return 2
    n = min(len(files), args.limit) if args.limit else len(files)
    from vit_lens.runs import read_manifest

    m = read_manifest(out)
    done = sum(c["stop"] - c["start"] for c in m["chunks"] if (out / c["shard"]).exists())
    failed = f"; {rep.n_failed} could not be read (listed in {out / 'failures.csv'})" if rep.n_failed else ""
    print(f"{done - rep.n_failed} of {n} images done ({time.perf_counter() - t:.1f} s this run){failed}; "
          f"results in {out / 'shards'}, figure {out / 'figures' / 'patching.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
