"""Speed of HookedViT against timm, measured in the same run.

    python benchmarks/bench_forward.py                       # ViT-B/16 batch 8, then ViT-Ti/16 batch 32 (fresh processes)
    python benchmarks/bench_forward.py --model vit_base_patch16_224 --batch 8 [--reps 9] [--device cuda]
    python benchmarks/bench_forward.py --peers --prisma-python /path/to/prisma-venv/bin/python  # + the peers' rows

Random-initialised weights, float32 (``--dtype bfloat16`` on a GPU), ``torch.inference_mode``. The
variants are timed with their repetitions interleaved in a balanced order (timm, HookedViT forward,
run_with_cache, ...; every variant runs right after every other equally often: see
``benchmarks/_timing.py``) so that load from other processes, and the state one call leaves the
heap in, hit all of them alike; the median of each is reported with the ratio against timm's forward, then min / median
/ max and the page faults of each variant. Rows (other scripts read the first three names):

* ``timm forward``: the timm model (the reference).
* ``hooked forward``: ``model(images)`` with no hooks (fused attention and LayerNorm).
* ``run_with_cache``: ``model.run_with_cache(images)`` caching every hook point (attention patterns
  materialised).
* ``resid cache``: ``run_with_cache`` of the residual stream only (``hook_resid_pre/mid/post``).
* ``kept: timm`` / ``kept: cache`` / ``kept: resid``: timm's forward, the full cache and the residual
  cache in a second process that called ``vit_lens.perf.keep_freed_memory()`` (the setting is
  process-wide, so it gets its own process; its repetitions are interleaved with this one's: the
  two processes take turns, one repetition each). Their ratio is against ``kept: timm``, timm's
  forward with the same allocator setting (``kept: timm``'s own against ``timm forward``).
  ``--no-kept`` skips them.
* ``cache floor`` (``--floor``): allocating and writing fresh tensors of every shape the full cache
  holds, without any model: the cost of the cache's memory alone. ``kept: floor`` is the same in
  the kept-memory process, where the pages are reused; the difference (printed as the ``fault
  floor``) is what faulting fresh pages in costs, which ``run_with_cache`` pays on top of a forward
  under the default allocator: ``1 + fault floor / timm forward`` is the lowest full-cache ratio the
  default allocator allows.
* ``hf forward`` / ``bridge cache`` (with ``--peers``, when transformer-lens's ``TransformerBridge``
  imports; for the first model only when no ``--model`` is given): the equivalent Hugging Face ``ViTForImageClassification``
  (random weights, eager attention) and TransformerBridge's ``run_with_cache`` over it.
* ``prisma cache`` (same rule): ViT-Prisma's ``run_with_cache`` on its HookedViT of the same size,
  run by ``--prisma-python`` (an interpreter of an environment where ``vit_prisma`` imports: it pins
  an old plotly, so it gets its own; made e.g. with ``python -m venv prisma-venv && prisma-venv/bin/pip
  install vit-prisma``) in its own process, interleaved like the kept rows; without the option, only
  when ``vit_prisma`` imports here.

The default run (no peers: 10 rounds, warm-up included, of 7 calls in two processes, on ViT-B/16 batch 8,
then 22 rounds on ViT-Ti/16 batch 32) takes about 5 minutes on a quiet 2-core machine; ``--floor`` adds 2 calls a
round, ``--peers`` 3-4 ViT-B calls.

Targets (issue 17, quiet machine): hooked forward and the residual-stream cache <= 1.03x timm; the
full cache <= 1.10x on ViT-B/16 batch 8 and <= 1.20x on ViT-Ti/16 batch 32. A target counts as met
when the default row or its ``kept:`` row meets it (the exit status is 1 otherwise).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the peers' models are built from configs: never wait on the hub
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup  # noqa: E402  (benchmarks/_common.py, the shared flags)
from _timing import Timings, interleaved, round_order, sync  # noqa: E402  (benchmarks/_timing.py, the shared timing helper)

REPO = Path(__file__).resolve().parents[1]
#: the default run: (model, batch, repetitions). ViT-Ti/16's calls take a third of ViT-B/16's, so it gets more
#: repetitions for about the same time: with 9, single calls spreading up to 1.9x max/min moved its hooked-forward
#: median by +-7% between two quiet runs (a 30-repetition run: 1.00x)
DEFAULT_RUNS = (("vit_base_patch16_224", 8, 9), ("vit_tiny_patch16_224", 32, 21))
DEFAULT_REPS = 9
#: rows of the kept-memory process -> the row whose target they share
KEPT_ROWS = {"kept: timm": None, "kept: cache": "run_with_cache", "kept: resid": "resid cache", "kept: floor": None}
_MSG = "@@bench_forward "  # protocol lines of a worker process (anything else it prints is passed to stderr)


def targets(model_name: str, batch: int) -> Dict[str, float]:
    t = {"hooked forward": 1.03, "resid cache": 1.03}
    if model_name.startswith("vit_base_patch16_224") and batch == 8:
        t["run_with_cache"] = 1.10
    elif model_name.startswith("vit_tiny_patch16_224") and batch == 32:
        t["run_with_cache"] = 1.20
    return t


def load_average() -> str:
    try:
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _hf_twin(ref, device, dtype):
    """The equivalent Hugging Face ViT (same sizes, random weights) and TransformerBridge over it;
    None when transformers / the bridge are missing or refuse it (the reason is printed)."""
    try:
        from transformers import ViTConfig, ViTForImageClassification
        from transformer_lens.model_bridge import TransformerBridge
    except Exception as e:  # optional column
        print(f"  (hf forward / bridge cache skipped: {type(e).__name__}: {e})")
        return None
    try:
        blk = ref.blocks[0]
        cfg = ViTConfig(
            hidden_size=ref.embed_dim, num_hidden_layers=len(ref.blocks), num_attention_heads=blk.attn.num_heads,
            intermediate_size=blk.mlp.fc1.out_features, image_size=ref.patch_embed.img_size[0],
            patch_size=ref.patch_embed.patch_size[0], num_labels=ref.num_classes, layer_norm_eps=ref.norm.eps,
            architectures=["ViTForImageClassification"], attn_implementation="eager",
        )
        hf = ViTForImageClassification(cfg).eval().to(device=device, dtype=dtype)
        bridge = TransformerBridge.boot_transformers("google/vit-base-patch16-224", hf_model=hf, device=device, dtype=dtype)
        return hf, bridge
    except Exception as e:
        print(f"  (hf forward / bridge cache skipped: {type(e).__name__}: {str(e)[:200]})")
        return None


def _prisma_twin(ref, device, dtype):
    """ViT-Prisma's HookedViT of the same size (random weights); (None, reason) when it does not import."""
    try:
        from vit_prisma.configs.HookedViTConfig import HookedViTConfig as PrismaConfig
        from vit_prisma.models.base_vit import HookedViT as PrismaViT
    except Exception as e:
        return None, f"vit_prisma does not import in {sys.executable}: {type(e).__name__}: {str(e)[:160]}"
    try:
        blk = ref.blocks[0]
        cfg = PrismaConfig(
            n_layers=len(ref.blocks), d_model=ref.embed_dim, d_head=ref.embed_dim // blk.attn.num_heads,
            d_mlp=blk.mlp.fc1.out_features, n_heads=blk.attn.num_heads, patch_size=ref.patch_embed.patch_size[0],
            image_size=ref.patch_embed.img_size[0], n_classes=ref.num_classes, eps=ref.norm.eps,
        )
        return PrismaViT(cfg).eval().to(device=device, dtype=dtype), ""
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def _build(name: str, batch: int, device, dtype):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval().to(device=device, dtype=dtype)
    cfg_in = (ref.patch_embed.proj.in_channels, *ref.patch_embed.img_size)
    x = torch.randn(batch, *cfg_in, device=device, dtype=dtype)
    return ref, x


def _cache_shapes(cache) -> List[Any]:
    """(shape, dtype) of every tensor a full cache owns (expanded views skipped)."""
    return [(tuple(v.shape), v.dtype) for v in cache.values()
            if v.untyped_storage().nbytes() >= v.numel() * v.element_size()]


def _floor_of(shapes: List[Any], device) -> Callable[[], object]:
    """Allocating and writing fresh tensors of the cache's shapes, without any model."""
    def floor():
        return [torch.empty(s, dtype=d, device=device).fill_(1.0) for s, d in shapes]
    return floor


def _counted(faults: Timings, n: str, fn: Callable[[], object], device) -> Callable[[], object]:
    def run():
        a = _minor_faults()
        out = fn()
        sync(device)
        faults.add(n, _minor_faults() - a)
        return out
    return run


class _Local:
    """This process's variants: one round per repetition, in the balanced order."""

    def __init__(self, variants: Dict[str, Callable[[], object]], device):
        self.variants, self.device = variants, device
        self.times, self.faults = Timings(variants), Timings(variants)
        self.calls = {n: _counted(self.faults, n, f, device) for n, f in variants.items()}

    def warmup(self) -> None:
        interleaved(self.variants, reps=1, warmup=0, device=self.device)

    def rep(self, r: int) -> None:
        names = list(self.calls)
        for i in round_order(len(names), r):
            n = names[i]
            out, _ = self.times.timed(n, self.calls[n], self.device)
            del out

    def close(self) -> None:
        pass


class _Worker:
    """Variants in another process (another allocator setting, another environment): it runs one
    round per repetition when told, so its repetitions interleave with this process's."""

    def __init__(self, role: str, python: str, name: str, batch: int, args):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        cmd = [python, str(Path(__file__).resolve()), "--worker", role, "--model", name, "--batch", str(batch),
               "--device", args.device, "--dtype", args.dtype, "--threads", str(torch.get_num_threads())]
        cmd += ["--floor"] if args.floor else []
        self.role = role
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.times, self.faults = Timings(), Timings()
        self.ready = self._read()
        self.names: List[str] = self.ready.get("names", [])
        for n in self.names:
            self.times.times[n], self.faults.times[n] = [], []

    def _read(self) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_MSG):
                return json.loads(line[len(_MSG):])
            sys.stderr.write(line)
        return {"skip": f"the worker exited ({self.proc.wait()}) before answering"}

    def _ask(self, cmd: str) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def warmup(self) -> None:
        self._ask("warmup")

    def rep(self, r: int) -> None:
        got = self._ask(f"rep {r}")
        if "times" not in got:
            raise RuntimeError(f"benchmark worker failed: {got}")
        for n in self.names:
            self.times.add(n, got["times"][n])
            self.faults.add(n, got["faults"][n])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._ask("quit")
            except (BrokenPipeError, OSError):
                pass
            self.proc.wait(timeout=60)


def worker(role: str, name: str, batch: int, args) -> int:
    """The other end of :class:`_Worker`: build the variants of ``role``, then answer commands (the
    prisma role needs only torch, timm and vit_prisma)."""
    def say(msg: Dict[str, Any]) -> None:
        print(_MSG + json.dumps(msg), flush=True)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ref, x = _build(name, batch, device, dtype)
    variants: Dict[str, Callable[[], object]] = {}
    note = ""
    if role == "kept":
        import vit_lens.perf
        from vit_lens import HookedViT

        status = vit_lens.perf.keep_freed_memory()
        note = status.note
        if not status.applied:
            say({"skip": note})
            return 0
        model = HookedViT.from_timm(ref)
        resid = lambda n: ".hook_resid_" in n  # noqa: E731
        variants = {
            "kept: timm": lambda: ref(x),
            "kept: cache": lambda: model.run_with_cache(x)[1],
            "kept: resid": lambda: model.run_with_cache(x, names_filter=resid)[1],
        }
        if args.floor:
            with torch.inference_mode():
                variants["kept: floor"] = _floor_of(_cache_shapes(model.run_with_cache(x)[1]), device)
    elif role == "prisma":
        prisma, why = _prisma_twin(ref, device, dtype)
        if prisma is None:
            say({"skip": why})
            return 0
        from importlib.metadata import PackageNotFoundError, version

        try:
            note = f"ViT-Prisma {version('vit-prisma')} in {sys.executable}"
        except PackageNotFoundError:
            note = f"ViT-Prisma in {sys.executable}"
        variants = {"prisma cache": lambda: prisma.run_with_cache(x)[1]}
    else:
        say({"skip": f"unknown worker role {role!r}"})
        return 2
    local = _Local(variants, device)
    say({"names": list(variants), "note": note})
    with torch.inference_mode():
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "warmup":
                local.warmup()
                say({"ok": True})
            elif cmd[0] == "rep":
                r = int(cmd[1])
                local.rep(r)
                say({"times": {n: local.times[n][-1] for n in variants},
                     "faults": {n: local.faults[n][-1] for n in variants}})
    return 0


def bench_one(name: str, batch: int, args, peers: bool = True) -> bool:
    from vit_lens import HookedViT
    import vit_lens.perf

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ref, x = _build(name, batch, device, dtype)
    model = HookedViT.from_timm(ref)
    resid = lambda n: ".hook_resid_" in n  # noqa: E731

    variants: Dict[str, Callable[[], object]] = {
        "timm forward": lambda: ref(x),
        "hooked forward": lambda: model(x),
        "run_with_cache": lambda: model.run_with_cache(x)[1],
        "resid cache": lambda: model.run_with_cache(x, names_filter=resid)[1],
    }
    with torch.inference_mode():
        # sanity: the thing we time is the thing we test
        diff = (ref(x) - model(x)).abs().max().item()
        cache = model.run_with_cache(x)[1]
        shapes = _cache_shapes(cache)
        cache_bytes = sum(v.untyped_storage().nbytes() for v in
                          {v.untyped_storage().data_ptr(): v for v in cache.values()}.values())
        n_hooks = len(cache)
        del cache

    if args.floor:
        variants["cache floor"] = _floor_of(shapes, device)
    notes: List[str] = []
    units: List[Any] = []
    if device.type == "cpu" and not args.no_kept:
        units.append(_Worker("kept", sys.executable, name, batch, args))
    if peers and not args.no_peers:
        twin = _hf_twin(ref, device, dtype)
        if twin is not None:
            hf, bridge = twin
            variants["hf forward"] = lambda: hf(pixel_values=x).logits
            variants["bridge cache"] = lambda: bridge.run_with_cache(x)[1]
        if args.prisma_python or importlib.util.find_spec("vit_prisma") is not None:
            units.append(_Worker("prisma", args.prisma_python or sys.executable, name, batch, args))
        else:
            notes.append("prisma cache skipped: vit_prisma does not import here; pass --prisma-python "
                         "(an interpreter of an environment with vit-prisma)")
    local = _Local(variants, device)
    live: List[Any] = [local]
    for u in units:
        if "skip" in u.ready:
            notes.append(f"{'kept rows' if u.role == 'kept' else 'prisma cache'} skipped: {u.ready['skip']}")
            u.close()
        else:
            notes.append(u.ready.get("note", ""))
            live.append(u)
    try:
        with torch.inference_mode():
            for _ in range(max(0, args.warmup)):
                for u in live:
                    u.warmup()
            for r in range(args.reps):
                for i in round_order(len(live), r):  # the processes take turns, in the balanced order
                    live[i].rep(r)
    finally:
        for u in units:
            u.close()

    times, faults = Timings(), Timings()
    for u in live:
        for n in u.times:
            times.times[n], faults.times[n] = u.times[n], u.faults[n]

    where = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else "synchronised around each call"
    here = "freed memory kept (MALLOC_* variables)" if vit_lens.perf.freed_memory_kept() else "default allocator"
    print(
        f"{name}, batch {batch}, {where} {args.dtype}, {threads}, "
        f"{args.reps} interleaved reps; max |logit diff| vs timm {diff:.2e}; "
        f"run_with_cache caches {n_hooks} hook points ({cache_bytes / 2**20:.0f} MiB); {here}; {load_average()}"
    )
    for n in notes:
        if n:
            print(f"  ({n})")
    print(f"{'variant':<16} {'median ms':>10} {'min ms':>8} {'ratio':>7} {'paired':>7}  target")
    goal = targets(name, batch)
    met: Dict[str, bool] = {}
    for n in times:
        med = times.median(n)
        base = "kept: timm" if n in KEPT_ROWS and n != "kept: timm" else "timm forward"
        ratio = times.ratio(n, base)
        # median over repetitions of (this variant / its reference in the same repetition): robust to drifts in load
        paired = times.paired(n, base)
        row = KEPT_ROWS.get(n, n) if n in KEPT_ROWS else n
        target = goal.get(row) if row else None
        flag = ""
        if target is not None:
            flag = f"<= {target:.2f}" + ("" if ratio <= target else "  MISSED")
            met[row] = met.get(row, False) or ratio <= target
        print(f"{n:<16} {med * 1e3:>10.1f} {times.min(n) * 1e3:>8.1f} {ratio:>6.2f}x {paired:>6.2f}x  {flag}")
    print("ratio = median / median of timm forward (the target); paired = median of per-repetition ratios")
    if any(n in KEPT_ROWS for n in times):
        print("kept: = in a process with vit_lens.perf.keep_freed_memory(); its ratios are against kept: timm")
    print(f"\n{'spread':<16} {'min ms':>8} {'median ms':>10} {'max ms':>8} {'max/min':>8} {'faults/run':>11}")
    for n in times:
        lo, med, hi = times.min(n), times.median(n), times.max(n)
        print(f"{n:<16} {lo * 1e3:>8.1f} {med * 1e3:>10.1f} {hi * 1e3:>8.1f} {hi / lo:>7.2f}x "
              f"{faults.median(n):>11.0f}")
    print("faults/run = median minor page faults per call (new memory pages the call touched)")
    if "cache floor" in times.times and "kept: floor" in times.times:
        # the same allocations and writes with and without fresh pages: the difference is what faulting the
        # cache's memory in costs by itself, which run_with_cache pays on top of a forward by default
        fault_cost = times.median("cache floor") - times.median("kept: floor")
        extra = fault_cost / times.median("timm forward")
        goal_c = goal.get("run_with_cache")
        if fault_cost <= 0:
            print(f"fault floor: none measurable (cache floor - kept: floor = {fault_cost * 1e3:.1f} ms, within the noise)")
        else:
            print(f"fault floor: cache floor - kept: floor = {fault_cost * 1e3:.1f} ms = {extra:.2f} of a timm forward: "
                  f"run_with_cache cannot go below {1 + extra:.2f}x by default"
                  + ("" if goal_c is None else f" (target {goal_c:.2f}x: "
                     + ("below the floor, reachable only with kept memory)" if 1 + extra > goal_c else "above the floor)")))
    missed = [r for r, m in met.items() if not m]
    print(("targets met (by default or with keep_freed_memory)" if not missed else
           "targets MISSED (by default and with keep_freed_memory): " + ", ".join(missed)) + "\n")
    return not missed


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="one timm model (default: ViT-B/16 batch 8, then ViT-Ti/16 batch 32)")
    p.add_argument("--batch", type=int, default=None, help="batch size (with --model; default 8)")
    p.add_argument("--reps", type=int, default=None,
                   help=f"timed repetitions of each variant (>= 9 for the report; default {DEFAULT_REPS}, "
                        "21 for ViT-Ti/16 in the default run)")
    p.add_argument("--warmup", type=int, default=1)
    add_common_args(p, device="cpu", threads=None, dtype="float32")
    p.add_argument("--peers", action="store_true",
                   help="add the Hugging Face / TransformerBridge / ViT-Prisma rows (implied by --prisma-python)")
    p.add_argument("--no-peers", action="store_true", help="no peer rows (the default; wins over --peers)")
    p.add_argument("--no-kept", action="store_true", help="skip the kept-memory rows (CPU only; their own process)")
    p.add_argument("--floor", action="store_true", help="add the cache floor row (the cache's memory without a model)")
    p.add_argument("--prisma-python", default=None, metavar="PATH",
                   help="a Python with vit-prisma installed: runs the prisma cache row in its own process")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup(args, p)  # threads; refuses a device that is not there (exit 2)
    if args.worker:
        return worker(args.worker, args.model, args.batch or 8, args)  # its rounds come one by one: no --reps
    runs = [(args.model, args.batch or 8, DEFAULT_REPS)] if args.model else list(DEFAULT_RUNS)
    if args.batch and not args.model:
        runs = [(m, args.batch, r) for m, _, r in runs]
    if args.reps is not None:
        runs = [(m, b, args.reps) for m, b, _ in runs]
    if len(runs) > 1:
        # one fresh process per model: the allocator's state (what the previous model's caches left in the
        # heap) would otherwise carry over and hide the page faults of the next model's first process;
        # the peers are measured on the first model only (--model vit_tiny_patch16_224 --batch 32 --peers
        # gives them on ViT-Ti)
        given = list(sys.argv[1:] if argv is None else argv)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        rc = 0
        for i, (name, batch, reps) in enumerate(runs):
            cmd = [sys.executable, str(Path(__file__).resolve()), *given, "--model", name, "--batch", str(batch)]
            cmd += [] if args.reps is not None else ["--reps", str(reps)]
            r = subprocess.run(cmd + ([] if i == 0 else ["--no-peers"]), env=env)
            rc = max(rc, r.returncode)
        return rc
    name, batch, args.reps = runs[0]
    ok = bench_one(name, batch, args, peers=args.peers or bool(args.prisma_python))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
