"""A resumable layer x position activation-patching sweep over a folder of images.

    python benchmarks/patching_sweep.py IMAGES_DIR --out OUT_DIR [--model vit_tiny_patch16_224]
        [--checkpoint PATH] [--hook resid_pre] [--corruption blur|noise|gray] [--layers 0 5 11]
        [--limit N] [--memory-mb 512]

For every image (clean) a corrupted copy is made (``blur``: a strong Gaussian blur, ``noise``:
Gaussian noise seeded by the file name, ``gray``: the all-zero normalised image), the metric is the
logit of the clean image's top-1 class, and :func:`vit_lens.patching.patch_positions_sweep`
patches ``blocks.{l}.hook_<hook>`` of every layer at every position (prefix tokens included).

Results are written incrementally so that an interrupted sweep resumes where it stopped with
nothing lost or repeated:

* ``OUT_DIR/results/<image key>.pt`` -- one file per image (values, normalised values, baselines,
  labels), written to a temporary file and atomically renamed: a result file exists only when it is
  complete, and it is the record that the image is done;
* ``OUT_DIR/manifest.json`` -- the sweep's configuration and the list of finished images (rewritten
  atomically after every image); a rerun with another configuration refuses to mix results;
* ``OUT_DIR/sweep.parquet`` -- every finished image's results as one tidy table (one row per image x
  layer x position: ``key, image, target, layer, pos, token, row, col, value, normalized, clean,
  corrupted``), rewritten at the end of every run; ``pandas.read_parquet`` reads it (the ``.pt``
  records need :func:`load_results` and this script);
* ``OUT_DIR/failures.csv`` -- images that could not be read (``path, key, error``); they are skipped,
  reported, and tried again by the next run (an image that then works leaves the file);
* ``OUT_DIR/sweep.html`` -- a plotly figure of the mean normalised effect (layer x position, and
  the patch grid of every layer), rewritten at the end of every run.

With ``--limit N`` at most N new images are processed in this run (the others stay for the next).
Ctrl-C stops after the image in progress is dropped (finished images stay); rerunning the same
command resumes. Temporary files carry the writing process's id, so those left by a killed run
(``kill -9``) are removed by the next run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from vit_lens.core.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
FORMAT = 1
TMP_SUFFIX = ".tmp"


class SweepError(InputError):
    """A problem with the command line or the output folder, reported in one line (no traceback)."""


class ConfigMismatchError(SweepError):
    """The output folder holds a sweep made with other options."""


def find_images(folder: os.PathLike) -> List[Path]:
    """Image files under ``folder`` (recursively), in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "does not exist"
        raise SweepError(f"{str(folder)!r} {what}; give the folder of images to sweep")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SweepError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(folder)!r}; give the folder of images to sweep")
    return files


def image_key(path: Path, root: Path) -> str:
    """A file-name-safe key that is unique per image (its path relative to the folder)."""
    rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "__".join(rel.parts))


def corrupt(clean: torch.Tensor, kind: str, key: str) -> torch.Tensor:
    """A deterministic corrupted copy of a normalised batch ``[1, C, H, W]``."""
    if kind == "gray":
        return torch.zeros_like(clean)
    if kind == "noise":
        seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little") % (2**31)
        g = torch.Generator().manual_seed(seed)
        return clean + torch.randn(clean.shape, generator=g).to(clean) * 1.0
    if kind == "blur":
        F = torch.nn.functional
        H, W = clean.shape[-2:]
        sigma = max(H, W) / 16
        r = max(1, min(int(3 * sigma), H - 1, W - 1))
        t = torch.arange(-r, r + 1, dtype=clean.dtype, device=clean.device)
        k = torch.exp(-(t**2) / (2 * sigma**2))
        k = k / k.sum()
        C = clean.shape[1]
        x = F.pad(clean, (r, r, r, r), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1).contiguous(), groups=C)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1).contiguous(), groups=C)
    raise ValueError(f"unknown corruption {kind!r}; use 'blur', 'noise' or 'gray'")


def _tmp_name(path: Path) -> Path:
    """``.<name>.<pid>.<random>.tmp`` beside ``path``: the pid says whether its writer still runs."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its files
    return True


def remove_stale_temp_files(folder: os.PathLike) -> List[Path]:
    """Delete the hidden temporary files that killed runs left in ``folder`` (and ``folder/results``):
    those whose writer process is gone, and those of the old naming without a pid. Returns them."""
    removed = []
    for d in (Path(folder), Path(folder) / "results"):
        if not d.is_dir():
            continue
        for f in d.glob(f".*{TMP_SUFFIX}"):
            m = re.fullmatch(rf"\..+\.(\d+)\.[0-9a-f]{{8}}{re.escape(TMP_SUFFIX)}", f.name)
            if m is not None and (int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1)))):
                continue  # this run's own, or a concurrent run's that is still writing it
            try:
                f.unlink()
                removed.append(f)
            except FileNotFoundError:
                pass
    return removed


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``: the file is
    either the old one or the complete new one, never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _done(results_dir: Path) -> Dict[str, Path]:
    return {p.stem: p for p in results_dir.glob("*.pt")} if results_dir.is_dir() else {}


FAILURE_COLUMNS = ("path", "key", "error")


def read_failures(out_dir: os.PathLike) -> Dict[str, Dict[str, str]]:
    """``failures.csv`` as key -> {path, key, error} (empty when there is none)."""
    f = Path(out_dir) / "failures.csv"
    if not f.is_file():
        return {}
    with open(f, newline="") as fh:
        return {r["key"]: r for r in csv.DictReader(fh)}


def _write_failures(out_dir: Path, failures: Dict[str, Dict[str, str]]) -> None:
    f = out_dir / "failures.csv"
    if not failures:
        if f.exists():
            f.unlink()
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
    w.writeheader()
    for k in sorted(failures):
        w.writerow({c: failures[k][c] for c in FAILURE_COLUMNS})
    _atomic_write_bytes(f, lambda fh: fh.write(buf.getvalue().encode()))


def _config_diff(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


def run_sweep(
    model: Any,
    images: Sequence[os.PathLike],
    out_dir: os.PathLike,
    *,
    root: Optional[os.PathLike] = None,
    hook: str = "resid_pre",
    corruption: str = "blur",
    layers: Optional[Sequence[int]] = None,
    preprocess: str = "timm",
    memory_mb: float = 512,
    limit: Optional[int] = None,
    on_done: Optional[Callable[[str, Dict[str, Any]], None]] = None,
    progress: bool = True,
    figure: bool = True,
) -> Dict[str, Any]:
    """Sweep every image not done yet; returns the manifest.

    Args:
        model: a :class:`~vit_lens.HookedViT`.
        images: image files; ``root`` (default their common folder) makes the result keys.
        out_dir: where results, manifest and figure go (created; an existing one is resumed).
        hook, layers, memory_mb: passed to :func:`~vit_lens.patching.patch_positions_sweep`.
        corruption: ``"blur"``, ``"noise"`` or ``"gray"``.
        preprocess: ``"timm"`` or ``"paper"`` (see ``model.preprocess``).
        limit: process at most this many new images in this call.
        on_done: called as ``on_done(key, record)`` after each image's result is safely written
            (a place to stop a run: an exception raised there interrupts the sweep after that image).
        progress: tqdm bars.
        figure: write ``sweep.html`` at the end.

    An image that cannot be read or preprocessed is skipped: it is reported on stderr, listed in
    ``failures.csv`` (path, key, error) and tried again by the next run. ``sweep.parquet`` (the
    tidy table of all finished images) is rewritten at the end of every run that is not
    interrupted by Ctrl-C (:func:`write_table` rebuilds it at any time).

    Raises:
        ConfigMismatchError: ``out_dir`` holds a sweep made with another configuration.
        KeyboardInterrupt: Ctrl-C; finished images stay, the image in progress is dropped.
    """
    from tqdm.auto import tqdm

    from vit_lens.patching import logit_metric, patch_positions_sweep

    paths = [Path(p) for p in images]
    root = Path(root) if root is not None else Path(os.path.commonpath([str(p.parent) for p in paths]))
    out = Path(out_dir)
    results_dir = out / "results"
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {str(out)!r} is a file; give a folder (it is created if missing)")
    results_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    config = dict(
        format=FORMAT, model=model.cfg.model_name, n_layers=model.cfg.n_layers, n_ctx=model.cfg.n_ctx,
        hook=hook, corruption=corruption, preprocess=preprocess,
        layers=None if layers is None else [int(l) for l in layers], metric="logit of the clean top-1 class",
    )
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("config") != config:
            raise ConfigMismatchError(
                f"{out} holds a sweep with another configuration ({_config_diff(old.get('config') or {}, config)}); "
                "rerun with that folder's options to resume it, or use another --out folder (or delete that one) "
                "to start a new sweep"
            )
    keys = {image_key(p, root): p for p in paths}
    if len(keys) != len(paths):
        raise ValueError("two images map to the same result key; give them distinct relative paths")
    done = _done(results_dir)
    todo = [k for k in keys if k not in done]
    if limit is not None:
        todo = todo[: max(0, int(limit))]

    failures = read_failures(out)

    def write_manifest() -> Dict[str, Any]:
        finished = sorted(_done(results_dir))
        m = dict(config=config, done=finished, n_done=len(finished), failed=sorted(failures),
                 n_failed=len(failures), updated=time.strftime("%Y-%m-%d %H:%M:%S"))
        _atomic_write_json(manifest_path, m)
        return m

    manifest = write_manifest()
    interrupted = False
    try:
        with tqdm(todo, disable=not progress, desc="images", unit="image") as bar:  # closed on Ctrl-C too
            for key in bar:
                path = keys[key]
                try:
                    clean = model.preprocess([str(path)], mode=preprocess)
                except Exception as e:  # an unreadable / corrupt image: skip it, record it, go on
                    msg = " ".join(f"{type(e).__name__}: {e}".split())
                    failures[key] = dict(path=str(path), key=key, error=msg)
                    _write_failures(out, failures)
                    manifest = write_manifest()
                    (bar.write if progress else lambda t: print(t, file=sys.stderr))(
                        f"skipped {path}: {msg} (listed in {out / 'failures.csv'})")
                    continue
                corrupted = corrupt(clean, corruption, key)
                with torch.inference_mode():
                    target = int(model(clean).argmax(-1)[0])
                res = patch_positions_sweep(
                    model, clean, corrupted, logit_metric(target), hook=hook, layers=layers,
                    memory_mb=memory_mb, progress=progress,
                )
                with torch.no_grad():
                    norm = res.normalized() if float(res.clean[0] - res.corrupted[0]) != 0 else torch.full_like(res.values, float("nan"))
                record = dict(
                    key=key, image=str(path), target=target, values=res.values[..., 0].clone(),
                    normalized=norm[..., 0].clone(), clean=float(res.clean[0]), corrupted=float(res.corrupted[0]),
                    layers=list(res.coords["layer"]), positions=res.positions.clone(), labels=list(res.coords["pos"]),
                    hook=res.hook, grid_size=list(res.grid_size), n_prefix_tokens=res.n_prefix_tokens,
                )
                _atomic_write_bytes(results_dir / f"{key}.pt", lambda f: torch.save(record, f))
                if failures.pop(key, None) is not None:  # it failed in an earlier run and works now
                    _write_failures(out, failures)
                manifest = write_manifest()
                if on_done is not None:
                    on_done(key, record)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        manifest = write_manifest()
        if not interrupted and manifest["n_done"]:  # Ctrl-C: leave at once (a rerun rewrites them)
            recs = load_results(out)
            write_table(out, recs)
            if figure:
                write_figure(out, recs)
    return manifest


def load_results(out_dir: os.PathLike) -> List[Dict[str, Any]]:
    """Every finished image's record, in key order."""
    return [torch.load(p, weights_only=False) for _, p in sorted(_done(Path(out_dir) / "results").items())]


def results_table(out_dir: os.PathLike, records: Optional[List[Dict[str, Any]]] = None):
    """Every finished image's results as one tidy ``pandas.DataFrame``, one row per (image, layer,
    position): ``key, image, target, layer, pos, token, row, col, value, normalized, clean,
    corrupted`` (``row``/``col``: the patch's place on the grid, NaN for prefix tokens).
    ``records``: :func:`load_results` of ``out_dir`` when already loaded."""
    import numpy as np
    import pandas as pd

    frames = []
    for r in load_results(out_dir) if records is None else records:
        values, norm = r["values"].numpy(), r["normalized"].numpy()  # [layer, pos]
        n_l, n_p = values.shape
        pos = np.asarray(r["positions"].numpy(), dtype=np.int64)
        cols = r["grid_size"][1]
        patch = pos - r["n_prefix_tokens"]
        is_patch = patch >= 0
        frames.append(pd.DataFrame({
            "key": r["key"], "image": r["image"], "target": r["target"],
            "layer": np.repeat(np.asarray(r["layers"], dtype=np.int64), n_p),
            "pos": np.tile(pos, n_l),
            "token": np.tile(np.asarray([str(t) for t in r["labels"]], dtype=object), n_l),
            "row": np.tile(np.where(is_patch, patch // cols, np.nan), n_l),
            "col": np.tile(np.where(is_patch, patch % cols, np.nan), n_l),
            "value": values.reshape(-1), "normalized": norm.reshape(-1),
            "clean": r["clean"], "corrupted": r["corrupted"],
        }))
    if not frames:
        return pd.DataFrame(columns=["key", "image", "target", "layer", "pos", "token", "row", "col",
                                     "value", "normalized", "clean", "corrupted"])
    return pd.concat(frames, ignore_index=True)


def write_table(out_dir: os.PathLike, records: Optional[List[Dict[str, Any]]] = None) -> Path:
    """``sweep.parquet``: :func:`results_table` of every finished image (written atomically)."""
    path = Path(out_dir) / "sweep.parquet"
    df = results_table(out_dir, records)
    _atomic_write_bytes(path, lambda f: df.to_parquet(f, index=False))
    return path


def write_figure(out_dir: os.PathLike, records: Optional[List[Dict[str, Any]]] = None) -> Path:
    """``sweep.html``: mean normalised patching effect, layer x position and on the patch grid.
    ``records``: :func:`load_results` of ``out_dir`` when already loaded."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from vit_lens.plot import save_html

    recs = load_results(out_dir) if records is None else records
    norm = torch.stack([r["normalized"] for r in recs]).numpy()  # [image, layer, pos]
    with np.errstate(all="ignore"):
        mean = np.nanmean(norm, axis=0)
    r0 = recs[0]
    layers, labels = r0["layers"], r0["labels"]
    rows, cols = r0["grid_size"]
    n_pre = r0["n_prefix_tokens"]
    pos = r0["positions"].numpy()
    n_l = len(layers)
    ncols = min(n_l, 6)
    nrows = 1 + (n_l + ncols - 1) // ncols
    height = 340 + 240 * (nrows - 1)
    fig = make_subplots(
        rows=nrows, cols=ncols,
        specs=[[{"colspan": ncols}] + [None] * (ncols - 1)] + [[{}] * ncols for _ in range(nrows - 1)],
        subplot_titles=["layer x position"] + [f"layer {l}" for l in layers],
        # room under the first row for its rotated position labels, above the next row's titles
        vertical_spacing=min(0.3, 110 / height),
    )
    fig.add_trace(go.Heatmap(z=mean, x=labels, y=[str(l) for l in layers], coloraxis="coloraxis",
                             hovertemplate="layer %{y}, token %{x}: %{z:.3f}<extra></extra>"), row=1, col=1)
    for i, l in enumerate(layers):
        g = np.full(rows * cols, np.nan)
        sel = pos >= n_pre
        g[pos[sel] - n_pre] = mean[i, sel]
        fig.add_trace(go.Heatmap(z=g.reshape(rows, cols), coloraxis="coloraxis",
                                 hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>"),
                      row=2 + i // ncols, col=1 + i % ncols)
        fig.update_yaxes(autorange="reversed", row=2 + i // ncols, col=1 + i % ncols)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(type="category", tickangle=-90, nticks=40, tickfont=dict(size=10), row=1, col=1)
    fig.update_layout(
        title=dict(text=f"{r0['hook'].replace('blocks.{l}.', '')} of each block patching, clean -> corrupted, mean over {len(recs)} images<br>"
                        "(0 = corrupted, 1 = clean; logit of the clean top-1 class)", font=dict(size=15)),
        coloraxis=dict(colorscale="RdBu_r", cmid=0, colorbar=dict(title=dict(text="patching effect", side="right"))),
        height=height, template="plotly_white", margin=dict(t=90),
    )
    return save_html(fig, Path(out_dir) / "sweep.html")


def _say(msg: str) -> None:
    print(f"patching_sweep: {msg}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; returns the exit status (0 done, 2 a usage / folder problem, 130 Ctrl-C)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--checkpoint", default=None, help="local weights file (else $VIT_LENS_CHECKPOINTS or the hub)")
    p.add_argument("--hook", default="resid_pre")
    p.add_argument("--corruption", default="blur", choices=["blur", "noise", "gray"])
    p.add_argument("--layers", type=int, nargs="*", default=None)
    p.add_argument("--preprocess", default="timm", choices=["timm", "paper"])
    p.add_argument("--memory-mb", type=float, default=512)
    p.add_argument("--limit", type=int, default=None, help="process at most N new images in this run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
        m = run_sweep(
            model, files, out, root=args.images, hook=args.hook, corruption=args.corruption, layers=args.layers,
            preprocess=args.preprocess, memory_mb=args.memory_mb, limit=args.limit,
        )
    except KeyboardInterrupt:
        done = len(_done(out / "results")) if files else 0
        _say(f"interrupted after {done} of {len(files)} images; rerun the same command to resume")
        return 130
    except SweepError as e:
        if args.traceback:
            raise
        _say(f"error: {e}")
        return 2
    failed = f"; {m['n_failed']} could not be read (listed in {out / 'failures.csv'})" if m["n_failed"] else ""
    print(f"{m['n_done']} of {len(files)} images done ({time.perf_counter() - t:.1f} s this run){failed}; "
          f"results in {out / 'results'} (table {out / 'sweep.parquet'}), figure {out / 'sweep.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
