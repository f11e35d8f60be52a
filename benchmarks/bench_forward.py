"""Speed of HookedViT against timm, measured in the same run.

    python benchmarks/bench_forward.py                       # ViT-B/16 batch 8, then ViT-Ti/16 batch 32
    python benchmarks/bench_forward.py --model vit_base_patch16_224 --batch 8 [--reps 9] [--device cuda]

Random-initialised weights, float32 (``--dtype bfloat16`` on a GPU), ``torch.inference_mode``. The
variants are timed with their repetitions interleaved in rotated order (timm, HookedViT forward,
run_with_cache, ...; see ``benchmarks/_timing.py``) so that load from other processes hits all of
them alike; the median of each is reported with the ratio against timm's forward, then min / median
/ max and the page faults of each variant. Rows (other scripts read the first three names):

* ``timm forward``: the timm model (the reference).
* ``hooked forward``: ``model(images)`` with no hooks (fused attention and LayerNorm).
* ``run_with_cache``: ``model.run_with_cache(images)`` caching every hook point (attention patterns
  materialised).
* ``resid cache``: ``run_with_cache`` of the residual stream only (``hook_resid_pre/mid/post``).
* ``cache floor``: allocating and writing fresh tensors of every shape the full cache holds, without
  any model: the cost of the cache's memory alone (its pages are new on every run, where a forward
  reuses a few buffers that stay in cache); a lower bound on ``run_with_cache - timm forward``.
* ``hf forward`` / ``bridge cache`` (when transformer-lens's ``TransformerBridge`` imports; in the
  default run for the first model only): the
  equivalent Hugging Face ``ViTForImageClassification`` (random weights, eager attention) and
  TransformerBridge's ``run_with_cache`` over it.
* ``prisma cache`` (when ``vit_prisma`` imports, in its own environment; same rule): ViT-Prisma's
  ``run_with_cache`` on its HookedViT of the same size.

Targets (issue 17, quiet machine): hooked forward and the residual-stream cache <= 1.03x timm; the
full cache <= 1.10x on ViT-B/16 batch 8 and <= 1.20x on ViT-Ti/16 batch 32.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the peers' models are built from configs: never wait on the hub
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Timings, interleaved, sync  # noqa: E402  (benchmarks/_timing.py, the shared timing helper)

DEFAULT_RUNS = (("vit_base_patch16_224", 8), ("vit_tiny_patch16_224", 32))


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
    """ViT-Prisma's HookedViT of the same size (random weights); None when it does not import."""
    try:
        from vit_prisma.configs.HookedViTConfig import HookedViTConfig as PrismaConfig
        from vit_prisma.models.base_vit import HookedViT as PrismaViT
    except Exception as e:
        print(f"  (prisma cache skipped: vit_prisma does not import here: {type(e).__name__})")
        return None
    try:
        blk = ref.blocks[0]
        cfg = PrismaConfig(
            n_layers=len(ref.blocks), d_model=ref.embed_dim, d_head=ref.embed_dim // blk.attn.num_heads,
            d_mlp=blk.mlp.fc1.out_features, n_heads=blk.attn.num_heads, patch_size=ref.patch_embed.patch_size[0],
            image_size=ref.patch_embed.img_size[0], n_classes=ref.num_classes, eps=ref.norm.eps,
        )
        return PrismaViT(cfg).eval().to(device=device, dtype=dtype)
    except Exception as e:
        print(f"  (prisma cache skipped: {type(e).__name__}: {str(e)[:200]})")
        return None


def bench_one(name: str, batch: int, args, peers: bool = True) -> bool:
    import timm

    from vit_lens import HookedViT

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval().to(device=device, dtype=dtype)
    model = HookedViT.from_timm(ref)
    x = torch.randn(batch, model.cfg.in_chans, *model.cfg.image_size, device=device, dtype=dtype)
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
        shapes = [(tuple(v.shape), v.dtype) for v in cache.values()
                  if v.untyped_storage().nbytes() >= v.numel() * v.element_size()]  # not expanded views
        cache_bytes = sum(v.untyped_storage().nbytes() for v in
                          {v.untyped_storage().data_ptr(): v for v in cache.values()}.values())
        n_hooks = len(cache)
        del cache

    def floor():
        return [torch.empty(s, dtype=d, device=device).fill_(1.0) for s, d in shapes]

    variants["cache floor"] = floor
    if peers and not args.no_peers:
        twin = _hf_twin(ref, device, dtype)
        if twin is not None:
            hf, bridge = twin
            variants["hf forward"] = lambda: hf(pixel_values=x).logits
            variants["bridge cache"] = lambda: bridge.run_with_cache(x)[1]
        prisma = _prisma_twin(ref, device, dtype)
        if prisma is not None:
            variants["prisma cache"] = lambda: prisma.run_with_cache(x)[1]

    faults = Timings(variants)  # page-fault counts per call, with the helper's statistics

    def counted(n: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            a = _minor_faults()
            out = fn()
            sync(device)
            faults.add(n, _minor_faults() - a)
            return out
        return run

    with torch.inference_mode():
        times = interleaved({n: counted(n, f) for n, f in variants.items()}, reps=args.reps, warmup=args.warmup,
                            rotate=True, device=device)

    where = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else "synchronised around each call"
    print(
        f"{name}, batch {batch}, {where} {args.dtype}, {threads}, "
        f"{args.reps} interleaved reps; max |logit diff| vs timm {diff:.2e}; "
        f"run_with_cache caches {n_hooks} hook points ({cache_bytes / 2**20:.0f} MiB); {load_average()}"
    )
    print(f"{'variant':<16} {'median ms':>10} {'min ms':>8} {'ratio':>7} {'paired':>7}  target")
    ok = True
    goal = targets(name, batch)
    for n in variants:
        med = times.median(n)
        ratio = times.ratio(n, "timm forward")
        # median over repetitions of (this variant / timm in the same repetition): robust to drifts in load
        paired = times.paired(n, "timm forward")
        target = goal.get(n)
        flag = ""
        if target is not None:
            flag = f"<= {target:.2f}" + ("" if ratio <= target else "  MISSED")
            ok &= ratio <= target
        print(f"{n:<16} {med * 1e3:>10.1f} {times.min(n) * 1e3:>8.1f} {ratio:>6.2f}x {paired:>6.2f}x  {flag}")
    print("ratio = median / median of timm forward (the target); paired = median of per-repetition ratios")
    print(f"\n{'spread':<16} {'min ms':>8} {'median ms':>10} {'max ms':>8} {'max/min':>8} {'faults/run':>11}")
    for n in variants:
        lo, med, hi = times.min(n), times.median(n), times.max(n)
        print(f"{n:<16} {lo * 1e3:>8.1f} {med * 1e3:>10.1f} {hi * 1e3:>8.1f} {hi / lo:>7.2f}x "
              f"{faults.median(n):>11.0f}")
    print("faults/run = median minor page faults per call (new memory pages the call touched)\n")
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="one timm model (default: ViT-B/16 batch 8, then ViT-Ti/16 batch 32)")
    p.add_argument("--batch", type=int, default=None, help="batch size (with --model; default 8)")
    p.add_argument("--reps", type=int, default=9, help="timed repetitions of each variant (>= 9 for the report)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-peers", action="store_true", help="skip the TransformerBridge / ViT-Prisma columns")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(args.model, args.batch or 8)] if args.model else list(DEFAULT_RUNS)
    if args.batch and not args.model:
        runs = [(m, args.batch) for m, _ in runs]
    ok = True
    for i, (name, batch) in enumerate(runs):
        # the default run measures the peers on ViT-B only (under 3 minutes on a quiet 2-core machine);
        # --model vit_tiny_patch16_224 --batch 32 gives them on ViT-Ti
        ok &= bench_one(name, batch, args, peers=bool(args.model) or i == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
