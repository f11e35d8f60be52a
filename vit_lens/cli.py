"""The ``vit-lens`` command.

``vit-lens identify [IMAGE|FOLDER...] [--model NAME] [--label CLASS | --labels labels.csv]
[--out FILE.html|FILE.png] [--plotlyjs inline|cdn] [--checkpoint PATH] [--baseline]`` runs the
class-embedding-space analysis on images: it prints each image's top classes and a per-layer
class-identifiability table for the [CLS] token and the image tokens, and writes a report (one HTML
page, or a PNG of the same): identifiability per block, the last block's token map over the first
image and its top-k classes per block. With no image it runs on the built-in sample image (a
tabby cat), or on the images listed in ``--labels``.

Every input is checked (it exists and is a readable image) before the model is loaded, and all the
bad ones are reported together. Errors in what the user typed (unknown model, missing file, unknown
class) print one line and exit with status 2; ``--traceback`` (before or after ``identify``) shows
the full traceback instead. Warnings (e.g. a tiny image that is upscaled a lot) print as one line.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

DEFAULT_MODEL = "vit_tiny_patch16_224"
DEFAULT_OUT = "vit-lens-identify.html"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class UsageError(Exception):
    """A problem with the command line (reported without a traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error (unknown option, invalid choice) is a :class:`UsageError`:
    one line and status 2 from :func:`main`, not argparse's usage block and ``SystemExit``."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _version() -> str:
    from vit_lens import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vit-lens",
        description="Mechanistic interpretability of Vision Transformers in class embedding space.",
    )
    p.add_argument("--version", action="version", version=f"vit-lens {_version()}")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    idp = sub.add_parser(
        "identify",
        help="class identifiability of every layer and token on images",
        description=(
            "Project every block's output tokens onto the class embedding space (Vilas et al., 2023) and "
            "report, per layer, how identifiable the target class is: r = 1 - rank/n_classes (1 = top-1) for "
            "the [CLS] token and the image tokens, the share of image tokens whose target class is top-1, and "
            "the share of images with at least one such token."
        ),
    )
    # also accepted after the subcommand; SUPPRESS keeps the top-level value when it is not given here
    idp.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                     help="show full tracebacks on errors")
    idp.add_argument("images", nargs="*", metavar="IMAGE",
                     help="image files or folders (a folder: every image file under it, recursively, sorted); "
                          "default: the images of --labels, else the built-in sample image 'chelsea', a tabby cat")
    idp.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"timm model name, optionally with a pretrained tag (default {DEFAULT_MODEL})")
    idp.add_argument("--checkpoint", metavar="PATH",
                     help="local weights file in timm's layout (default: $VIT_LENS_CHECKPOINTS/<name>.safetensors, else the hub)")
    idp.add_argument("--label", metavar="CLASS",
                     help="target class for every image: a class name ('tabby cat'), index or WordNet id "
                          "(default: each image's top-1 prediction)")
    idp.add_argument("--labels", metavar="LABELS.csv",
                     help="per-image target classes from a CSV with columns path,class_index (further columns "
                          "ignored; paths relative to the CSV's folder); its images are used when no IMAGE is "
                          "given, and every IMAGE given must be listed in it")
    idp.add_argument("--out", metavar="FILE.html|FILE.png", default=DEFAULT_OUT,
                     help=f"where to write the report (default {DEFAULT_OUT}; '-' for none): identifiability per "
                          "block ([CLS] and image tokens, mean r and top-1 share, chance lines, the random twin with "
                          "--baseline), the last block's token map over the first image and its top-k classes per "
                          "block; .html is one interactive page, .png a static picture of the same (needs kaleido "
                          "and a Chromium)")
    idp.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                     help="for an .html report: 'inline' writes plotly.js into the file, which then works offline "
                          "(default; about 5 MB); 'cdn' writes a small file that loads plotly.js from the internet")
    idp.add_argument("--mode", choices=("paper", "dla"), default="paper",
                     help="projection: 'paper' (each token through the final norm with its own statistics and the "
                          "classifier; default) or 'dla' (frozen final-norm scale, no bias)")
    idp.add_argument("--preprocess", choices=("timm", "paper"), default="timm",
                     help="'timm': the model's own timm eval transform (resize, center crop, normalise; default, "
                          "as everywhere in vit_lens); 'paper': resize to the input size without cropping, as "
                          "Vilas et al.")
    idp.add_argument("--baseline", action="store_true",
                     help="also run a randomly initialised twin of the model (seed 0) on the same images, as a baseline")
    idp.add_argument("--top-k", type=int, default=5, help="top classes to print per image (default 5)")
    idp.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    idp.add_argument("--device", default=None, help="torch device (default cpu)")
    add_run_parsers(sub)
    return p


def _sample_image() -> Path:
    try:
        from vit_lens.samples import sample_image_path

        return sample_image_path("chelsea")
    except (ImportError, KeyError, FileNotFoundError):
        fallback = Path(__file__).resolve().parents[2] / "shared" / "images" / "photos" / "chelsea.png"
        if fallback.is_file():
            return fallback
        raise UsageError("no image given and the built-in sample image is missing; pass IMAGE paths") from None


def _expand_inputs(images: Sequence[str]) -> Tuple[List[Path], List[str]]:
    """IMAGE arguments -> (paths, problems). A folder gives every image file under it (sorted); one
    line per folder says how many were found. A folder without images is a problem."""
    paths: List[Path] = []
    problems: List[str] = []
    for s in images:
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"folder {s!r} has no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
            else:
                print(f"{s}: {len(found)} image{'s' * (len(found) != 1)} found", file=sys.stderr)
            paths += found
        else:
            paths.append(p)
    return paths, problems


def _image_problem(p: Path) -> Optional[str]:
    """Why ``p`` cannot be used as an image (None when it can): missing, unreadable, not an image."""
    if not p.exists():
        return f"no image file at {str(p)!r}"
    if not p.is_file():
        return f"{str(p)!r} is not a file"
    try:
        from PIL import Image

        with Image.open(p) as im:
            im.load()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        return f"{str(p)!r} is not a readable image ({type(e).__name__}: {e})"
    return None


def _check_images(paths: Sequence[Path], problems: Sequence[str] = ()) -> List[Path]:
    """Refuse, all at once, every path that is not a readable image (before any model is loaded)."""
    bad = list(problems) + [m for m in (_image_problem(p) for p in paths) if m is not None]
    if bad:
        if len(bad) == 1:
            raise UsageError(bad[0])
        raise UsageError(f"{len(bad)} inputs cannot be used:\n  " + "\n  ".join(bad))
    return list(paths)


def _read_labels(csv_path: str) -> Dict[Path, int]:
    """``--labels``: resolved image path -> class index, in the CSV's order."""
    f = Path(csv_path).expanduser()
    if not f.is_file():
        raise UsageError(f"--labels: no CSV file at {csv_path!r}")
    try:
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            if "path" not in cols or "class_index" not in cols:
                raise UsageError(f"--labels: {csv_path} needs the columns path,class_index (it has: {', '.join(cols) or 'none'})")
            out: Dict[Path, int] = {}
            for n, row in enumerate(reader, start=2):
                try:
                    c = int(row["class_index"])
                except (TypeError, ValueError):
                    raise UsageError(f"--labels: {csv_path} line {n}: class_index {row['class_index']!r} is not an integer") from None
                if not row["path"]:
                    raise UsageError(f"--labels: {csv_path} line {n}: empty path")
                out[(f.parent / row["path"]).expanduser().resolve()] = c
    except UnicodeDecodeError:
        raise UsageError(f"--labels: {csv_path} is not a text CSV file") from None
    if not out:
        raise UsageError(f"--labels: {csv_path} lists no images")
    return out


def _inputs(args: argparse.Namespace) -> Tuple[List[Path], Optional[List[int]]]:
    """The images to run and, with ``--labels``, their class indices. Checked before the model loads."""
    if args.label is not None and args.labels is not None:
        raise UsageError("give either --label (one class for every image) or --labels (a CSV of per-image classes), not both")
    labels = _read_labels(args.labels) if args.labels is not None else None
    if args.images:
        paths, problems = _expand_inputs(args.images)
    elif labels is not None:
        paths, problems = list(labels), []
    else:
        return [_sample_image()], None
    paths = _check_images(paths, problems)
    if labels is None:
        return paths, None
    missing = [p for p in paths if p.resolve() not in labels]
    if missing:
        shown = ", ".join(str(p) for p in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UsageError(f"--labels: {len(missing)} image{'s' * (len(missing) > 1)} not listed in {args.labels}: "
                         f"{shown}; add them to the CSV or leave them out")
    return paths, [labels[p.resolve()] for p in paths]


def _load_model(name: str, checkpoint: Optional[str], device: Optional[str]):
    from vit_lens.model import HookedViT

    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise UsageError(f"no checkpoint file at {checkpoint!r}")
    try:
        return HookedViT.from_pretrained(name, checkpoint_path=checkpoint, device=device)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:  # unknown / unsupported / offline
        raise UsageError(f"cannot load model {name!r}: {e}") from e


def _fmt_table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def identify_command(args: argparse.Namespace) -> int:
    import torch

    from vit_lens import class_space as cs

    if args.top_k < 1 or args.batch_size < 1:
        raise UsageError("--top-k and --batch-size must be positive")
    _check_out(args)
    paths, per_image = _inputs(args)  # every input checked before the (slow) model load
    model = _load_model(args.model, args.checkpoint, args.device)
    if model.unembed is None:
        raise UsageError(f"{model.cfg.model_name} is headless (no classifier), so it has no class space to analyse")
    target: Any = "pred"
    if args.label is not None:
        try:
            target = model.class_index(args.label)
        except (KeyError, IndexError, TypeError) as e:
            raise UsageError(f"--label: {e.args[0] if e.args else e}") from None
    elif per_image is not None:
        n = model.cfg.n_classes
        bad = sorted({c for c in per_image if not 0 <= c < n})
        if bad:
            raise UsageError(f"--labels: class_index {', '.join(map(str, bad[:10]))} out of range for "
                             f"{model.cfg.model_name}'s {n} classes (valid: 0..{n - 1})")
        target = torch.tensor(per_image, dtype=torch.long)
    names = model.class_names or [f"class {i}" for i in range(model.cfg.n_classes)]

    try:
        result, logits = cs.identify(model, [str(p) for p in paths], target, mode=args.mode,
                                     preprocess=args.preprocess, batch_size=args.batch_size, progress=True)
    except (OSError, ValueError) as e:  # unreadable image files
        raise UsageError(str(e)) from e

    base = None
    if args.baseline:
        twin = cs.random_twin(model, seed=0)
        base, _ = cs.identify(twin, [str(p) for p in paths], result.target, mode=args.mode,
                              preprocess=args.preprocess, batch_size=args.batch_size, progress=True)

    cfg = model.cfg
    print(f"model: {cfg.model_name} ({cfg.n_layers} blocks, {cfg.n_classes} classes, "
          f"{cfg.n_prefix_tokens} prefix + {cfg.n_patches} image tokens); projection mode: {args.mode}; "
          f"preprocessing: {args.preprocess}")
    probs = logits.softmax(-1)
    k = min(args.top_k, cfg.n_classes)
    top = probs.topk(k, dim=-1)
    for i, p in enumerate(paths):
        t = int(result.target[i])
        rank = int(cs.class_rank(logits[i], torch.tensor(t)))
        print(f"\n[{i + 1}] {p}")
        for j in range(k):
            c = int(top.indices[i, j])
            print(f"    {j + 1}. {names[c]}  (class {c}, p={float(top.values[i, j]):.3f})")
        how = "--label" if args.label is not None else "--labels" if per_image is not None else "top-1 prediction"
        print(f"    target ({how}): {names[t]} (class {t}), rank {rank} in the model's output")

    n_img = len(paths)
    has_cls = cfg.n_prefix_tokens > 0 and cfg.has_class_token
    rows, header = [], ["layer"]
    if has_cls:
        header += ["CLS r", "CLS top-1"]
    header += ["image r", "image top-1", "images w/ top-1 token"]
    if base is not None:
        header += ["random: CLS r"] if has_cls else []
        header += ["random: image r", "random: image top-1"]
    cls_r, cls_t = (result.mean_r("cls"), result.rate("cls")) if has_cls else (None, None)
    cls_r, cls_t = cast(Any, cls_r), cast(Any, cls_t)  # None only without a [CLS] (has_cls False)
    img_r, img_t, img_any = result.mean_r("image"), result.rate("image"), result.image_share("image")
    for li, layer in enumerate(result.layers):
        row = [str(layer)]
        if has_cls:
            row += [f"{float(cls_r[li]):.3f}", f"{float(cls_t[li]):.0%}"]
        row += [f"{float(img_r[li]):.3f}", f"{float(img_t[li]):.1%}", f"{float(img_any[li]):.0%}"]
        if base is not None:
            row += [f"{float(base.mean_r('cls')[li]):.3f}"] if has_cls else []
            row += [f"{float(base.mean_r('image')[li]):.3f}", f"{float(base.rate('image')[li]):.1%}"]
        rows.append(row)
    print(f"\nClass identifiability of the target per block output (r = 1 - rank/{cfg.n_classes}, 1 = top-1; "
          f"top-1 = share of tokens whose target class is the top-1 class; {n_img} image{'s' * (n_img > 1)}):")
    print(_fmt_table(rows, header))

    if args.out and args.out != "-":
        path = _write_figure(model, result, args, has_cls, paths, base)
        print(f"\nwrote {path}")
    return 0


def _check_out(args: argparse.Namespace) -> None:
    """``--out``: an .html page or a .png picture; a .png needs static export (checked up front)."""
    if not args.out or args.out == "-":
        return
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise UsageError(f"--out {args.out}: write the report as FILE.html (interactive) or FILE.png (static), "
                         "or '-' for none")
    if suffix == ".png":
        from vit_lens import plot

        problem = plot.static_export_problem()
        if problem is not None:
            raise UsageError(f"--out {args.out}: {problem}; or write FILE.html instead")


def _write_figure(model, result, args, has_cls: bool, paths, base=None) -> Path:
    """The report: identifiability per block (mean r and top-1 share; [CLS] and image tokens; chance
    lines; random twin dashed), the last block's token map over the first image and its top-k classes
    per block ([CLS], or the mean over image tokens without one), as one HTML page or one PNG."""
    import torch

    from vit_lens import class_space as cs
    from vit_lens import plot

    cfg = model.cfg
    x = model.preprocess([str(paths[0])], mode=args.preprocess)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=cs.hook_names(model, "resid_post"))
    if has_cls:
        lens, label = cs.logit_lens(model, cache, mode=args.mode, positions=0)[:, 0, 0], "[CLS]"
    else:
        scores = cs.logit_lens(model, cache, mode=args.mode)[:, 0, cfg.n_prefix_tokens:]
        lens, label = scores.mean(1), "image tokens' mean"
    figs = plot.identify_report(result, base, image=x[0], lens=lens, lens_label=label, index=0,
                                class_names=model.class_names, mean=model.data_config["mean"],
                                std=model.data_config["std"], k=min(args.top_k, cfg.n_classes),
                                image_name=Path(paths[0]).name)
    n = len(paths)
    notes = [f"model: {cfg.model_name} ({cfg.n_layers} blocks, {cfg.n_classes} classes, {cfg.n_prefix_tokens} prefix + "
             f"{cfg.n_patches} image tokens); projection: {args.mode}; preprocessing: {args.preprocess}; "
             f"{n} image{'s' * (n != 1)}" + ("; dashed: a random-weights twin (seed 0)" if base is not None else ""),
             f"token map and top-k table: {paths[0]}"]
    try:
        return plot.save_report(figs, args.out, title=f"vit-lens identify: {cfg.model_name}", notes=notes,
                                plotlyjs=args.plotlyjs)
    except FileNotFoundError as e:  # no browser for a .png (after the check, e.g. removed meanwhile)
        raise UsageError(f"--out {args.out}: {e}") from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command: ``vit-lens: warning: <message>`` on one line."""
    text = " ".join(str(message).split())
    print(f"vit-lens: warning: {text}", file=sys.stderr if file is None else file)


KEEP_FREED_MEMORY_ENV = "VIT_LENS_KEEP_FREED_MEMORY"


def console_main() -> int:
    """The ``vit-lens`` console script and ``python -m vit_lens``: :func:`main` in a process that keeps
    the memory it frees (:func:`vit_lens.perf.keep_freed_memory`), so that the caches of batch after
    batch reuse resident pages instead of page-faulting fresh ones (results are bit-identical; a
    command is one job, and the memory goes back at exit). ``VIT_LENS_KEEP_FREED_MEMORY=0`` turns it off."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip() != "0":
        from vit_lens.perf import keep_freed_memory

        keep_freed_memory()
    return main()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``vit-lens`` command (without the allocator setting of :func:`console_main`, so it can be
    called inside another program). Returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"vit-lens: error: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.traceback or bool(os.environ.get("VIT_LENS_TRACEBACK"))
    try:
        if args.command == "identify":
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return identify_command(args)
        if args.command in RUN_COMMANDS:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return RUN_COMMANDS[args.command](args)
        parser.error(f"unknown command {args.command!r}")
    except UsageError as e:
        if debug:
            raise
        print(f"vit-lens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vit-lens: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, and how to see more
        if debug:
            raise
        print(f"vit-lens: error: {type(e).__name__}: {e} (run with --traceback for details)", file=sys.stderr)
        return 1
    return 0



# =============================================================================================
# vit-lens run / vit-lens summarize (dataset-scale runs, vit_lens.runs and vit_lens.results)
# =============================================================================================
#: analysis option -> (flag, argparse keywords); each analysis takes the options it declares
RUN_OPTION_FLAGS: Dict[str, Tuple[str, dict]] = {
    "mode": ("--mode", dict(choices=("paper", "dla"), help="projection mode (identifiability, logit-lens, knockout; default paper)")),
    "top_k": ("--top-k", dict(type=int, help="logit-lens: classes per block (default 5)")),
    "by": ("--by", dict(choices=("component", "layer", "head", "neuron"), help="dla: granularity (default component)")),
    "edges": ("--edges", dict(nargs="+", help="knockout: edge sets (default self_only no_cls)")),
    "modes": ("--modes", dict(nargs="+", choices=("mask", "paper", "zero_edges"), help="knockout: modes (default mask paper)")),
    "box": ("--box", dict(nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                          help="context-ablation: the class tokens' box in model-input pixels")),
    "segmentations": ("--segmentations", dict(metavar="FOLDER", help="context-ablation: segmentation PNGs parallel to the "
                                              "images (ImageNet-S style: class id = R + 256 G; 0 and 1000 = no object)")),
    "context_method": ("--context-method", dict(choices=("remove", "attention"), help="context-ablation: how tokens are removed")),
    "sweep": ("--sweep", dict(choices=("positions", "heads"), help="patching: layer x position or layer x head (default positions)")),
    "hook": ("--hook", dict(help="patching: the hook to patch (default resid_pre; attn.hook_z for heads)")),
    "layers": ("--layers", dict(type=int, nargs="+", help="patching: blocks to sweep (default all)")),
    "corruption": ("--corruption", dict(choices=("other", "noise", "blur", "gray"),
                                        help="patching: the corrupted run: a seeded image of another class in the set "
                                             "(other, default), noise, blur or gray")),
    "seed": ("--seed", dict(type=int, help="patching: seed of the pairing and the noise (default 0)")),
    "method": ("--method", dict(help="patching: passed to the sweep as method= (default: the sweep's own, exact)")),
    "memory_mb": ("--memory-mb", dict(type=float, help="patching: memory budget of a chunk of patched runs")),
}


#: the built-in analyses of ``vit-lens run`` (vit_lens.runs.ANALYSES; one registered later is accepted too)
RUN_ANALYSES = ("identifiability", "logit-lens", "dla", "knockout", "context-ablation", "patching")


def add_run_parsers(sub) -> None:
    """The ``run`` and ``summarize`` subcommands."""
    rp = sub.add_parser(
        "run", help="run an analysis over a dataset: Parquet shards + manifest, resumable, torchrun-ready",
        description=("Run ANALYSIS over every image of --data, in fixed chunks of images, one Parquet shard per chunk "
                     "in OUT/shards plus OUT/manifest.json. Rerunning the same command resumes (finished chunks are "
                     "skipped; another configuration is refused). Under 'torchrun --nproc_per_node=N -m vit_lens run ...' "
                     "the chunks are shared between the processes."),
    )
    rp.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    rp.add_argument("analysis", metavar="ANALYSIS", help=f"one of {', '.join(RUN_ANALYSES)}")
    rp.add_argument("--model", default=DEFAULT_MODEL,
                    help="timm model name (optionally .tag), or a file written by HookedViT.save")
    rp.add_argument("--checkpoint", metavar="PATH", help="local weights file in timm's layout")
    rp.add_argument("--random-weights", action="store_true",
                    help="the architecture with random weights (seed 0), e.g. for throughput measurements")
    rp.add_argument("--data", required=True, metavar="SRC",
                    help="a folder (ImageFolder tree or flat), a labels CSV (path,class_index,...) or hf:PATH[:split]")
    rp.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed if it holds this run)")
    rp.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    rp.add_argument("--chunk-size", type=int, default=256, help="images per chunk / shard (default 256)")
    rp.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    rp.add_argument("--device", default=None, help="torch device (default cpu; under torchrun 'cuda' means this rank's GPU)")
    rp.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    rp.add_argument("--limit", type=int, default=None, help="only the first N images of --data")
    rp.add_argument("--preprocess", choices=("timm", "paper"), default="timm",
                    help="'timm': the model's own eval transform (default); 'paper': resize without crop")
    rp.add_argument("--target", choices=("auto", "label", "pred"), default="auto",
                    help="target class: the image's label, the model's top-1 (pred), or auto (label when labelled)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    for dest, (flag, kw) in RUN_OPTION_FLAGS.items():
        rp.add_argument(flag, dest=f"opt_{dest}", default=None, **kw)

    sp = sub.add_parser("summarize", help="aggregate tables and figures of a 'vit-lens run' folder",
                        description="Print the paper-style aggregate tables of a run and write their figures.")
    sp.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    sp.add_argument("dir", metavar="DIR", help="the --out folder of a 'vit-lens run'")
    sp.add_argument("--figures", metavar="FOLDER", default=None,
                    help="where to write the HTML figures (default DIR/figures; '-' for none)")


def _run_model(args: argparse.Namespace):
    import torch

    from vit_lens.model import HookedViT

    dtype = getattr(torch, args.dtype)
    device = args.device
    if device and device.startswith("cuda") and ":" not in device and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    spec = Path(args.model).expanduser()
    if spec.suffix == ".safetensors" and spec.is_file():
        if args.checkpoint or args.random_weights:
            raise UsageError("--model FILE.safetensors is a saved HookedViT; --checkpoint / --random-weights do not apply")
        return HookedViT.load(spec, device=device, dtype=dtype)
    if args.random_weights:
        if args.checkpoint:
            raise UsageError("give --checkpoint or --random-weights, not both")
        import timm

        torch.manual_seed(0)
        try:
            m = timm.create_model(args.model, pretrained=False).eval()
        except Exception as e:
            raise UsageError(f"cannot build model {args.model!r}: {e}") from e
        return HookedViT.from_timm(m).to(device=device or "cpu", dtype=dtype)
    model = _load_model(args.model, args.checkpoint, device)
    return model.to(dtype=dtype) if dtype != torch.float32 else model


def run_command(args: argparse.Namespace) -> int:
    from vit_lens.core.errors import VitLensError
    from vit_lens.runs import get_analysis, open_source, run

    try:
        spec = get_analysis(args.analysis)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    given = {dest: getattr(args, f"opt_{dest}") for dest in RUN_OPTION_FLAGS if getattr(args, f"opt_{dest}") is not None}
    wrong = [RUN_OPTION_FLAGS[d][0] for d in given if d not in spec.options]
    if wrong:
        takes = ", ".join(RUN_OPTION_FLAGS[d][0] for d in spec.options if d in RUN_OPTION_FLAGS) or "none"
        raise UsageError(f"{', '.join(wrong)} do{'es' * (len(wrong) == 1)} not apply to {args.analysis} "
                         f"(its options: {takes})")
    try:
        if args.data.startswith("hf:") is False and not Path(args.data).expanduser().exists():
            raise UsageError(f"--data: no file or folder at {args.data!r}; give a folder of images, a labels CSV or hf:PATH")
        model = _run_model(args)
        source = open_source(args.data, model)
        target = args.target
        if target == "auto":
            target = "label" if source.labels is not None and all(l >= 0 for l in source.labels) else "pred"
        report = run(args.analysis, model, source, args.out, options=given, batch_size=args.batch_size,
                     workers=args.workers, preprocess=args.preprocess, limit=args.limit, chunk_size=args.chunk_size,
                     target=target, model_spec=args.model, progress=not args.no_progress)
    except VitLensError as e:
        raise UsageError(str(e.args[0]) if e.args else str(e)) from e
    return 0 if report.complete else 1


def summarize_command(args: argparse.Namespace) -> int:
    from vit_lens import results
    from vit_lens.core.errors import VitLensError

    try:
        tables = results.summarize(args.dir)
        m = results.manifest(args.dir)
    except VitLensError as e:
        raise UsageError(str(e.args[0]) if e.args else str(e)) from e
    n_chunks, done = len(m["chunks"]), len(m.get("done", []))
    print(f"{m['analysis']} of {m['model']} ({m['config']['preprocess']} preprocessing, target {m['config']['target']}); "
          f"{done} of {n_chunks} chunks done")
    print(results.format_tables(tables))
    fails = results.failures(args.dir)
    if len(fails):
        print(f"\n{len(fails)} unreadable image(s) skipped (listed in {Path(args.dir) / 'failures.csv'})")
    if args.figures != "-":
        for p in results.write_figures(args.dir, tables, args.figures):
            print(f"wrote {p}")
    return 0


RUN_COMMANDS = {"run": run_command, "summarize": summarize_command}


if __name__ == "__main__":
    sys.exit(main())
