"""An independent cross-check: HookedViT.from_hf against TransformerLens's own TransformerBridge.

For HF ViT and DeiT (the classes the bridge supports: ``ViTModel``, ``ViTForImageClassification``,
``DeiTModel``, ``DeiTForImageClassification``), the residual stream entering the first block and
after every block, every attention pattern and the logits must equal the bridge's on the same HF
model. The bridge boots offline from an in-memory model whose ``config.architectures`` is set
(``HF_HUB_OFFLINE`` keeps it from asking the hub for a processor). It replaces the HF model's
modules in place, so it gets a deep copy; HookedViT converts the original.

Random small configs, and the real ViT-Ti/16 (timm's AugReg weights moved into an HF
``ViTForImageClassification`` by this test, checked against timm's own logits) on real photos.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

from vit_lens import HookedViT  # noqa: E402

from conftest import IMAGES, REAL_VIT, WEIGHTS  # noqa: E402

SMALL = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
#: the max abs differences seen, printed at the end of the module (README numbers)
MAX_DIFF: dict = {}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def bridge_of(model):
    from transformer_lens.model_bridge import TransformerBridge

    m = copy.deepcopy(model)
    m.config.architectures = [type(model).__name__]
    return TransformerBridge.boot_transformers(f"local/{type(model).__name__}", hf_model=m)


def compare(model, x, key):
    hooked = HookedViT.from_hf(model)
    bridge = bridge_of(model)
    with torch.no_grad():
        out_b, cache_b = bridge.run_with_cache(x)
        out_h, cache_h = hooked.run_with_cache(x)
    diffs = {"resid": 0.0, "pattern": 0.0, "logits": 0.0}
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(hooked.cfg.n_layers)]
    for n in names:
        assert cache_b[n].shape == cache_h[n].shape, n
        diffs["resid"] = max(diffs["resid"], (cache_b[n] - cache_h[n]).abs().max().item())
    for l in range(hooked.cfg.n_layers):
        n = f"blocks.{l}.attn.hook_pattern"
        assert cache_b[n].shape == cache_h[n].shape, n
        diffs["pattern"] = max(diffs["pattern"], (cache_b[n] - cache_h[n]).abs().max().item())
    if hooked.cfg.n_classes:
        diffs["logits"] = (out_b - out_h).abs().max().item()
    MAX_DIFF[key] = diffs
    return diffs, cache_h


@pytest.mark.parametrize("cls_name", ["ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification"])
def test_hooked_equals_transformer_bridge(cls_name):
    torch.manual_seed(0)
    cfg_cls = transformers.ViTConfig if cls_name.startswith("ViT") else transformers.DeiTConfig
    cfg = cfg_cls(**SMALL, num_labels=6)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    diffs, _ = compare(model, x, cls_name)
    assert diffs["resid"] <= 1e-4 and diffs["pattern"] <= 1e-5 and diffs["logits"] <= 1e-4, diffs


def _hf_vit_from_timm(timm_model):
    """timm's ViT-Ti weights in an HF ViTForImageClassification (mapping written here, checked below)."""
    D, L = timm_model.embed_dim, len(timm_model.blocks)
    cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=timm_model.blocks[0].attn.num_heads,
                                 intermediate_size=timm_model.blocks[0].mlp.fc1.out_features, layer_norm_eps=1e-6,
                                 num_labels=timm_model.num_classes, image_size=224, patch_size=16)
    cfg._attn_implementation = "eager"
    hf = transformers.ViTForImageClassification(cfg).eval()
    t = timm_model.state_dict()
    sd = {"vit.embeddings.cls_token": t["cls_token"], "vit.embeddings.position_embeddings": t["pos_embed"],
          "vit.embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
          "vit.embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
          "vit.layernorm.weight": t["norm.weight"], "vit.layernorm.bias": t["norm.bias"],
          "classifier.weight": t["head.weight"], "classifier.bias": t["head.bias"]}
    for i in range(L):
        a, b = f"blocks.{i}.", f"vit.layers.{i}."
        for part, w in zip("qkv", t[a + "attn.qkv.weight"].chunk(3)):
            sd[b + f"attention.{part}_proj.weight"] = w
        for part, w in zip("qkv", t[a + "attn.qkv.bias"].chunk(3)):
            sd[b + f"attention.{part}_proj.bias"] = w
        for src, dst in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            sd[b + dst + ".weight"], sd[b + dst + ".bias"] = t[a + src + ".weight"], t[a + src + ".bias"]
    hf.load_state_dict(sd, strict=True)
    return hf


@pytest.mark.slow
def test_real_vit_tiny_equals_transformer_bridge_and_timm():
    path = WEIGHTS / f"{REAL_VIT}.safetensors"
    photos = sorted((IMAGES / "photos").glob("*"))[:2]
    if not path.exists() or not photos:
        pytest.skip(f"real ViT-Ti checkpoint or photos not found ({path}, {IMAGES})")
    import timm

    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    hf = _hf_vit_from_timm(timm_model)
    hooked_timm = HookedViT.from_timm(timm_model)
    x = hooked_timm.preprocess([str(p) for p in photos])
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - timm_model(x)).abs().max() <= 1e-3  # the mapping above is right
    diffs, cache_h = compare(hf, x, "real ViT-Ti/16 (2 photos)")
    # activations reach |x| ~ 100s here: bound relative to their size
    scale = max(cache_h[f"blocks.{l}.hook_resid_post"].abs().max().item() for l in range(hf.config.num_hidden_layers))
    assert diffs["resid"] <= 1e-5 * scale and diffs["pattern"] <= 1e-4 and diffs["logits"] <= 1e-3, (diffs, scale)


def test_zz_report_max_differences(capsys):
    """Prints the table the README quotes (run with -s)."""
    with capsys.disabled():
        for k, d in MAX_DIFF.items():
            print(f"\n[bridge] {k}: residual {d['resid']:.1e}, attention pattern {d['pattern']:.1e}, logits {d['logits']:.1e}")
