"""Shared fixtures: paths to ../shared, the real checkpoints, small random models.

Real-weight tests read ``$VIT_LENS_CHECKPOINTS`` (default: ``<repo>/../shared/weights``) and the
labelled photos in ``<repo>/../shared/images``; they are skipped with a reason when absent.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VIT_LENS_SHARED", REPO.parent / "shared"))
WEIGHTS = Path(os.environ.get("VIT_LENS_CHECKPOINTS", SHARED / "weights"))
IMAGES = SHARED / "images"

REAL_VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
REAL_DEIT = "deit_tiny_patch16_224.fb_in1k"


def _need(path: Path, what: str) -> None:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set VIT_LENS_CHECKPOINTS / VIT_LENS_SHARED)")


@pytest.fixture(scope="session", autouse=True)
def _checkpoint_env():
    """Point from_pretrained at the local checkpoints for the whole session."""
    if WEIGHTS.is_dir():
        os.environ.setdefault("VIT_LENS_CHECKPOINTS", str(WEIGHTS))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def labelled_images():
    """List of dicts: path (absolute), class_index (int), synset, class_name."""
    labels = IMAGES / "labels.csv"
    _need(labels, "labelled images")
    rows = []
    with open(labels, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({**r, "path": str(IMAGES / r["path"]), "class_index": int(r["class_index"])})
    return rows


@pytest.fixture(scope="session")
def real_vit():
    """The real AugReg ViT-Ti/16 (ImageNet-1k), float32, CPU."""
    _need(WEIGHTS / f"{REAL_VIT}.safetensors", "real ViT-Ti checkpoint")
    from vit_lens import HookedViT

    return HookedViT.from_pretrained("vit_tiny_patch16_224", checkpoint_path=WEIGHTS / f"{REAL_VIT}.safetensors")


@pytest.fixture(scope="session")
def real_deit():
    """The real DeiT-Ti/16 (ImageNet-1k), float32, CPU."""
    _need(WEIGHTS / f"{REAL_DEIT}.safetensors", "real DeiT-Ti checkpoint")
    from vit_lens import HookedViT

    return HookedViT.from_pretrained("deit_tiny_patch16_224", checkpoint_path=WEIGHTS / f"{REAL_DEIT}.safetensors")


def make_timm(name: str, seed: int = 0, **kwargs):
    """A random-initialised timm model in eval mode (deterministic for a seed)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def weights_hash(model) -> str:
    """sha256 over every parameter and buffer (name and bytes) of ``model``: equal before and after a
    call means the call changed no weight."""
    import hashlib

    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def spread_head(t, seed: int = 1):
    """Give a random-init timm model a larger classifier and final-norm spread (timm initialises the head
    at std 0.02 and the norms at 1/0), so logits differ visibly and class ranks are not ties. In place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("head", "head_dist"):
            h = getattr(t, name, None)
            if isinstance(h, torch.nn.Linear):
                h.weight.copy_(torch.randn(h.weight.shape, generator=g))
                h.bias.copy_(torch.randn(h.bias.shape, generator=g))
        for norm in (t.norm, t.fc_norm):
            if isinstance(norm, torch.nn.LayerNorm):
                norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=g))
                norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=g))
    return t



def spread_families(families: dict, **common) -> dict:
    """key -> (timm model, HookedViT) for ``{key: (timm name, kwargs)}``, each random-initialised with
    ``common`` kwargs added and its head spread by :func:`spread_head`."""
    from vit_lens import HookedViT

    out = {}
    for key, (name, kw) in families.items():
        t = spread_head(make_timm(name, **common, **kw))
        out[key] = (t, HookedViT.from_timm(t))
    return out

@pytest.fixture(scope="session")
def tiny_pair():
    """(timm model, HookedViT) for a random-initialised vit_tiny_patch16_224."""
    from vit_lens import HookedViT

    t = make_timm("vit_tiny_patch16_224")
    return t, HookedViT.from_timm(t)


def load_script(path: Path, name: str):
    """Import a script (benchmarks/, experiments/) by path as module ``name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


#: weight-processing options, one at a time and all together (the parity tests run each)
OPTION_SETS = {
    "none": {},
    "fold_ln": dict(fold_ln=True),
    "center_writing_weights": dict(center_writing_weights=True),
    "center_unembed": dict(center_unembed=True),
    "fold_value_biases": dict(fold_value_biases=True),
    "all": dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
}
