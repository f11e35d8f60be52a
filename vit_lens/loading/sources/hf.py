"""The Hugging Face source: ``transformers`` image models -> :class:`HookedViTConfig` + HookedViT state dict.

The source interface (see :mod:`vit_lens.loading.sources`):

- :func:`convert` (an in-memory ``transformers`` model -> :class:`~vit_lens.loading.sources.Converted`),
- :func:`load` (a hub id such as ``"google/vit-base-patch16-224"`` or a local directory written by
  ``save_pretrained``; weights strictly loaded, every tensor accounted for).

Supported classes (:data:`SUPPORTED_CLASSES`), with what the HookedViT reads out:

- ``ViTModel``, ``DeiTModel``: headless; the output is the final-norm [CLS] token (HF's
  ``last_hidden_state[:, 0]``), as for timm's headless models. Their tanh ``pooler``
  (``pooler_output``) is *not* the class-space path and is not converted.
- ``ViTForImageClassification``: final norm, [CLS], ``classifier``.
- ``DeiTForImageClassification``: HF DeiT always has a distillation token (position 1); this class
  reads [CLS] only (``pooling="token"``, the distillation token is a plain prefix token).
- ``DeiTForImageClassificationWithTeacher``: the mean of ``cls_classifier([CLS])`` and
  ``distillation_classifier([DIST])`` (``pooling="token_dist"``, ``W_U`` / ``W_U_dist``).
- ``CLIPVisionModel``: ``pre_layrnorm`` (as ``ln_pre``), ``post_layernorm`` on [CLS] (as
  ``ln_final``), headless (output = HF's ``pooler_output``). ``CLIPVisionModelWithProjection``
  (and the image tower of a ``CLIPModel``): the ``visual_projection`` is the head (``W_U``, no
  bias), so the output is HF's ``image_embeds``.
- ``Dinov2Model``: LayerScale folded into ``W_O`` / ``W_out``, headless (output = final-norm
  [CLS], HF's ``pooler_output``); position embeddings interpolated to the input size exactly as HF
  does (bicubic, no antialiasing), so any multiple of the patch size is accepted.

- ``Dinov2ForImageClassification``: one linear layer on ``concat(final-norm [CLS], mean of the
  final-norm patch tokens)``, converted exactly as ``pooling="token_avg"``: a [CLS] head ``W_U`` =
  ``classifier.weight[:, :D].T`` with the bias and a patch-mean head ``W_U_patch`` =
  ``classifier.weight[:, D:].T`` without one (``class_directions(head="cls"|"patch")``; the default
  head is their sum). ``num_labels=0`` (HF's identity classifier) is refused: load ``model.dinov2``.
- ``Dinov2WithRegistersModel`` / ``Dinov2WithRegistersForImageClassification``: register tokens sit
  between [CLS] and the patches (positions ``1 .. num_register_tokens``) and get no position
  embedding; HF adds the [CLS] position embedding to [CLS], which is folded into ``cls_token``
  (``pos_embed_prefix=False``: ``hook_pos_embed`` is zero at every prefix position). HF interpolates
  this family's position embeddings *with* antialiasing (the plain DINOv2 classes without), and so
  does the HookedViT. The classifier skips the registers: concat([CLS], mean of the patches).

Every other class is refused up front, naming the feature
(:data:`REFUSED_CLASSES`), as are configurations HookedViT does not reproduce exactly (SwiGLU MLPs,
unknown activations, non-square DINOv2 grids, ...).

Fine-tuned checkpoints: any ``num_labels``; ``config.id2label`` becomes ``model.class_names``
(HF's placeholder labels ``LABEL_0, LABEL_1, ...`` are not class names: ``class_names`` is None).

Preprocessing: the model's ``data_config`` holds timm-style keys (``input_size``, ``mean``, ``std``,
``interpolation``, ``crop_pct``, ``crop_mode``; used by ``preprocess(mode="paper")`` and plots) and
``hf_image_processor`` = ``{"class": ..., "settings": {...}}``: :meth:`HookedViT.preprocess` (the
default mode) runs that ``transformers`` image processor, so its output equals HF's own.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, cast

import torch
import torch.nn as nn

from vit_lens.config import HookedViTConfig
from vit_lens.core.errors import InputError, InputTypeError
from vit_lens.loading.checkpoints import CheckpointMismatchError, CheckpointNotFoundError, CheckpointWarning
from vit_lens.loading.sources import Converted, build_model
from vit_lens.loading.sources.timm import UnsupportedModelError

#: HF class name -> (family key, what the HookedViT output is)
SUPPORTED_CLASSES: Dict[str, Tuple[str, str]] = {
    "ViTModel": ("vit", "final-norm [CLS] (headless; the tanh pooler is not converted)"),
    "ViTForImageClassification": ("vit", "logits: classifier on the final-norm [CLS]"),
    "DeiTModel": ("deit", "final-norm [CLS] (headless; the tanh pooler is not converted)"),
    "DeiTForImageClassification": ("deit", "logits: classifier on the final-norm [CLS] only"),
    "DeiTForImageClassificationWithTeacher": ("deit", "logits: mean of the [CLS] and distillation heads"),
    "CLIPVisionModel": ("clip", "post_layernorm [CLS] (HF's pooler_output)"),
    "CLIPVisionModelWithProjection": ("clip", "image_embeds: visual_projection of the post_layernorm [CLS]"),
    "CLIPModel": ("clip", "image tower only: image_embeds (as CLIPVisionModelWithProjection)"),
    "Dinov2Model": ("dinov2", "final-norm [CLS] (HF's pooler_output)"),
    "Dinov2ForImageClassification": ("dinov2", "logits: classifier on concat(final-norm [CLS], mean of the patches)"),
    "Dinov2WithRegistersModel": ("dinov2", "final-norm [CLS] (HF's pooler_output); register tokens"),
    "Dinov2WithRegistersForImageClassification": ("dinov2", "logits: classifier on concat(final-norm [CLS], mean of "
                                                  "the patches); register tokens"),
}

#: the DINOv2 classes with register tokens
_REGISTER_CLASSES = ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification")
#: the DINOv2 classes whose classifier reads concat([CLS], mean of the patches)
_CONCAT_CLASSES = ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")

#: HF classes refused up front, with the feature that makes them different
REFUSED_CLASSES: Dict[str, str] = {
    "Dinov2Backbone": "a multi-stage feature backbone (load Dinov2Model instead)",
    "SiglipVisionModel": "SigLIP's attention-pool head (multihead attention pooling)",
    "SiglipModel": "SigLIP's attention-pool head (multihead attention pooling)",
    "Siglip2VisionModel": "SigLIP2's attention-pool head and NaFlex variable-resolution patches",
    "Siglip2Model": "SigLIP2's attention-pool head and NaFlex variable-resolution patches",
    "CLIPForImageClassification": "a classifier on the mean of the un-normalised patch tokens (no final norm "
    "before it; use CLIPVisionModelWithProjection and text classes)",
    "CLIPTextModel": "a text model (the image tower is CLIPVisionModel)",
    "CLIPTextModelWithProjection": "a text model (the image tower is CLIPVisionModelWithProjection)",
    "ViTForMaskedImageModeling": "a masked-image-modelling decoder head (load ViTModel instead)",
    "DeiTForMaskedImageModeling": "a masked-image-modelling decoder head (load DeiTModel instead)",
    "ViTMAEModel": "MAE's random token masking (ViTMAE)",
    "ViTMAEForPreTraining": "MAE's random token masking and decoder (ViTMAE)",
    "ViTMSNModel": "ViTMSN (not converted)",
    "ViTHybridModel": "a hybrid CNN stem (ViT-hybrid)",
    "BeitModel": "relative position bias (BEiT)",
    "BeitForImageClassification": "relative position bias (BEiT)",
    "Data2VecVisionModel": "relative position bias (Data2Vec-vision, BEiT-style)",
    "SwinModel": "windowed attention (Swin)",
    "SwinForImageClassification": "windowed attention (Swin)",
    "Dinov3ViTModel": "rotary position embeddings (DINOv3)",
}

_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

#: the image processor class of each family and its defaults scaled to a config image size
_PROCESSOR = {"vit": "ViTImageProcessor", "deit": "DeiTImageProcessor", "clip": "CLIPImageProcessor",
              "dinov2": "BitImageProcessor"}

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _refuse(name: str, feature: str) -> None:
    raise UnsupportedModelError(
        f"{name}: {feature} is not supported by HookedViT. Supported transformers classes: "
        f"{', '.join(SUPPORTED_CLASSES)} (see vit_lens.supported_models() and the README's table)."
    )


def check_supported_class(cls_name: str, name: str = "") -> str:
    """The family key of a supported HF class name; refuses any other class, naming the feature."""
    who = name or cls_name
    if cls_name in SUPPORTED_CLASSES:
        return SUPPORTED_CLASSES[cls_name][0]
    if cls_name in REFUSED_CLASSES:
        _refuse(who, f"{cls_name} ({REFUSED_CLASSES[cls_name]})")
    _refuse(who, f"the transformers class {cls_name}")
    raise AssertionError  # unreachable


# ---------------------------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------------------------
def _pair(x: Any) -> Tuple[int, int]:
    if isinstance(x, (list, tuple)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


def _parts(model: Any, cls_name: str) -> Dict[str, Any]:
    """The modules of a supported model: embeddings, layers, final norm, heads, ``ln_pre``."""
    def get(obj: Any, path: str) -> Any:
        for part in path.split("."):
            if not hasattr(obj, part):
                raise UnsupportedModelError(
                    f"{cls_name}: expected the submodule {path!r} (the layout of transformers 5.x) and found none; "
                    "this transformers version's layout is not supported"
                )
            obj = getattr(obj, part)
        return obj

    p: Dict[str, Any] = {"ln_pre": None, "heads": [], "proj": None}
    if cls_name in ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
                    "DeiTForImageClassificationWithTeacher"):
        base = model if cls_name.endswith("Model") else get(model, "vit" if cls_name.startswith("ViT") else "deit")
        p["emb"], p["layers"], p["norm"] = get(base, "embeddings"), list(get(base, "layers")), get(base, "layernorm")
        if cls_name in ("ViTForImageClassification", "DeiTForImageClassification"):
            p["heads"] = [get(model, "classifier")]
        elif cls_name == "DeiTForImageClassificationWithTeacher":
            p["heads"] = [get(model, "cls_classifier"), get(model, "distillation_classifier")]
    elif cls_name in ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"):
        vm = model if cls_name == "CLIPVisionModel" else get(model, "vision_model")
        vm = getattr(vm, "vision_model", vm)  # an older layout wraps the transformer once more
        p["emb"], p["layers"] = get(vm, "embeddings"), list(get(vm, "encoder.layers"))
        p["ln_pre"], p["norm"] = get(vm, "pre_layrnorm"), get(vm, "post_layernorm")
        if cls_name != "CLIPVisionModel":
            p["proj"] = get(model, "visual_projection")
    elif cls_name in ("Dinov2Model", "Dinov2WithRegistersModel") or cls_name in _CONCAT_CLASSES:
        if cls_name.endswith("Model"):
            base = model
        else:
            base = get(model, "dinov2_with_registers" if cls_name in _REGISTER_CLASSES else "dinov2")
            p["heads"] = [get(model, "classifier")]
        p["emb"], p["layers"], p["norm"] = get(base, "embeddings"), list(get(base, "encoder.layer")), get(base, "layernorm")
    else:
        check_supported_class(cls_name)
    return p


def _layer_modules(layer: Any, family: str) -> Dict[str, Any]:
    if family == "clip":
        a = layer.self_attn
        return dict(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.out_proj, ln1=layer.layer_norm1, ln2=layer.layer_norm2,
                    fc1=layer.mlp.fc1, fc2=layer.mlp.fc2, ls1=None, ls2=None, n_heads=a.num_heads, d_head=a.head_dim)
    a = layer.attention
    if family == "dinov2":
        mlp = layer.mlp
        if not hasattr(mlp, "fc1"):
            _refuse("Dinov2Model", f"the MLP {type(mlp).__name__} (SwiGLU, DINOv2 giant)")
        return dict(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, ln1=layer.norm1, ln2=layer.norm2, fc1=mlp.fc1,
                    fc2=mlp.fc2, ls1=layer.layer_scale1.lambda1, ls2=layer.layer_scale2.lambda1,
                    n_heads=a.num_attention_heads if hasattr(a, "num_attention_heads") else a.config.num_attention_heads,
                    d_head=a.head_dim)
    return dict(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, ln1=layer.layernorm_before, ln2=layer.layernorm_after,
                fc1=layer.mlp.fc1, fc2=layer.mlp.fc2, ls1=None, ls2=None, n_heads=a.num_attention_heads,
                d_head=a.head_dim)


def _vision_config(model: Any, cls_name: str) -> Any:
    cfg = model.config
    return cfg.vision_config if cls_name == "CLIPModel" else cfg


def class_name_of(model: Any) -> str:
    """The HF class name of ``model``, refused unless supported (:func:`check_supported_class`)."""
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - transformers comes with transformer-lens
        raise InputError("HookedViT.from_hf needs transformers (pip install transformers)") from e
    if not isinstance(model, PreTrainedModel):
        raise InputTypeError(
            f"from_hf expects a transformers PreTrainedModel (e.g. ViTForImageClassification) or a model id / local "
            f"directory, got {type(model).__name__}. For a timm model use HookedViT.from_timm(model)."
        )
    name = type(model).__name__
    check_supported_class(name, getattr(model.config, "_name_or_path", "") or name)
    return name


def config_from_hf(model: Any, name: Optional[str] = None) -> HookedViTConfig:
    """Derive the architecture of a supported ``transformers`` model, refusing unsupported features by name."""
    cls_name = class_name_of(model)
    family = SUPPORTED_CLASSES[cls_name][0]
    vc = _vision_config(model, cls_name)
    model_name = name or getattr(model.config, "_name_or_path", "") or cls_name

    def refuse(feature: str) -> None:
        _refuse(model_name, feature)

    act = _ACT.get(str(vc.hidden_act))
    if act is None:
        refuse(f"the MLP activation {vc.hidden_act!r} (gelu, quick_gelu, gelu_pytorch_tanh, gelu_new are)")
    if family == "dinov2" and getattr(vc, "use_swiglu_ffn", False):
        refuse("a SwiGLU MLP (use_swiglu_ffn=True, DINOv2 giant)")
    p = _parts(model, cls_name)
    emb, layers = p["emb"], p["layers"]
    if not layers:
        refuse("a model without layers")
    image_size, patch_size = _pair(vc.image_size), _pair(vc.patch_size)
    if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
        refuse(f"an image size {image_size} that is not a multiple of the patch size {patch_size}")
    conv = emb.patch_embedding if family == "clip" else emb.patch_embeddings.projection
    if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding not in ((0, 0), 0):
        refuse("a patch embedding other than a plain non-overlapping convolution")
    if tuple(conv.kernel_size) != patch_size:
        refuse(f"a patch convolution of size {tuple(conv.kernel_size)} != config.patch_size {patch_size}")
    mods = [_layer_modules(layer, family) for layer in layers]
    H, E = int(mods[0]["n_heads"]), int(mods[0]["d_head"])
    D = int(vc.hidden_size)
    d_mlp = int(mods[0]["fc1"].out_features)
    norms = [m[k] for m in mods for k in ("ln1", "ln2")] + [p["norm"]] + ([p["ln_pre"]] if p["ln_pre"] is not None else [])
    for i, m in enumerate(mods):
        if int(m["n_heads"]) != H or int(m["d_head"]) != E or int(m["fc1"].out_features) != d_mlp:
            refuse(f"layers of differing widths (layer {i})")
        if H * E != m["q"].out_features:
            refuse(f"an attention projection of width {m['q'].out_features} != heads x head size {H}x{E}")
    eps = set()
    for n in norms:
        if not isinstance(n, nn.LayerNorm) or not n.elementwise_affine or n.bias is None:
            refuse(f"a normalisation layer {type(n).__name__} (LayerNorm with weight and bias is supported)")
        eps.add(float(n.eps))
    if len(eps) != 1:
        refuse(f"LayerNorms with different eps values {sorted(eps)}")
    n_dist = 1 if family == "deit" else 0
    if cls_name == "DeiTForImageClassificationWithTeacher":
        pooling = "token_dist"
    else:
        pooling = "token"
    heads = p["heads"]
    if p["proj"] is not None:
        if not isinstance(p["proj"], nn.Linear):
            refuse(f"a visual projection of type {type(p['proj']).__name__}")
        n_classes = int(p["proj"].out_features)
    elif heads:
        if all(isinstance(h, nn.Identity) for h in heads):  # num_labels=0: no classifier
            n_classes = 0
        elif not all(isinstance(h, nn.Linear) for h in heads):
            refuse(f"a classifier of type {[type(h).__name__ for h in heads]}")
            n_classes = 0
        else:
            n_classes = int(heads[0].out_features)
    else:
        n_classes = 0
    if pooling == "token_dist" and n_classes == 0:
        pooling = "token"  # no classifier: the output is the final-norm [CLS], as DeiTModel's
    n_reg = int(getattr(vc, "num_register_tokens", 0) or 0) if cls_name in _REGISTER_CLASSES else 0
    if cls_name in _CONCAT_CLASSES:
        if n_classes == 0:
            refuse(f"{cls_name} with num_labels=0 (its output is then the concat [CLS] + patch mean features of width "
                   f"2 * hidden_size; load its backbone instead: HookedViT.from_hf(model."
                   f"{'dinov2_with_registers' if n_reg or cls_name in _REGISTER_CLASSES else 'dinov2'}))")
        if int(heads[0].in_features) != 2 * D:
            refuse(f"a classifier of input width {heads[0].in_features} (concat([CLS], mean) is 2 x {D})")
        pooling = "token_avg"
    pos = emb.position_embedding.weight if family == "clip" else emb.position_embeddings
    n_patches = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
    n_pos = int(pos.shape[-2])
    if n_pos != n_patches + 1 + n_dist:
        refuse(f"a position embedding of {n_pos} positions (expected {n_patches + 1 + n_dist})")
    extra: Dict[str, Any] = {"source": "hf", "hf_class": cls_name, "hf_model_type": str(getattr(vc, "model_type", ""))}
    dynamic = family == "dinov2"
    if dynamic:
        if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
            refuse(f"a non-square DINOv2 grid ({image_size}, patches {patch_size}): HF interpolates from a square grid")
        # HF's Dinov2 interpolation has no antialiasing (timm's has); Dinov2WithRegisters' has
        extra["pos_embed_antialias"] = cls_name in _REGISTER_CLASSES
    cfg = HookedViTConfig(
        n_layers=len(layers), d_model=D, n_heads=H, d_head=E, d_mlp=d_mlp, n_classes=n_classes,
        image_size=image_size, patch_size=patch_size, in_chans=int(conv.in_channels), has_class_token=True,
        n_dist_tokens=n_dist, n_register_tokens=n_reg, pos_embed_prefix=cls_name not in _REGISTER_CLASSES,
        pooling=pooling, act_fn=act,  # type: ignore[arg-type]
        eps=eps.pop(), normalization_type="LN", has_norm_pre=p["ln_pre"] is not None, has_ln_final=True,
        has_fc_norm=False, post_norm=False, dynamic_img_size=dynamic, model_name=model_name, extra=extra,
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def state_dict_from_hf(model: Any, cfg: HookedViTConfig) -> Dict[str, torch.Tensor]:
    """HF state -> HookedViT state dict (LayerScale folded into the output weights)."""
    cls_name = cfg.extra["hf_class"]
    family = SUPPORTED_CLASSES[cls_name][0]
    p = _parts(model, cls_name)
    H, E, D = cfg.n_heads, cfg.d_head, cfg.d_model
    emb = p["emb"]
    sd: Dict[str, torch.Tensor] = {}

    def bias(lin: nn.Linear, n: int) -> torch.Tensor:
        return lin.bias if lin.bias is not None else torch.zeros(n, device=lin.weight.device, dtype=lin.weight.dtype)

    with torch.no_grad():
        if family == "clip":
            conv = emb.patch_embedding
            sd["embed.cls_token"] = emb.class_embedding.reshape(1, 1, D)
            sd["pos_embed.W_pos"] = emb.position_embedding.weight[None]
        else:
            conv = emb.patch_embeddings.projection
            sd["embed.cls_token"] = emb.cls_token
            sd["pos_embed.W_pos"] = emb.position_embeddings
            if cfg.n_register_tokens or cls_name in _REGISTER_CLASSES:
                # registers get no position embedding; HF adds position 0 to [CLS]: fold it into the token
                sd["embed.cls_token"] = emb.cls_token + emb.position_embeddings[:, :1]
                sd["pos_embed.W_pos"] = emb.position_embeddings[:, 1:]
                if cfg.n_register_tokens:
                    sd["embed.reg_token"] = emb.register_tokens
            if cfg.n_dist_tokens:
                sd["embed.dist_token"] = emb.distillation_token
        sd["embed.W_E"] = conv.weight
        sd["embed.b_E"] = conv.bias if conv.bias is not None else torch.zeros(D, device=conv.weight.device, dtype=conv.weight.dtype)
        if p["ln_pre"] is not None:
            sd["ln_pre.w"], sd["ln_pre.b"] = p["ln_pre"].weight, p["ln_pre"].bias
        for l, layer in enumerate(p["layers"]):
            m = _layer_modules(layer, family)
            pre = f"blocks.{l}."
            for n, key in (("Q", "q"), ("K", "k"), ("V", "v")):
                lin = m[key]
                sd[pre + f"attn.W_{n}"] = lin.weight.view(H, E, D).permute(0, 2, 1)  # [H, D, E]
                sd[pre + f"attn.b_{n}"] = bias(lin, H * E).view(H, E)
            W_O = m["o"].weight.T.reshape(H, E, D)
            b_O = bias(m["o"], D)
            W_out, b_out = m["fc2"].weight.T, bias(m["fc2"], D)
            if m["ls1"] is not None:
                W_O, b_O = W_O * m["ls1"], b_O * m["ls1"]
                W_out, b_out = W_out * m["ls2"], b_out * m["ls2"]
            sd[pre + "attn.W_O"], sd[pre + "attn.b_O"] = W_O, b_O
            sd[pre + "mlp.W_in"], sd[pre + "mlp.b_in"] = m["fc1"].weight.T, bias(m["fc1"], cfg.d_mlp)
            sd[pre + "mlp.W_out"], sd[pre + "mlp.b_out"] = W_out, b_out
            sd[pre + "ln1.w"], sd[pre + "ln1.b"] = m["ln1"].weight, m["ln1"].bias
            sd[pre + "ln2.w"], sd[pre + "ln2.b"] = m["ln2"].weight, m["ln2"].bias
        sd["ln_final.w"], sd["ln_final.b"] = p["norm"].weight, p["norm"].bias
        if cfg.n_classes:
            if p["proj"] is not None:
                heads = [p["proj"]]
            else:
                heads = p["heads"]
            sd["unembed.W_U"] = heads[0].weight.T
            sd["unembed.b_U"] = bias(heads[0], cfg.n_classes)
            if cfg.pooling == "token_avg":  # concat([CLS], mean of patches) @ W.T + b == [CLS] @ W[:, :D].T + b + mean @ W[:, D:].T
                sd["unembed.W_U"] = heads[0].weight[:, :D].T
                sd["unembed_patch.W_U"] = heads[0].weight[:, D:].T
                sd["unembed_patch.b_U"] = torch.zeros_like(sd["unembed.b_U"])
            if cfg.pooling == "token_dist":
                sd["unembed_dist.W_U"] = heads[1].weight.T
                sd["unembed_dist.b_U"] = bias(heads[1], cfg.n_classes)
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in sd.items()}


def class_names_of(model: Any, n_classes: int) -> Optional[List[str]]:
    """``config.id2label`` as class names, or None (no head, or HF's placeholder ``LABEL_i`` names)."""
    if not n_classes:
        return None
    id2label = getattr(model.config, "id2label", None) or {}
    try:
        names = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in range(n_classes)]
    except KeyError:
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
def default_image_processor(model: Any) -> Any:
    """The family's ``transformers`` image processor with the settings of its published checkpoints
    (google/vit-*, facebook/deit-*, openai/clip-*, facebook/dinov2-*), sized for the config's image size:
    ViT: resize to it, mean / std 0.5; DeiT: resize to 256/224 of it, centre crop to it, ImageNet mean /
    std; CLIP: shortest edge and crop at it, CLIP mean / std; DINOv2: shortest edge 256, crop 224,
    ImageNet mean / std (the model interpolates its position embeddings to any size)."""
    import transformers

    cls_name = type(model).__name__
    family = SUPPORTED_CLASSES[cls_name][0]
    vc = _vision_config(model, cls_name)
    h, w = _pair(vc.image_size)
    proc_cls = getattr(transformers, _PROCESSOR[family])
    if family == "vit":
        return proc_cls(size={"height": h, "width": w})
    if family == "deit":  # facebook/deit-* checkpoints: ImageNet mean / std (the class's own default is 0.5)
        return proc_cls(size={"height": round(h * 256 / 224), "width": round(w * 256 / 224)},
                        crop_size={"height": h, "width": w}, image_mean=list(_IMAGENET_MEAN), image_std=list(_IMAGENET_STD))
    if family == "clip":
        return proc_cls(size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w})
    # facebook/dinov2-* checkpoints: BitImageProcessor with shortest edge 256, crop 224, ImageNet mean / std
    return proc_cls(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                    image_mean=list(_IMAGENET_MEAN), image_std=list(_IMAGENET_STD))


def processor_config(processor: Any) -> Dict[str, Any]:
    """``{"class": name, "settings": to_dict()}``, JSON-round-tripped (what ``save()`` writes)."""
    import transformers

    name = type(processor).__name__
    if not hasattr(transformers, name) or not hasattr(processor, "to_dict"):
        raise InputTypeError(
            f"image_processor must be a transformers image processor (e.g. ViTImageProcessor), got {name}"
        )
    settings = json.loads(json.dumps(processor.to_dict(), default=lambda o: o.value if hasattr(o, "value") else str(o)))
    return {"class": name, "settings": settings}


def _size_of(d: Any) -> Optional[Tuple[int, int]]:
    if not isinstance(d, dict):
        return None
    if "height" in d and "width" in d:
        return int(d["height"]), int(d["width"])
    if "shortest_edge" in d:
        return int(d["shortest_edge"]), int(d["shortest_edge"])
    return None


def data_config_from_processor(processor: Any, cfg: HookedViTConfig) -> Dict[str, Any]:
    """timm-style keys (for ``mode="paper"`` and plots) + the processor itself (``hf_image_processor``)."""
    pc = processor_config(processor)
    s = pc["settings"]
    crop = _size_of(s.get("crop_size")) if s.get("do_center_crop") else None
    resize = _size_of(s.get("size")) if s.get("do_resize", True) else None
    out_size = crop or resize or cfg.image_size
    mean = tuple(float(x) for x in (s.get("image_mean") or (0.0,) * cfg.in_chans)) if s.get("do_normalize", True) else (0.0,) * cfg.in_chans
    std = tuple(float(x) for x in (s.get("image_std") or (1.0,) * cfg.in_chans)) if s.get("do_normalize", True) else (1.0,) * cfg.in_chans
    if len(mean) != cfg.in_chans:
        mean = (sum(mean) / len(mean),) * cfg.in_chans
        std = (sum(std) / len(std),) * cfg.in_chans
    resample = s.get("resample", 3)
    crop_pct = 1.0
    if crop is not None and resize is not None and "shortest_edge" not in (s.get("size") or {}):
        crop_pct = min(crop) / min(resize)
    elif crop is not None and resize is not None:
        crop_pct = min(crop) / min(resize)
    return {
        "input_size": (cfg.in_chans, int(out_size[0]), int(out_size[1])),
        "interpolation": _RESAMPLE.get(int(resample) if isinstance(resample, (int, float)) else 3, "bicubic"),
        "mean": mean,
        "std": std,
        "crop_pct": float(crop_pct),
        "crop_mode": "center",
        "hf_image_processor": pc,
    }


_PROCESSOR_CACHE: Dict[str, Any] = {}


def image_processor_from_config(pc: Dict[str, Any]) -> Any:
    """The ``transformers`` image processor a ``data_config["hf_image_processor"]`` entry describes."""
    import transformers

    key = json.dumps(pc, sort_keys=True)
    if key not in _PROCESSOR_CACHE:
        cls = getattr(transformers, str(pc.get("class")), None)
        if cls is None:
            raise InputError(
                f"data_config['hf_image_processor'] names {pc.get('class')!r}, which this transformers version does "
                "not have; set model.data_config to a timm data config or install the transformers it was saved with"
            )
        _PROCESSOR_CACHE[key] = cls.from_dict(dict(pc.get("settings") or {}))
    return _PROCESSOR_CACHE[key]


# ---------------------------------------------------------------------------------------------
# the source interface
# ---------------------------------------------------------------------------------------------
def convert(model: Any, *, name: Optional[str] = None, image_processor: Any = None,
            interpolate_pos_encoding: bool = False) -> Converted:
    """An in-memory ``transformers`` model -> :class:`Converted` (config, HookedViT state dict, class
    names from ``id2label``, preprocessing from ``image_processor`` or the family's defaults at the
    config's image size). The HF model is not modified. ``interpolate_pos_encoding``: see
    :func:`opt_in_interpolation`."""
    _check_interpolate_flag(interpolate_pos_encoding)
    cfg = config_from_hf(model, name=name)
    if interpolate_pos_encoding:
        opt_in_interpolation(cfg)
    sd = state_dict_from_hf(model, cfg)
    names = class_names_of(model, cfg.n_classes)
    processor = image_processor if image_processor is not None else default_image_processor(model)
    dc = data_config_from_processor(processor, cfg)
    notes = {"image_processor": "given" if image_processor is not None else "family defaults"}
    cfg.extra["image_processor"] = notes["image_processor"]
    return Converted(cfg, sd, names, None, dc, notes)


def _is_local(src: Union[str, os.PathLike]) -> bool:
    return Path(src).expanduser().is_dir()


def _hub_error(name: str, e: BaseException) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"could not load the Hugging Face model {name!r} ({type(e).__name__}: {str(e)[:240]}). It is neither a local "
        "directory nor reachable on the hub. Offline, save it on a machine with access -- "
        f"m = transformers.AutoModel.from_pretrained({name!r}); m.save_pretrained('DIR'); "
        f"transformers.AutoImageProcessor.from_pretrained({name!r}).save_pretrained('DIR') -- then load "
        "HookedViT.from_hf('DIR') (or pass checkpoint_path='DIR'); models already in the Hugging Face cache load "
        "with HF_HUB_OFFLINE=1."
    )


def load(name: str, *, checkpoint_path: Optional[Union[str, os.PathLike]] = None, image_processor: Any = None,
         interpolate_pos_encoding: bool = False) -> Converted:
    """A hub id or a local ``save_pretrained`` directory -> :class:`Converted`.

    The class comes from ``config.architectures`` (refused before any weights are read unless
    supported); the weights load strictly: a tensor of the class missing from the files (which
    transformers would initialise randomly) or of another shape is a
    :class:`~vit_lens.loading.CheckpointMismatchError`; unused file tensors are an error too, except
    a ``pooler`` (not the class-space path). The image processor is the directory's / hub's
    ``preprocessor_config.json`` when there is one, else the family's defaults (with a
    :class:`~vit_lens.loading.CheckpointWarning`). ``checkpoint_path``: a local directory to read
    instead of the hub (``name`` then only names the model). ``interpolate_pos_encoding``: see
    :func:`opt_in_interpolation`.
    """
    import transformers

    _check_interpolate_flag(interpolate_pos_encoding)
    if not isinstance(name, str) or not name:
        raise InputTypeError(f"the Hugging Face model must be a non-empty model id or directory, got {name!r}")
    src = str(Path(checkpoint_path).expanduser()) if checkpoint_path is not None else name
    local = _is_local(src)
    if checkpoint_path is not None and not local:
        raise CheckpointNotFoundError(
            f"checkpoint_path={str(checkpoint_path)!r} is not a directory; pass a folder written by save_pretrained "
            "(config.json + model.safetensors)"
        )
    if not local and (Path(src).expanduser().exists() or src.startswith((".", "/", "~"))):
        raise CheckpointNotFoundError(
            f"{src!r} is not a directory written by save_pretrained; pass a folder with config.json and "
            "model.safetensors, or a Hugging Face model id such as 'google/vit-base-patch16-224'"
        )
    kw = {"local_files_only": True} if local else {}
    try:
        config = transformers.AutoConfig.from_pretrained(src, **kw)
    except Exception as e:
        if local:
            raise CheckpointNotFoundError(
                f"{src!r} has no readable config.json ({type(e).__name__}: {str(e)[:200]}); write the folder with "
                "model.save_pretrained(DIR)"
            ) from e
        raise _hub_error(name, e) from e
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise InputError(
            f"{src}: config.json names no architecture (config.architectures is empty), so the model class is "
            "unknown; build the model yourself (e.g. ViTForImageClassification.from_pretrained(DIR)) and pass it: "
            "HookedViT.from_hf(model)"
        )
    cls_name = archs[0]
    check_supported_class(cls_name, name)
    cls = getattr(transformers, cls_name)
    try:
        model, info = cls.from_pretrained(src, output_loading_info=True, **kw)
    except Exception as e:
        if local:
            raise CheckpointMismatchError(
                f"{src!r}: transformers could not load {cls_name} from it ({type(e).__name__}: {str(e)[:300]}); "
                "check that config.json (sizes, num_labels) describes the saved weights, or write the folder with "
                "model.save_pretrained(DIR)"
            ) from e
        raise _hub_error(name, e) from e
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if "pooler" not in k)
    if missing or mismatched or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the files (transformers left them randomly initialised): {missing[:8]}")
        if mismatched:
            parts.append(f"of another shape: {mismatched[:8]}")
        if unexpected:
            parts.append(f"in the files but not in {cls_name}: {unexpected[:8]}")
        raise CheckpointMismatchError(
            f"{name}: the weights do not fit {cls_name} exactly -- " + "; ".join(parts) + ". Check that config.json "
            "(architectures, num_labels, sizes) describes the saved weights, or load the model yourself and pass it "
            "to HookedViT.from_hf(model)."
        )
    model.eval()
    if image_processor is None:
        try:
            image_processor = transformers.AutoImageProcessor.from_pretrained(src, **kw)
        except Exception:
            warnings.warn(
                f"{name}: no image processor config (preprocessor_config.json) found, so preprocessing is the "
                f"{cls_name} family's default at the config's image size; pass image_processor=... if the weights "
                "were trained with other preprocessing.",
                CheckpointWarning, stacklevel=3,
            )
    converted = convert(model, name=name, image_processor=image_processor,
                        interpolate_pos_encoding=interpolate_pos_encoding)
    converted.config.extra["checkpoint"] = src if local else None
    return converted


def load_hf(cls: Any, model_or_name: Any, *, image_processor: Any = None,
            checkpoint_path: Optional[Union[str, os.PathLike]] = None, device: Any = None,
            dtype: Optional[torch.dtype] = None, interpolate_pos_encoding: bool = False, **processing: bool) -> Any:
    """See :meth:`vit_lens.HookedViT.from_hf`."""
    from vit_lens.loading.processing import validate_processing_options

    _check_interpolate_flag(interpolate_pos_encoding)
    validate_processing_options(cast(Dict[str, object], processing))
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(model_or_name, (str, os.PathLike)):
        converted = load(str(model_or_name), checkpoint_path=checkpoint_path, image_processor=image_processor,
                         interpolate_pos_encoding=interpolate_pos_encoding)
        return build_model(cls, converted, device=device or "cpu", dtype=dtype or torch.float32, **processing)
    if checkpoint_path is not None:
        raise InputTypeError("checkpoint_path is for loading by name; an in-memory model already has its weights")
    converted = convert(model_or_name, image_processor=image_processor,
                        interpolate_pos_encoding=interpolate_pos_encoding)
    ref = next(model_or_name.parameters())
    return build_model(cls, converted, device=device if device is not None else ref.device,
                       dtype=dtype or ref.dtype, **processing)


# ---------------------------------------------------------------------------------------------
# ViT / DeiT / CLIP: opt-in position-embedding interpolation (transformers' interpolate_pos_encoding=True)
# ---------------------------------------------------------------------------------------------
def _check_interpolate_flag(flag: object) -> None:
    if not isinstance(flag, bool):
        raise InputTypeError(f"interpolate_pos_encoding must be True or False, got {flag!r}")


def opt_in_interpolation(cfg: HookedViTConfig) -> None:
    """Make a converted ViT / DeiT / CLIP config accept other image sizes as transformers' forward with
    ``interpolate_pos_encoding=True`` does (in place on ``cfg``).

    transformers (``ViTEmbeddings`` / ``DeiTEmbeddings`` / ``CLIPVisionEmbeddings.interpolate_pos_encoding``)
    keeps the [CLS] (and DeiT's [DIST]) position embeddings as they are, reshapes the patch part to
    its square ``sqrt(n) x sqrt(n)`` grid and resizes it with ``F.interpolate(size=(H // p, W // p),
    mode="bicubic", align_corners=False)`` (no antialiasing); it skips the interpolation only when the
    number of patches is the native one and the image is square, i.e. at the native size. The hooked
    model does the same through :class:`~vit_lens.components.embed.PosEmbed`'s HF-style resampling
    (``cfg.dynamic_img_size`` with ``cfg.extra["pos_embed_antialias"] = False``, the flag DINOv2 uses),
    resampling exactly when the patch grid differs from the native one. Differences, both refusals or
    rounding, never silent: image sizes that are not a multiple of the patch size are refused (HF drops
    the remainder pixels), and in float16 / bfloat16 the resampling runs in float32 (HF's ViT / DeiT /
    CLIP resample in the parameter dtype). A non-square native grid is refused (HF's reshape assumes a
    square one). DINOv2 always interpolates, as HF's ``Dinov2Model``: nothing to do.
    """
    cls_name = str(cfg.extra.get("hf_class", ""))
    family = SUPPORTED_CLASSES[cls_name][0] if cls_name in SUPPORTED_CLASSES else ""
    if family.startswith("dinov2") and cfg.dynamic_img_size:
        return
    if family not in ("vit", "deit", "clip"):
        raise InputError(
            f"interpolate_pos_encoding=True is an option of the Hugging Face ViT, DeiT and CLIP classes, not of "
            f"{cls_name or cfg.model_name}; leave it out"
        )
    (h, w), (ph, pw) = cfg.grid_size, cfg.patch_size
    if h != w or ph != pw:
        raise UnsupportedModelError(
            f"{cfg.model_name}: interpolate_pos_encoding=True with a non-square native grid {h}x{w} (patches "
            f"{ph}x{pw}) is not supported: transformers reshapes the position embeddings to a square grid there; "
            f"load without it and run {cfg.image_size[0]}x{cfg.image_size[1]} images"
        )
    cfg.dynamic_img_size = True
    cfg.extra["pos_embed_antialias"] = False
    cfg.extra["interpolate_pos_encoding"] = True


# ---------------------------------------------------------------------------------------------
# the README's supported-models table
# ---------------------------------------------------------------------------------------------
def table_rows() -> List[Tuple[str, str, str, str, str]]:
    """Rows of the supported-models table: (source, family, names, what is reproduced, class-space projection)."""
    src = "Hugging Face"
    return [
        (src, "ViT", "`ViTModel`, `ViTForImageClassification`",
         "[CLS], learned position embedding, any `num_labels` (`id2label` as class names); `ViTModel`'s tanh "
         "pooler is not converted (the output is the final-norm [CLS])",
         "`ln_final` (HF's `layernorm`) on [CLS], then `W_U` = `classifier`"),
        (src, "DeiT", "`DeiTModel`, `DeiTForImageClassification`, `DeiTForImageClassificationWithTeacher`",
         "[CLS] + distillation token (always present in HF DeiT); `DeiTForImageClassification` reads [CLS] only; "
         "`WithTeacher`: mean of both heads",
         "`ln_final` on [CLS], then `W_U` (`WithTeacher`: mean of `W_U` on [CLS] and `W_U_dist` on the "
         "distillation token)"),
        (src, "CLIP image towers", "`CLIPVisionModel`, `CLIPVisionModelWithProjection`, `CLIPModel` (image tower)",
         "`pre_layrnorm` (as `ln_pre`), no patch bias, QuickGELU; head = `visual_projection` (output = "
         "`image_embeds`)",
         "`ln_final` (`post_layernorm`) on [CLS], then the projection; text classes via "
         "`set_class_directions(W_text, space=\"head\")`"),
        (src, "DINOv2 (headless)", "`Dinov2Model`",
         "LayerScale, position embeddings interpolated to the input size as HF does (bicubic, no antialiasing)",
         "none until `set_class_directions(W)`; then `ln_final` on [CLS], then `W`"),
        (src, "DINOv2 classifier", "`Dinov2ForImageClassification`",
         "LayerScale, interpolated position embeddings (as `Dinov2Model`); the classifier on concat([CLS], mean of "
         "the patches) is converted exactly as two heads (`pooling=\"token_avg\"`), any `num_labels` (0 refused)",
         "`ln_final` on every token, then `W_U` (`W[:D]`, with the bias) on [CLS] plus `W_U_patch` (`W[D:]`) on "
         "the patch mean; `head=\"cls\"` / `\"patch\"` selects one, the default is their sum"),
        (src, "DINOv2 with registers", "`Dinov2WithRegistersModel`, `Dinov2WithRegistersForImageClassification`",
         "register tokens after [CLS] (no position embedding; [CLS]'s is folded into the token), position "
         "embeddings interpolated as HF does for this family (bicubic, antialiased)",
         "as `Dinov2Model` / `Dinov2ForImageClassification`; the registers are read by neither head"),
    ]


_README_REFUSED = ("SiglipVisionModel", "Siglip2VisionModel", "CLIPForImageClassification", "Dinov2Backbone",
                   "ViTMAEModel", "BeitModel")


def table_notes() -> str:
    """The README paragraph under the table for the Hugging Face rows: parity and refusals."""
    refused = "; ".join(f"`{k}` ({REFUSED_CLASSES[k].split(';')[0].split(' (')[0]})" for k in _README_REFUSED)
    return (
        "Hugging Face rows: `HookedViT.from_hf(model_or_name)` or `from_pretrained(\"hf:NAME\")`; each class's parity "
        "test builds a small random model from its transformers config and compares the output and every block's "
        "residual stream with transformers' own forward, with eager and with SDPA attention (max abs diff <= 1e-4, "
        "float32), with and without each weight-processing option (headless classes refuse `fold_ln` and "
        "`center_unembed`, as timm's); ViT-B/16, distilled DeiT-B, CLIP ViT-B/32 and ViT-L/14, DINOv2-B (headless, "
        "classifier, with 4 registers) convert at their real size. "
        f"Refused up front, naming the feature: {refused}; and every other class."
    )


__all__ = ["SUPPORTED_CLASSES", "REFUSED_CLASSES", "convert", "load", "load_hf", "config_from_hf", "state_dict_from_hf",
           "default_image_processor", "data_config_from_processor", "image_processor_from_config", "table_rows",
           "opt_in_interpolation"]
