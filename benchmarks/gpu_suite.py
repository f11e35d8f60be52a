"""The GPU suite's runner (started by ``benchmarks/gpu_suite.sh``): every step in its own subprocess
with its own time limit, and one Markdown report.

    python benchmarks/gpu_suite.py [--device cuda] [--quick] [--out benchmarks/results/gpu_suite.md]
                                   [--budget 290] [--slack 1.0] [--only NAME ...]

Steps (``--only`` takes their short names):

* ``tests``: ``tests/test_gpu.py`` on CUDA -- parity with timm in float32 (the architectures of
  ``tests/test_parity.py``, both HookedViT paths, TF32 off) and float64, bfloat16 against timm's own
  bfloat16 forward, caches on the GPU / to the CPU / in bfloat16, stream_reductions, exact and
  attribution patching, edges, identifiability, DLA, explain maps and the ``vit-lens run`` engine on
  the GPU model against the same model on the CPU.
* ``forward32`` / ``forward16``: ``bench_forward.py`` in float32 / bfloat16 (ViT-B/16 batch 8 and
  ViT-Ti/16 batch 32; no peer columns: the device has no ViT-Prisma).
* ``patching`` / ``patching16``: ``bench_patching.py`` in float32 / bfloat16 -- the exact batched
  sweep vs the naive loop (ViT-B/16); in bfloat16 both run in bfloat16 and must agree within
  bfloat16 rounding (4 eps x the largest |metric|), and the sweep is also run, untimed, on a float32
  twin of the model to print how far bfloat16 moves the values.
* ``attribution`` / ``attribution16``: ``bench_attribution.py`` in float32 / bfloat16 --
  ``method="attribution"`` vs the exact sweep vs the naive loop, their agreement, the exact sweep
  against the naive runs in its layers (ViT-B/16); in bfloat16 also the deviation from float32.
* ``run32`` / ``run16``: ``bench_run.py`` -- images/s of the real ``vit-lens run identifiability``
  engine (DataLoader, cached forward, rows, Parquet shards, manifest) against a timm forward over the
  same loader, float32 / bfloat16 (ViT-B/16, batch 64, 256 random JPEGs, 8 workers).
* ``memory``: ``bench_memory.py`` -- peak GPU memory of each cache option (ViT-B/16, batch 32).

Every timing synchronises the device before and after each timed call (``benchmarks/_timing.py``;
``torch.cuda.synchronize``). A step that fails, times out or cannot import is reported in the table
and the next step still runs.

Time budget: 270 s of steps (with the wheel install and the import check, under 5 minutes; a rerun
still fits into the 15 device minutes), each step capped by its own limit (``LIMITS``, adding up to
the budget) and by what is left; a step may also use what the earlier ones left unused (the later
steps' caps stay reserved), so bench_memory, last, gets the slack. How the caps were set (an estimate: the suite has not run on a GPU
yet): a step's time there is its start-up plus its arithmetic. Start-up (import torch +
transformer_lens + timm, random init of the timm model, the CUDA context) is what ``--quick`` measures
on a CPU: 20-40 s per process on the shared 2-core machine at load 8, of which importing alone is
27-40 s there and ~4-6 s on a quiet 16-core machine (torch alone: 8 s vs ~2 s). The arithmetic is
small on an H200 (~60 TFLOP/s float32 without TF32, ~790 bfloat16): the largest is the exact
patching sweep of ViT-B/16, 12 x 197 runs of 17.6 GFLOP / 2.13 (runs start at the patched layer)
~ 20 TFLOP ~ 0.5 s at peak, a few seconds in practice, run twice (with and without the K/V reuse);
bench_forward does 2 models x 5 variants x 10 calls of <= 0.2 TFLOP; the run steps 6 passes over
256 images (~5 TFLOP) plus JPEG decoding on 8 workers and a sha256 of the weights per run (~1 s).
The bfloat16 patching and attribution steps do the same work in bfloat16 (~13x the float32 peak,
but batch-1 naive runs are launch-bound either way) plus the untimed float32 twin: a second model
conversion (~1 s) and one more float32 sweep (the patching step: ~20 TFLOP, as much as one of the
float32 step's two sweeps; the attribution step: 3 exact layers and one attribution pass), so they
get 2 s more than their float32 steps. So a step should take 10-18 s and the caps leave 1.3-2x
room: tests 45, bench_forward 23 each, patching and attribution 20 each in float32 and 22 in
bfloat16, run 25 each. bench_memory (one process per variant, 8 of them) should take ~45 s: its own
cap is 45 s, and as the last step it also gets what the earlier ones left unused (~50-100 s by the
estimates above). Before the bfloat16 patching and attribution steps the caps were 45, 28 x 4,
32 x 2 and 49: the two new steps took their 44 s from the 1.5-2x room of the others.
``--quick`` (timm's tiny ``test_vit``, few repetitions) is a dry run of the whole pipeline, e.g.
``--device cpu --quick --slack 3`` on a loaded CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
BUDGET_S = 270  # the steps: with the wheel install and import check under 5 minutes, so a rerun fits into 15
# per-step caps in seconds (sum = BUDGET_S); see the module docs for how they were estimated
LIMITS: Dict[str, float] = {"tests": 45, "forward32": 23, "forward16": 23, "patching": 20, "patching16": 22,
                            "attribution": 20, "attribution16": 22, "run32": 25, "run16": 25, "memory": 45}
# the precision each step runs in (a column of the table)
DTYPES: Dict[str, str] = {"tests": "float32, float64, bfloat16", "forward32": "float32", "forward16": "bfloat16",
                          "patching": "float32", "patching16": "bfloat16", "attribution": "float32",
                          "attribution16": "bfloat16", "run32": "float32", "run16": "bfloat16", "memory": "float32"}
# lines of each step's output that go into the table (the last matching ones); default: the last line
PICK: Dict[str, str] = {
    "tests": r"(passed|failed|skipped|error)",
    "patching": r"(^\| batched patch_positions_sweep|^K/V reuse|^identical results|^target)",
    "patching16": r"(^\| batched patch_positions_sweep|^identical results|^deviation from float32|^note:|^target)",
    "attribution": r"(attribution vs exact|agreement|target)",
    "attribution16": r"(attribution vs exact|^naive runs vs the exact|^deviation from float32|agreement|target)",
    "run32": r"(throughput|images/s|^timm forward|^vit-lens run)",
    "run16": r"(throughput|images/s|^timm forward|^vit-lens run)",
    "memory": r"^(timm forward|hooked forward|run_with_cache|cache bf16|cache \[CLS\]|resid cache|stream mean|cache to cpu"
              r"|.*: failed)\s",
}
PICK_N = {"memory": 9, "patching": 4, "patching16": 5, "attribution16": 5}  # lines kept in the table (default 3)


def run_step(title: str, cmd: List[str], timeout: float) -> Tuple[int, float, str]:
    """(return code (124: timed out, 127: could not start), seconds, stdout + stderr) of one step."""
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(5.0, timeout))
        rc, out = r.returncode, (r.stdout + ("\n[stderr]\n" + r.stderr if r.stderr.strip() else ""))
    except subprocess.TimeoutExpired as e:
        rc = 124
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        out += ("\n[stderr]\n" + err if err.strip() else "") + f"\n[timed out after {timeout:.0f} s]"
    except OSError as e:
        rc, out = 127, f"[could not start {cmd[0]}: {e}]"
    return rc, time.perf_counter() - t, out


def forward_rows(out: str) -> List[Tuple[str, str, str]]:
    """(variant, median ms, ratio) rows of bench_forward's first table(s)."""
    rows = []
    for line in out.splitlines():
        m = re.match(r"^(timm forward|hooked forward|run_with_cache|resid cache|cache floor|hf forward|bridge cache|"
                     r"prisma cache)\s+([\d.]+)\s+[\d.]+\s+([\d.]+x)", line)
        if m:
            rows.append(m.groups())
    return rows


def summary(name: str, rc: int, out: str) -> str:
    """The table's result cell of one step: its key lines, or the error that stopped it."""
    stdout, _, stderr = out.partition("\n[stderr]\n")
    if name.startswith("forward") and rc in (0, 1):
        rows = forward_rows(stdout)
        if rows:
            return "; ".join(f"{v} {ms} ms ({r})" for v, ms, r in rows)
    lines = [l.strip() for l in stdout.splitlines() if l.strip()]
    if rc not in (0, 1) or not lines:  # the error: the last line of stderr that says something
        err = [l.strip() for l in (stderr or stdout).splitlines() if l.strip() and not l.startswith(" ")]
        return (err[-1] if err else "(no output)")[:300]
    pat = PICK.get(name)
    picked = [l for l in lines if pat and re.search(pat, l)][-PICK_N.get(name, 3):] if pat else []
    return "; ".join(" ".join(l.split()) for l in picked or lines[-1:])[:800]


def steps(py: str, dev: str, quick: bool) -> List[Tuple[str, str, List[str]]]:
    """(short name, title, command) of every step, in the order they run."""
    b = str(BENCH)
    if quick:
        fwd = ["--model", "test_vit", "--batch", "2", "--reps", "2", "--no-peers"]
        pat = ["--model", "test_vit", "--naive-runs", "2"]
        att = ["--models", "test_vit", "--reps", "1", "--naive-runs", "6", "--exact-layers", "2"]
        run = ["--model", "test_vit", "--batch", "4", "--images", "8", "--workers", "0", "--reps", "1"]
        mem = ["--model", "test_vit", "--batch", "2", "--variants", "timm forward,run_with_cache,stream mean"]
    else:
        fwd = ["--reps", "9", "--no-peers"]
        pat = ["--naive-runs", "24", "--threads", "8"]
        att = ["--models", "vit_base_patch16_224", "--reps", "3", "--naive-runs", "12", "--exact-layers", "3",
               "--threads", "8"]
        run = ["--model", "vit_base_patch16_224", "--batch", "64", "--images", "256", "--workers", "8", "--reps", "2"]
        mem = []
    out = [("tests", "CUDA tests (tests/test_gpu.py)",
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_gpu.py"])]
    for short, dtype in (("forward32", "float32"), ("forward16", "bfloat16")):
        out.append((short, f"bench_forward {dtype}", [py, f"{b}/bench_forward.py", "--device", dev, "--dtype", dtype, *fwd]))
    for short, dtype in (("patching", "float32"), ("patching16", "bfloat16")):
        out.append((short, f"bench_patching {dtype} (exact sweep vs naive loop)",
                    [py, f"{b}/bench_patching.py", "--device", dev, "--dtype", dtype, *pat]))
    for short, dtype in (("attribution", "float32"), ("attribution16", "bfloat16")):
        out.append((short, f"bench_attribution {dtype} (attribution vs exact vs naive)",
                    [py, f"{b}/bench_attribution.py", "--device", dev, "--dtype", dtype, *att]))
    for short, dtype in (("run32", "float32"), ("run16", "bfloat16")):
        out.append((short, f"dataset run (vit-lens run identifiability) {dtype}",
                    [py, f"{b}/bench_run.py", "--device", dev, "--dtype", dtype, *run]))
    out.append(("memory", "bench_memory float32", [py, f"{b}/bench_memory.py", "--device", dev, *mem]))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(BENCH / "results" / "gpu_suite.md"))
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite (steps past it are skipped)")
    p.add_argument("--slack", type=float, default=1.0,
                   help="multiply the budget and every step's limit (a loaded CPU dry run)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps: " + ", ".join(LIMITS))
    args = p.parse_args(argv)
    unknown = set(args.only or ()) - set(LIMITS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; the steps are {', '.join(LIMITS)}")

    import torch

    py, dev, quick = sys.executable, args.device, args.quick
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("warning: --device cuda but torch sees no CUDA device; every step will fail or skip", flush=True)
    budget = args.budget * args.slack
    try:  # a missing package shows once here, not as eight failed steps
        import timm  # noqa: F401

        import vit_lens.attribution_patching  # noqa: F401
        import vit_lens.model  # noqa: F401
        import vit_lens.runs  # noqa: F401
        preflight = "vit_lens, transformer_lens and timm import"
    except Exception as e:  # noqa: BLE001  (reported, the steps still run)
        preflight = f"IMPORT FAILED: {type(e).__name__}: {e}"
    print(preflight, flush=True)
    todo = [s for s in steps(py, dev, quick) if args.only is None or s[0] in args.only]
    t0 = time.perf_counter()
    done = []
    for i, (short, title, cmd) in enumerate(todo):
        left = budget - (time.perf_counter() - t0)
        # its own cap, plus whatever the earlier steps left unused (the later steps' caps stay reserved)
        later = sum(LIMITS[s] for s, _, _ in todo[i + 1:]) * args.slack
        limit = max(LIMITS[short] * args.slack, left - later)
        if left < 10:
            done.append((short, title, -1, 0.0, limit, "[skipped: the suite's time budget is spent]"))
            continue
        rc, s, out = run_step(title, cmd, min(limit, left))
        done.append((short, title, rc, s, min(limit, left), out))
        print(f"{title}: rc {rc}, {s:.0f} s (limit {min(limit, left):.0f} s)", flush=True)

    where = torch.cuda.get_device_name(0) if dev.startswith("cuda") and torch.cuda.is_available() else dev
    load = "%.2f %.2f %.2f" % os.getloadavg()
    lines = [f"# GPU suite: {where}", "",
             f"torch {torch.__version__}, Python {platform.python_version()}, {'quick' if quick else 'full'} mode, "
             f"{time.perf_counter() - t0:.0f} s in all (budget {budget:.0f} s); load average {load}; {preflight}", "",
             "| step | dtype | status | seconds | limit | result |", "|---|---|---|---:|---:|---|"]
    for short, title, rc, s, limit, out in done:
        status = ("ok" if rc == 0 else "skipped" if rc == -1 else "timed out" if rc == 124 else
                  "ran, a target missed" if rc == 1 and short not in ("tests",) and "Traceback" not in out else
                  "FAILED" if rc == 1 else f"FAILED (rc {rc})")
        result = summary(short, rc, out) if rc != -1 else "the suite's time budget is spent"
        lines.append(f"| {title} | {DTYPES[short]} | {status} | {s:.0f} | {limit:.0f} | {result.replace('|', '/')} |")
    lines += [""]
    for short, title, rc, s, limit, out in done:
        lines += [f"## {title}", "", "```", out.strip()[-6000:], "```", ""]
    report = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report.split("\n## ")[0])
    print(f"report: {args.out}")
    ok = all(rc == 0 or (rc == 1 and short != "tests" and "Traceback" not in out) for short, _, rc, _, _, out in done)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
