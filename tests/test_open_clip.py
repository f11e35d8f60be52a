"""OpenCLIP image towers: parity with OpenCLIP's own forward, refusals, preprocessing, loading.

Reference: OpenCLIP's own ``VisionTransformer`` forward (the image embedding, ``encode_image``) and its
blocks' outputs (forward hooks on ``visual.transformer.resblocks[i]``), on small random towers built
through OpenCLIP's public ``open_clip.CLIP(embed_dim, vision_cfg, text_cfg)`` with every parameter
perturbed (so zero biases, unit norms and tiny LayerScale values cannot hide a conversion bug),
with PyTorch's fused MultiheadAttention fast path on and off. The listed towers at their real size
are converted on the meta device (no weights) and checked against OpenCLIP's own config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from vit_lens import HookedViT, UnsupportedModelError  # noqa: E402
from vit_lens.core.errors import InputError, InputTypeError  # noqa: E402
from vit_lens.loading import ProcessingError  # noqa: E402
from vit_lens.loading.checkpoints import CheckpointMismatchError, CheckpointNotFoundError  # noqa: E402
from vit_lens.loading.sources import open_clip as source  # noqa: E402

from conftest import IMAGES, OPTION_SETS  # noqa: E402

TOL = 1e-4
TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=1)
BASE = dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32)
#: small variants of every kind of OpenCLIP ViT tower the source converts
VARIANTS = {
    "clip": dict(vision=BASE),
    "quickgelu": dict(vision=BASE, quick_gelu=True),
    "layerscale": dict(vision=dict(BASE, ls_init_value=0.1)),
    "clipa": dict(vision=dict(BASE, no_ln_pre=True, pool_type="avg", final_ln_after_pool=True)),
    "avg": dict(vision=dict(BASE, pool_type="avg")),
    "tok_ln_after_pool": dict(vision=dict(BASE, final_ln_after_pool=True)),
    "sincos_patch_dropout": dict(vision=dict(BASE, pos_embed_type="sin_cos_2d", patch_dropout=0.5)),
    "gelu_tanh_eps": dict(vision=dict(BASE, act_kwargs=dict(approximate="tanh"), norm_kwargs=dict(eps=1e-6))),
    "non_square": dict(vision=dict(BASE, image_size=(32, 48))),
}


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def small_clip(vision, quick_gelu=False, embed_dim=24, seed=0):
    torch.manual_seed(seed)
    m = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=dict(vision), text_cfg=dict(TEXT), quick_gelu=quick_gelu)
    return perturb(m).eval()


def oc_reference(model, x):
    """OpenCLIP's image embedding, each block's output and ln_pre's output (from its own forward)."""
    visual = model.visual
    blocks, pre = [], []
    hs = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in visual.transformer.resblocks]
    hs.append(visual.ln_pre.register_forward_hook(lambda m, i, o: pre.append(o)))
    try:
        with torch.no_grad():
            emb = model.encode_image(x)
    finally:
        for h in hs:
            h.remove()
    return emb, blocks, pre[0]


def pp_cfg(model, **changes):
    """OpenCLIP's full preprocessing config of ``model`` (its defaults filled in), with changes."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    return dict(asdict(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(model), **changes)


_CACHE: dict = {}


def variant(key):
    if key not in _CACHE:
        spec = VARIANTS[key]
        m = small_clip(spec["vision"], spec.get("quick_gelu", False))
        H, W = m.visual.image_size
        if H != W:  # OpenCLIP's 'shortest' resize at a non-square size has no exact timm equivalent
            open_clip.set_model_preprocess_cfg(m, pp_cfg(m, resize_mode="squash"))
        x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
        _CACHE[key] = (m, x)
    return _CACHE[key]


def assert_parity(hooked, ref, x, options, names_filter=lambda n: n.endswith("hook_resid_post")):
    emb, blocks, pre = ref
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(x, names_filter=names_filter)
    assert logits.shape == emb.shape
    if options.get("center_unembed"):  # equal up to a per-image constant
        d = (logits - logits.mean(-1, keepdim=True)) - (emb - emb.mean(-1, keepdim=True))
    else:
        d = logits - emb
    assert d.abs().max().item() <= TOL
    assert len(blocks) == hooked.cfg.n_layers
    for layer, r in enumerate(blocks):
        if options.get("center_writing_weights"):  # every write centred; ln_pre's output keeps its own mean
            r = r - (r - pre).mean(-1, keepdim=True) if hooked.cfg.has_norm_pre else r - r.mean(-1, keepdim=True)
        got = cache[f"blocks.{layer}.hook_resid_post"]
        assert (got - r).abs().max().item() <= TOL, f"block {layer}"


@pytest.mark.parametrize("fastpath", [True, False], ids=["mha_fastpath", "mha_standard"])
@pytest.mark.parametrize("key", list(VARIANTS))
def test_parity_small_towers(key, fastpath):
    m, x = variant(key)
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        ref = oc_reference(m, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(old)
    hooked = HookedViT.from_open_clip(m)
    assert hooked.cfg.extra["source"] == "open_clip"
    assert_parity(hooked, ref, x, {})
    if fastpath:  # the fully hooked path (explicit LayerNorm, materialised attention) too
        assert_parity(hooked, ref, x, {}, names_filter=None)


PROCESSING_CASES = [(k, o) for k in ("clip", "clipa") for o in OPTION_SETS if o != "none"] + [
    ("layerscale", "all"), ("avg", "all"), ("quickgelu", "all")]


@pytest.mark.parametrize("key, option_set", PROCESSING_CASES)
def test_parity_with_weight_processing(key, option_set):
    m, x = variant(key)
    options = OPTION_SETS[option_set]
    hooked = HookedViT.from_open_clip(m, **options)
    assert hooked.cfg.normalization_type == ("LNPre" if options.get("fold_ln") else "LN")
    assert_parity(hooked, oc_reference(m, x), x, options)


def test_features_as_claimed():
    cfgs = {k: HookedViT.from_open_clip(variant(k)[0]).cfg for k in VARIANTS}
    assert cfgs["clip"].has_norm_pre and cfgs["clip"].pooling == "token" and cfgs["clip"].act_fn == "gelu"
    assert cfgs["quickgelu"].act_fn == "quick_gelu"
    assert cfgs["clipa"].pooling == "avg" and cfgs["clipa"].has_fc_norm and not cfgs["clipa"].has_ln_final
    assert not cfgs["clipa"].has_norm_pre
    assert cfgs["avg"].pooling == "avg" and cfgs["avg"].has_ln_final
    assert cfgs["gelu_tanh_eps"].act_fn == "gelu_tanh" and cfgs["gelu_tanh_eps"].eps == 1e-6
    assert cfgs["non_square"].grid_size == (4, 6)
    assert cfgs["clip"].n_classes == 24 and cfgs["clip"].extra["embed_dim"] == 24
    assert abs(cfgs["clip"].extra["logit_scale"] - variant("clip")[0].logit_scale.exp().item()) < 1e-6


def test_visual_tower_alone_and_the_source_is_untouched():
    m, x = variant("clip")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hooked = HookedViT.from_open_clip(m.visual)
    with torch.no_grad():
        assert (hooked(x) - m.visual(x)).abs().max().item() <= TOL
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert "logit_scale" not in hooked.cfg.extra  # only the full model knows its temperature


#: the towers the issue lists, at their real size (conversion only), and one of each other kind
REAL_SIZE = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu",
             "ViT-L-14-quickgelu", "ViT-H-14-quickgelu", "ViT-L-14-CLIPA", "ViT-M-16-alt", "ViT-L-14-336"]


@pytest.mark.parametrize("name", REAL_SIZE)
def test_real_size_conversion_on_meta(name):
    """Every listed tower converts at its real size: the config matches OpenCLIP's own config file and
    the state dict fits HookedViT(config) key for key and shape for shape."""
    with torch.device("meta"):
        m = open_clip.create_model(name, pretrained=None, device="meta")
    conv = source.convert(m, name=name)
    cfg, vc = conv.config, open_clip.get_model_config(name)["vision_cfg"]
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    size = vc.get("image_size", 224)
    assert cfg.n_layers == vc["layers"] and cfg.d_model == vc["width"]
    assert cfg.d_head == vc.get("head_width", 64) and cfg.n_heads == vc["width"] // vc.get("head_width", 64)
    assert cfg.d_mlp == int(vc["width"] * vc.get("mlp_ratio", 4.0))
    assert cfg.patch_size == (vc["patch_size"],) * 2 and cfg.image_size == (size, size)
    assert cfg.n_classes == embed_dim
    assert cfg.act_fn == ("quick_gelu" if open_clip.get_model_config(name).get("quick_gelu") else "gelu")
    assert cfg.has_norm_pre == (not vc.get("no_ln_pre", False))
    with torch.device("meta"):
        target = HookedViT(cfg).state_dict()
    got = {k: tuple(v.shape) for k, v in conv.state_dict.items()}
    want = {k.replace("readout.", ""): tuple(v.shape) for k, v in target.items()}
    assert got == want
    assert conv.data_config["input_size"] == (3, size, size)


@pytest.mark.parametrize("name, feature", [
    ("RN50", "ModifiedResNet"),
    ("ViT-B-16-SigLIP", "timm image tower"),
    ("EVA02-B-16", "timm image tower"),
    ("coca_ViT-B-32", "CoCa"),
    ("coca_base", "CoCa"),
    ("roberta-ViT-B-32", "Hugging Face text tower"),
    ("convnext_base", "timm image tower"),
])
def test_refused_by_name(name, feature):
    with pytest.raises(UnsupportedModelError, match=feature):
        HookedViT.from_open_clip(name)
    assert name not in source.supported_names()


def test_refused_by_feature_on_objects():
    m = small_clip(dict(BASE, qk_norm=True))
    with pytest.raises(UnsupportedModelError, match="custom blocks"):
        HookedViT.from_open_clip(m)
    m = small_clip(dict(BASE, attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2))
    with pytest.raises(UnsupportedModelError, match="attentional pooling"):
        HookedViT.from_open_clip(m)
    m = small_clip(dict(BASE, pool_type="none"))
    with pytest.raises(UnsupportedModelError, match="pool_type='none'"):
        HookedViT.from_open_clip(m)
    torch.manual_seed(0)
    rn = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=64), text_cfg=dict(TEXT))
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        HookedViT.from_open_clip(rn)
    with pytest.raises(InputTypeError, match="OpenCLIP model"):
        HookedViT.from_open_clip(torch.nn.Linear(2, 2))


def test_listed_families_are_supported_and_table_rows():
    names = source.supported_names()
    for n in ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-B-32-quickgelu", "ViT-L-14-quickgelu"]:
        assert n in names
    rows = source.table_rows()
    assert all(len(r) == 5 and r[0] == "OpenCLIP" for r in rows)
    listed = " ".join(r[2] for r in rows)
    assert all(f"`{n}`" in listed for n in names)
    assert sum(r[2].count("`") // 2 for r in rows) == len(names)  # each name in one row


# ------------------------------------------------------------------ preprocessing
def _photos():
    paths = sorted(str(p) for p in (IMAGES / "imagenet").glob("*.JPEG"))[:3] + sorted(
        str(p) for p in (IMAGES / "photos").glob("*"))
    if not paths:
        pytest.skip(f"no photos at {IMAGES}")
    return paths


@pytest.mark.parametrize("pp", [
    {},  # OpenCLIP's defaults: OpenAI mean/std, bicubic, resize the short side + centre crop
    dict(resize_mode="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
])
def test_preprocess_equals_open_clip_transform(pp):
    from PIL import Image

    m = small_clip(dict(BASE, image_size=224, patch_size=32, layers=1))
    cfg = pp_cfg(m, **pp)
    open_clip.set_model_preprocess_cfg(m, cfg)
    hooked = HookedViT.from_open_clip(m)
    tf = open_clip.image_transform((224, 224), is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
                                   resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"))
    paths = _photos()
    ref = torch.stack([tf(Image.open(p)) for p in paths])
    got = hooked.preprocess(paths)
    assert (got - ref).abs().max().item() <= 1e-6


def test_preprocess_without_exact_equivalent_is_refused():
    m = small_clip(dict(BASE, image_size=224, patch_size=32, layers=1))
    open_clip.set_model_preprocess_cfg(m, pp_cfg(m, resize_mode="longest"))
    with pytest.raises(UnsupportedModelError, match="longest"):
        HookedViT.from_open_clip(m)


# ------------------------------------------------------------------ names, files, save / load
TINY = {"embed_dim": 16, "vision_cfg": dict(BASE), "text_cfg": dict(TEXT)}


@pytest.fixture
def tiny_name(tmp_path):
    """A tiny OpenCLIP config registered through open_clip.add_model_config, and a weights file."""
    name = "vit-lens-tiny-test"
    (tmp_path / f"{name}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(tmp_path / f"{name}.json"))
    yield name
    # OpenCLIP's registry of configs is global: leave it as it was (the supported-models table lists it)
    configs = getattr(getattr(open_clip, "factory", None), "_MODEL_CONFIGS", None)
    if isinstance(configs, dict):
        configs.pop(name, None)
    assert name not in open_clip.list_models(), "the test config stayed registered in OpenCLIP"


def test_name_with_local_weights_file(tiny_name, tmp_path):
    m = perturb(open_clip.create_model(tiny_name, pretrained=None)).eval()
    path = tmp_path / "weights.pt"
    torch.save(m.state_dict(), path)
    hooked = HookedViT.from_open_clip(tiny_name, pretrained=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (hooked(x) - m.encode_image(x)).abs().max().item() <= TOL
    assert hooked.cfg.extra["checkpoint"] == str(path)
    assert hooked.cfg.model_name == f"open_clip:{tiny_name}/weights.pt"
    # the source interface's load(name, checkpoint_path=...) gives the same Converted
    conv = source.load(tiny_name, checkpoint_path=path)
    assert conv.config.model_name == hooked.cfg.model_name
    assert all(torch.equal(conv.state_dict[k], v) for k, v in source.convert(m).state_dict.items())
    # a file of another model is refused by OpenCLIP's strict load, never loaded partly
    bad = tmp_path / "bad.pt"
    torch.save({k: v for k, v in m.state_dict().items() if not k.startswith("visual.proj")}, bad)
    with pytest.raises(CheckpointMismatchError, match="do not fit"):  # a library error, no bare RuntimeError
        HookedViT.from_open_clip(tiny_name, pretrained=bad)


def test_local_dir_offline(tmp_path):
    m = perturb(open_clip.CLIP(**TINY)).eval()
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    torch.save(m.state_dict(), folder / "open_clip_pytorch_model.bin")
    hooked = HookedViT.from_open_clip(f"open_clip:local-dir:{folder}", fold_ln=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (hooked(x) - m.encode_image(x)).abs().max().item() <= TOL
    assert hooked.data_config["mean"] == (0.5, 0.5, 0.5)


def test_hub_errors_and_quickgelu_tags(monkeypatch):
    seen = {}

    def offline(name, pretrained=None, **kwargs):
        seen.update(kwargs, name=name, pretrained=pretrained)
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(CheckpointNotFoundError, match="local copy") as e:  # a library error, no bare RuntimeError
        HookedViT.from_open_clip("open_clip:ViT-B-32/openai")
    assert "local-dir:" in str(e.value)
    # the OpenAI weights were trained with QuickGELU: the GELU config is built with it, as they need
    assert seen["name"] == "ViT-B-32" and seen["pretrained"] == "openai" and seen["force_quick_gelu"] is True
    seen.clear()
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        HookedViT.from_open_clip("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert "force_quick_gelu" not in seen


def test_dtype_and_device():
    m, x = variant("clip")
    m64 = __import__("copy").deepcopy(m).double()
    hooked = HookedViT.from_open_clip(m, dtype=torch.float64, device="cpu")
    assert hooked.dtype == torch.float64 and hooked.device.type == "cpu"
    with torch.no_grad():
        assert (hooked(x.double()) - m64.encode_image(x.double())).abs().max().item() <= 1e-10
    with pytest.raises(InputTypeError, match="dtype"):
        HookedViT.from_open_clip(m, dtype=torch.int64)


def test_bad_names_tags_and_arguments(tiny_name):
    with pytest.raises(InputError, match="ViT-B-32"):
        HookedViT.from_open_clip("ViT-B-33")
    with pytest.raises(InputError, match="neither an OpenCLIP pretrained tag"):
        HookedViT.from_open_clip("ViT-B-32", pretrained="no_such_tag")
    m, _ = variant("clip")
    with pytest.raises(InputTypeError, match="pretrained"):
        HookedViT.from_open_clip(m, pretrained="openai")
    with pytest.raises(InputTypeError, match="must be True or False"):
        HookedViT.from_open_clip(m, fold_ln="yes")
    with pytest.raises(TypeError):
        HookedViT.from_open_clip(m, fold_everything=True)


def test_save_load_round_trip(tmp_path):
    m, x = variant("layerscale")
    for options in ({}, OPTION_SETS["all"]):
        hooked = HookedViT.from_open_clip(m, **options)
        path = hooked.save(tmp_path / "m.safetensors")
        back = HookedViT.load(path)
        with torch.no_grad():
            assert torch.equal(back(x), hooked(x))
        assert back.data_config == hooked.data_config and back.cfg.extra["source"] == "open_clip"
        assert back.cfg.extra.get("logit_scale") == hooked.cfg.extra.get("logit_scale")


def test_processing_refusal_is_clean():
    # a headless tower (projection pruned) cannot centre an unembedding it does not have
    m = small_clip(BASE)
    m.visual.proj = None
    hooked = HookedViT.from_open_clip(m)
    assert hooked.cfg.n_classes == 0
    with pytest.raises(ProcessingError):
        HookedViT.from_open_clip(m, center_unembed=True)


def test_from_pretrained_prefix(tiny_name, tmp_path):
    """`HookedViT.from_pretrained("open_clip:...")` reaches the same model as from_open_clip: a local folder
    (its "/" are no tag) and a weights file through checkpoint_path; a tag and a file together are refused."""
    m = perturb(open_clip.CLIP(**TINY)).eval()
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    torch.save(m.state_dict(), folder / "open_clip_pytorch_model.bin")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.encode_image(x)
        from_dir = HookedViT.from_pretrained(f"open_clip:local-dir:{folder}")
        assert (from_dir(x) - ref).abs().max().item() <= TOL
        path = tmp_path / "weights.pt"
        m2 = perturb(open_clip.create_model(tiny_name, pretrained=None)).eval()
        torch.save(m2.state_dict(), path)
        from_file = HookedViT.from_pretrained(f"open_clip:{tiny_name}", checkpoint_path=path, fold_ln=True)
        assert (from_file(x) - m2.encode_image(x)).abs().max().item() <= TOL
    with pytest.raises(InputError, match="give one of them"):
        HookedViT.from_pretrained(f"open_clip:{tiny_name}/openai", checkpoint_path=path)
