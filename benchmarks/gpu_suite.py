"""The GPU suite's runner (started by ``benchmarks/gpu_suite.sh``): every step in its own subprocess
with its own time limit, and one Markdown report.

    python benchmarks/gpu_suite.py [--device cuda] [--quick] [--out benchmarks/results/gpu_suite.md]

Steps: the CUDA tests (``tests/test_gpu.py``: parity with timm in float32 and bfloat16, caches on
the GPU / to the CPU / in bfloat16, stream_reductions, analyses on the GPU); ``bench_forward.py`` in
float32 and bfloat16; ``bench_patching.py`` (exact sweep vs naive loop; the attribution method once
``vit_lens.patching`` offers one); the dataset-run throughput (images/s of
``HookedViT.stream_reductions``, float32 and bfloat16); ``bench_memory.py``. Timings synchronise
the device around every call (``benchmarks/_timing.py``). ``--quick`` uses timm's 6-block
``test_vit`` and few repetitions (a dry run of the whole pipeline, e.g. ``--device cpu --quick``).
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
from typing import List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
BUDGET_S = 290  # the whole suite: under 5 minutes, so that a rerun fits into 15 device minutes


def throughput(device: str, dtype: str, model_name: str, batch: int, n_batches: int) -> str:
    """images/s of stream_reductions (the mean of every residual-stream hook, and [CLS] of the last
    block) over ``n_batches`` batches, after one warm-up batch; the device is synchronised."""
    import timm
    import torch

    sys.path.insert(0, str(BENCH))
    from _timing import Timings

    from vit_lens import HookedViT

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    model = HookedViT.from_timm(timm.create_model(model_name, pretrained=False).eval(), device=device, dtype=dt)
    batches = [torch.randn(batch, 3, *model.cfg.image_size, dtype=dt) for _ in range(n_batches)]  # on the CPU, as from a loader
    L = model.cfg.n_layers
    red = {n: "mean" for n in model.hook_dict if ".hook_resid_" in n}
    red[f"blocks.{L - 1}.hook_resid_post"] = lambda a: a[:, 0]
    model.stream_reductions(batches[:1], red, progress=False, device="cpu")
    t = Timings()
    _, s = t.timed("stream", lambda: model.stream_reductions(batches, red, progress=False, device="cpu"), device=device)
    n = batch * n_batches
    return (f"stream_reductions {model_name} {dtype} on {device}: {n} images in {s:.2f} s = {n / s:.0f} images/s "
            f"(batch {batch}, {len(red)} reductions, results on the CPU)")


def run_step(title: str, cmd: List[str], timeout: float) -> Tuple[str, int, float, str]:
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(5, timeout))
        rc, out = r.returncode, (r.stdout + ("\n[stderr]\n" + r.stderr if r.stderr.strip() else ""))
    except subprocess.TimeoutExpired as e:
        rc = 124
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += f"\n[timed out after {timeout:.0f} s]"
    return title, rc, time.perf_counter() - t, out


def forward_rows(out: str) -> List[Tuple[str, str, str]]:
    """(variant, median ms, ratio) rows of bench_forward's first table(s)."""
    rows = []
    for line in out.splitlines():
        m = re.match(r"^(timm forward|hooked forward|run_with_cache|resid cache|cache floor|hf forward|bridge cache|"
                     r"prisma cache)\s+([\d.]+)\s+[\d.]+\s+([\d.]+x)", line)
        if m:
            rows.append(m.groups())
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(BENCH / "results" / "gpu_suite.md"))
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite (steps past it are skipped)")
    p.add_argument("--slack", type=float, default=1.0, help="multiply every step's time limit (a loaded CPU dry run)")
    p.add_argument("--throughput", nargs=4, metavar=("DTYPE", "MODEL", "BATCH", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.throughput:
        dtype, model_name, batch, n = args.throughput
        print(throughput(args.device, dtype, model_name, int(batch), int(n)))
        return 0

    import torch

    py, dev, quick = sys.executable, args.device, args.quick
    fwd_model = ["--model", "test_vit", "--batch", "2", "--reps", "2", "--no-peers"] if quick else []
    big = "test_vit" if quick else "vit_base_patch16_224"
    steps = [
        ("CUDA tests (tests/test_gpu.py)", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], 80),
    ]
    for dtype in ("float32", "bfloat16"):
        steps.append((f"bench_forward {dtype}", [py, str(BENCH / "bench_forward.py"), "--device", dev, "--dtype", dtype,
                                                 *fwd_model], 70))
    steps.append(("bench_patching float32 (exact sweep vs naive loop)",
                  [py, str(BENCH / "bench_patching.py"), "--device", dev,
                   *(["--model", "test_vit", "--naive-runs", "2"] if quick else ["--naive-runs", "24"])], 60))
    for dtype in ("float32", "bfloat16"):
        steps.append((f"dataset-run throughput {dtype}",
                      [py, __file__, "--device", dev, "--throughput", dtype, big,
                       *(["4", "2"] if quick else ["64", "16"])], 40))
    steps.append(("bench_memory float32", [py, str(BENCH / "bench_memory.py"), "--device", dev,
                                           *(["--model", "test_vit", "--batch", "2"] if quick else [])], 60))

    t0 = time.perf_counter()
    done = []
    for title, cmd, limit in steps:
        left = args.budget - (time.perf_counter() - t0)
        if left < 10:
            done.append((title, -1, 0.0, "[skipped: the suite's time budget is spent]"))
            continue
        res = run_step(title, cmd, min(limit * args.slack, left))
        done.append(res)
        print(f"{title}: rc {res[1]}, {res[2]:.0f} s", flush=True)

    where = torch.cuda.get_device_name(0) if dev.startswith("cuda") and torch.cuda.is_available() else dev
    lines = [f"# GPU suite: {where}", "",
             f"torch {torch.__version__}, Python {platform.python_version()}, {'quick' if quick else 'full'} mode, "
             f"{time.perf_counter() - t0:.0f} s in all; load average " + ("%.2f %.2f %.2f" % os.getloadavg()), "",
             "| step | status | seconds | result |", "|---|---|---:|---|"]
    for title, rc, s, out in done:
        status = "ok" if rc == 0 else "skipped" if rc == -1 else "timed out" if rc == 124 else \
            "ran, a target missed" if rc == 1 and title.startswith("bench_") else f"rc {rc}"
        if title.startswith("bench_forward"):
            rows = forward_rows(out)
            result = "; ".join(f"{v} {ms} ms ({r})" for v, ms, r in rows) or "(no rows)"
        else:
            stdout = out.split("\n[stderr]\n")[0]  # the last printed line, not a progress bar's
            tail = [l for l in stdout.strip().splitlines() if l.strip()]
            result = tail[-1] if tail else ""
        lines.append(f"| {title} | {status} | {s:.0f} | {result.replace('|', '/')} |")
    lines += [""]
    for title, rc, s, out in done:
        lines += [f"## {title}", "", "```", out.strip()[-6000:], "```", ""]
    report = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report.split("\n## ")[0])
    print(f"report: {args.out}")
    return 0 if all(rc == 0 or (rc == 1 and t.startswith("bench_")) for t, rc, _, _ in done) else 1


if __name__ == "__main__":
    raise SystemExit(main())
