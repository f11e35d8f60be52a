"""The Hugging Face source: every supported transformers class against transformers' own forward.

Models are built from small configs with random weights (the hub is unreachable); the reference is
the HF model's own output and its layers' outputs (captured with forward hooks on the HF modules),
for both of HF's attention implementations (eager and SDPA). Real-size configs are converted on the
meta device (shapes only). Preprocessing is compared with the transformers image processor on the
real photos in ../shared/images.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vit_lens import HookedViT  # noqa: E402
from vit_lens.core.errors import VitLensError  # noqa: E402
from vit_lens.loading.checkpoints import CheckpointMismatchError, CheckpointNotFoundError  # noqa: E402
from vit_lens.loading.sources.hf import SUPPORTED_CLASSES  # noqa: E402
from vit_lens.loading.sources.timm import UnsupportedModelError  # noqa: E402

from conftest import IMAGES  # noqa: E402

TOL = 1e-4
SMALL = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

#: class -> (config class, config overrides, input size); every supported class but CLIPModel (below)
CASES = {
    "ViTModel": (transformers.ViTConfig, {}, (32, 32)),
    "ViTForImageClassification": (transformers.ViTConfig, dict(num_labels=7), (32, 32)),
    "DeiTModel": (transformers.DeiTConfig, {}, (32, 32)),
    "DeiTForImageClassification": (transformers.DeiTConfig, dict(num_labels=7), (32, 32)),
    "DeiTForImageClassificationWithTeacher": (transformers.DeiTConfig, dict(num_labels=7), (32, 32)),
    "CLIPVisionModel": (transformers.CLIPVisionConfig, {}, (32, 32)),
    "CLIPVisionModelWithProjection": (transformers.CLIPVisionConfig, dict(projection_dim=24), (32, 32)),
    # DINOv2 interpolates its position embeddings to the input: 42x56 is a 3x4 grid from the native 2x2
    "Dinov2Model": (transformers.Dinov2Config, dict(image_size=28, patch_size=14, layerscale_value=0.5), (42, 56)),
    "Dinov2ForImageClassification": (transformers.Dinov2Config, dict(image_size=28, patch_size=14, layerscale_value=0.5,
                                                                      num_labels=7), (42, 56)),
    # registers: a 4x4 native grid, 6x8 at the input size
    "Dinov2WithRegistersModel": (transformers.Dinov2WithRegistersConfig, dict(
        image_size=28, patch_size=7, layerscale_value=0.5, num_register_tokens=2), (42, 56)),
    "Dinov2WithRegistersForImageClassification": (transformers.Dinov2WithRegistersConfig, dict(
        image_size=28, patch_size=7, layerscale_value=0.5, num_register_tokens=2, num_labels=7), (42, 56)),
}
HEADLESS = {"ViTModel", "DeiTModel", "CLIPVisionModel", "Dinov2Model", "Dinov2WithRegistersModel"}


def make_hf(cls_name: str, attn: str = "eager", seed: int = 0, **overrides):
    cfg_cls, kw, _ = CASES[cls_name]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**SMALL, **kw, **overrides})
    cfg._attn_implementation = attn
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0 / 1: make every tensor matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def hf_output(model, x):
    """What the HookedViT's output must equal: logits, image_embeds, or the final-norm [CLS]."""
    name = type(model).__name__
    out = model(pixel_values=x)
    if name in ("ViTModel", "DeiTModel", "Dinov2Model", "Dinov2WithRegistersModel"):
        return out.last_hidden_state[:, 0]  # NOT pooler_output for ViT / DeiT (the tanh pooler)
    if name == "CLIPVisionModel":
        return out.pooler_output
    if name in ("CLIPVisionModelWithProjection",):
        return out.image_embeds
    return out.logits


def hf_layer_outputs(model, x):
    """The residual stream after every HF layer, from forward hooks on the layer modules."""
    from vit_lens.loading.sources.hf import _parts

    layers = _parts(model, type(model).__name__)["layers"]
    outs = []

    def first_input(m, args, kwargs):  # the residual stream entering layer 0 (after CLIP's pre_layrnorm)
        outs.append(args[0] if args else next(iter(kwargs.values())))

    handles = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [l.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o)) for l in layers]
    try:
        model(pixel_values=x)
    finally:
        for h in handles:
            h.remove()
    return outs


def inputs(cls_name, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *CASES[cls_name][2], generator=g)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", sorted(CASES))
def test_parity_with_transformers(cls_name, attn):
    model = make_hf(cls_name, attn)
    assert model.config._attn_implementation == attn
    hooked = HookedViT.from_hf(model)
    x = inputs(cls_name)
    with torch.no_grad():
        ref = hf_output(model, x)
        blocks = hf_layer_outputs(model, x)
        plain = hooked(x)
        logits, cache = hooked.run_with_cache(x)
    assert plain.shape == ref.shape
    assert (plain - ref).abs().max() <= TOL
    assert (logits - ref).abs().max() <= TOL
    assert len(blocks) == hooked.cfg.n_layers + 1
    # entering block 0: embeddings + (for DINOv2 interpolated) position embeddings, exactly as HF's
    assert (cache["blocks.0.hook_resid_pre"] - blocks[0]).abs().max() <= 1e-5
    for l, b in enumerate(blocks[1:]):
        assert (cache[f"blocks.{l}.hook_resid_post"] - b).abs().max() <= TOL, l
    assert hooked.cfg.extra["source"] == "hf" and hooked.cfg.extra["hf_class"] == cls_name


def test_clip_model_image_tower_is_converted():
    torch.manual_seed(0)
    vision = {**SMALL}
    cfg = transformers.CLIPConfig(
        vision_config=vision, projection_dim=24,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99),
    )
    model = transformers.CLIPModel(cfg).eval()
    hooked = HookedViT.from_hf(model)
    x = inputs("CLIPVisionModel")
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=x)
        ref = getattr(ref, "image_embeds", getattr(ref, "pooler_output", ref))
        assert (hooked(x) - ref).abs().max() <= TOL


def test_deit_classification_reads_cls_only_and_teacher_averages_heads():
    m = make_hf("DeiTForImageClassificationWithTeacher")
    hooked = HookedViT.from_hf(m)
    assert hooked.cfg.n_dist_tokens == 1 and hooked.cfg.pooling == "token_dist"
    x = inputs("DeiTModel")
    with torch.no_grad():
        out = m(pixel_values=x)
        assert (hooked(x) - (out.cls_logits + out.distillation_logits) / 2).abs().max() <= TOL
    single = HookedViT.from_hf(make_hf("DeiTForImageClassification"))
    assert single.cfg.n_dist_tokens == 1 and single.cfg.pooling == "token"  # the distillation token is there, unread


@pytest.mark.parametrize("cls_name", sorted(CASES))
def test_weight_processing_keeps_the_output(cls_name):
    from vit_lens.loading.processing import ProcessingError

    model = make_hf(cls_name, seed=2)
    x = inputs(cls_name)
    with torch.no_grad():
        ref = hf_output(model, x)
    headless = cls_name in HEADLESS
    options = ["center_writing_weights", "fold_value_biases"] + ([] if headless else ["fold_ln", "center_unembed"])
    for opts in [{o: True} for o in options] + [{o: True for o in options}]:
        with torch.no_grad():
            got = HookedViT.from_hf(model, **opts)(x)
        if opts.get("center_unembed"):  # equal up to a per-image constant
            got, want = got - got.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True)
        else:
            want = ref
        assert (got - want).abs().max() <= TOL, opts
    if headless:
        for refused in ("fold_ln", "center_unembed"):
            with pytest.raises(ProcessingError):
                HookedViT.from_hf(model, **{refused: True})


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
                                      "CLIPVisionModelWithProjection", "Dinov2Model",
                                      "Dinov2WithRegistersForImageClassification"])
def test_save_load_round_trip(cls_name, tmp_path):
    model = make_hf(cls_name, id2label={i: f"class {i}" for i in range(7)}) if "Classification" in cls_name else make_hf(cls_name)
    hooked = HookedViT.from_hf(model, fold_value_biases=True)
    path = hooked.save(tmp_path / "m.safetensors")
    again = HookedViT.load(path)
    x = inputs(cls_name)
    with torch.no_grad():
        assert (again(x) - hf_output(model, x)).abs().max() <= TOL
    assert again.class_names == hooked.class_names
    assert again.data_config == hooked.data_config
    assert again.cfg.extra == hooked.cfg.extra
    if "Classification" in cls_name:
        assert again.class_names == [f"class {i}" for i in range(7)]


def test_fine_tuned_labels_become_class_names_and_placeholders_do_not():
    m = make_hf("ViTForImageClassification", num_labels=3, id2label={0: "cat", 1: "dog", 2: "newt"})
    hooked = HookedViT.from_hf(m)
    assert hooked.class_names == ["cat", "dog", "newt"] and hooked.cfg.n_classes == 3
    assert hooked.class_index("newt") == 2
    assert HookedViT.from_hf(make_hf("ViTForImageClassification")).class_names is None  # LABEL_0 ... LABEL_6
    assert HookedViT.from_hf(make_hf("ViTForImageClassification", num_labels=0)).cfg.n_classes == 0


# --------------------------------------------------------------------------------------------- real sizes
REAL_SIZE = {
    "vit-base-patch16-224": (transformers.ViTForImageClassification, transformers.ViTConfig(num_labels=1000)),
    "deit-base-distilled-patch16-224": (transformers.DeiTForImageClassificationWithTeacher, transformers.DeiTConfig(num_labels=1000)),
    "clip-vit-base-patch32": (transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(projection_dim=512)),
    "clip-vit-large-patch14": (transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        projection_dim=768)),
    "dinov2-base": (transformers.Dinov2Model, transformers.Dinov2Config()),
    "dinov2-base-imagenet1k-1-layer": (transformers.Dinov2ForImageClassification, transformers.Dinov2Config(num_labels=1000)),
    "dinov2-with-registers-base": (transformers.Dinov2WithRegistersModel,
                                   transformers.Dinov2WithRegistersConfig(num_register_tokens=4)),
    "dinov2-with-registers-base-imagenet1k-1-layer": (transformers.Dinov2WithRegistersForImageClassification,
                                                      transformers.Dinov2WithRegistersConfig(num_register_tokens=4,
                                                                                             num_labels=1000)),
}


@pytest.mark.parametrize("name", sorted(REAL_SIZE))
def test_real_size_configs_convert_on_the_meta_device(name):
    from vit_lens.loading.sources.hf import convert

    cls, cfg = REAL_SIZE[name]
    with torch.device("meta"):
        model = cls(cfg)
    converted = convert(model, name=name)
    assert all(v.device.type == "meta" for v in converted.state_dict.values())
    with torch.device("meta"):
        target = HookedViT(converted.config)
    target.load_state_dict(converted.state_dict, strict=True)  # every key, every shape
    c = converted.config
    assert (c.n_layers, c.d_model, c.n_heads) == (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads)


# --------------------------------------------------------------------------------------------- loading by name
def test_local_directory_loads_strictly_and_through_the_prefix(tmp_path):
    model = make_hf("ViTForImageClassification", num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    model.save_pretrained(tmp_path / "m")
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6])
    proc.save_pretrained(tmp_path / "m")
    x = inputs("ViTModel")
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    for hooked in (HookedViT.from_hf(str(tmp_path / "m")), HookedViT.from_pretrained(f"hf:{tmp_path / 'm'}"),
                   HookedViT.from_pretrained("hf:my-org/my-vit", checkpoint_path=tmp_path / "m")):
        with torch.no_grad():
            assert (hooked(x) - ref).abs().max() <= TOL
        assert hooked.class_names == ["a", "b", "c"]
        assert hooked.data_config["mean"] == (0.4, 0.5, 0.6)  # the directory's processor, not the defaults
        assert hooked.dtype == torch.float32 and hooked.device.type == "cpu"
    assert HookedViT.from_hf(str(tmp_path / "m"), dtype=torch.float64).dtype == torch.float64


def test_directory_without_processor_warns_and_uses_the_family_defaults(tmp_path):
    from vit_lens.loading.checkpoints import CheckpointWarning

    make_hf("DeiTForImageClassification").save_pretrained(tmp_path / "d")
    with pytest.warns(CheckpointWarning, match="preprocessor_config.json"):
        hooked = HookedViT.from_hf(str(tmp_path / "d"))
    assert hooked.data_config["hf_image_processor"]["class"] == "DeiTImageProcessor"
    assert hooked.data_config["input_size"] == (3, 32, 32)


def test_weights_that_do_not_fit_the_class_are_refused(tmp_path):
    # a ViTModel checkpoint whose config.json claims a classifier: transformers would make it up at random
    make_hf("ViTModel").save_pretrained(tmp_path / "b")
    cfg_path = tmp_path / "b" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["ViTForImageClassification"]
    cfg_path.write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointMismatchError, match="missing from the files"):
            HookedViT.from_hf(str(tmp_path / "b"))
    cfg["architectures"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(VitLensError, match="names no architecture"):
        HookedViT.from_hf(str(tmp_path / "b"))


def test_hub_names_give_a_clear_error_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1: fail at once, not after retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(CheckpointNotFoundError, match="save_pretrained"):
        HookedViT.from_pretrained("hf:google/vit-base-patch16-224")
    with pytest.raises(CheckpointNotFoundError, match="not a directory"):
        HookedViT.from_hf("google/vit-base-patch16-224", checkpoint_path=tmp_path / "nothing")


def test_prefix_dispatch(monkeypatch):
    import vit_lens.loading as loading

    class Probe(HookedViT):
        calls: list = []

        @classmethod
        def from_open_clip(cls, name, pretrained=None, **options):
            cls.calls.append((name, pretrained, options))
            return "open_clip model"

    assert Probe.from_pretrained("open_clip:ViT-B-32/openai", fold_ln=True) == "open_clip model"
    assert Probe.calls[-1] == ("ViT-B-32", "openai", dict(device=None, dtype=torch.float32, open_clip_kwargs=None,
                                                           fold_ln=True))
    with pytest.raises(VitLensError, match="timm_kwargs"):
        HookedViT.from_pretrained("hf:google/vit-base-patch16-224", timm_kwargs=dict(img_size=32))
    seen = []
    monkeypatch.setattr(loading, "load_pretrained", lambda cls, name, **kw: seen.append((name, kw)) or "timm model")
    assert HookedViT.from_pretrained("timm:vit_tiny_patch16_224", fold_ln=True) == "timm model"
    assert HookedViT.from_pretrained("vit_tiny_patch16_224") == "timm model"
    assert [n for n, _ in seen] == ["vit_tiny_patch16_224"] * 2 and seen[0][1]["fold_ln"] is True


# --------------------------------------------------------------------------------------------- refusals
def test_other_classes_are_refused_naming_the_feature():
    from vit_lens.loading.sources.hf import check_supported_class

    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128))
    with pytest.raises(UnsupportedModelError, match="attention-pool head"):
        HookedViT.from_hf(siglip)
    # Dinov2ForImageClassification is converted (tests/test_hf_dinov2.py); without labels its output is the
    # 2 * hidden_size concat of features, which is refused, naming the backbone to load instead
    dino_cls = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(
        image_size=28, patch_size=14, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_labels=0))
    with pytest.raises(UnsupportedModelError, match=r"num_labels=0.*model\.dinov2\)"):
        HookedViT.from_hf(dino_cls)
    with pytest.raises(UnsupportedModelError, match="multi-stage feature backbone"):
        check_supported_class("Dinov2Backbone")
    with pytest.raises(UnsupportedModelError, match="SwiGLU"):
        HookedViT.from_hf(make_hf("Dinov2Model", use_swiglu_ffn=True))
    with pytest.raises(UnsupportedModelError, match="activation"):
        HookedViT.from_hf(make_hf("ViTModel", hidden_act="relu"))
    with pytest.raises(UnsupportedModelError, match="BertModel"):
        check_supported_class("BertModel")
    with pytest.raises(VitLensError, match="from_timm"):
        HookedViT.from_hf(torch.nn.Linear(2, 2))
    assert set(CASES) | {"CLIPModel"} == set(SUPPORTED_CLASSES)


# --------------------------------------------------------------------------------------------- preprocessing
PHOTOS = sorted((IMAGES / "photos").glob("*")) + sorted((IMAGES / "imagenet").glob("*.JPEG"))[:1]


IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


# the references: each class's defaults plus the settings of the published checkpoints' preprocessor_config.json
# (facebook/deit-*: ImageNet mean / std; facebook/dinov2-*: shortest edge 256, crop 224, ImageNet mean / std)
@pytest.mark.parametrize("cls_name, processor", [
    ("ViTForImageClassification", lambda: transformers.ViTImageProcessor()),
    ("DeiTForImageClassification", lambda: transformers.DeiTImageProcessor(**IMAGENET)),
    ("CLIPVisionModelWithProjection", lambda: transformers.CLIPImageProcessor()),
    ("Dinov2Model", lambda: transformers.BitImageProcessor(size={"shortest_edge": 256}, **IMAGENET)),
])
def test_preprocess_equals_the_hf_processor_on_real_photos(cls_name, processor, tmp_path):
    from PIL import Image

    if not PHOTOS:
        pytest.skip(f"no photos under {IMAGES}")
    size = dict(image_size=224, patch_size=32) if cls_name != "Dinov2Model" else dict(image_size=518 // 37 * 2, patch_size=14)
    hooked = HookedViT.from_hf(make_hf(cls_name, num_hidden_layers=1, **size))  # no processor: the family's defaults
    ims = [Image.open(p).convert("RGB") for p in PHOTOS]
    ref = processor()(images=ims, return_tensors="pt")["pixel_values"]  # the processor's own defaults, built here
    got = hooked.preprocess([str(p) for p in PHOTOS])
    assert got.shape == ref.shape == (len(PHOTOS), 3, 224, 224)
    assert torch.equal(got, ref)
    again = HookedViT.load(hooked.save(tmp_path / "p.safetensors"))
    assert torch.equal(again.preprocess([str(p) for p in PHOTOS]), ref)
    paper = hooked.preprocess([str(p) for p in PHOTOS], mode="paper")  # resize without crop, same mean / std
    assert paper.shape == ref.shape
    from vit_lens.explain import model_view

    assert model_view(hooked, str(PHOTOS[0])).size == (224, 224)  # the resized, cropped photo the model sees


def test_given_processor_is_used_exactly():
    from PIL import Image

    if not PHOTOS:
        pytest.skip(f"no photos under {IMAGES}")
    proc = transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.2, 0.3, 0.4], resample=3)
    hooked = HookedViT.from_hf(make_hf("ViTModel"), image_processor=proc)
    ims = [Image.open(p).convert("RGB") for p in PHOTOS]
    assert torch.equal(hooked.preprocess([str(p) for p in PHOTOS]), proc(images=ims, return_tensors="pt")["pixel_values"])
    assert hooked.data_config["interpolation"] == "bicubic" and hooked.data_config["mean"] == (0.2, 0.3, 0.4)
    with pytest.raises(VitLensError, match="image processor"):
        HookedViT.from_hf(make_hf("ViTModel"), image_processor=object())
