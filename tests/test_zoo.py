"""Parity with timm for every registry family, with and without each weight-processing option.

Reference: timm's own forward (logits) and its blocks' outputs (forward hooks), on small
random-initialised instances whose every parameter is perturbed (so zero-initialised biases,
unit LayerNorm weights and tiny LayerScale values cannot hide a conversion bug).
"""

from __future__ import annotations

import pytest
import torch

from vit_lens import HookedViT
from vit_lens.loading import FAMILIES, ProcessingError, UnsupportedModelError

from conftest import OPTION_SETS, make_timm

TOL = 1e-4
FAMILY_BY_KEY = {f.key: f for f in FAMILIES}


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def timm_reference(t, x):
    """timm logits, every block's output, and the pre-norm output (CLIP) if any."""
    blocks, pre = [], []
    handles = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in t.blocks]
    if not isinstance(t.norm_pre, torch.nn.Identity):
        handles.append(t.norm_pre.register_forward_hook(lambda m, i, o: pre.append(o)))
    try:
        with torch.no_grad():
            logits = t(x)
    finally:
        for h in handles:
            h.remove()
    return logits, blocks, (pre[0] if pre else None)


_CACHE: dict = {}


def family_model(key: str):
    """(timm model, input batch, reference) for a family's small example, built once."""
    if key not in _CACHE:
        fam = FAMILY_BY_KEY[key]
        t = perturb(make_timm(fam.example, **fam.test_kwargs))
        size = fam.test_kwargs.get("img_size", 32)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
        _CACHE[key] = (t, x, timm_reference(t, x))
    return _CACHE[key]


def assert_parity(hooked, x, ref, options):
    ref_logits, ref_blocks, ref_pre = ref
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert logits.shape == ref_logits.shape
    if options.get("center_unembed"):
        # equal up to a per-example constant: compare centred logits, and the softmax
        diff = (logits - logits.mean(-1, keepdim=True)) - (ref_logits - ref_logits.mean(-1, keepdim=True))
        assert diff.abs().max().item() <= TOL
        assert (logits.softmax(-1) - ref_logits.softmax(-1)).abs().max().item() <= TOL
    else:
        assert (logits - ref_logits).abs().max().item() <= TOL
    assert len(ref_blocks) == hooked.cfg.n_layers
    for layer, r in enumerate(ref_blocks):
        if options.get("center_writing_weights"):
            # every write is centred; with a pre-norm (CLIP) ln_pre's output keeps its own mean
            r = r - (r - ref_pre).mean(-1, keepdim=True) if ref_pre is not None else r - r.mean(-1, keepdim=True)
        got = cache[f"blocks.{layer}.hook_resid_post"]
        assert (got - r).abs().max().item() <= TOL, f"block {layer}"


@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("family", [f.key for f in FAMILIES])
def test_family_parity(family, option_set):
    fam = FAMILY_BY_KEY[family]
    options = OPTION_SETS[option_set]
    t, x, ref = family_model(family)
    refused = [o for o in options if o in fam.not_foldable]
    if refused:
        with pytest.raises(ProcessingError):
            HookedViT.from_timm(t, **options)
        return
    hooked = HookedViT.from_timm(t, **options)
    assert hooked.cfg.normalization_type == ("LNPre" if options.get("fold_ln") else "LN")
    assert_parity(hooked, x, ref, options)


def test_registry_rows_cover_the_required_kinds():
    keys = {f.key for f in FAMILIES}
    assert len(keys) >= 8
    assert {"deit_distilled", "deit3", "clip", "clip_quickgelu", "gap", "rpn", "dinov2", "dinov2_reg", "miil"} <= keys


def test_family_features_as_claimed():
    """The example of each row really has the features the registry claims."""
    cfgs = {k: HookedViT.from_timm(family_model(k)[0]).cfg for k in FAMILY_BY_KEY}
    assert cfgs["deit_distilled"].pooling == "token_dist" and cfgs["deit_distilled"].n_prefix_tokens == 2
    assert not cfgs["deit3"].pos_embed_prefix
    assert cfgs["clip"].has_norm_pre and cfgs["clip_quickgelu"].act_fn == "quick_gelu"
    assert cfgs["gap"].pooling == "avg" and not cfgs["gap"].has_class_token and cfgs["gap"].has_ln_final
    assert cfgs["reg_gap"].n_register_tokens == 4 and cfgs["reg_gap"].has_fc_norm
    assert cfgs["rpn"].post_norm and cfgs["rpn"].has_fc_norm
    assert cfgs["dinov2"].n_classes == 0 and cfgs["dino"].n_classes == 0
    assert cfgs["dinov2_reg"].n_register_tokens == 4 and not cfgs["dinov2_reg"].pos_embed_prefix
    assert cfgs["miil"].n_classes == 11221
    assert cfgs["siglip_gap"].act_fn == "gelu_tanh"


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "dinov2_reg", "gap", "clip", "rpn"])
def test_dynamic_img_size_parity(family):
    """dynamic_img_size models at other (non-square) sizes: interpolated position embeddings as timm."""
    fam = FAMILY_BY_KEY[family]
    t = perturb(make_timm(fam.example, **dict(fam.test_kwargs, dynamic_img_size=True)))
    hooked = HookedViT.from_timm(t)
    assert hooked.cfg.dynamic_img_size
    for h, w in [(48, 40), (24, 64), (32, 32)]:
        x = torch.randn(2, 3, h, w)
        assert_parity(hooked, x, timm_reference(t, x), {})
    with pytest.raises(ValueError, match="multiple of the patch size"):
        hooked(torch.randn(1, 3, 33, 32))


def test_static_model_other_size_is_refused_with_advice():
    t, _, _ = family_model("vit")
    hooked = HookedViT.from_timm(t)
    with pytest.raises(ValueError, match="preprocess"):
        hooked(torch.randn(1, 3, 48, 48))


def test_any_number_of_classes_and_image_size():
    t = perturb(make_timm("vit_small_patch16_224", img_size=(48, 24), patch_size=8, depth=1, embed_dim=32,
                          num_heads=2, num_classes=3))
    hooked = HookedViT.from_timm(t)
    assert hooked.cfg.n_classes == 3 and hooked.cfg.grid_size == (6, 3)
    x = torch.randn(5, 3, 48, 24)
    assert_parity(hooked, x, timm_reference(t, x), {})


# ------------------------------------------------------------------------------------------
# project_to_classes: the class-space projection reproduces the logits for every pooling kind
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "deit_distilled", "gap", "reg_gap", "rpn", "clip", "dinov2"])
@pytest.mark.parametrize("fold", [False, True])
def test_project_to_classes_reproduces_logits(family, fold):
    t, x, (ref_logits, ref_blocks, _) = family_model(family)
    hooked = HookedViT.from_timm(t)
    if hooked.unembed is None:  # headless: give it directions, then process
        hooked.set_class_directions(torch.randn(hooked.cfg.d_model, 5))
        ref_logits = hooked(x)
    if fold and not hooked.cfg.post_norm:
        from vit_lens.loading import process_weights

        process_weights(hooked, fold_ln=True)
    r = ref_blocks[-1]  # timm's residual stream after the last block
    n = hooked.cfg.n_prefix_tokens
    cfg = hooked.cfg
    with torch.no_grad():
        if cfg.pooling == "token":
            rec = hooked.project_to_classes(r[:, 0])
        elif cfg.pooling == "token_dist":
            rec = (hooked.project_to_classes(r[:, 0], head="cls") + hooked.project_to_classes(r[:, 1], head="dist")) / 2
        elif cfg.has_fc_norm:
            rec = hooked.project_to_classes(r[:, n:].mean(1))
        else:
            rec = hooked.project_to_classes(r[:, n:]).mean(1)
    assert (rec - ref_logits).abs().max().item() <= TOL


def test_distilled_exposes_both_heads():
    t, x, (ref_logits, ref_blocks, _) = family_model("deit_distilled")
    hooked = HookedViT.from_timm(t)
    assert torch.equal(hooked.W_U, t.head.weight.T) and torch.equal(hooked.W_U_dist, t.head_dist.weight.T)
    assert torch.equal(hooked.b_U_dist, t.head_dist.bias)
    cls_dirs, dist_dirs = hooked.class_directions(head="cls"), hooked.class_directions(head="dist")
    w = t.norm.weight[:, None]
    assert torch.allclose(cls_dirs, w * t.head.weight.T) and torch.allclose(dist_dirs, w * t.head_dist.weight.T)
    assert torch.allclose(hooked.class_directions(), (cls_dirs + dist_dirs) / 2)
    with pytest.raises(ValueError, match="head"):
        hooked.class_directions(head="bogus")
    plain = HookedViT.from_timm(family_model("vit")[0])
    with pytest.raises(ValueError, match="distilled"):
        plain.class_directions(head="dist")
    with pytest.raises(ValueError, match="distillation head"):
        plain.W_U_dist


def test_headless_distilled_output_is_mean_feature():
    t = perturb(make_timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0))
    x = torch.randn(2, 3, 32, 32)
    hooked = HookedViT.from_timm(t)
    with torch.no_grad():
        assert (hooked(x) - t(x)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------
# CLIP-style class space and set_class_directions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True),
                                     dict(fold_ln=True, center_unembed=True)])
def test_clip_text_directions_in_head_space(options):
    """W_U = W_proj @ W_text: logits = timm image embedding @ W_text + bias."""
    t, x, (img_emb, _, _) = family_model("clip")
    hooked = HookedViT.from_timm(t, **options)
    g = torch.Generator().manual_seed(3)
    W_text = torch.nn.functional.normalize(torch.randn(img_emb.shape[-1], 7, generator=g), dim=0)
    bias = torch.randn(7, generator=g)
    hooked.set_class_directions(W_text, labels=[f"c{i}" for i in range(7)], bias=bias, space="head")
    expected = img_emb @ W_text + bias
    with torch.no_grad():
        got = hooked(x)
    if options.get("center_unembed"):
        got, expected = got - got.mean(-1, keepdim=True), expected - expected.mean(-1, keepdim=True)
    assert (got - expected).abs().max().item() <= TOL
    # ranking equals CLIP's cosine similarity with unit-norm text embeddings
    cos = torch.nn.functional.normalize(img_emb, dim=-1) @ W_text
    assert torch.equal((img_emb @ W_text).argsort(-1), cos.argsort(-1))
    assert hooked.class_names[3] == "c3" and hooked.class_index("c3") == 3
    # a second call composes with the original projection again, not with the first text embeddings
    hooked.set_class_directions(W_text[:, :2], space="head")
    with torch.no_grad():
        got2 = hooked(x)
    exp2 = img_emb @ W_text[:, :2]
    if options.get("center_unembed"):
        got2, exp2 = got2 - got2.mean(-1, keepdim=True), exp2 - exp2.mean(-1, keepdim=True)
    assert (got2 - exp2).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["vit", "gap", "reg_gap", "deit_distilled", "dinov2"])
@pytest.mark.parametrize("fold", [False, True])
def test_residual_space_directions_act_on_timm_pre_logits(family, fold):
    t, x, _ = family_model(family)
    hooked = HookedViT.from_timm(t)
    g = torch.Generator().manual_seed(4)
    W, b = torch.randn(hooked.cfg.d_model, 6, generator=g), torch.randn(6, generator=g)
    hooked.set_class_directions(W, bias=b)
    if fold:
        from vit_lens.loading import process_weights

        process_weights(hooked, fold_ln=True, center_unembed=True)
    with torch.no_grad():
        feats = t.forward_head(t.forward_features(x), pre_logits=True)  # timm's classifier input
        expected = feats @ W + b
        got = hooked(x)
    if fold:
        got, expected = got - got.mean(-1, keepdim=True), expected - expected.mean(-1, keepdim=True)
    assert (got - expected).abs().max().item() <= TOL


def test_directions_set_after_processing_mean_the_same():
    t, x, _ = family_model("deit3")
    W, b = torch.randn(64, 4), torch.randn(4)
    plain = HookedViT.from_timm(t)
    folded = HookedViT.from_timm(t, fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    plain.set_class_directions(W, bias=b)
    folded.set_class_directions(W, bias=b)
    with torch.no_grad():
        assert (plain(x) - folded(x)).abs().max().item() <= TOL


def test_set_class_directions_errors():
    t, _, _ = family_model("vit")
    hooked = HookedViT.from_timm(t)
    with pytest.raises(ValueError, match="d_model"):
        hooked.set_class_directions(torch.randn(5, 3))
    with pytest.raises(ValueError, match="n_head_outputs"):
        hooked.set_class_directions(torch.randn(5, 3), space="head")
    with pytest.raises(ValueError, match="labels"):
        hooked.set_class_directions(torch.randn(64, 3), labels=["a"])
    with pytest.raises(ValueError, match="space"):
        hooked.set_class_directions(torch.randn(64, 3), space="text")
    headless = HookedViT.from_timm(family_model("dinov2")[0])
    with pytest.raises(ValueError, match="set_class_directions"):
        headless.W_U
    with pytest.raises(ValueError, match="residual space"):
        headless.set_class_directions(torch.randn(64, 3), space="head")


# ------------------------------------------------------------------------------------------
# unsupported models are refused up front, naming the feature
# ------------------------------------------------------------------------------------------
SMALL = dict(img_size=32, patch_size=8, depth=1)


@pytest.mark.parametrize(
    "name, kwargs, feature",
    [
        ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=14, depth=1), "rotary"),
        ("beit_base_patch16_224", dict(SMALL, embed_dim=32, num_heads=2), "relative position bias"),
        ("vit_base_patch16_siglip_224", dict(SMALL, embed_dim=32, num_heads=2), "attention-pool"),
        ("vit_small_patch16_18x2_224", dict(SMALL, embed_dim=32, num_heads=2), "parallel"),
        ("vit_tiny_patch16_224", dict(SMALL, qk_norm=True), "QK normalisation"),
        ("vit_small_patch14_dinov2", dict(SMALL, mlp_layer="swiglu"), "SwiGLU"),
        ("vit_tiny_patch16_224", dict(SMALL, global_pool="max"), "global_pool='max'"),
        ("vit_tiny_patch16_224", dict(SMALL, pos_embed="none"), "position embedding"),
        ("vit_tiny_patch16_224", dict(SMALL, norm_layer="rmsnorm"), "only LayerNorm"),
    ],
)
def test_unsupported_models_are_refused(name, kwargs, feature):
    if kwargs.get("mlp_layer") == "swiglu":
        from timm.layers import SwiGLUPacked

        kwargs = dict(kwargs, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    t = make_timm(name, **kwargs)
    with pytest.raises(UnsupportedModelError, match=feature):
        HookedViT.from_timm(t)


@pytest.mark.parametrize(
    "name, feature",
    [("eva02_tiny_patch14_224", "rotary"), ("beit_base_patch16_224", "relative position bias"),
     ("vit_base_patch16_siglip_224", "attention-pool"), ("vit_giant_patch14_dinov2", "SwiGLU")],
)
def test_refused_by_name_before_any_weights_are_read(name, feature, monkeypatch):
    import timm

    real_create = timm.create_model

    def no_download(*args, **kwargs):
        assert not kwargs.get("pretrained"), "tried to load weights of an unsupported model"
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(UnsupportedModelError, match=feature):
        HookedViT.from_pretrained(name)


def test_unknown_processing_option_and_timm_kwargs():
    with pytest.raises(TypeError, match="fold_layernorm"):
        HookedViT.from_pretrained("vit_tiny_patch16_224", fold_layernorm=True)
    with pytest.raises(TypeError, match="timm_kwargs"):
        HookedViT.from_pretrained("vit_tiny_patch16_224", timm_kwargs=dict(pretrained=False))


# ------------------------------------------------------------------------------------------
# the real checkpoints still pass
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["vit", "deit"])
def test_real_checkpoints_parity_and_accuracy(which, request, labelled_images):
    import safetensors.torch
    import timm

    from conftest import REAL_DEIT, REAL_VIT, WEIGHTS

    hooked = request.getfixturevalue("real_vit" if which == "vit" else "real_deit")
    full = REAL_VIT if which == "vit" else REAL_DEIT
    t = timm.create_model(full.split(".")[0], pretrained=False).eval()
    t.load_state_dict(safetensors.torch.load_file(str(WEIGHTS / f"{full}.safetensors")), strict=True)
    rows = [r for r in labelled_images if "imagenet/" in r["path"]][:3]
    x = hooked.preprocess([r["path"] for r in rows])
    ref = timm_reference(t, x)
    assert_parity(hooked, x, ref, {})
    labels = torch.tensor([r["class_index"] for r in rows])
    assert (ref[0].argmax(-1) == labels).sum().item() >= 2  # the checkpoints get 19/20 right overall
