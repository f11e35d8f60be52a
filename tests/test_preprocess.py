"""model.preprocess: every accepted input gives timm's own eval transform; "paper" mode is a plain
resize + normalise (checked against a hand-written one); built-in sample images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vit_lens
from conftest import make_timm
from vit_lens import HookedViT


@pytest.fixture(scope="module")
def pair():
    # a random vit_tiny carries the default pretrained tag's data config (bicubic, crop 0.9, mean/std 0.5)
    t = make_timm("vit_tiny_patch16_224", depth=1)
    return t, HookedViT.from_timm(t)


@pytest.fixture(scope="module")
def timm_transform(pair):
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config(model=pair[0]), is_training=False)


def test_data_config_is_timms(pair):
    from timm.data import resolve_data_config

    t, m = pair
    assert m.data_config == dict(resolve_data_config(model=t))
    assert m.data_config["mean"] == (0.5, 0.5, 0.5) and m.data_config["crop_pct"] == 0.9  # AugReg ViT-Ti config


def test_every_input_kind_gives_timms_transform(pair, timm_transform):
    _, m = pair
    path = vit_lens.sample_image_path("coffee")
    pil = Image.open(path).convert("RGB")
    ref = timm_transform(pil)[None]
    hwc = np.array(pil)  # uint8 [H, W, 3]
    chw = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()  # uint8 [3, H, W]
    for inp in (pil, path, str(path), hwc, chw, torch.from_numpy(hwc)):
        x = m.preprocess(inp)
        assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
        assert torch.equal(x, ref), type(inp)


def test_lists_and_batches(pair, timm_transform):
    _, m = pair
    imgs = [vit_lens.sample_image(n) for n in vit_lens.SAMPLE_IMAGES]
    ref = torch.stack([timm_transform(im) for im in imgs])
    assert torch.equal(m.preprocess(imgs), ref)
    assert torch.equal(m.preprocess(tuple(vit_lens.sample_image_path(n) for n in vit_lens.SAMPLE_IMAGES)), ref)
    # a uint8 batch [B, C, H, W] / [B, H, W, C] counts as a list of images
    same_size = [np.asarray(im.resize((64, 48))) for im in imgs]
    ref = torch.stack([timm_transform(Image.fromarray(a)) for a in same_size])
    assert torch.equal(m.preprocess(np.stack(same_size)), ref)
    assert torch.equal(m.preprocess(torch.from_numpy(np.stack(same_size)).permute(0, 3, 1, 2)), ref)
    # mixed kinds in one list
    mixed = m.preprocess([imgs[0], vit_lens.sample_image_path("coffee")])
    assert torch.equal(mixed[1], timm_transform(imgs[1]))


def test_grayscale_and_rgba_become_rgb(pair, timm_transform):
    _, m = pair
    rgb = vit_lens.sample_image("grace_hopper")
    gray = rgb.convert("L")
    assert torch.equal(m.preprocess(gray), timm_transform(gray.convert("RGB"))[None])
    assert torch.equal(m.preprocess(np.asarray(gray)), timm_transform(gray.convert("RGB"))[None])  # [H, W]
    rgba = rgb.convert("RGBA")
    assert torch.equal(m.preprocess(rgba), timm_transform(rgb)[None])


def test_paper_mode_is_resize_without_crop(pair):
    _, m = pair
    im = vit_lens.sample_image("chelsea")  # 385x256: a crop and a squash differ
    paper = m.preprocess(im, mode="paper")
    timm_mode = m.preprocess(im)
    assert paper.shape == timm_mode.shape == (1, 3, 224, 224)
    assert (paper - timm_mode).abs().max() > 0.1
    # by hand: bicubic resize of the whole image to 224x224, scale to [0, 1], (x - mean) / std
    arr = np.asarray(im.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array(m.data_config["mean"]), np.array(m.data_config["std"])
    by_hand = torch.from_numpy(((arr - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    assert (paper - by_hand).abs().max() <= 1e-6


def test_output_follows_model_dtype(pair):
    t, _ = pair
    m64 = HookedViT.from_timm(t, dtype=torch.float64)
    assert m64.preprocess(vit_lens.sample_image("coffee")).dtype == torch.float64


def test_preprocess_errors(pair, tmp_path):
    _, m = pair
    with pytest.raises(TypeError, match="uint8"):
        m.preprocess(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="no image file"):
        m.preprocess(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="no images"):
        m.preprocess([])
    with pytest.raises(ValueError, match="mode"):
        m.preprocess(vit_lens.sample_image("coffee"), mode="squash")
    with pytest.raises(TypeError, match="cannot read an image"):
        m.preprocess(42)
    with pytest.raises(ValueError, match="expected an image"):
        m.preprocess(np.zeros((2, 2, 2, 2, 3), dtype=np.uint8))


def test_non_rgb_models():
    one = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, in_chans=1))
    x = one.preprocess(vit_lens.sample_image("coffee"))
    assert x.shape == (1, 1, 32, 32)
    one(x)
    four = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, in_chans=4))
    with pytest.raises(ValueError, match="4-channel"):
        four.preprocess(vit_lens.sample_image("coffee"))


# ------------------------------------------------------------------ built-in samples
def test_sample_images():
    assert list(vit_lens.SAMPLE_IMAGES) == ["chelsea", "coffee", "grace_hopper"]
    for name in vit_lens.SAMPLE_IMAGES:
        path = vit_lens.sample_image_path(name)
        assert path.is_file() and path.stat().st_size < 100_000
        im = vit_lens.sample_image(name)
        assert im.mode == "RGB" and min(im.size) == 256
    credits = (vit_lens.sample_image_path("coffee").parent / "CREDITS.txt").read_text()
    assert "CC0" in credits and "public domain" in credits
    with pytest.raises(KeyError, match="Did you mean 'chelsea'"):
        vit_lens.sample_image("chelsee")


@pytest.mark.real
def test_real_model_on_sample_images(real_vit, real_deit):
    """Known answers: espresso (967) and military uniform (652) top-1; tabby cat (281) in the top 3."""
    for model in (real_vit, real_deit):
        with torch.no_grad():
            logits = model(model.preprocess([vit_lens.sample_image(n) for n in vit_lens.SAMPLE_IMAGES]))
        top = logits.topk(3).indices
        assert 281 in top[0].tolist()
        assert top[1, 0] == 967 and top[2, 0] == 652


def test_small_image_warns_with_name_and_factor(pair, tmp_path):
    """An image whose short side is under half the input's (224 here) is upscaled with a warning
    naming it and the factor; at half or more there is none. The output is unchanged by the warning."""
    import warnings

    from vit_lens.preprocess import SmallImageWarning

    _, m = pair
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((10, 10, 3), 128, dtype=np.uint8)).save(tiny)
    with pytest.warns(SmallImageWarning, match=r"tiny\.png is 10x10 pixels.*about 22x") as rec:
        x = m.preprocess([str(tiny)])
    assert len(rec) == 1 and x.shape == (1, 3, 224, 224)
    # a PIL image is named by its index in the batch; 111 px short side (< 112) warns, 112 does not
    ok = Image.fromarray(np.zeros((112, 300, 3), dtype=np.uint8))
    small = Image.fromarray(np.zeros((300, 111, 3), dtype=np.uint8))
    with pytest.warns(SmallImageWarning, match=r"image 1 \(Image\) is 111x300") as rec:
        m.preprocess([ok, small], mode="paper")
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.preprocess([ok])
