"""The timm source: timm ``VisionTransformer`` -> :class:`HookedViTConfig` + HookedViT state dict.

The source interface (see :mod:`vit_lens.loading.sources`):

- :func:`convert` (an in-memory timm model -> :class:`~vit_lens.loading.sources.Converted`),
- :func:`load` (a timm name, weights from ``checkpoint_path``, ``$VIT_LENS_CHECKPOINTS`` or the hub).

Every architectural feature of the timm model is checked up front: anything this converter does
not reproduce exactly is refused with :class:`UnsupportedModelError` naming the feature, never
converted into a model that gives a different answer.

A user's weights file is loaded strictly (:func:`open_checkpoint_model`): every tensor in the file
is accounted for (missing / unexpected keys and shape differences are errors naming the keys), the
shape-bearing settings the file determines unambiguously -- ``num_classes`` (``head.weight`` rows,
0 without a head), ``in_chans`` and ``patch_size`` (``patch_embed.proj.weight``), ``img_size``
(a square ``pos_embed`` grid) -- are read from it unless given in ``timm_kwargs``, and a file that
names another model (its file name ``<arch>.<tag>.<suffix>``, a Hugging Face ``config.json``
beside it, or ``model_name`` / ``architecture`` in its safetensors metadata) is refused with the
right name suggested. A file that names no pretrained tag (and none is given in the name asked
for), or whose head does not match the tag's, is loaded with ``cfg.model_name = "<arch>.unknown"``
(``cfg.extra["pretrained_tag"] = "unknown"``) and the architecture's default preprocessing, with
a :class:`~vit_lens.loading.checkpoints.CheckpointWarning` saying so.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, cast

import torch
import torch.nn as nn

from vit_lens.config import HookedViTConfig
from vit_lens.core.errors import InputError, InputTypeError
from vit_lens.loading.checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWarning,
    diff_state_dicts,
    read_checkpoint,
)
from vit_lens.loading.sources import Converted, build_model, layer_norm_eps

CHECKPOINT_ENV = "VIT_LENS_CHECKPOINTS"
#: the pretrained tag recorded for weights whose tag is not known (``cfg.model_name = "<arch>.unknown"``)
UNKNOWN_TAG = "unknown"
#: timm modules whose models may be supported (anything else is refused before it is built)
VIT_MODULES = ("vision_transformer", "deit")


class UnsupportedModelError(InputError):
    """The timm model has a feature HookedViT does not reproduce exactly."""


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
def resolve_model_name(name: str) -> Tuple[str, str]:
    """Split and validate a timm name.

    Returns:
        ``(architecture, tag)``; a bare architecture name gets timm's default pretrained tag
        (``""`` if the architecture has no pretrained weights registered).
    """
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not isinstance(name, str) or not name:
        raise InputTypeError(f"model name must be a non-empty string, got {name!r}")
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        candidates = timm.list_models("*vit*") + timm.list_models("deit*")
        close = difflib.get_close_matches(arch, candidates, n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(
            f"unknown model name {name!r}: timm has no architecture {arch!r}.{hint} "
            "See vit_lens.supported_models() or timm.list_models('vit_*')."
        )
    check_supported_architecture(arch)
    if tag == UNKNOWN_TAG:
        raise InputError(
            f"{name!r} is the name vit_lens records for {arch} weights of unknown pretrained tag; it cannot be "
            f"fetched. Load the file again with HookedViT.from_pretrained({arch!r}, checkpoint_path=...), or the "
            "saved model with HookedViT.load(path)."
        )
    if not tag:
        cfg = get_pretrained_cfg(arch)
        tag = cfg.tag if cfg is not None and cfg.tag else ""
    else:
        from timm.models import get_arch_pretrained_cfgs

        known = sorted(get_arch_pretrained_cfgs(arch))
        if f"{arch}.{tag}" not in known:
            raise InputError(f"unknown pretrained tag {tag!r} for {arch}; timm knows: {known}")
    return arch, tag


#: the feature that makes the models of other timm modules (or classes) different from a plain ViT
UNSUPPORTED_MODULE_FEATURES = {
    "eva": "rotary position embeddings and SwiGLU MLPs (EVA-02 / RoPE ViTs, timm module eva)",
    "beit": "relative position bias (BEiT, timm module beit)",
    "vision_transformer_relpos": "relative position embeddings (timm module vision_transformer_relpos)",
    "vision_transformer_hybrid": "a hybrid CNN stem (timm module vision_transformer_hybrid)",
    "vision_transformer_sam": "windowed attention with relative positions (SAM, timm module vision_transformer_sam)",
    "naflexvit": "NaFlex variable-resolution patching (timm module naflexvit)",
    "cait": "class-attention layers and talking heads (CaiT)",
    "deepseek_vit": "a non-timm-ViT architecture (deepseek_vit)",
}
UNSUPPORTED_CLASS_FEATURES = {
    "Eva": UNSUPPORTED_MODULE_FEATURES["eva"],
    "Beit": UNSUPPORTED_MODULE_FEATURES["beit"],
    "VisionTransformerRelPos": UNSUPPORTED_MODULE_FEATURES["vision_transformer_relpos"],
    "VisionTransformerSAM": UNSUPPORTED_MODULE_FEATURES["vision_transformer_sam"],
    "NaFlexVit": UNSUPPORTED_MODULE_FEATURES["naflexvit"],
    "Cait": UNSUPPORTED_MODULE_FEATURES["cait"],
}


def check_supported_architecture(arch: str) -> None:
    """Refuse, before building anything, architectures that are not timm Vision Transformers."""
    from timm.models import is_model_in_modules, model_entrypoint

    if not is_model_in_modules(arch, list(VIT_MODULES)):
        module = model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
        feature = UNSUPPORTED_MODULE_FEATURES.get(module, f"an architecture outside timm's VisionTransformer (module {module})")
        raise UnsupportedModelError(
            f"{arch}: {feature} is not supported by HookedViT. HookedViT supports timm's "
            f"VisionTransformer family (modules {', '.join(VIT_MODULES)}); see vit_lens.supported_models()."
        )


# ---------------------------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------------------------
def _is_identity(m: Any) -> bool:
    return m is None or isinstance(m, nn.Identity)




def _act_name(act: nn.Module) -> str:
    from timm.layers import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    name = type(act).__name__
    if name == "GELU":  # timm.layers.activations.GELU wraps F.gelu
        return "gelu"
    if name == "GELUTanh":
        return "gelu_tanh"
    raise UnsupportedModelError(f"MLP activation {name} is not supported (GELU, GELU-tanh, QuickGELU are)")


def config_from_timm(model: nn.Module, name: Optional[str] = None) -> HookedViTConfig:
    """Derive the architecture of a timm ViT, refusing unsupported features by name."""
    from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

    if not isinstance(model, VisionTransformer):
        cls_name = type(model).__name__
        feature = UNSUPPORTED_CLASS_FEATURES.get(cls_name, f"{cls_name} (not a timm VisionTransformer)")
        raise UnsupportedModelError(
            f"{feature} is not supported by HookedViT; it supports timm's VisionTransformer family "
            "(see vit_lens.supported_models())."
        )
    model_name = name or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    distilled = hasattr(model, "dist_token") and getattr(model, "dist_token", None) is not None

    def refuse(feature: str) -> None:
        raise UnsupportedModelError(f"{model_name}: {feature} is not supported by HookedViT")

    if getattr(model, "attn_pool", None) is not None:
        refuse(f"attention-pool head (global_pool={model.global_pool!r}, {type(model.attn_pool).__name__})")
    pool = model.global_pool
    if pool not in ("token", "avg", ""):
        refuse(f"global_pool={pool!r}")
    if getattr(model, "pool_include_prefix", False):
        refuse("pooling that includes prefix tokens")
    if getattr(model, "pos_embed", None) is None:
        refuse("a model without a learned absolute position embedding")
    if getattr(model, "rope", None) is not None:
        refuse("rotary position embedding")
    pe = model.patch_embed
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d) or not _is_identity(getattr(pe, "norm", None)):
        refuse("a patch embedding other than a plain convolution")
    fmt = str(getattr(getattr(pe, "output_fmt", None), "value", getattr(pe, "output_fmt", "NCHW")))
    flat = bool(getattr(pe, "flatten", True))
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    # static models: conv -> flatten (NCHW -> NLC); dynamic_img_size models: conv -> NHWC, flattened after pos_embed
    if not ((flat and fmt == "NCHW") or (dynamic and not flat and fmt == "NHWC")):
        refuse(f"a patch embedding with output format {fmt} (flatten={flat})")
    if type(pe).__name__ != "PatchEmbed":
        refuse(f"patch embedding module {type(pe).__name__}")
    conv = pe.proj
    if tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding not in ((0, 0), 0, "valid"):
        refuse("an overlapping or padded patch convolution")
    if distilled and not model.has_class_token:
        refuse("a distillation token without a class token")
    if distilled and not _is_identity(model.fc_norm):
        refuse("fc_norm on a distilled model (timm's distilled head skips it)")

    blocks: List[Any] = list(model.blocks)  # timm Blocks (nn.Module attributes: Any)
    if not blocks:
        refuse("a model without blocks")
    block_types = {type(b) for b in blocks}
    if block_types == {Block}:
        post_norm = False
    elif block_types == {ResPostBlock}:
        post_norm = True
    else:
        names = sorted(t.__name__ for t in block_types)
        kind = "parallel attention/MLP blocks" if any("Parallel" in n for n in names) else "block type(s)"
        refuse(f"{kind} {names} (Block and ResPostBlock are supported)")

    eps_values = set()
    b0 = blocks[0]
    attn0 = b0.attn
    H, E = attn0.num_heads, attn0.head_dim
    D = model.embed_dim
    for i, blk in enumerate(blocks):
        a = blk.attn
        if type(a).__name__ != "Attention":
            refuse(f"attention module {type(a).__name__} in block {i}")
        if not (_is_identity(a.q_norm) and _is_identity(a.k_norm)):
            refuse("QK normalisation")
        if not _is_identity(getattr(a, "norm", None)):
            refuse("attention output normalisation (scale_norm)")
        if getattr(a, "gate", None) is not None:
            refuse("gated attention")
        if a.num_heads != H or a.head_dim != E:
            refuse("blocks with differing head counts")
        mlp = blk.mlp
        if type(mlp).__name__ != "Mlp":
            refuse(f"MLP type {type(mlp).__name__} (SwiGLU/GLU MLPs)")
        if not _is_identity(getattr(mlp, "norm", None)):
            refuse("a norm inside the MLP")
        eps_values.add(layer_norm_eps(blk.norm1, f"block {i} norm1"))
        eps_values.add(layer_norm_eps(blk.norm2, f"block {i} norm2"))
        if post_norm is False:
            for ls in ("ls1", "ls2"):
                m = getattr(blk, ls)
                if not (_is_identity(m) or type(m).__name__ == "LayerScale"):
                    refuse(f"{ls} of type {type(m).__name__}")
    act = _act_name(blocks[0].mlp.act)
    d_mlp = blocks[0].mlp.fc1.out_features
    for i, blk in enumerate(blocks):
        if blk.mlp.fc1.out_features != d_mlp or _act_name(blk.mlp.act) != act:
            refuse(f"blocks with differing MLP widths or activations (block {i})")
    ph, pw = tuple(pe.patch_size)
    if pe.img_size is not None and (pe.img_size[0] % ph or pe.img_size[1] % pw):
        refuse(f"an image size {tuple(pe.img_size)} that is not a multiple of the patch size {(ph, pw)}")
    has_norm_pre = not _is_identity(model.norm_pre)
    if has_norm_pre:
        eps_values.add(layer_norm_eps(model.norm_pre, "norm_pre"))
    has_ln_final = not _is_identity(model.norm)
    if has_ln_final:
        eps_values.add(layer_norm_eps(model.norm, "norm"))
    has_fc_norm = not _is_identity(model.fc_norm)
    if has_fc_norm:
        eps_values.add(layer_norm_eps(model.fc_norm, "fc_norm"))
    if len(eps_values) != 1:
        refuse(f"LayerNorms with different eps values {sorted(eps_values)}")

    if distilled:
        pooling = "token_dist"
    elif pool == "avg":
        pooling = "avg"
    elif pool == "token":
        pooling = "token"
    else:  # '' = no pooling: unsupported for classification
        refuse("global_pool='' (no pooling)")
    head = model.head
    if isinstance(head, nn.Linear):
        n_classes = head.out_features
    elif _is_identity(head):
        n_classes = 0
    else:
        refuse(f"classifier head of type {type(head).__name__}")

    n_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    cfg = HookedViTConfig(
        n_layers=len(blocks),
        d_model=D,
        n_heads=H,
        d_head=E,
        d_mlp=blocks[0].mlp.fc1.out_features,
        n_classes=n_classes,
        image_size=tuple(pe.img_size) if pe.img_size is not None else (224, 224),
        patch_size=tuple(pe.patch_size),
        in_chans=conv.in_channels,
        has_class_token=bool(model.has_class_token),
        n_dist_tokens=1 if distilled else 0,
        n_register_tokens=n_reg,
        pos_embed_prefix=not model.no_embed_class,
        pooling=cast(Any, pooling),  # checked above: "token" / "avg" / "token_dist"
        act_fn=cast(Any, act),  # one of _act_name's names
        eps=eps_values.pop(),
        normalization_type="LN",
        has_norm_pre=has_norm_pre,
        has_ln_final=has_ln_final,
        has_fc_norm=has_fc_norm,
        post_norm=post_norm,
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        model_name=model_name,
    )
    if cfg.n_prefix_tokens != model.num_prefix_tokens:
        refuse(f"a prefix-token layout with {model.num_prefix_tokens} tokens")
    expected_pos = cfg.n_patches + (cfg.n_prefix_tokens if cfg.pos_embed_prefix else 0)
    n_pos = cast(torch.Tensor, model.pos_embed).shape[1]  # not None: refused above
    if n_pos != expected_pos:
        refuse(f"a position embedding of length {n_pos} (expected {expected_pos})")
    return cfg


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def state_dict_from_timm(model: Any, cfg: HookedViTConfig) -> Dict[str, torch.Tensor]:
    """timm state dict -> HookedViT state dict (LayerScale folded into the output weights).

    ``model``: a timm ``VisionTransformer`` that :func:`config_from_timm` accepted (``cfg``)."""
    H, E, D = cfg.n_heads, cfg.d_head, cfg.d_model
    sd: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        conv = model.patch_embed.proj
        sd["embed.W_E"] = conv.weight
        sd["embed.b_E"] = conv.bias if conv.bias is not None else torch.zeros(D)
        if cfg.has_class_token:
            sd["embed.cls_token"] = model.cls_token
        if cfg.n_dist_tokens:
            sd["embed.dist_token"] = model.dist_token
        if cfg.n_register_tokens:
            sd["embed.reg_token"] = model.reg_token
        sd["pos_embed.W_pos"] = model.pos_embed
        if cfg.has_norm_pre:
            sd["ln_pre.w"], sd["ln_pre.b"] = model.norm_pre.weight, model.norm_pre.bias
        for l, blk in enumerate(model.blocks):
            p = f"blocks.{l}."
            a = blk.attn
            qkv_w = a.qkv.weight.view(3, H, E, D).permute(0, 1, 3, 2)  # [3, H, D, E]
            qkv_b = a.qkv.bias.view(3, H, E) if a.qkv.bias is not None else torch.zeros(3, H, E)
            for i, n in enumerate("QKV"):
                sd[p + f"attn.W_{n}"] = qkv_w[i]
                sd[p + f"attn.b_{n}"] = qkv_b[i]
            W_O = a.proj.weight.T.reshape(H, E, D)
            b_O = a.proj.bias if a.proj.bias is not None else torch.zeros(D)
            W_out = blk.mlp.fc2.weight.T
            b_out = blk.mlp.fc2.bias if blk.mlp.fc2.bias is not None else torch.zeros(D)
            if not cfg.post_norm:
                if type(blk.ls1).__name__ == "LayerScale":
                    W_O, b_O = W_O * blk.ls1.gamma, b_O * blk.ls1.gamma
                if type(blk.ls2).__name__ == "LayerScale":
                    W_out, b_out = W_out * blk.ls2.gamma, b_out * blk.ls2.gamma
            sd[p + "attn.W_O"], sd[p + "attn.b_O"] = W_O, b_O
            sd[p + "mlp.W_in"] = blk.mlp.fc1.weight.T
            sd[p + "mlp.b_in"] = blk.mlp.fc1.bias if blk.mlp.fc1.bias is not None else torch.zeros(cfg.d_mlp)
            sd[p + "mlp.W_out"], sd[p + "mlp.b_out"] = W_out, b_out
            sd[p + "ln1.w"], sd[p + "ln1.b"] = blk.norm1.weight, blk.norm1.bias
            sd[p + "ln2.w"], sd[p + "ln2.b"] = blk.norm2.weight, blk.norm2.bias
        if cfg.has_ln_final:
            sd["ln_final.w"], sd["ln_final.b"] = model.norm.weight, model.norm.bias
        if cfg.has_fc_norm:
            sd["fc_norm.w"], sd["fc_norm.b"] = model.fc_norm.weight, model.fc_norm.bias
        if cfg.n_classes:
            sd["unembed.W_U"] = model.head.weight.T
            sd["unembed.b_U"] = model.head.bias if model.head.bias is not None else torch.zeros(cfg.n_classes)
            if cfg.pooling == "token_dist":
                hd = model.head_dist
                sd["unembed_dist.W_U"] = hd.weight.T
                sd["unembed_dist.b_U"] = hd.bias if hd.bias is not None else torch.zeros(cfg.n_classes)
    # one copy per tensor (clone().contiguous() copied the transposed weights twice)
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in sd.items()}


def _class_names(model: nn.Module, n_classes: int) -> Tuple[Optional[list], Optional[list]]:
    """ImageNet class descriptions and synsets when the model's head is an ImageNet head."""
    if not n_classes:
        return None, None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return None, None
        info = ImageNetInfo(subset)
        if info.num_classes() != n_classes:
            return None, None
        return cast(list, info.label_descriptions()), cast(list, info.label_names())
    except Exception:  # class names are a convenience; never fail a conversion over them
        return None, None


def data_config_of(model: nn.Module, cfg: HookedViTConfig) -> Dict[str, Any]:
    """timm's preprocessing config for ``model``, with the model's own input size and channel count."""
    from timm.data import resolve_data_config

    data_config = dict(resolve_data_config(model=model))
    # the model's own input size (timm keeps the registry's size in pretrained_cfg when a model is
    # built with another img_size / in_chans)
    data_config["input_size"] = (cfg.in_chans, *cfg.image_size)
    for key in ("mean", "std"):
        if len(data_config[key]) != cfg.in_chans:
            data_config[key] = (sum(data_config[key]) / len(data_config[key]),) * cfg.in_chans
    return data_config


# ---------------------------------------------------------------------------------------------
# the source interface
# ---------------------------------------------------------------------------------------------
def convert(model: nn.Module, *, name: Optional[str] = None) -> Converted:
    """An in-memory timm ViT -> :class:`Converted` (config, HookedViT state dict, class names,
    preprocessing). The timm model is not modified; the state dict holds copies on its device."""
    cfg = config_from_timm(model, name=name)
    cfg.extra.setdefault("source", "timm")
    sd = state_dict_from_timm(model, cfg)
    names, synsets = _class_names(model, cfg.n_classes)
    return Converted(cfg, sd, names, synsets, data_config_of(model, cfg))


def convert_timm_model(cls, model: nn.Module, *, device: Any = None, dtype: Optional[torch.dtype] = None,
                       name: Optional[str] = None, **processing: bool):
    """Build a ``cls`` (HookedViT) equal to the timm ``model``; the timm model is not modified."""
    from vit_lens.loading.processing import validate_processing_options

    validate_processing_options(processing)
    converted = convert(model, name=name)
    ref = next(model.parameters())
    return build_model(cls, converted, device=device if device is not None else ref.device,
                       dtype=dtype or ref.dtype, **processing)


def load(name: str, *, checkpoint_path: Optional[Union[str, os.PathLike]] = None,
         timm_kwargs: Optional[Dict[str, Any]] = None) -> Converted:
    """A timm name -> :class:`Converted`, weights from ``checkpoint_path``, else
    ``$VIT_LENS_CHECKPOINTS/<arch.tag>.safetensors``, else timm's hub download (see :func:`open_timm_model`).

    ``converted.config.extra`` records ``source`` (``"timm"``), ``pretrained_tag`` (``"unknown"`` when
    the file names none), ``checkpoint`` (the file, or None for the hub) and ``inferred_timm_kwargs``
    (the settings read from the file).
    """
    opened = open_timm_model(name, checkpoint_path, timm_kwargs)
    converted = convert(opened.model, name=opened.name)
    extra = converted.config.extra
    extra["pretrained_tag"] = opened.tag if opened.tag_known else UNKNOWN_TAG
    extra["checkpoint"] = str(opened.checkpoint) if opened.checkpoint is not None else None
    if opened.inferred:
        extra["inferred_timm_kwargs"] = opened.inferred
    converted.notes.update(requested=opened.requested, inferred=opened.inferred)
    return converted


# ---------------------------------------------------------------------------------------------
# which model a file claims to be
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _timm_archs() -> frozenset:
    import timm

    return frozenset(timm.list_models())


def _known_tags(arch: str) -> List[str]:
    from timm.models import get_arch_pretrained_cfgs

    return [n.split(".", 1)[1] for n in get_arch_pretrained_cfgs(arch) if "." in n]


@dataclass
class Claim:
    """The timm model a file says it holds: ``arch`` and ``tag`` (None: no known tag), and where it says so."""

    arch: str
    tag: Optional[str]
    where: str

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else self.arch


def _claim_from_string(text: str, where: str) -> Optional[Claim]:
    archs = _timm_archs()
    head, _, rest = text.partition(".")
    if head in archs:
        arch = head
    else:  # "deit_tiny_patch16_224-finetuned": the longest architecture name followed by a separator
        hits = [a for a in archs if text.startswith(a) and len(text) > len(a) and text[len(a)] in "._-"]
        if not hits:
            return None
        arch = max(hits, key=len)
        rest = text[len(arch) + 1:]
    tag = rest if rest and rest in _known_tags(arch) else None
    return Claim(arch, tag, where)


def claim_of(ckpt: Checkpoint) -> Optional[Claim]:
    """What a checkpoint says it is: the metadata first (a Hugging Face ``config.json`` beside the
    file; ``model_name`` / ``architecture`` / ``arch`` in safetensors metadata), then the file
    name (``<arch>.<tag>.safetensors``; ``<arch>[-_.]anything`` names the architecture only)."""
    md = ckpt.metadata
    hf = md.get("hf_config")
    if isinstance(hf, dict) and isinstance(hf.get("architecture"), str):
        tag = (hf.get("pretrained_cfg") or {}).get("tag") if isinstance(hf.get("pretrained_cfg"), dict) else None
        claim = _claim_from_string(hf["architecture"] + (f".{tag}" if tag else ""), "config.json beside it")
        if claim is not None:
            return claim
    for key in ("model_name", "architecture", "arch", "timm_model"):
        value = md.get(key)
        if isinstance(value, str):
            claim = _claim_from_string(value, f"its metadata ({key}={value!r})")
            if claim is not None:
                return claim
    name = ckpt.path.name
    for suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _claim_from_string(name, f"its file name {ckpt.path.name!r}")


def _refuse_other_model(ckpt: Checkpoint, claim: Claim, asked: str) -> CheckpointError:
    from timm.models import get_pretrained_cfg

    path = str(ckpt.path)
    default = get_pretrained_cfg(claim.arch)
    # the bare architecture name when the file's tag is timm's default for it (it resolves to the same)
    suggest = claim.arch if not claim.tag or (default is not None and default.tag == claim.tag) else claim.name
    from timm.models import is_model_in_modules

    if not is_model_in_modules(claim.arch, list(VIT_MODULES)):
        return CheckpointError(
            f"{ckpt.path.name} is {claim.name} ({claim.where}), not {asked}, and HookedViT does not support "
            f"{claim.arch} (see vit_lens.supported_models()). If the file really is {asked}, rename it."
        )
    return CheckpointError(
        f"{ckpt.path.name} is {claim.name} ({claim.where}), not {asked}: loading it as {asked} would run "
        f"another model's weights with {asked}'s settings. Load it with "
        f"HookedViT.from_pretrained({suggest!r}, checkpoint_path={path!r}) (command line: --model {suggest}). "
        f"If the file really is {asked}, rename it."
    )


# ---------------------------------------------------------------------------------------------
# loading by name
# ---------------------------------------------------------------------------------------------
def local_checkpoint(full_name: str) -> Optional[Path]:
    """``$VIT_LENS_CHECKPOINTS/<name.tag>.safetensors`` if that file exists (None if the variable is
    unset or the folder has no such file).

    Raises:
        CheckpointNotFoundError: the variable is set to something that is not a folder.
    """
    root = os.environ.get(CHECKPOINT_ENV)
    if not root:
        return None
    folder = Path(root).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CheckpointNotFoundError(
            f"{CHECKPOINT_ENV}={root!r} {what}; vit_lens looked there for {full_name}.safetensors. Point "
            f"{CHECKPOINT_ENV} at the folder holding <name.tag>.safetensors checkpoints, unset it to "
            "download from the model hub, or pass checkpoint_path=..."
        )
    path = folder / f"{full_name}.safetensors"
    return path if path.is_file() else None


def check_architecture_fast(full_name: str, timm_kwargs: Optional[Dict[str, Any]] = None) -> HookedViTConfig:
    """Build ``full_name`` on the meta device (no memory, no download) and run the converter's
    checks, so unsupported models are refused before any weights are fetched."""
    return config_from_timm(_probe(full_name, timm_kwargs or {}), name=full_name)


def _probe(full_name: str, kwargs: Dict[str, Any]) -> Any:  # a timm VisionTransformer on the meta device
    import timm

    with torch.device("meta"):
        return timm.create_model(full_name, pretrained=False, **{"weight_init": "skip", **kwargs})


def _filter_fn(arch: str):
    """timm's own checkpoint conversion for the architecture (other layouts, resampled embeddings)."""
    from functools import partial

    from timm.models import model_entrypoint
    from timm.models.vision_transformer import checkpoint_filter_fn

    module = model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    return partial(checkpoint_filter_fn, adapt_layer_scale=True) if module == "deit" else checkpoint_filter_fn


@dataclass
class OpenedTimm:
    """A timm model with its weights, and what is known about them.

    Attributes:
        model: the timm model (eval mode, CPU for files).
        name: ``"arch.tag"``, or ``"arch.unknown"`` when the tag is not known.
        arch, tag: the architecture; the tag whose pretrained config (preprocessing, labels) was used.
        tag_known: False when the file named no tag (and the name asked for none), or its head
            does not match the tag's.
        checkpoint: the file the weights came from (None: timm's hub download).
        inferred: the ``timm.create_model`` arguments read from the file.
        requested: the name asked for.
    """

    model: nn.Module
    name: str
    arch: str
    tag: str
    tag_known: bool
    checkpoint: Optional[Path]
    inferred: Dict[str, Any] = field(default_factory=dict)
    requested: str = ""


def _outside_vit_lens() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside the vit_lens package."""
    import sys

    root = str(Path(__file__).resolve().parents[2])
    level, frame = 1, cast(Any, sys._getframe(1))
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(root):
        level, frame = level + 1, frame.f_back
    return level


def _kw_text(kwargs: Dict[str, Any]) -> str:
    return f" with timm_kwargs={kwargs}" if kwargs else ""


def _inferred_text(inferred: Dict[str, Any]) -> str:
    return (" (built with " + ", ".join(f"{k}={v!r}" for k, v in inferred.items()) + " read from the file)"
            if inferred else "")


def _infer_kwargs(full: str, sd: Dict[str, torch.Tensor], user: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The ``timm.create_model`` arguments the file's shapes fix unambiguously, unless the user gave them.

    ``num_classes``: rows of ``head.weight`` (0 when the file has no ``head.*`` / ``head_dist.*`` tensor);
    ``in_chans`` / ``patch_size``: ``patch_embed.proj.weight`` ``[d_model, in_chans, ph, pw]``;
    ``img_size``: ``pos_embed`` ``[1, prefix + gh * gw, d_model]`` when ``gh = gw``. A user value that
    contradicts the file's head is an error.
    """
    inferred: Dict[str, Any] = {}
    if not ("patch_embed.proj.weight" in sd or any(k.startswith("blocks.") for k in sd)):
        return inferred  # another layout (OpenAI CLIP, OpenCLIP, ...): timm's conversion decides below
    head = sd.get("head.weight")
    n_file: Optional[int] = None
    if head is not None and head.ndim == 2:
        n_file = int(head.shape[0])
    elif not any(k.startswith(("head.", "head_dist.")) for k in sd):
        n_file = 0
    if n_file is not None:
        if "num_classes" in user and user["num_classes"] != n_file:
            has = (f"a {n_file}-class head (head.weight {tuple(cast(torch.Tensor, head).shape)})" if n_file
                   else "no head (no head.* tensors)")
            raise CheckpointMismatchError(
                f"{where} has {has}, but timm_kwargs asks for num_classes={user['num_classes']!r}: timm would "
                f"{'put a randomly initialised classifier in' if user['num_classes'] else 'drop the saved classifier'}. "
                f"Leave num_classes out of timm_kwargs (it is read from the file) or pass "
                f"timm_kwargs=dict(num_classes={n_file})."
            )
        inferred["num_classes"] = n_file
    kwargs = {**inferred, **user}
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        pw = _probe(full, kwargs).patch_embed.proj.weight
        if w.shape[1] != pw.shape[1] and "in_chans" not in user:
            inferred["in_chans"] = kwargs["in_chans"] = int(w.shape[1])
        if tuple(w.shape[2:]) != tuple(pw.shape[2:]) and "patch_size" not in user:
            ph, pwid = int(w.shape[2]), int(w.shape[3])
            inferred["patch_size"] = kwargs["patch_size"] = ph if ph == pwid else [ph, pwid]
    pe = sd.get("pos_embed")
    if pe is not None and pe.ndim == 3 and "img_size" not in user:
        probe = _probe(full, kwargs)
        if probe.pos_embed is not None and pe.shape[1] != probe.pos_embed.shape[1]:
            n_prefix = 0 if getattr(probe, "no_embed_class", False) else int(probe.num_prefix_tokens)
            n_patches = int(pe.shape[1]) - n_prefix
            g = math.isqrt(max(n_patches, 0))
            ph, pwid = probe.patch_embed.patch_size
            if n_patches <= 0 or g * g != n_patches:
                raise CheckpointMismatchError(
                    f"{where} has a position embedding for {n_patches} patches ({tuple(pe.shape)}; "
                    f"{probe.pos_embed.shape[1]} expected), which is not a square grid, so its image size is "
                    "ambiguous: pass timm_kwargs=dict(img_size=(height, width))."
                )
            size = [g * ph, g * pwid]
            inferred["img_size"] = size[0] if size[0] == size[1] else size
    return inferred


def _shape_summary(sd: Dict[str, torch.Tensor], model: nn.Module) -> str:
    def depth(keys) -> int:
        idx = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()}
        return max(idx) + 1 if idx else 0

    def width(d) -> Optional[int]:
        for k in ("pos_embed", "cls_token", "norm.weight"):
            if k in d:
                return int(d[k].shape[-1])
        return None

    msd = model.state_dict()
    fd, md_ = (depth(sd), width(sd)), (depth(msd), width(msd))
    if fd == md_:
        return ""
    return f" The file has {fd[0]} blocks of width {fd[1]}; the model has {md_[0]} of width {md_[1]}: another architecture."


def open_checkpoint_model(arch: str, tag: str, explicit_tag: bool, ckpt: Checkpoint,
                          timm_kwargs: Dict[str, Any], requested: str = "") -> OpenedTimm:
    """Build the timm model ``arch`` for the weights in ``ckpt``, strictly.

    Steps: refuse a ``HookedViT.save`` file and a file that names another model; read the
    shape-bearing settings from the file (:func:`_infer_kwargs`); build the model; compare every key
    and shape (after timm's own checkpoint conversion, if the plain comparison fails); load with
    ``strict=True``. The tag is the one the file names, else the one asked for; it is recorded
    as unknown when neither names one or the file's head does not match the tag's class count.
    """
    import timm

    path = ckpt.path
    saved = ckpt.metadata.get("vit_lens")
    if saved is not None:
        try:
            saved_name = json.loads(saved)["config"]["model_name"]
        except (ValueError, KeyError, TypeError):
            saved_name = "?"
        raise CheckpointError(
            f"{path.name} was written by HookedViT.save (model {saved_name}), in HookedViT's own layout, not "
            f"timm's: load it with HookedViT.load({str(path)!r})."
        )
    asked = f"{arch}.{tag}" if (explicit_tag and tag) else arch
    claim = claim_of(ckpt)
    if claim is not None:
        if claim.arch != arch or (claim.tag and explicit_tag and claim.tag != tag):
            raise _refuse_other_model(ckpt, claim, asked)
        if claim.tag:
            tag = claim.tag
    tag_named = bool((claim is not None and claim.tag) or explicit_tag)
    full = f"{arch}.{tag}" if tag else arch
    where = path.name
    sd = ckpt.state_dict
    inferred = _infer_kwargs(full, sd, timm_kwargs, where)
    kwargs = {**inferred, **timm_kwargs}
    if kwargs != timm_kwargs:  # the settings read from the file pass the converter's checks too
        check_architecture_fast(full, kwargs)
    model = timm.create_model(full, pretrained=False, **kwargs)
    target = model.state_dict()
    diff = diff_state_dicts(sd, target)
    final = sd
    if diff:
        try:
            converted = _filter_fn(arch)(dict(sd), model)
        except Exception:  # timm's converter does not know this layout either: report the plain diff
            converted = None
        if converted is not None and not diff_state_dicts(converted, target):
            final = converted
            if diff.missing or diff.unexpected:  # another layout, converted by timm: say what was not used as is
                dropped = diff.unexpected
                warnings.warn(
                    f"{where} is not in timm's layout for {arch}; timm's checkpoint conversion mapped it onto the "
                    f"model ({len(dropped)} file tensor(s) renamed or dropped: {', '.join(dropped[:6])}"
                    f"{' ...' if len(dropped) > 6 else ''}). Compare the logits with the original model's.",
                    CheckpointWarning, stacklevel=_outside_vit_lens(),
                )
            changed = sorted(k for k in converted if k in sd and tuple(sd[k].shape) != tuple(converted[k].shape))
            if changed:
                warnings.warn(
                    f"{where}: {', '.join(changed)} resampled by timm to the model's size{_kw_text(timm_kwargs)} "
                    f"(file: {[tuple(sd[k].shape) for k in changed]}); leave img_size / patch_size out of "
                    "timm_kwargs to load the file at its own size.",
                    CheckpointWarning, stacklevel=_outside_vit_lens(),
                )
        else:
            n_head = sd["head.weight"].shape[0] if "head.weight" in sd and sd["head.weight"].ndim == 2 else None
            head_hint = (
                f" Its head has {n_head} classes: pass timm_kwargs=dict(num_classes={n_head}) or leave it out."
                if n_head is not None and any("head" in k for k in diff.missing + diff.unexpected + [s[0] for s in diff.shapes])
                else ""
            )
            raise CheckpointMismatchError(
                f"{where} does not match {full}{_kw_text(timm_kwargs)}{_inferred_text(inferred)}: "
                f"{diff.describe()}.{_shape_summary(sd, model)}{head_hint} If the file is another timm architecture, name it: HookedViT.from_pretrained("
                f"'<arch>', checkpoint_path={str(path)!r}); if it was built with other timm arguments, pass them as "
                "timm_kwargs=dict(...); or build the timm model yourself, load the file into it and convert it with "
                "HookedViT.from_timm(model)."
            )
    model.load_state_dict(final, strict=True)
    model.eval()
    n_tag = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    n = int(getattr(model, "num_classes", 0))
    tag_known = tag_named and (n_tag is None or n == n_tag)
    if not tag_known:
        _warn_unknown_tag(model, ckpt, claim, arch, tag, tag_named, n, n_tag)
    return OpenedTimm(model, full if tag_known else f"{arch}.{UNKNOWN_TAG}", arch, tag, tag_known, path,
                      inferred, requested)


def _warn_unknown_tag(model, ckpt, claim, arch, tag, tag_named, n, n_tag) -> None:
    from timm.data import resolve_data_config

    full = f"{arch}.{tag}" if tag else arch
    if tag_named:
        why = (f"{ckpt.path.name} is named for {full}, but its head has {n} classes where {full}'s has {n_tag}, so "
               f"it holds other weights (a fine-tune?)")
    elif claim is not None:
        why = f"{ckpt.path.name} names the architecture {arch} but no pretrained tag"
    else:
        why = f"{ckpt.path.name} names no timm model"
    dc = resolve_data_config(model=model)
    labels = _class_names(model, n)[0]
    names = (f"timm's ImageNet class names for a {n}-class head" if labels is not None
             else "no class names (set model.class_names)" if n else "no classifier")
    tags = _known_tags(arch)
    warnings.warn(
        f"{why}; the pretrained tag is unknown (recorded as cfg.model_name='{arch}.{UNKNOWN_TAG}'). "
        f"Preprocessing is the architecture's default ({full}: mean {tuple(dc['mean'])}, std {tuple(dc['std'])}, "
        f"{dc['interpolation']}, crop_pct {dc['crop_pct']}) and the model has {names}. If the weights were trained "
        f"with other preprocessing, set model.data_config; to record their tag, name it: "
        f"HookedViT.from_pretrained('{arch}.<tag>', checkpoint_path=...) (timm's tags for {arch}: {tags[:6]}).",
        CheckpointWarning, stacklevel=_outside_vit_lens(),
    )


def open_timm_model(name: str, checkpoint_path: Optional[Union[str, os.PathLike]] = None,
                    timm_kwargs: Optional[Dict[str, Any]] = None) -> OpenedTimm:
    """The timm model for ``name`` with its weights: ``checkpoint_path`` if given, else
    ``$VIT_LENS_CHECKPOINTS/<arch.tag>.safetensors`` if it exists, else timm's hub download.
    Files are loaded strictly (:func:`open_checkpoint_model`)."""
    import timm
    from timm.models import get_pretrained_cfg

    arch, tag = resolve_model_name(name)
    explicit_tag = "." in name
    full = f"{arch}.{tag}" if tag else arch
    if timm_kwargs is not None and not isinstance(timm_kwargs, dict):
        raise InputTypeError(f"timm_kwargs must be a dict of timm.create_model arguments, got {type(timm_kwargs).__name__}")
    timm_kwargs = dict(timm_kwargs or {})
    if "pretrained" in timm_kwargs:
        raise InputTypeError("timm_kwargs must not contain 'pretrained' (from_pretrained always loads weights)")
    for key in ("checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg"):
        if key in timm_kwargs:
            raise InputTypeError(
                f"timm_kwargs must not contain {key!r}: pass the weights file as from_pretrained(name, "
                "checkpoint_path=...), which checks it against the model"
            )
    check_architecture_fast(full, timm_kwargs)
    ckpt: Optional[Checkpoint]
    if checkpoint_path is not None:
        ckpt = read_checkpoint(checkpoint_path)
    else:
        path = local_checkpoint(full)
        ckpt = read_checkpoint(path) if path is not None else None
    if ckpt is not None:
        return open_checkpoint_model(arch, tag, explicit_tag, ckpt, timm_kwargs, requested=name)

    if not tag:
        raise InputError(
            f"timm has no pretrained weights registered for {arch}; pass checkpoint_path=..., or "
            f"build the timm model yourself and use HookedViT.from_timm(model)."
        )
    n_tag = cast(Any, get_pretrained_cfg(full)).num_classes  # a tag resolve_model_name returned
    if "num_classes" in timm_kwargs and timm_kwargs["num_classes"] != n_tag:
        raise CheckpointMismatchError(
            f"{full}'s pretrained head has {n_tag} classes; timm_kwargs num_classes={timm_kwargs['num_classes']!r} "
            f"would {'replace it with a randomly initialised classifier' if timm_kwargs['num_classes'] else 'drop it'}. "
            "Leave num_classes out; for your own fine-tuned head pass its file as checkpoint_path=..., or convert "
            "your timm model with HookedViT.from_timm(model)."
        )
    root = os.environ.get(CHECKPOINT_ENV)
    local_hint = (f" ({CHECKPOINT_ENV}={root!r} has no {full}.safetensors)" if root else "")
    try:
        model = timm.create_model(full, pretrained=True, **timm_kwargs)
    except Exception as e:
        raise RuntimeError(
            f"could not fetch the pretrained weights of {full} from the model hub ({type(e).__name__}: "
            f"{str(e)[:200]}){local_hint}. If this machine is offline, point vit_lens at a local copy: "
            f"HookedViT.from_pretrained({name!r}, checkpoint_path='path/to/{full}.safetensors'), or set "
            f"{CHECKPOINT_ENV}=/folder/with/checkpoints containing {full}.safetensors."
        ) from e
    model.eval()
    return OpenedTimm(model, full, arch, tag, True, None, {}, name)


def create_timm_model(
    name: str,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    timm_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, str]:
    """Build the timm model for ``name`` with its pretrained weights.

    Weights come from ``checkpoint_path`` if given, else ``$VIT_LENS_CHECKPOINTS/<name.tag>.safetensors``
    if it exists, else the hub (timm's own download). ``timm_kwargs`` go to ``timm.create_model``
    (e.g. ``dict(dynamic_img_size=True)``). Unsupported architectures are refused before any
    weights are read; a file is loaded strictly (see :func:`open_checkpoint_model`). Returns
    ``(model, "arch.tag")`` (``"arch.unknown"`` for a file that names no tag).
    """
    opened = open_timm_model(name, checkpoint_path, timm_kwargs)
    return opened.model, opened.name


def load_pretrained(cls, name: str, *, checkpoint_path=None, device=None, dtype=torch.float32,
                    timm_kwargs: Optional[Dict[str, Any]] = None, **processing: bool):
    """See :meth:`vit_lens.HookedViT.from_pretrained`."""
    from vit_lens.loading.processing import validate_processing_options
    from vit_lens.loading.registry import family_of

    validate_processing_options(processing)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    converted = load(name, checkpoint_path=checkpoint_path, timm_kwargs=timm_kwargs)
    arch, tag = resolve_model_name(name)
    if family_of(f"{arch}.{tag}" if tag else arch) is None:
        warnings.warn(
            f"{converted.config.model_name} passed the converter's checks but is not in the registry of families "
            "with a parity test (vit_lens.supported_models()); compare its logits with timm's before relying on it.",
            stacklevel=_outside_vit_lens(),
        )
    return build_model(cls, converted, device=device or "cpu", dtype=dtype, **processing)
