"""The run engine: data source -> fixed chunks -> batches (a torch ``DataLoader``) -> analysis rows ->
one Parquet shard per chunk, plus a manifest; resumable, and shared between processes by
``torch.distributed`` (``torchrun``).

Output folder ``OUT``:

* ``OUT/manifest.json``: the configuration (analysis and options, model name, config and a hash of
  its weights, data source and a hash of its items, preprocessing, dtype, target, chunk size),
  its ``config_hash``, the vit_lens version, the chunk plan (``chunks``: index, first and last+1
  image id, shard file) and, after a run that finished, ``done`` / ``n_failed``;
* ``OUT/shards/chunk-000000.parquet`` ...: the rows of each chunk (tidy long form, the columns of
  :data:`~vit_lens.runs.analyses.ROW_COLUMNS`); a shard exists only complete (written to a hidden
  temporary file in the same folder, then renamed), and its existence is the record that the
  chunk is done;
* the images of a chunk that could not be read are listed in its shard's Parquet metadata
  (``failures``: JSON), so shard and list are one atomic file; ``OUT/failures.csv`` lists all of
  them (``image, path, error``) after each run.

Exactly once: a chunk is either done (its shard exists, complete) or not (no shard; at most a
hidden temporary file, removed by the next run). A rerun with the same configuration skips the
done chunks; one with another configuration is refused (:class:`ConfigMismatchError`), so rows of
two configurations never mix. ``kill -9`` at any moment loses at most the chunks in flight.

Many processes: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started (gloo on
CPU, nccl on CUDA), every rank computes the same list of chunks not yet done and takes every
``world_size``-th one (no sample is repeated, unlike ``DistributedSampler``'s padding), rank 0
writes the manifest and shows the progress bar of the whole run. A rank that dies leaves its
chunks to the rerun.

One run per folder: while a run writes to ``OUT`` it holds ``OUT/.lock`` (its process id and host);
a second run on the same folder is refused (:class:`RunLockedError`) instead of redoing the same
chunks. The lock of a process that is gone (``kill -9``) is taken over by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vit_lens.core.errors import InputError
from vit_lens.runs.analyses import ROW_COLUMNS, RunBatch, get_analysis
from vit_lens.runs.sources import DataSource, ImageItems, collate, open_source

__all__ = ["run", "RunReport", "ConfigMismatchError", "RunLockedError", "FORMAT", "STOP_AFTER_ENV", "read_manifest", "shard_dir"]

FORMAT = 1
TMP_SUFFIX = ".tmp"
#: test hook: ``"K"`` or ``"K@RANK"``: the process (of that rank) kills itself with SIGKILL right
#: after writing its K-th chunk in this run
STOP_AFTER_ENV = "VIT_LENS_RUN_STOP_AFTER"


class ConfigMismatchError(InputError):
    """The output folder holds a run made with another configuration."""


class RunLockedError(InputError):
    """Another run is writing to the output folder now."""


@dataclass
class RunReport:
    """What a :func:`run` did.

    Attributes:
        out: the output folder.
        n_chunks: chunks in the plan; ``n_done``: chunks done now (this and earlier runs).
        n_images_run: images read in this run, over all processes (failures included).
        n_failed: unreadable images listed so far (all runs).
        seconds: wall time of this run's chunk loop; ``images_per_s``: ``n_images_run / seconds``.
        world_size: processes.
    """

    out: Path
    n_chunks: int
    n_done: int
    n_images_run: int
    n_failed: int
    seconds: float
    images_per_s: float
    world_size: int = 1

    @property
    def complete(self) -> bool:
        return self.n_done == self.n_chunks


# ---------------------------------------------------------------------------------------- files
def shard_dir(out: os.PathLike) -> Path:
    return Path(out) / "shards"


def _shard_name(k: int) -> str:
    return f"chunk-{k:06d}.parquet"


def _tmp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def _atomic_write(path: Path, data: bytes) -> None:
    """``path`` is either absent / the old file or the complete new one, never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its files
    return True


LOCK_NAME = ".lock"
_HELD_LOCKS: set = set()  # lock files this process holds now (a lock with our pid not in here is stale)


def _acquire_lock(out: Path) -> Path:
    """Take ``out/.lock`` (created whole, with this process' id and host, by a hard link), taking over
    the lock of a process that is gone; :class:`RunLockedError` if a live one holds it. The takeover is
    best effort: two runs started in the same instant after a killed one may both proceed; their rows
    still appear once, since every shard is written whole and replaced atomically."""
    lock = out / LOCK_NAME
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(20):
        tmp = _tmp_name(lock)
        tmp.write_text(me)
        try:
            try:
                os.link(tmp, lock)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: exclusive create (written right after)
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(me)
        except FileExistsError:
            try:
                pid_s, _, host = lock.read_text().strip().partition(" ")
                pid = int(pid_s)
            except (FileNotFoundError, ValueError):
                pid, host = None, ""
                try:  # an empty lock younger than a few seconds is being written (the no-hard-link path)
                    if time.time() - lock.stat().st_mtime < 5:
                        time.sleep(0.5)
                        continue
                except FileNotFoundError:
                    continue
            if pid is not None:
                ours = pid == os.getpid() and host == socket.gethostname()
                if ours and str(lock) in _HELD_LOCKS:
                    raise RunLockedError(f"this process is already running a run into {out}; wait for it to finish "
                                         "or give another --out folder") from None
                if host != socket.gethostname():
                    raise RunLockedError(
                        f"{out} is locked by a run on host {host!r} (process {pid}); wait for it to finish, give "
                        f"another --out folder, or delete {lock} if no run is writing there") from None
                if not ours and _pid_alive(pid):
                    raise RunLockedError(
                        f"another run (process {pid}) is writing to {out} now; wait for it to finish (a rerun then "
                        f"resumes and finishes the run), or give another --out folder. If no run is going, delete {lock}"
                    ) from None
            try:  # a stale lock (its process is gone): take it over
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        finally:
            tmp.unlink(missing_ok=True)
        _HELD_LOCKS.add(str(lock))
        return lock
    raise RunLockedError(f"could not take the lock {lock} (other processes keep taking it); give another --out folder")


def _release_lock(lock: Optional[Path]) -> None:
    if lock is None:
        return
    _HELD_LOCKS.discard(str(lock))
    try:
        if lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n":
            lock.unlink()
    except FileNotFoundError:
        pass


def remove_stale_temp_files(out: os.PathLike) -> List[Path]:
    """Delete the hidden temporary files that killed runs left in ``out`` and ``out/shards``: those
    whose writer process is gone (or of another naming). Those of a live process stay. Returns them."""
    removed = []
    for d in (Path(out), shard_dir(out)):
        if not d.is_dir():
            continue
        for f in d.glob(f".*{TMP_SUFFIX}"):
            m = re.fullmatch(rf"\..+\.(\d+)\.[0-9a-f]{{8}}{re.escape(TMP_SUFFIX)}", f.name)
            if m is not None and int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1))):
                continue  # a live writer's
            try:
                f.unlink()
                removed.append(f)
            except FileNotFoundError:
                pass
    return removed


def shard_failures(path: os.PathLike) -> List[Dict[str, Any]]:
    """The unreadable images of one shard (from its Parquet metadata): ``[{image, path, error}]``."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"failures", b"[]").decode())


def read_manifest(out: os.PathLike) -> Dict[str, Any]:
    """``OUT/manifest.json`` (a :class:`~vit_lens.core.MissingFileError` if there is none)."""
    from vit_lens.core.errors import MissingFileError

    p = Path(out) / "manifest.json"
    if not p.is_file():
        raise MissingFileError(f"no run in {str(out)!r} (no manifest.json); give the --out folder of a 'vit-lens run'")
    return json.loads(p.read_text())


def _schema():
    import pyarrow as pa

    types = dict(image=pa.int64(), path=pa.string(), label=pa.int64(), target=pa.int64(), layer=pa.int64(),
                 group=pa.string(), index=pa.int64(), condition=pa.string(), measure=pa.string(), value=pa.float64())
    return pa.schema([(c, types[c]) for c in ROW_COLUMNS])


def _parquet_bytes(df: Any, meta: Dict[str, str]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema().with_metadata({k.encode(): v.encode() for k, v in meta.items()})
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- config
def weights_sha256(model: Any) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _config_diff(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


def corruption_pairs(source: DataSource, seed: int) -> Dict[int, int]:
    """Each image's corruption partner: a seeded image of another class in the set (by image id,
    so the same in every process and chunking)."""
    labels = source.labels
    if labels is None or any(l < 0 for l in labels):
        raise InputError("corruption 'other' pairs each image with one of another class, so the data needs labels; "
                         "use --corruption noise / blur / gray for unlabelled data")
    n = len(labels)
    if len(set(labels)) < 2:
        raise InputError("corruption 'other' needs images of at least two classes; use --corruption noise / blur / gray")
    out = {}
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        while True:
            j = rng.randrange(n)
            if labels[j] != labels[i]:
                out[i] = j
                break
    return out


# ---------------------------------------------------------------------------------------- processes
def _dist(device: Any = "cpu") -> Tuple[int, int, Any]:
    """(rank, world size, torch.distributed or None); starts the process group under torchrun
    (nccl for a model on CUDA, else gloo; ``VIT_LENS_DIST_BACKEND`` overrides)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        import datetime

        on_cuda = torch.device(device).type == "cuda"
        backend = os.environ.get("VIT_LENS_DIST_BACKEND") or ("nccl" if on_cuda else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device) if torch.device(device).index is not None
                                  else int(os.environ.get("LOCAL_RANK", "0")))
        # ranks wait for each other only at the start and the end: allow for uneven shares of work
        timeout = datetime.timedelta(seconds=float(os.environ.get("VIT_LENS_DIST_TIMEOUT_S", 24 * 3600)))
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), dist


def _barrier(dist: Any) -> None:
    if dist is not None:
        dist.barrier()


def _dist_device(dist: Any) -> str:
    """Where a tensor for a collective call lives: this rank's GPU under nccl, else the CPU."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def _all_ranks_agree(dist: Any, ok: bool) -> bool:
    """Rank 0's ``ok``, on every rank (so that all ranks refuse together rather than some waiting)."""
    if dist is None:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.long, device=_dist_device(dist))
    dist.broadcast(flag, 0)
    return bool(flag.item())


def _stop_after(rank: int) -> Optional[int]:
    v = os.environ.get(STOP_AFTER_ENV)
    if not v:
        return None
    k, _, r = v.partition("@")
    if r and int(r) != rank:
        return None
    return int(k)


# ---------------------------------------------------------------------------------------- the run
def run(
    analysis: str,
    model: Any,
    data: Any,
    out: os.PathLike,
    *,
    options: Optional[Dict[str, Any]] = None,
    batch_size: int = 32,
    workers: int = 0,
    preprocess: str = "timm",
    limit: Optional[int] = None,
    chunk_size: int = 256,
    target: str = "label",
    model_spec: Optional[str] = None,
    retry_failed: bool = False,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> RunReport:
    """Run a registered analysis over a data source, writing Parquet shards and a manifest to ``out``.

    Args:
        analysis: a name in :data:`vit_lens.runs.ANALYSES` (``identifiability``, ``logit-lens``,
            ``dla``, ``knockout``, ``context-ablation``, ``patching``).
        model: a :class:`~vit_lens.HookedViT` (on the device the run uses; under torchrun with CUDA,
            on this rank's GPU).
        data: ``--data`` (a folder, a labels CSV, ``hf:PATH[:split]``) or a :class:`DataSource`.
        out: the output folder (created; an existing run there is resumed).
        options: the analysis' options (names in ``ANALYSES[analysis].options``); others are refused.
        batch_size: images per forward pass; workers: DataLoader worker processes.
        preprocess: ``"timm"`` (the model's own eval transform) or ``"paper"`` (resize, no crop).
        limit: only the first ``limit`` images of the source.
        chunk_size: images per chunk (one shard each); part of the configuration.
        target: ``"label"`` (each image's label; the source must be labelled) or ``"pred"`` (the
            model's own top-1 class).
        model_spec: how the model was named (for the manifest).
        retry_failed: also redo the done chunks that list unreadable images (their shard is
            replaced whole, atomically, so rows stay exactly once).
        progress: a progress bar (rank 0, the whole run).
        log: where one-line messages go (default stderr, rank 0 only).

    Returns:
        a :class:`RunReport` (this process's view; ``n_images_run`` summed over processes).

    Raises:
        ConfigMismatchError: ``out`` holds a run with another configuration.
        InputError / UnknownNameError: unknown analysis or option, a target the data cannot give.
    """
    import pandas as pd

    from vit_lens import __version__
    from vit_lens.core import progress_bar

    rank, world, dist = _dist(model.device)
    say: Callable[[str], None] = (log or (lambda m: print(f"vit-lens run: {m}", file=sys.stderr))) if rank == 0 \
        else (lambda m: None)
    spec = get_analysis(analysis)
    given = dict(options or {})
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        raise InputError(f"analysis {analysis!r} takes no option(s) {unknown}; its options are {sorted(spec.options)}")
    opts = {**spec.options, **{k: v for k, v in given.items() if v is not None}}
    if preprocess not in ("timm", "paper"):
        raise InputError(f"--preprocess must be 'timm' or 'paper', got {preprocess!r}")
    if target not in ("label", "pred"):
        raise InputError(f"--target must be 'label' or 'pred', got {target!r}")
    if int(batch_size) < 1 or int(chunk_size) < 1 or int(workers) < 0:
        raise InputError("--batch-size and --chunk-size must be >= 1 and --workers >= 0")
    model.readout.require_head()
    source = data if isinstance(data, DataSource) else open_source(str(data), model)
    source = source.limited(limit)
    if len(source) == 0:
        raise InputError(f"--data {source.spec} has no images")
    if target == "label" and (source.labels is None or any(l < 0 for l in source.labels)):
        raise InputError(f"--data {source.spec} is not labelled (every image needs a class index); "
                         "use --target pred to analyse each image's top-1 class")
    if source.labels is not None:
        n = model.cfg.n_classes
        bad = sorted({l for l in source.labels if l >= n})
        if bad:
            raise InputError(f"labels {bad[:5]} are out of range for {model.cfg.model_name}'s {n} classes")
    needs = spec.needs(opts)
    if "segmentation" in needs:
        if source.root is None:
            raise InputError("--segmentations needs image files (a folder or CSV source), not a hf: dataset")
        if preprocess != "paper":
            raise InputError("--segmentations masks are in the original image's pixels; the timm transform crops, so "
                             "they would not line up: use --preprocess paper (resize without crop)")
        opts["segmentations"] = str(Path(opts["segmentations"]).expanduser().resolve())
    pairs = corruption_pairs(source, int(opts.get("seed", 0))) if "pair" in needs else None

    dtype = model.dtype
    config = _jsonable(dict(
        format=FORMAT, analysis=analysis, options=opts, target=target, preprocess=preprocess, chunk_size=int(chunk_size),
        limit=limit, dtype=str(dtype).replace("torch.", ""),
        model=dict(name=model.cfg.model_name, cfg=model.cfg.to_dict(), weights_sha256=weights_sha256(model)),
        data=source.fingerprint(),
    ))
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    N = len(source)
    C = int(chunk_size)
    chunks: List[Dict[str, Any]] = [dict(index=k, start=s, stop=min(s + C, N), shard=f"shards/{_shard_name(k)}")
              for k, s in enumerate(range(0, N, C))]
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; give a folder (created if missing)")
    manifest_path = out / "manifest.json"
    if manifest_path.exists():  # every rank checks, so every rank refuses together
        old = json.loads(manifest_path.read_text())
        if old.get("config_hash") != config_hash:
            diff = "; ".join(_config_diff(old.get("config") or {}, config)[:6]) or "format"
            raise ConfigMismatchError(
                f"{out} holds a run with another configuration ({diff}); rerun with that run's options to resume it, "
                "or give another --out folder (or delete that one) to start a new run"
            )
    lock: Optional[Path] = None
    lock_error = ""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = _acquire_lock(out)
        except RunLockedError as e:
            lock_error = str(e)
    if not _all_ranks_agree(dist, lock is not None or rank != 0):
        raise RunLockedError(lock_error or f"rank 0 could not take the lock of {out} (its message says why)")
    try:
        manifest = dict(format=FORMAT, vit_lens_version=__version__, model=model.cfg.model_name,
                        model_spec=model_spec or model.cfg.model_name, analysis=analysis, config_hash=config_hash,
                        config=config, chunks=chunks, n_images=N, columns=list(ROW_COLUMNS))
        if rank == 0:
            shard_dir(out).mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(out)  # left by killed runs (one run per folder at a time)
            if not manifest_path.exists():
                _atomic_write(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        _barrier(dist)

        sd = shard_dir(out)
        done_before = {c["index"] for c in chunks if (sd / _shard_name(c["index"])).exists()}
        if retry_failed:
            done_before = {k for k in done_before if not shard_failures(sd / _shard_name(k))}
        pending = [c for c in chunks if c["index"] not in done_before]
        mine = pending[rank::world]
        n_pending_images = sum(c["stop"] - c["start"] for c in pending)
        if rank == 0:
            what = f"{len(pending)} of {len(chunks)} chunks ({n_pending_images} images) to do"
            say(f"{analysis} on {N} images ({source.spec}), {what}" + (f", {world} processes" if world > 1 else ""))

        items = ImageItems(source, model.data_config, preprocess, pairs=pairs,
                           segmentation_root=Path(opts["segmentations"]) if "segmentation" in needs else None,
                           dtype=dtype)
        batches = [list(range(s, min(s + int(batch_size), c["stop"]))) for c in mine
                   for s in range(c["start"], c["stop"], int(batch_size))]
        loader = torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=int(workers), collate_fn=collate,
                                             persistent_workers=False)
        stop_after = _stop_after(rank)
        t0 = time.perf_counter()
        n_run = 0
        written = 0
        chunk_of: Dict[int, Dict[str, Any]] = {}
        for c in mine:
            for i in range(c["start"], c["stop"]):
                chunk_of[i] = c
        frames: List[Any] = []
        failures: List[Dict[str, Any]] = []
        device = model.device
        labels = source.labels
        sizes = {c["index"]: c["stop"] - c["start"] for c in chunks}

        def done_images() -> int:
            return sum(sizes[int(m.group(1))] for f in sd.glob("chunk-*.parquet")
                       if (m := re.fullmatch(r"chunk-(\d+)\.parquet", f.name)) and int(m.group(1)) not in done_before)

        bar = progress_bar(total=n_pending_images, progress=progress and rank == 0, desc=analysis, unit="image")
        try:
            for b in loader:
                ids_all = sorted([*b["ids"], *(i for i, _ in b["failures"])])
                chunk = chunk_of[ids_all[0]]
                n_run += len(ids_all)
                for i, err in b["failures"]:
                    failures.append(dict(image=i, path=source.paths[i], error=err))
                    say(f"skipped image {i} ({source.paths[i]}): {err}")
                if b["ids"]:
                    x = b["images"].to(device=device, dtype=dtype)
                    tgt: Optional[torch.Tensor] = None
                    with torch.no_grad():
                        if target == "pred" and not spec.own_pred:
                            tgt = model(x).argmax(-1)
                        elif target == "label":
                            assert labels is not None
                            tgt = torch.tensor([labels[i] for i in b["ids"]], dtype=torch.long, device=device)
                    rb = RunBatch(images=x, targets=tgt, ids=list(b["ids"]),
                                  pair=None if "pair" not in b else b["pair"].to(device=device, dtype=dtype),
                                  segmentation=b.get("segmentation"))
                    df = spec.fn(model, rb, **{k: v for k, v in opts.items()})
                    if rb.targets is None:
                        raise InputError(f"analysis {analysis!r} is registered with own_pred=True but set no targets")
                    tgt = rb.targets
                    pos = df["image"].to_numpy()
                    ids = np.asarray(rb.ids, dtype=np.int64)[pos]
                    df = df.assign(image=ids)
                    df["path"] = [source.paths[i] for i in ids]
                    df["label"] = [-1 if labels is None else labels[i] for i in ids]
                    df["target"] = tgt.cpu().numpy()[pos]
                    frames.append(df)
                last = max(ids_all)
                if last == chunk["stop"] - 1:  # the chunk's last batch: write its shard
                    _write_chunk(sd, chunk, frames, failures, config_hash)
                    frames, failures = [], []
                    written += 1
                    if rank == 0:
                        bar.n = min(n_pending_images, done_images())
                        bar.refresh()
                    if stop_after is not None and written >= stop_after:
                        os.kill(os.getpid(), signal.SIGKILL)  # the test hook: die like kill -9
                elif rank == 0:
                    bar.update(len(ids_all))
        finally:
            bar.close()
        _barrier(dist)
        seconds = time.perf_counter() - t0
        if dist is not None:
            t = torch.tensor([n_run], dtype=torch.long, device=_dist_device(dist))
            dist.all_reduce(t)
            n_run = int(t.item())
        done = sorted(c["index"] for c in chunks if (sd / _shard_name(c["index"])).exists())
        all_failures = _collect_failures(out)
        if rank == 0:
            manifest.update(done=done, n_done=len(done), n_failed=len(all_failures), world_size=world,
                            updated=time.strftime("%Y-%m-%d %H:%M:%S"))
            _atomic_write(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
            if all_failures:
                buf = pd.DataFrame(all_failures, columns=["image", "path", "error"]).to_csv(index=False)
                _atomic_write(out / "failures.csv", buf.encode())
            elif (out / "failures.csv").exists():
                (out / "failures.csv").unlink()
        ips = n_run / seconds if seconds > 0 else float("nan")
        report = RunReport(out=out, n_chunks=len(chunks), n_done=len(done), n_images_run=n_run, n_failed=len(all_failures),
                           seconds=seconds, images_per_s=ips, world_size=world)
        if rank == 0:
            failed = f"; {len(all_failures)} unreadable image(s) listed in {out / 'failures.csv'}" if all_failures else ""
            say(f"{len(done)} of {len(chunks)} chunks done; {n_run} images in {seconds:.1f} s ({ips:.1f} images/s)"
                f"{failed}; results: {out}")
        return report
    finally:
        _release_lock(lock)


def _write_chunk(sd: Path, chunk: Dict[str, Any], frames: List[Any], failures: List[Dict[str, Any]],
                 config_hash: str) -> None:
    import pandas as pd

    k = chunk["index"]
    if frames:
        df = pd.concat(frames, ignore_index=True)
    else:
        df = pd.DataFrame({c: [] for c in ROW_COLUMNS})
    for c in ROW_COLUMNS:
        if c not in df:
            df[c] = None
    df = df[list(ROW_COLUMNS)]
    for c in ("layer", "index"):
        df[c] = pd.array(df[c].to_numpy(dtype=object), dtype="Int64") if len(df) else pd.array([], dtype="Int64")
    for c in ("group", "condition", "measure", "path"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    df = df.sort_values(["image"], kind="stable", ignore_index=True)
    meta = dict(config_hash=config_hash, chunk=str(k), start=str(chunk["start"]), stop=str(chunk["stop"]),
                failures=json.dumps(failures))
    _atomic_write(sd / _shard_name(k), _parquet_bytes(df, meta))


def _collect_failures(out: Path) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for f in sorted(shard_dir(out).glob("chunk-*.parquet")):
        rows += shard_failures(f)
    return sorted(rows, key=lambda r: r["image"])
