"""Hugging Face ViT / DeiT / CLIP at other image sizes: ``from_hf(..., interpolate_pos_encoding=True)``.

The reference is transformers' own forward with ``interpolate_pos_encoding=True`` (and its embeddings'
own ``interpolate_pos_encoding`` method for the position embeddings), on small random models, with
eager and SDPA attention, at the native size and at two others (one non-square). Without the option
a wrong size is refused, naming it, as transformers' default forward refuses it.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vit_lens import HookedViT  # noqa: E402
from vit_lens.core.errors import InputError, InputTypeError  # noqa: E402
from vit_lens.loading.sources.timm import UnsupportedModelError  # noqa: E402

TOL = 1e-4
SMALL = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128)
#: native 32x32 (4x4 grid); 48x48 (6x6, larger); 24x40 (3x5, non-square)
SIZES = [(32, 32), (48, 48), (24, 40)]
#: class -> (config class, overrides, (embeddings path, HF output attribute))
CASES = {
    "ViTForImageClassification": (transformers.ViTConfig, dict(num_labels=7), ("vit.embeddings", "logits")),
    # the distilled pair: [CLS] and [DIST] position embeddings both kept, both heads read
    "DeiTForImageClassificationWithTeacher": (transformers.DeiTConfig, dict(num_labels=7),
                                              ("deit.embeddings", "logits")),
    "CLIPVisionModelWithProjection": (transformers.CLIPVisionConfig, dict(projection_dim=24),
                                      ("vision_model.embeddings", "image_embeds")),
}


def make(cls_name: str, attn: str = "eager", seed: int = 0, **overrides):
    cfg_cls, kw, _ = CASES[cls_name]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**SMALL, **kw, **overrides})
    cfg._attn_implementation = attn
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # HF initialises position embeddings / biases to 0 or tiny values: make each matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _embeddings(model):
    obj = model
    for part in CASES[type(model).__name__][2][0].split("."):
        obj = getattr(obj, part)
    return obj


def hf_run(model, x):
    """HF's output and the residual stream entering / leaving each layer, with interpolate_pos_encoding=True."""
    from vit_lens.loading.sources.hf import _parts

    layers = _parts(model, type(model).__name__)["layers"]
    outs = []

    def first_input(m, args, kwargs):
        outs.append(args[0] if args else next(iter(kwargs.values())))

    handles = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [l.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o)) for l in layers]
    try:
        out = model(pixel_values=x, interpolate_pos_encoding=True)
    finally:
        for h in handles:
            h.remove()
    return getattr(out, CASES[type(model).__name__][2][1]), outs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", sorted(CASES))
def test_parity_with_transformers_at_other_sizes(cls_name, attn):
    model = make(cls_name, attn)
    hooked = HookedViT.from_hf(model, interpolate_pos_encoding=True)
    assert hooked.cfg.dynamic_img_size and hooked.cfg.extra["interpolate_pos_encoding"] is True
    n_pre = hooked.cfg.n_prefix_tokens
    for i, (h, w) in enumerate(SIZES):
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(10 + i))
        with torch.no_grad():
            ref, blocks = hf_run(model, x)
            logits, cache = hooked.run_with_cache(x)
            # HF's own interpolation of the position embeddings (its method, called directly)
            emb = _embeddings(model)
            dummy = torch.zeros(1, n_pre + (h // 8) * (w // 8), SMALL["hidden_size"])
            pos_ref = emb.interpolate_pos_encoding(dummy, h, w)
        assert logits.shape == ref.shape
        assert (logits - ref).abs().max() <= TOL, (h, w)
        assert cache["hook_pos_embed"].shape[1] == n_pre + (h // 8) * (w // 8)
        assert (cache["hook_pos_embed"][0] - pos_ref[0]).abs().max() <= 1e-6, (h, w)
        assert len(blocks) == hooked.cfg.n_layers + 1
        assert (cache["blocks.0.hook_resid_pre"] - blocks[0]).abs().max() <= 1e-5, (h, w)
        for l, b in enumerate(blocks[1:]):
            assert (cache[f"blocks.{l}.hook_resid_post"] - b).abs().max() <= TOL, (h, w, l)
    # the [CLS] (and [DIST]) position embeddings are the native ones, not resampled
    torch.testing.assert_close(cache["hook_pos_embed"][0, :n_pre], hooked.pos_embed.W_pos[0, :n_pre], rtol=0, atol=0)


def test_without_the_option_other_sizes_are_refused_naming_it():
    model = make("ViTForImageClassification")
    hooked = HookedViT.from_hf(model)
    x = torch.randn(1, 3, 48, 48)
    with pytest.raises(ValueError):  # transformers refuses too
        model(pixel_values=x)
    with pytest.raises(InputError, match=r"takes 32x32 images, got 48x48.*interpolate_pos_encoding=True"):
        hooked(x)
    assert not hooked.cfg.dynamic_img_size and "interpolate_pos_encoding" not in hooked.cfg.extra
    with torch.no_grad():  # the native size is unchanged by the option
        a = hooked(torch.ones(1, 3, 32, 32))
        b = HookedViT.from_hf(model, interpolate_pos_encoding=True)(torch.ones(1, 3, 32, 32))
    assert torch.equal(a, b)


def test_sizes_that_are_not_a_multiple_of_the_patch_are_refused():
    hooked = HookedViT.from_hf(make("ViTForImageClassification"), interpolate_pos_encoding=True)
    with pytest.raises(InputError, match="not a multiple of the patch size 8x8"):
        hooked(torch.randn(1, 3, 36, 40))


def test_option_is_checked_and_a_non_square_native_grid_refused():
    with pytest.raises(InputTypeError, match="interpolate_pos_encoding must be True or False"):
        HookedViT.from_hf(make("ViTForImageClassification"), interpolate_pos_encoding="yes")  # type: ignore[arg-type]
    wide = make("ViTForImageClassification", image_size=(32, 48))
    with pytest.raises(RuntimeError):  # transformers' reshape to a square grid fails there
        wide(pixel_values=torch.randn(1, 3, 32, 48), interpolate_pos_encoding=True)
    with pytest.raises(UnsupportedModelError, match="interpolate_pos_encoding=True with a non-square native grid 4x6"):
        HookedViT.from_hf(wide, interpolate_pos_encoding=True)
    with pytest.raises(InputTypeError, match="interpolate_pos_encoding is an option of Hugging Face models.*"
                                             "dynamic_img_size=True"):
        HookedViT.from_pretrained("vit_tiny_patch16_224", interpolate_pos_encoding=True)


def test_saved_and_loaded_and_through_from_pretrained(tmp_path):
    model = make("DeiTForImageClassificationWithTeacher")
    model.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = hf_run(model, x)
    with pytest.warns(Warning, match="image processor"):
        by_name = HookedViT.from_pretrained(f"hf:{tmp_path / 'hf'}", interpolate_pos_encoding=True)
    assert by_name.cfg.extra["interpolate_pos_encoding"] is True
    by_name.save(tmp_path / "m.safetensors")
    loaded = HookedViT.load(tmp_path / "m.safetensors")
    assert loaded.cfg.dynamic_img_size and loaded.cfg.extra["interpolate_pos_encoding"] is True
    assert loaded.cfg.extra["pos_embed_antialias"] is False
    with torch.no_grad():
        for m in (by_name, loaded):
            assert (m(x) - ref).abs().max() <= TOL


def test_weight_processing_keeps_the_output_at_other_sizes():
    """Centring the position embeddings commutes with their interpolation (both linear, on different axes):
    every processing option keeps HF's logits at a non-native size (up to center_unembed's per-image shift)."""
    model = make("DeiTForImageClassificationWithTeacher")
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, _ = hf_run(model, x)
        got = HookedViT.from_hf(model, interpolate_pos_encoding=True, fold_ln=True, center_writing_weights=True,
                                center_unembed=True, fold_value_biases=True)(x)
    centred = ref - ref.mean(-1, keepdim=True)
    assert (got - centred).abs().max() <= TOL
