"""timm ``VisionTransformer`` -> :class:`HookedViTConfig` + state dict, and loading by name.

Every architectural feature of the timm model is checked up front: anything this converter does
not reproduce exactly is refused with :class:`UnsupportedModelError` naming the feature, never
converted into a model that gives a different answer.
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from vit_lens.config import HookedViTConfig
from vit_lens.core.errors import InputError, InputTypeError

CHECKPOINT_ENV = "VIT_LENS_CHECKPOINTS"
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


def _norm_eps(m: nn.Module, where: str) -> float:
    if not isinstance(m, nn.LayerNorm):
        raise UnsupportedModelError(f"{where} is {type(m).__name__}; only LayerNorm is supported")
    if not m.elementwise_affine or m.bias is None:
        raise UnsupportedModelError(f"{where} is a LayerNorm without affine weight and bias; not supported")
    return float(m.eps)


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

    blocks = list(model.blocks)
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
        eps_values.add(_norm_eps(blk.norm1, f"block {i} norm1"))
        eps_values.add(_norm_eps(blk.norm2, f"block {i} norm2"))
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
        eps_values.add(_norm_eps(model.norm_pre, "norm_pre"))
    has_ln_final = not _is_identity(model.norm)
    if has_ln_final:
        eps_values.add(_norm_eps(model.norm, "norm"))
    has_fc_norm = not _is_identity(model.fc_norm)
    if has_fc_norm:
        eps_values.add(_norm_eps(model.fc_norm, "fc_norm"))
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
        pooling=pooling,
        act_fn=act,
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
    if model.pos_embed.shape[1] != expected_pos:
        refuse(f"a position embedding of length {model.pos_embed.shape[1]} (expected {expected_pos})")
    return cfg


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def state_dict_from_timm(model: nn.Module, cfg: HookedViTConfig) -> Dict[str, torch.Tensor]:
    """timm state dict -> HookedViT state dict (LayerScale folded into the output weights)."""
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
        return info.label_descriptions(), info.label_names()
    except Exception:  # class names are a convenience; never fail a conversion over them
        return None, None


def convert_timm_model(cls, model: nn.Module, *, device: Any = None, dtype: Optional[torch.dtype] = None,
                       name: Optional[str] = None, **processing: bool):
    """Build a ``cls`` (HookedViT) equal to the timm ``model``; the timm model is not modified."""
    from timm.data import resolve_data_config

    from vit_lens.loading.processing import process_weights, validate_processing_options

    validate_processing_options(processing)
    cfg = config_from_timm(model, name=name)
    sd = state_dict_from_timm(model, cfg)
    ref = next(model.parameters())
    device = torch.device(device) if device is not None else ref.device
    dtype = dtype or ref.dtype
    with torch.device("meta"):
        hooked = cls(cfg).to(dtype=dtype)  # allocate in the target dtype: no float32 round trip
    hooked = hooked.to_empty(device=device)
    hooked.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True)
    hooked.eval()
    data_config = dict(resolve_data_config(model=model))
    # the model's own input size (timm keeps the registry's size in pretrained_cfg when a model is
    # built with another img_size / in_chans)
    data_config["input_size"] = (cfg.in_chans, *cfg.image_size)
    for key in ("mean", "std"):
        if len(data_config[key]) != cfg.in_chans:
            data_config[key] = (sum(data_config[key]) / len(data_config[key]),) * cfg.in_chans
    hooked.data_config = data_config
    hooked.class_names, hooked.class_synsets = _class_names(model, cfg.n_classes)
    if any(processing.values()):
        process_weights(hooked, **processing)
    return hooked


# ---------------------------------------------------------------------------------------------
# loading by name
# ---------------------------------------------------------------------------------------------
def local_checkpoint(full_name: str) -> Optional[Path]:
    """``$VIT_LENS_CHECKPOINTS/<name.tag>.safetensors`` if that file exists."""
    root = os.environ.get(CHECKPOINT_ENV)
    if not root:
        return None
    path = Path(root).expanduser() / f"{full_name}.safetensors"
    return path if path.is_file() else None


def check_architecture_fast(full_name: str, timm_kwargs: Optional[Dict[str, Any]] = None) -> HookedViTConfig:
    """Build ``full_name`` on the meta device (no memory, no download) and run the converter's
    checks, so unsupported models are refused before any weights are fetched."""
    import timm

    with torch.device("meta"):
        probe = timm.create_model(full_name, pretrained=False, **{"weight_init": "skip", **(timm_kwargs or {})})
    return config_from_timm(probe, name=full_name)


def create_timm_model(
    name: str,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    timm_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, str]:
    """Build the timm model for ``name`` with its pretrained weights.

    Weights come from ``checkpoint_path`` if given, else ``$VIT_LENS_CHECKPOINTS/<name.tag>.safetensors``
    if it exists, else the hub (timm's own download). ``timm_kwargs`` go to ``timm.create_model``
    (e.g. ``dict(dynamic_img_size=True)``). Unsupported architectures are refused before any
    weights are read. Returns ``(model, "arch.tag")``.
    """
    import timm

    arch, tag = resolve_model_name(name)
    full = f"{arch}.{tag}" if tag else arch
    timm_kwargs = dict(timm_kwargs or {})
    if "pretrained" in timm_kwargs:
        raise InputTypeError("timm_kwargs must not contain 'pretrained' (from_pretrained always loads weights)")
    check_architecture_fast(full, timm_kwargs)
    path = Path(checkpoint_path).expanduser() if checkpoint_path is not None else local_checkpoint(full)
    if checkpoint_path is not None and not path.is_file():
        raise FileNotFoundError(f"checkpoint_path {str(path)!r} does not exist")
    if path is not None:
        try:
            model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **timm_kwargs)
        except Exception as e:
            raise RuntimeError(
                f"could not load {full} weights from {path}: {e}. The file must hold a timm state dict "
                f"for {arch} (safetensors, .pth or .bin)."
            ) from e
    else:
        if not tag:
            raise InputError(
                f"timm has no pretrained weights registered for {arch}; pass checkpoint_path=..., or "
                f"build the timm model yourself and use HookedViT.from_timm(model)."
            )
        try:
            model = timm.create_model(full, pretrained=True, **timm_kwargs)
        except Exception as e:
            raise RuntimeError(
                f"could not fetch the pretrained weights of {full} from the model hub ({type(e).__name__}: "
                f"{str(e)[:200]}). If this machine is offline, point vit_lens at a local copy: "
                f"HookedViT.from_pretrained({name!r}, checkpoint_path='path/to/{full}.safetensors'), or set "
                f"{CHECKPOINT_ENV}=/folder/with/checkpoints containing {full}.safetensors."
            ) from e
    model.eval()
    return model, full


def load_pretrained(cls, name: str, *, checkpoint_path=None, device=None, dtype=torch.float32,
                    timm_kwargs: Optional[Dict[str, Any]] = None, **processing: bool):
    """See :meth:`vit_lens.HookedViT.from_pretrained`."""
    from vit_lens.loading.processing import validate_processing_options
    from vit_lens.loading.registry import family_of

    validate_processing_options(processing)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if timm_kwargs is not None and not isinstance(timm_kwargs, dict):
        raise InputTypeError(f"timm_kwargs must be a dict of timm.create_model arguments, got {type(timm_kwargs).__name__}")
    timm_model, full = create_timm_model(name, checkpoint_path, timm_kwargs)
    if family_of(full) is None:
        warnings.warn(
            f"{full} passed the converter's checks but is not in the registry of families with a parity test "
            "(vit_lens.supported_models()); compare its logits with timm's before relying on it.",
            stacklevel=3,
        )
    hooked = convert_timm_model(cls, timm_model, device=device or "cpu", dtype=dtype, name=full, **processing)
    return hooked
