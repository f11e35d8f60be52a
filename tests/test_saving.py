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


# ------------------------------------------------------------------ head state survives save / load (issue 12 item 2)
PROCESSINGS = [
    {},
    {"fold_ln": True},
    {"center_unembed": True},
    {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True},
]


def _logit_gap(a, b):
    """Logits equal up to the per-example constant center_unembed allows (compare centred logits)."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", ["vit", "deit_distilled"])
@pytest.mark.parametrize("processing", PROCESSINGS, ids=lambda p: "+".join(p) or "none")
def test_set_class_directions_after_reload_equals_the_model_never_saved(tmp_path, family, processing):
    """Every weight processing x set_class_directions (residual and head space, before or after saving) x
    save/load: the reloaded model gives the logits of the model that was never saved, and both give the
    logits an unprocessed model gives with the same directions (the definition of the directions)."""
    fam = FAMILY_BY_KEY[family]
    t = make_timm(fam.example, seed=5, **fam.test_kwargs)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.05 * torch.randn_like(p))
    size = fam.test_kwargs.get("img_size", 32)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    W_res = torch.randn(t.embed_dim, 7, generator=g)
    W_head = torch.randn(t.num_classes, 6, generator=g)
    bias = torch.randn(7, generator=g)
    plain = HookedViT.from_timm(t)  # the definition: no processing, never saved
    m = HookedViT.from_timm(t, **processing)
    # 1. save, reload, then give both the same new directions
    r = HookedViT.load(m.save(tmp_path / "a.safetensors"))
    for space, W, b in (("residual", W_res, bias), ("head", W_head, None)):
        ref = HookedViT.from_timm(t)
        ref.set_class_directions(W, bias=b, space=space)
        m2 = HookedViT.from_timm(t, **processing)
        m2.set_class_directions(W, bias=b, space=space)
        r2 = HookedViT.load(m2.save(tmp_path / f"b_{space}.safetensors"))  # directions set before saving
        r.set_class_directions(W, bias=b, space=space)  # directions set after reloading
        with torch.no_grad():
            want = ref(x)
            assert want.abs().max() > 1  # not a trivially small output
            for got in (m2(x), r(x), r2(x)):
                assert _logit_gap(got, want) <= 1e-4, (space, processing)
            if "center_unembed" not in processing:
                assert (r(x) - want).abs().max() <= 1e-4 and (r2(x) - want).abs().max() <= 1e-4
        # 2. a reloaded re-headed model still knows the ORIGINAL head: a second space="head" composes with it
        r2.set_class_directions(W_head[:, :4], space="head")
        ref.set_class_directions(W_head[:, :4], space="head")
        with torch.no_grad():
            assert _logit_gap(r2(x), ref(x)) <= 1e-4
    # the reloaded, processed model without new directions is the original model
    with torch.no_grad():
        assert _logit_gap(HookedViT.load(tmp_path / "a.safetensors")(x), plain(x)) <= 1e-4


def test_format_1_files_still_load(tmp_path):
    """Files written before the readout was one component (flat key names, no head state) load."""
    import json as _json

    from safetensors.torch import load_file, save_file

    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5))
    p = m.save(tmp_path / "new.safetensors")
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        meta = _json.loads(f.metadata()["vit_lens"])
    meta["format"] = "vit_lens.hooked_vit/1"
    flat = {k.replace("readout.", "", 1): v for k, v in load_file(str(p)).items()}
    assert "unembed.W_U" in flat and "ln_final.w" in flat
    save_file(flat, str(tmp_path / "old.safetensors"), metadata={"vit_lens": _json.dumps(meta)})
    old = HookedViT.load(tmp_path / "old.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(old(x), m(x))
