"""Peak memory of run_with_cache and its memory options, beside timm's forward.

    python benchmarks/bench_memory.py [--model vit_base_patch16_224] [--batch 32] [--device cpu|cuda]

Each variant runs once in a fresh subprocess (random weights, ``torch.inference_mode``), holding its
output (the cache) at the end, as a user would:

* CPU: the kernel's high-water mark of resident memory is reset after the model and the input are
  built (``echo 5 > /proc/self/clear_refs``), and the peak reported is ``VmHWM - VmRSS`` at that
  point: the memory the call itself added at its peak (Linux only).
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
  allocated before the call.

Variants: ``timm forward``; ``hooked forward``; ``run_with_cache`` (every hook); ``cache bf16``
(``dtype=torch.bfloat16``); ``cache [CLS]`` (``pos_slice=0``); ``resid cache`` (the residual stream
only); ``stream mean`` (``stream_reductions`` of the mean of every residual-stream hook over 4
batches of ``--batch / 4``); on CUDA also ``cache to cpu`` (``device="cpu"``, GPU memory only).
Reported: peak MiB, and the ratio to timm's forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, random_timm, setup  # noqa: E402  (benchmarks/_common.py: the shared flags)

VARIANTS = ("timm forward", "hooked forward", "run_with_cache", "cache bf16", "cache [CLS]", "resid cache", "stream mean")


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (e.g. VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str, model_name: str, batch: int, device: str) -> dict:
    import torch

    from vit_lens import HookedViT

    dev = torch.device(device)
    ref = random_timm(model_name, seed=0).to(dev)
    model = HookedViT.from_timm(ref)
    x = torch.randn(batch, 3, *model.cfg.image_size, device=dev)
    resid = [n for n in model.hook_dict if ".hook_resid_" in n]
    calls = {
        "timm forward": lambda: ref(x),
        "hooked forward": lambda: model(x),
        "run_with_cache": lambda: model.run_with_cache(x),
        "cache bf16": lambda: model.run_with_cache(x, dtype=torch.bfloat16),
        "cache [CLS]": lambda: model.run_with_cache(x, pos_slice=0),
        "resid cache": lambda: model.run_with_cache(x, names_filter=resid),
        "stream mean": lambda: model.stream_reductions(list(x.chunk(4)), {n: "mean" for n in resid}, progress=False),
        "cache to cpu": lambda: model.run_with_cache(x, device="cpu"),
    }
    fn = calls[variant]
    with torch.inference_mode():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out = fn()
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) - before
            held = torch.cuda.memory_allocated(dev) - before
        else:
            before = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS mark to the current RSS
            out = fn()
            peak = _status("VmHWM") - before
            held = _status("VmRSS") - before
    del out
    return {"variant": variant, "peak_bytes": peak, "held_bytes": held}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    add_common_args(p, device="cpu", threads=False)
    p.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup(args, p)  # a CUDA device that is not there is refused here, not once per variant
    if args.child:
        print(json.dumps(child(args.child, args.model, args.batch, args.device)))
        return 0
    variants = list(VARIANTS) + (["cache to cpu"] if args.device.startswith("cuda") else [])
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for v in variants:
        cmd = [sys.executable, __file__, "--child", v, "--model", args.model, "--batch", str(args.batch),
               "--device", args.device]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(f"{v}: failed ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    where = "GPU memory (torch allocator)" if args.device.startswith("cuda") else "CPU resident memory (VmHWM)"
    print(f"{args.model}, batch {args.batch}, {args.device} float32; peak = {where} added by the call, "
          "held = still held with the output kept")
    print(f"{'variant':<16} {'peak MiB':>10} {'held MiB':>10} {'peak / timm':>12}")
    base = next((r["peak_bytes"] for r in rows if r["variant"] == "timm forward"), None)
    for r in rows:
        ratio = f"{r['peak_bytes'] / base:>11.1f}x" if base else f"{'-':>12}"
        print(f"{r['variant']:<16} {r['peak_bytes'] / 2**20:>10.0f} {r['held_bytes'] / 2**20:>10.0f} {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
