"""Bad input gets a clear error that says what to do instead."""

from __future__ import annotations

import pytest
import torch

from conftest import make_timm
from vit_lens import HookedViT, UnsupportedModelError


@pytest.fixture(scope="module")
def tiny():
    return HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1))


def test_wrong_image_size(tiny):
    with pytest.raises(ValueError, match=r"takes 32x32 images, got 48x40.*model\.preprocess"):
        tiny(torch.randn(2, 3, 48, 40))


def test_wrong_number_of_channels(tiny):
    with pytest.raises(ValueError, match=r"expected 3 channels.*\[batch, channels, height, width\]"):
        tiny(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="expected 3 channels"):
        tiny(torch.randn(1, 32, 32, 3))  # channels-last


def test_single_image_without_batch_axis(tiny):
    with pytest.raises(ValueError, match=r"single image.*unsqueeze\(0\)"):
        tiny(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="expected images of shape"):
        tiny(torch.randn(1, 1, 3, 32, 32))


def test_uint8_tensor_points_to_preprocess(tiny):
    with pytest.raises(TypeError, match=r"uint8.*model\.preprocess"):
        tiny(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_non_tensor_input_points_to_preprocess(tiny):
    with pytest.raises(TypeError, match=r"got list.*model\.preprocess"):
        tiny([torch.randn(3, 32, 32)])


def test_bad_return_type(tiny):
    with pytest.raises(ValueError, match="return_type"):
        tiny(torch.randn(1, 3, 32, 32), return_type="loss")


def test_non_vit_model_name():
    with pytest.raises(UnsupportedModelError, match=r"resnet50.*VisionTransformer"):
        HookedViT.from_pretrained("resnet50")


def test_non_vit_timm_model():
    import timm

    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        HookedViT.from_timm(timm.create_model("resnet18", pretrained=False))


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model name 'vit_tinny_patch16_224'.*Did you mean vit_tiny_patch16_224"):
        HookedViT.from_pretrained("vit_tinny_patch16_224")
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nope'.*augreg_in21k_ft_in1k"):
        HookedViT.from_pretrained("vit_tiny_patch16_224.nope")
    with pytest.raises(TypeError, match="non-empty string"):
        HookedViT.from_pretrained(None)


@pytest.mark.parametrize("name, close", [
    ("blocks.0.attn.hook_patern", "blocks.0.attn.hook_pattern"),
    ("blocks.3.hook_resid_post", "blocks.0.hook_resid_post"),  # layer out of range
    ("hook_pos_embedding", "hook_pos_embed"),
])
def test_unknown_hook_name(tiny, name, close):
    x = torch.randn(1, 3, 32, 32)
    pattern = rf"unknown hook name '{name}'.*Did you mean.*'{close}'.*list\(model\.hook_dict\)"
    with pytest.raises(ValueError, match=pattern):
        tiny.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: a)])
    with pytest.raises(ValueError, match=pattern):
        tiny.run_with_cache(x, names_filter=[name])
    with pytest.raises(ValueError, match=pattern):
        tiny.add_hook(name, lambda a, hook: a)
    with pytest.raises(ValueError, match=pattern):
        with tiny.hooks(fwd_hooks=[(name, lambda a, hook: a)]):
            pass
    assert all(not hp.has_hooks() for hp in tiny.hook_dict.values())  # nothing left half-installed


def test_hook_result_needs_the_flag(tiny):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        tiny.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_result", lambda a, hook: a)])
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        tiny.run_with_cache(x, names_filter="blocks.0.attn.hook_result")
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        tiny.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("hook_result"), lambda a, hook: a)])
    assert all(not hp.has_hooks() for hp in tiny.hook_dict.values())


def test_bad_names_filter_type(tiny):
    with pytest.raises(TypeError, match="names_filter"):
        tiny.run_with_cache(torch.randn(1, 3, 32, 32), names_filter=3)


def test_unknown_keyword_arguments_are_refused():
    t = make_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    with pytest.raises(TypeError, match=r"unexpected keyword.*'fold_layernorm'"):
        HookedViT.from_timm(t, fold_layernorm=True)
    with pytest.raises(TypeError, match=r"unexpected keyword.*'devcie'"):
        HookedViT.from_pretrained("vit_tiny_patch16_224", devcie="cpu")
    with pytest.raises(TypeError, match="dtype"):
        HookedViT.from_pretrained("vit_tiny_patch16_224", dtype=torch.int64)


def test_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        HookedViT.from_pretrained("vit_tiny_patch16_224", checkpoint_path=missing)


def test_checkpoint_of_another_architecture(tmp_path):
    """A checkpoint that does not fit the named architecture fails loudly, naming the file."""
    from safetensors.torch import save_file

    other = make_timm("vit_small_patch16_224", depth=1)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    # a library error now (it was torch's load_state_dict RuntimeError), naming the file and the mismatch
    from vit_lens import VitLensError

    with pytest.raises(VitLensError, match=r"small\.safetensors does not match vit_tiny_patch16_224.*1 blocks of width 384"):
        HookedViT.from_pretrained("vit_tiny_patch16_224", checkpoint_path=path)


# ------------------------------------------------------------------ the forward's input checks (issue 12)
def test_float32_images_run_on_a_float64_model():
    """Pixels are exact in any float dtype: the model casts them (torch said 'Input type (float) and bias type (double)')."""
    t = make_timm("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).double()
    m64 = HookedViT.from_timm(t)
    x = torch.randn(2, 3, 32, 32)
    out = m64(x)
    assert out.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(out, t(x.double()), atol=1e-10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused(tiny, bad):
    x = torch.randn(3, 3, 32, 32)
    x[2, 1, 5, 7] = bad
    with pytest.raises(ValueError, match=r"images \[2\] of the batch contain NaN or inf"):
        tiny(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        tiny.run_with_cache(x)


def test_empty_batch_is_refused_everywhere(tiny):
    from vit_lens.patching import logit_metric, patch_positions_sweep

    empty = torch.randn(0, 3, 32, 32)
    with pytest.raises(ValueError, match="the batch is empty"):
        tiny(empty)
    # was: RuntimeError: cannot reshape tensor of 0 elements
    with pytest.raises(ValueError, match="the batch is empty"):
        patch_positions_sweep(tiny, empty, empty, logit_metric(0), progress=False)


def test_quantities_not_defined_for_a_model_are_library_errors():
    """Per-head DLA of post-norm blocks has no meaning: a VitLensError (also a NotImplementedError)."""
    from timm.models.vision_transformer import ResPostBlock

    from vit_lens import NotDefinedError
    from vit_lens.attribution import dla, dla_hooks

    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3,
                                      block_fn=ResPostBlock))
    _, cache = m.run_with_cache(torch.randn(1, 3, 32, 32), names_filter=dla_hooks(m, "component"))
    with pytest.raises(NotDefinedError, match="post-norm.*by='component'"):
        dla(m, cache, 0, by="head")
    assert issubclass(NotDefinedError, NotImplementedError)


def test_probe_importance_refuses_float_labels(tiny):
    from vit_lens.probing import probe_importance

    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(TypeError, match="train_labels"):
        probe_importance(tiny, x, torch.tensor([0.0, 1.0, 0.5, 1.0]), x[:1], torch.tensor([0]), layers=[0],
                         progress=False)
