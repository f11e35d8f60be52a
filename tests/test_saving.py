"""HookedViT.save / HookedViT.load: one .safetensors file, reloaded without timm weights or the hub.

References: timm's own forward (random models of several families) and the real DeiT-Ti checkpoint
loaded through from_pretrained.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REAL_DEIT, WEIGHTS, make_timm
from vit_lens import HookedViT
from vit_lens.loading import FAMILIES

FAMILY_BY_KEY = {f.key: f for f in FAMILIES}


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "clip", "reg_gap", "rpn", "dinov2"])
def test_roundtrip_matches_timm(tmp_path, family):
    fam = FAMILY_BY_KEY[family]
    t = make_timm(fam.example, seed=3, **fam.test_kwargs)
    with torch.no_grad():  # timm zero-initialises biases and norms: make every term count
        for p in t.parameters():
            p.add_(0.05 * torch.randn_like(p))
    size = fam.test_kwargs.get("img_size", 32)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    hooked = HookedViT.from_timm(t)
    path = hooked.save(tmp_path / "m.safetensors")
    loaded = HookedViT.load(path)
    with torch.no_grad():
        ref = t(x)
        out = loaded(x)
        assert torch.equal(out, hooked(x))
    assert (out - ref).abs().max() <= 1e-5
    assert loaded.cfg == hooked.cfg
    assert not loaded.training
    assert list(loaded.hook_dict) == list(hooked.hook_dict)


def test_processed_real_model_and_class_names_survive(tmp_path, real_deit, labelled_images):
    processed = HookedViT.from_pretrained("deit_tiny_patch16_224", checkpoint_path=WEIGHTS / f"{REAL_DEIT}.safetensors",
                                  fold_ln=True, center_writing_weights=True, center_unembed=True)
    path = processed.save(tmp_path / "sub" / "deit_processed.safetensors")  # parent folders are made
    loaded = HookedViT.load(path)
    assert loaded.cfg.normalization_type == "LNPre"
    assert loaded.cfg.extra["weight_processing"] == processed.cfg.extra["weight_processing"]
    assert loaded.class_names == real_deit.class_names and loaded.class_synsets == real_deit.class_synsets
    assert loaded.data_config == real_deit.data_config
    paths = [r["path"] for r in labelled_images[:4]]
    images = loaded.preprocess(paths)
    assert torch.equal(images, real_deit.preprocess(paths))
    with torch.no_grad():
        got, want = loaded(images), real_deit(images)
    # center_unembed shifts each image's logits by a constant: compare centred logits
    centred = lambda z: z - z.mean(-1, keepdim=True)  # noqa: E731
    assert (centred(got) - centred(want)).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_new_class_directions_survive(tmp_path):
    t = make_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    hooked = HookedViT.from_timm(t)
    W = torch.randn(hooked.cfg.d_model, 4, generator=torch.Generator().manual_seed(1))
    hooked.set_class_directions(W, labels=["a", "b", "c", "d"])
    loaded = HookedViT.load(hooked.save(tmp_path / "probe.safetensors"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert loaded(x).shape == (3, 4)
        assert torch.equal(loaded(x), hooked(x))
    assert loaded.class_names == ["a", "b", "c", "d"] and loaded.class_index("c") == 2


def test_load_with_dtype(tmp_path):
    t = make_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5)
    path = HookedViT.from_timm(t).save(tmp_path / "m.safetensors")
    m64 = HookedViT.load(path, dtype=torch.float64)
    assert m64.dtype == torch.float64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (m64(x.double()).float() - t(x)).abs().max() <= 1e-5


def test_save_and_load_refuse_with_advice(tmp_path):
    from safetensors.torch import save_file

    t = make_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5)
    hooked = HookedViT.from_timm(t)
    with pytest.raises(ValueError, match=".safetensors"):
        hooked.save(tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError, match="model.save"):
        HookedViT.load(tmp_path / "missing.safetensors")
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(timm_file))
    with pytest.raises(ValueError, match="from_pretrained"):
        HookedViT.load(timm_file)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"vit_lens": json.dumps({"format": "vit_lens.hooked_vit/99"})})
    with pytest.raises(ValueError, match="format"):
        HookedViT.load(other)
