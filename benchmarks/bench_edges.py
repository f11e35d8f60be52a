"""Edge attribution vs exact edge patching on the real ViT-Ti / DeiT-Ti and the labelled photos.

    python benchmarks/bench_edges.py [--model vit|deit] [--pairs 4] [--sample 0] [--ig 5] [--threads 2] [--device cpu] [--save results.pt]

Clean/corrupted pairs: labelled photo ``i`` (clean) and photo ``i + 1`` (corrupted), metric the logit
difference between the clean photo's class and the corrupted photo's class (one pair per image).
Prints, for plain attribution and for EAP-IG (``--ig`` steps, 0 to skip):

* Spearman rank correlation and top-20 overlap (shown only where there are at least 40 edges) of the edge scores (effect averaged over the pairs)
  against exact edge patching, over all edges (or ``--sample`` random edges) and per receiver kind
  (q / k / v inputs of heads, MLP inputs, the readout);
* the faithfulness curve: the share of the clean-corrupted gap recovered (exactly, by
  :func:`vit_lens.edges.faithfulness_curve`) when only the top-k edges by attribution (and by exact
  patching) are kept;
* the time of each step (one run each; give the load average beside them).

Needs ``VIT_LENS_CHECKPOINTS`` (or ``../shared/weights``) and ``../shared/images``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import SHARED, WEIGHTS, add_common_args, setup  # noqa: E402  (benchmarks/_common.py: the shared flags)

CKPT = {"vit": ("vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
        "deit": ("deit_tiny_patch16_224", "deit_tiny_patch16_224.fb_in1k")}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the ranks (ties are rare for float scores)."""
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    k = min(k, a.numel())
    ta = set(torch.argsort(a.abs(), descending=True)[:k].tolist())
    tb = set(torch.argsort(b.abs(), descending=True)[:k].tolist())
    return len(ta & tb) / k


def kind(receiver: str) -> str:
    if receiver == "logits":
        return "readout"
    if receiver.startswith("m"):
        return "mlp"
    return "head " + receiver[-2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(CKPT), default="vit")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--sample", type=int, default=0, help="exact-patch this many random edges (0: all)")
    p.add_argument("--ig", type=int, default=5, help="EAP-IG steps (0: skip)")
    add_common_args(p, device="cpu", threads=2)
    p.add_argument("--ks", default="50,100,200,400,800,1600,2845")
    p.add_argument("--save", default="", help="torch.save the attribution, EAP-IG and exact results here")
    args = p.parse_args(argv)
    setup(args, p)

    from vit_lens import HookedViT
    from vit_lens.edges import edge_attribution, edge_graph, faithfulness_curve, patch_edges
    from vit_lens.patching import logit_diff_metric

    arch, tag = CKPT[args.model]
    model = HookedViT.from_pretrained(arch, checkpoint_path=WEIGHTS / f"{tag}.safetensors", device=args.device)
    with open(SHARED / "images" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n = args.pairs
    paths = [str(SHARED / "images" / r["path"]) for r in rows[: n + 1]]
    labels = [int(r["class_index"]) for r in rows[: n + 1]]
    images = model.preprocess(paths)
    clean, corrupted = images[:n], images[1: n + 1]
    metric = logit_diff_metric(labels[:n], labels[1: n + 1])
    graph = edge_graph(model)
    print(f"{arch}: {len(graph.senders)} senders, {len(graph.receivers)} receivers, {len(graph.edges)} edges; "
          f"{n} pairs on {args.device}, {args.threads} threads; load average {os.getloadavg()}")

    def timed(what, fn):
        t = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"  {what}: {time.perf_counter() - t:.2f} s")
        return out

    att = timed("edge attribution (2 forwards + 1 backward)", lambda: edge_attribution(model, clean, corrupted, metric, progress=False))
    ig = None
    if args.ig:
        ig = timed(f"EAP-IG, {args.ig} steps", lambda: edge_attribution(model, clean, corrupted, metric, ig_steps=args.ig, progress=False))
    edges = list(graph.edges)
    if args.sample:
        g = torch.Generator().manual_seed(0)
        edges = [edges[i] for i in torch.randperm(len(edges), generator=g)[: args.sample].tolist()]
    exact = timed(f"exact edge patching, {len(edges)} edges", lambda: patch_edges(model, clean, corrupted, metric, edges, progress=False))
    if args.save:
        torch.save({"attribution": att, "ig": ig, "exact": exact}, args.save)
    pos = {e: i for i, e in enumerate(graph.edges)}
    sel = torch.tensor([pos[e] for e in edges])
    ex = exact.scores()
    print(f"  clean metric {exact.clean.tolist()}, corrupted {exact.corrupted.tolist()}")
    def overlap(a, b):
        return f"{top_overlap(a, b, 20):.2f}" if a.numel() >= 40 else "–"

    print("\n| estimate | receivers | edges | Spearman | top-20 overlap |\n|---|---|---|---|---|")
    for name, res in [("attribution", att), (f"EAP-IG ({args.ig} steps)", ig)]:
        if res is None:
            continue
        est = res.scores()[sel]
        kinds = [kind(e.receiver) for e in edges]
        print(f"| {name} | all | {len(edges)} | {spearman(est, ex):.3f} | {overlap(est, ex)} |")
        for k in ("head q", "head k", "head v", "mlp", "readout"):
            m = torch.tensor([x == k for x in kinds])
            if m.sum() > 2:
                print(f"| {name} | {k} | {int(m.sum())} | {spearman(est[m], ex[m]):.3f} | {overlap(est[m], ex[m])} |")
    ks = [int(k) for k in args.ks.split(",")]
    curves = [("attribution", att)] + ([("EAP-IG", ig)] if ig is not None else [])
    if not args.sample:
        curves.append(("exact", exact))
    print("\nfaithfulness: share of the gap recovered, top-k edges kept (mean over pairs)")
    print("| ranking | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for name, res in curves:
        df = timed(f"faithfulness curve by {name}", lambda: faithfulness_curve(model, clean, corrupted, metric, res, ks, progress=False))
        curve = df.groupby("k").recovered.mean()
        print(f"| {name} | " + " | ".join(f"{curve[k]:.2f}" for k in ks) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
