"""Loading a user's own weights file: every tensor accounted for, nothing randomly initialised, the
class count (and image / patch size, channels) read from the file, another model's file refused with
the right name, a file of unknown tag loaded with that said.

References are independent of the loader: the user's own timm model (its logits and its tensors),
the file's tensors read back with safetensors / torch, and timm's registry (pretrained configs).
Every checkpoint here is a random timm model saved to a tmp dir, except the ``real`` tests, which read
the shared DeiT-Ti / ViT-Ti files (skipped when absent).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REAL_DEIT, REAL_VIT, WEIGHTS, make_timm
from vit_lens import HookedViT, cli
from vit_lens.core.errors import InputError, VitLensError
from vit_lens.loading import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWarning,
)

TINY = "vit_tiny_patch16_224"
TINY_FULL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
DEIT = "deit_tiny_patch16_224"


def _timm_sd(t):
    return {k: v.detach().clone().contiguous() for k, v in t.state_dict().items()}


def _save(sd, path, fmt="safetensors", metadata=None):
    if fmt == "safetensors":
        save_file(sd, str(path), metadata=metadata)
    else:
        torch.save(sd, path)
    return path


def _logit_diff(m, t, x):
    with torch.no_grad():
        return (m(x).double() - t(x).double()).abs().max().item()


def _load_quiet(*args, **kwargs):
    """from_pretrained, with the expected unknown-tag warning caught (asserted where it matters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        return HookedViT.from_pretrained(*args, **kwargs)


@pytest.fixture(scope="module")
def t10():
    """The user's own 10-class fine-tune of vit_tiny (random weights, ImageNet-unlike head)."""
    t = make_timm(TINY, seed=31, num_classes=10)
    with torch.no_grad():
        t.head.weight.normal_(0, 1.0)
        t.head.bias.normal_(0, 1.0)
    return t


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ the user's own fine-tune (issue 12 item 4)
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("timm_kwargs", [None, dict(num_classes=10)], ids=["inferred", "given"])
def test_own_10_class_checkpoint_is_the_users_model(tmp_path, t10, x, fmt, timm_kwargs):
    """The saved head is the model's head (before the fix: a random classifier with timm_kwargs, a
    size-mismatch error without), logits equal the user's timm model, no ImageNet names, tag unknown."""
    path = _save(_timm_sd(t10), tmp_path / f"ft10.{fmt}", fmt)
    with pytest.warns(CheckpointWarning, match="ft10.* names no timm model.*pretrained tag is unknown"):
        m = HookedViT.from_pretrained(TINY, checkpoint_path=path, timm_kwargs=timm_kwargs)
    assert m.cfg.n_classes == 10
    assert torch.equal(m.W_U, t10.head.weight.T) and torch.equal(m.b_U, t10.head.bias)
    assert _logit_diff(m, t10, x) <= 1e-4
    assert m.class_names is None and m.class_synsets is None  # not ImageNet's classes
    assert m.cfg.model_name == "vit_tiny_patch16_224.unknown"
    assert m.cfg.extra["pretrained_tag"] == "unknown" and m.cfg.extra["source"] == "timm"
    assert m.cfg.extra["inferred_timm_kwargs"]["num_classes"] == 10
    # preprocessing: the architecture's default pretrained config, as the warning says
    from timm.models import get_pretrained_cfg

    default = get_pretrained_cfg(TINY)
    assert tuple(m.data_config["mean"]) == tuple(default.mean) and tuple(m.data_config["std"]) == tuple(default.std)


def test_two_loads_give_the_same_weights_as_the_users_model(tmp_path, t10):
    """Nothing random survives loading: two loads and the in-memory conversion hold the same tensors."""
    path = _save(_timm_sd(t10), tmp_path / "ft10.safetensors")
    a = _load_quiet(TINY, checkpoint_path=path).state_dict()
    b = _load_quiet(TINY, checkpoint_path=path).state_dict()
    ref = HookedViT.from_timm(t10).state_dict()
    assert a.keys() == b.keys() == ref.keys()
    for k in ref:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], ref[k]), k


def test_headless_checkpoint_loads_headless(tmp_path, x):
    t0 = make_timm(TINY, seed=33, num_classes=0)
    path = _save(_timm_sd(t0), tmp_path / "features.safetensors")
    m = _load_quiet(TINY, checkpoint_path=path)
    assert m.cfg.n_classes == 0 and m.unembed is None and m.class_names is None
    assert _logit_diff(m, t0, x) <= 1e-4  # the pooled features
    with pytest.raises(CheckpointMismatchError, match=r"no head.*num_classes=1000.*num_classes=0"):
        HookedViT.from_pretrained(TINY, checkpoint_path=path, timm_kwargs=dict(num_classes=1000))


def test_num_classes_that_contradicts_the_file_is_refused(tmp_path, t10):
    path = _save(_timm_sd(t10), tmp_path / "ft10.safetensors")
    for n in (1000, 0):
        with pytest.raises(CheckpointMismatchError) as err:
            HookedViT.from_pretrained(TINY, checkpoint_path=path, timm_kwargs=dict(num_classes=n))
        msg = str(err.value)
        assert "head.weight (10, 192)" in msg and "num_classes=10" in msg and f"num_classes={n}" in msg


def test_hub_load_with_another_class_count_is_refused(tmp_path, monkeypatch):
    """timm would drop the pretrained head and put a random one in: refused before any download."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("VIT_LENS_CHECKPOINTS", str(empty))
    with pytest.raises(CheckpointMismatchError, match=r"1000 classes.*randomly initialised.*from_timm"):
        HookedViT.from_pretrained(TINY, timm_kwargs=dict(num_classes=10))


# ------------------------------------------------------------------ strict accounting
def test_missing_key_is_named(tmp_path, t10):
    sd = _timm_sd(t10)
    del sd["blocks.3.mlp.fc1.bias"]
    path = _save(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        HookedViT.from_pretrained(TINY, checkpoint_path=path)
    msg = str(err.value)
    assert "missing from the file" in msg and "blocks.3.mlp.fc1.bias" in msg and "from_timm" in msg


def test_unexpected_key_is_named(tmp_path, t10):
    sd = _timm_sd(t10)
    sd["blocks.3.adapter.weight"] = torch.zeros(4, 192)
    path = _save(sd, tmp_path / "adapter.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"not in the model.*blocks\.3\.adapter\.weight"):
        HookedViT.from_pretrained(TINY, checkpoint_path=path)


def test_shape_mismatch_is_named(tmp_path, t10):
    sd = _timm_sd(t10)
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(700, 192)
    path = _save(sd, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.0\.mlp\.fc1\.weight \(700, 192\) in the file vs \(768, 192\)"):
        HookedViT.from_pretrained(TINY, checkpoint_path=path)


def test_another_depth_is_named_as_another_architecture(tmp_path):
    t = make_timm(TINY, seed=34, depth=6)
    path = _save(_timm_sd(t), tmp_path / "shallow.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        HookedViT.from_pretrained(TINY, checkpoint_path=path)
    msg = str(err.value)
    assert "blocks.6." in msg and "6 blocks of width 192; the model has 12" in msg and "timm_kwargs" in msg


# ------------------------------------------------------------------ settings read from the file
@pytest.mark.parametrize("arch, kwargs", [
    (TINY, dict(img_size=32, patch_size=8, num_classes=5)),
    (TINY, dict(img_size=48, patch_size=16, in_chans=1, num_classes=3)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, num_classes=7)),
])
def test_image_size_patch_size_and_channels_are_read_from_the_file(tmp_path, arch, kwargs):
    t = make_timm(arch, seed=35, **kwargs)
    path = _save(_timm_sd(t), tmp_path / "small.safetensors")
    m = _load_quiet(arch, checkpoint_path=path)
    size, patch = kwargs["img_size"], kwargs["patch_size"]
    assert m.cfg.image_size == (size, size) and m.cfg.patch_size == (patch, patch)
    assert m.cfg.in_chans == kwargs.get("in_chans", 3) and m.cfg.n_classes == kwargs["num_classes"]
    assert m.data_config["input_size"] == (m.cfg.in_chans, size, size)
    xs = torch.randn(2, m.cfg.in_chans, size, size)
    assert _logit_diff(m, t, xs) <= 1e-4
    assert torch.equal(m.W_pos, t.pos_embed)  # not resampled


def test_non_square_position_grid_needs_img_size(tmp_path):
    t = make_timm(TINY, seed=36, img_size=(32, 48), patch_size=8, num_classes=4)
    path = _save(_timm_sd(t), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"not a square grid.*img_size=\(height, width\)"):
        HookedViT.from_pretrained(TINY, checkpoint_path=path)
    m = _load_quiet(TINY, checkpoint_path=path, timm_kwargs=dict(img_size=(32, 48)))
    assert m.cfg.image_size == (32, 48) and _logit_diff(m, t, torch.randn(1, 3, 32, 48)) <= 1e-4


def test_an_explicit_other_img_size_is_resampled_with_a_warning(tmp_path):
    t = make_timm(TINY, seed=37, img_size=32, patch_size=8, num_classes=4)
    path = _save(_timm_sd(t), tmp_path / "small.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = HookedViT.from_pretrained(TINY, checkpoint_path=path, timm_kwargs=dict(img_size=64))
    assert any("pos_embed resampled" in str(w.message) for w in caught)
    assert m.cfg.image_size == (64, 64) and m.W_pos.shape[1] == 1 + 64


# ------------------------------------------------------------------ which model a file is (issue 12 item 5)
def test_file_named_for_another_model_is_refused_with_the_right_name(tmp_path):
    t = make_timm(DEIT, seed=38)
    path = _save(_timm_sd(t), tmp_path / "deit_tiny_patch16_224.fb_in1k.safetensors")
    with pytest.raises(CheckpointError) as err:
        HookedViT.from_pretrained(TINY, checkpoint_path=path)
    msg = str(err.value)
    assert "is deit_tiny_patch16_224.fb_in1k" in msg and "not vit_tiny_patch16_224" in msg
    assert f"from_pretrained('{DEIT}', checkpoint_path=" in msg and f"--model {DEIT}" in msg
    # and under its own name it loads as DeiT, with DeiT's preprocessing from timm's registry
    from timm.models import get_pretrained_cfg

    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        m = HookedViT.from_pretrained(DEIT, checkpoint_path=path)
    ref = get_pretrained_cfg("deit_tiny_patch16_224.fb_in1k")
    assert m.cfg.model_name == "deit_tiny_patch16_224.fb_in1k"
    assert tuple(m.data_config["mean"]) == tuple(ref.mean) and tuple(m.data_config["std"]) == tuple(ref.std)
    assert _logit_diff(m, t, torch.randn(1, 3, 224, 224)) <= 1e-4


def test_file_named_for_another_tag_of_the_same_arch(tmp_path):
    """Asked for an explicit tag: refused; asked for the bare architecture: the file's tag is used."""
    t = make_timm(TINY, seed=39, num_classes=21843)
    path = _save(_timm_sd(t), tmp_path / "vit_tiny_patch16_224.augreg_in21k.safetensors")
    with pytest.raises(CheckpointError, match=r"is vit_tiny_patch16_224\.augreg_in21k.*not "
                                              r"vit_tiny_patch16_224\.augreg_in21k_ft_in1k.*"
                                              r"from_pretrained\('vit_tiny_patch16_224\.augreg_in21k'"):
        HookedViT.from_pretrained(TINY_FULL, checkpoint_path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        m = HookedViT.from_pretrained(TINY, checkpoint_path=path)
    assert m.cfg.model_name == "vit_tiny_patch16_224.augreg_in21k" and m.cfg.n_classes == 21843
    assert torch.equal(m.W_U, t.head.weight.T)


def test_file_named_for_the_default_tag_loads_as_before(tmp_path):
    t = make_timm(TINY, seed=40)
    path = _save(_timm_sd(t), tmp_path / f"{TINY_FULL}.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        m = HookedViT.from_pretrained(TINY, checkpoint_path=path)
    assert m.cfg.model_name == TINY_FULL and m.cfg.extra["pretrained_tag"] == "augreg_in21k_ft_in1k"
    assert m.class_names is not None and len(m.class_names) == 1000
    assert _logit_diff(m, t, torch.randn(1, 3, 224, 224)) <= 1e-4


def test_fine_tune_saved_under_a_tag_name_is_not_that_tag(tmp_path, t10):
    path = _save(_timm_sd(t10), tmp_path / f"{TINY_FULL}.safetensors")
    with pytest.warns(CheckpointWarning, match=r"named for .* head has 10 classes where .* has 1000"):
        m = HookedViT.from_pretrained(TINY, checkpoint_path=path)
    assert m.cfg.model_name == "vit_tiny_patch16_224.unknown" and m.class_names is None
    assert torch.equal(m.W_U, t10.head.weight.T)


def test_unnamed_file_with_the_tag_in_the_name_asked_for_is_that_tag(tmp_path):
    t = make_timm(TINY, seed=41)
    path = _save(_timm_sd(t), tmp_path / "my_weights.safetensors")
    with pytest.warns(CheckpointWarning, match="my_weights.safetensors names no timm model"):
        unknown = HookedViT.from_pretrained(TINY, checkpoint_path=path)
    assert unknown.cfg.model_name == "vit_tiny_patch16_224.unknown"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        named = HookedViT.from_pretrained(TINY_FULL, checkpoint_path=path)
    assert named.cfg.model_name == TINY_FULL
    assert all(torch.equal(a, b) for a, b in zip(unknown.state_dict().values(), named.state_dict().values()))
    with pytest.raises(InputError, match="unknown pretrained tag"):
        HookedViT.from_pretrained(unknown.cfg.model_name)


def test_metadata_naming_another_model_is_refused(tmp_path, t10):
    path = _save(_timm_sd(t10), tmp_path / "weights.safetensors", metadata={"model_name": "deit_tiny_patch16_224.fb_in1k"})
    with pytest.raises(CheckpointError, match=r"its metadata \(model_name=.*--model deit_tiny_patch16_224"):
        HookedViT.from_pretrained(TINY, checkpoint_path=path)


def test_hugging_face_config_beside_the_file_names_the_model(tmp_path):
    t = make_timm(DEIT, seed=42)
    folder = tmp_path / "hub"
    folder.mkdir()
    path = _save(_timm_sd(t), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {"architecture": DEIT, "num_classes": 1000, "pretrained_cfg": {"tag": "fb_in1k"}}))
    with pytest.raises(CheckpointError, match=r"config\.json beside it.*--model deit_tiny_patch16_224"):
        HookedViT.from_pretrained(TINY, checkpoint_path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        assert HookedViT.from_pretrained(DEIT, checkpoint_path=path).cfg.model_name == "deit_tiny_patch16_224.fb_in1k"


def test_hooked_vit_save_file_points_at_load(tmp_path, t10):
    saved = HookedViT.from_timm(t10).save(tmp_path / "saved.safetensors")
    with pytest.raises(CheckpointError, match=r"written by HookedViT\.save.*HookedViT\.load\("):
        HookedViT.from_pretrained(TINY, checkpoint_path=saved)


# ------------------------------------------------------------------ files that are not weights
def test_not_a_weights_file(tmp_path):
    txt = tmp_path / "notimage.txt"
    txt.write_text("hello\n")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    listed = tmp_path / "list.pth"
    torch.save([1, 2, 3], listed)
    for path, why in [(txt, r"\.txt is not a weights suffix"), (junk, "no safetensors header"),
                      (listed, "not a name -> tensor dict"), (tmp_path, "is a folder")]:
        with pytest.raises(CheckpointError, match=why) as err:
            HookedViT.from_pretrained(TINY, checkpoint_path=path)
        assert ".safetensors" in str(err.value) and isinstance(err.value, (ValueError, VitLensError))
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        HookedViT.from_pretrained(TINY, checkpoint_path=tmp_path / "nope.safetensors")


def test_cli_names_a_file_that_is_not_weights(tmp_path, capsys):
    txt = tmp_path / "notimage.txt"
    txt.write_text("hello\n")
    assert cli.main(["identify", "--checkpoint", str(txt)]) == 2
    err = capsys.readouterr().err
    assert "is not a weights file" in err and ".safetensors" in err and ": 101" not in err


def test_training_checkpoint_wrappers_and_dataparallel_prefix(tmp_path, t10):
    sd = {f"module.{k}": v for k, v in _timm_sd(t10).items()}
    path = tmp_path / "epoch3.pth"
    torch.save({"epoch": 3, "model": sd, "optimizer": {"lr": 0.1}}, path)
    m = _load_quiet(TINY, checkpoint_path=path)
    assert torch.equal(m.W_U, t10.head.weight.T) and torch.equal(m.blocks[5].mlp.W_in, t10.blocks[5].mlp.fc1.weight.T)


def test_checkpoint_env_folder_that_does_not_exist(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_folder"
    monkeypatch.setenv("VIT_LENS_CHECKPOINTS", str(missing))
    with pytest.raises(CheckpointNotFoundError) as err:
        HookedViT.from_pretrained(TINY)
    msg = str(err.value)
    assert "does not exist" in msg and str(missing) in msg and f"{TINY_FULL}.safetensors" in msg
    assert isinstance(err.value, FileNotFoundError)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    monkeypatch.setenv("VIT_LENS_CHECKPOINTS", str(a_file))
    with pytest.raises(CheckpointNotFoundError, match="is a file, not a folder"):
        HookedViT.from_pretrained(TINY)


# ------------------------------------------------------------------ the real files
def _real(full):
    path = WEIGHTS / f"{full}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not found (set VIT_LENS_CHECKPOINTS)")
    return path


@pytest.mark.real
def test_real_deit_file_as_vit_is_refused(capsys):
    path = _real(REAL_DEIT)
    with pytest.raises(CheckpointError) as err:
        HookedViT.from_pretrained(TINY, checkpoint_path=path)
    assert f"is {REAL_DEIT}" in str(err.value) and f"from_pretrained('{DEIT}'" in str(err.value)
    assert cli.main(["identify", "--checkpoint", str(path)]) == 2
    out = capsys.readouterr()
    assert f"--model {DEIT}" in out.err and "p(" not in out.out  # refused before any image is scored


@pytest.mark.real
def test_real_unnamed_copy_loads_with_tag_unknown(tmp_path):
    path = _real(REAL_VIT)
    link = tmp_path / "my_weights.safetensors"
    link.symlink_to(path)  # the real file under a name that names no model (no copy of the weights)
    with pytest.warns(CheckpointWarning, match=r"my_weights\.safetensors names no timm model.*architecture's default"):
        m = HookedViT.from_pretrained(TINY, checkpoint_path=link)
    sd = load_file(str(path))
    assert m.cfg.model_name == "vit_tiny_patch16_224.unknown" and m.cfg.extra["pretrained_tag"] == "unknown"
    assert torch.equal(m.W_U, sd["head.weight"].T) and torch.equal(m.blocks[7].mlp.W_out, sd["blocks.7.mlp.fc2.weight"].T)
    assert m.class_names[281] == "tabby, tabby cat"  # 1000 classes: ImageNet-1k's names, as the warning says


def test_old_layout_converted_by_timm_is_announced(tmp_path):
    """DeiT-III's old ``gamma_1`` / ``gamma_2`` names: timm's conversion maps them, with a warning."""
    t = make_timm("deit3_small_patch16_224", seed=43, img_size=32, patch_size=8, num_classes=3, depth=2)
    sd = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in _timm_sd(t).items()}
    path = _save(sd, tmp_path / "old_layout.safetensors")
    with pytest.warns(CheckpointWarning, match=r"not in timm's layout.*blocks\.0\.gamma_1"):
        m = HookedViT.from_pretrained("deit3_small_patch16_224", checkpoint_path=path,
                                      timm_kwargs=dict(depth=2))
    assert _logit_diff(m, t, torch.randn(2, 3, 32, 32)) <= 1e-4
