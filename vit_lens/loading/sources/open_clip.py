"""The OpenCLIP source: an OpenCLIP ``VisionTransformer`` image tower -> :class:`HookedViTConfig` + HookedViT state dict.

The source interface (see :mod:`vit_lens.loading.sources`):

- :func:`convert` (an in-memory OpenCLIP model -- ``open_clip.CLIP``, ``CustomTextCLIP``, ``CoCa``, or
  its ``.visual`` tower alone -- -> :class:`~vit_lens.loading.sources.Converted`),
- :func:`load` (an OpenCLIP model name and ``pretrained`` tag or weights file -> the same).

What is converted: the image tower only. Its output is the image embedding (the tower's ``proj``
is the head: ``W_U = proj`` [width, embed_dim], no bias), so a converted model's logits are
``model.encode_image(x)`` (unnormalised) and ``set_class_directions(W_text, space="head")`` -- or
:func:`vit_lens.clip.set_text_classes` -- turns text embeddings into classes.

OpenCLIP's ViT, mapped onto HookedViT:

* ``conv1`` (no bias) -> ``embed.W_E`` (``b_E`` = 0); ``class_embedding`` -> [CLS];
  ``positional_embedding`` (learned, or fixed ``sin_cos_2d`` values) -> ``W_pos``;
* ``ln_pre`` -> ``ln_pre`` (``no_ln_pre`` models have none);
* ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` with fused ``in_proj``) -> pre-norm blocks;
  ``ls_1`` / ``ls_2`` LayerScale folded into ``W_O`` / ``W_out``; GELU, GELU-tanh or QuickGELU;
* ``ln_post`` then pooling: ``pool_type='tok'`` -> ``ln_final`` on [CLS] (with
  ``final_ln_after_pool`` the norm is applied to [CLS] only, which is the same map);
  ``'avg'`` -> ``ln_final`` on each patch token then the mean, or, with ``final_ln_after_pool``
  (CLIPA), the mean then ``fc_norm``;
* ``patch_dropout`` is the identity at evaluation (HookedViT is an evaluation model).

Refused up front with :class:`UnsupportedModelError` naming the feature: image towers that are
not OpenCLIP's ``VisionTransformer`` (timm trunks -- SigLIP, EVA, ConvNeXt, ViTamin, MobileCLIP,
PE -- and the ModifiedResNets), attentional pooling, CoCa models, ``pool_type='none'``, custom blocks
(``qk_norm``, scaled cosine attention, head / attention / MLP scaling), and, by name, models whose
text tower is a Hugging Face model that OpenCLIP builds from the hub (pass such a model object instead).
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from vit_lens.config import HookedViTConfig
from vit_lens.core.errors import InputError, InputTypeError
from vit_lens.loading.sources import Converted, build_model, layer_norm_eps
from vit_lens.loading.sources.timm import UnsupportedModelError

#: the prefix of OpenCLIP names in ``HookedViT.from_pretrained`` (``"open_clip:ViT-B-32/openai"``)
PREFIX = "open_clip:"


# ---------------------------------------------------------------------------------------------
# names: which built-in OpenCLIP configs can be converted (from the config alone, nothing built)
# ---------------------------------------------------------------------------------------------
def _model_config(name: str) -> Optional[Dict[str, Any]]:
    import open_clip

    return open_clip.get_model_config(name)


def name_feature(name: str) -> Optional[str]:
    """Why the built-in OpenCLIP config ``name`` cannot be converted (None: it can)."""
    cfg = _model_config(name)
    if cfg is None:
        return None
    vision = cfg.get("vision_cfg", {})
    text = cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        return (f"a timm image tower ({vision['timm_model_name']!r}, OpenCLIP's TimmModel), not OpenCLIP's "
                "VisionTransformer")
    if isinstance(vision.get("layers"), (list, tuple)):
        return "a ModifiedResNet image tower (a CNN), not a Vision Transformer"
    if "multimodal_cfg" in cfg:
        return "a CoCa model (image tokens feed a multimodal text decoder; its contrastive head is not tested)"
    if vision.get("attentional_pool"):
        return "attentional pooling of the image tokens (CoCa's AttentionalPooler)"
    custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
              if vision.get(k)]
    if custom or vision.get("block_type") == "custom":
        return f"custom attention blocks ({', '.join(custom) or 'block_type=custom'})"
    if vision.get("pool_type", "tok") not in ("tok", "avg"):
        return f"pool_type={vision.get('pool_type')!r} (no pooled image embedding)"
    if text.get("hf_model_name"):
        return (f"a Hugging Face text tower ({text['hf_model_name']!r}) that OpenCLIP builds from the hub "
                "(not tested offline)")
    return None


def supported_names() -> List[str]:
    """The built-in OpenCLIP model names whose image tower converts exactly."""
    import open_clip

    return [n for n in open_clip.list_models() if name_feature(n) is None]


# ---------------------------------------------------------------------------------------------
# inspection
# ---------------------------------------------------------------------------------------------
def _is_identity(m: Any) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _visual_of(model: nn.Module) -> nn.Module:
    """The image tower of an OpenCLIP model (or the tower itself)."""
    from open_clip.transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return model
    visual = getattr(model, "visual", None)
    if visual is None:
        raise InputTypeError(
            f"expected an OpenCLIP model (open_clip.create_model(...)) or its image tower (model.visual), got "
            f"{type(model).__name__}; for a timm model use HookedViT.from_timm(model)"
        )
    return visual




def _act_name(act: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    raise UnsupportedModelError(f"MLP activation {type(act).__name__} is not supported (GELU, GELU-tanh, QuickGELU are)")


def config_from_open_clip(visual: Any, name: Optional[str] = None) -> HookedViTConfig:
    """Derive the architecture of an OpenCLIP ``VisionTransformer``, refusing unsupported features by name."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    label = name or type(visual).__name__
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__
        hint = {
            "TimmModel": "a timm trunk inside OpenCLIP's TimmModel (SigLIP, EVA, ConvNeXt, ViTamin, MobileCLIP, PE)",
            "ModifiedResNet": "a ModifiedResNet (a CNN)",
        }.get(kind, kind)
        raise UnsupportedModelError(
            f"{label}: the image tower is {hint}, not OpenCLIP's VisionTransformer; HookedViT converts OpenCLIP's "
            "VisionTransformer towers (ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14, ...: see "
            "vit_lens.loading.sources.open_clip.supported_names())"
        )

    def refuse(feature: str) -> None:
        raise UnsupportedModelError(f"{label}: {feature} is not supported by HookedViT")

    if getattr(visual, "attn_pool", None) is not None:
        refuse("attentional pooling of the image tokens (attn_pool, CoCa)")
    pool = getattr(visual, "pool_type", "tok")
    if pool not in ("tok", "avg"):
        refuse(f"pool_type={pool!r} (no pooled image embedding)")
    conv = visual.conv1
    if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding not in ((0, 0), 0, "valid"):
        refuse("a patch embedding other than a non-overlapping convolution")
    if conv.bias is not None:
        refuse("a patch convolution with a bias")  # OpenCLIP's has none; never silently dropped
    blocks = list(visual.transformer.resblocks)
    if not blocks:
        refuse("a tower without blocks")
    D = conv.out_channels
    eps = {layer_norm_eps(visual.ln_post, "ln_post")}
    has_norm_pre = not _is_identity(visual.ln_pre)
    if has_norm_pre:
        eps.add(layer_norm_eps(visual.ln_pre, "ln_pre"))
    H = blocks[0].attn.num_heads
    d_mlp = blocks[0].mlp.c_fc.out_features
    act = _act_name(blocks[0].mlp.gelu)
    for i, blk in enumerate(blocks):
        if type(blk) is not ResidualAttentionBlock:
            refuse(f"block type {type(blk).__name__} in block {i} (custom blocks: qk_norm, scaled cosine attention, "
                   "head / attention / MLP scaling)")
        a = blk.attn
        if not isinstance(a, nn.MultiheadAttention) or not a._qkv_same_embed_dim or a.in_proj_weight is None:
            refuse(f"attention module {type(a).__name__} with separate q/k/v projections in block {i}")
        if a.bias_k is not None or a.bias_v is not None or a.add_zero_attn:
            refuse(f"attention with extra key/value biases (add_bias_kv / add_zero_attn) in block {i}")
        if a.num_heads != H or a.embed_dim != D:
            refuse(f"blocks of differing widths or head counts (block {i})")
        if hasattr(blk, "ln_1_kv"):
            refuse(f"cross-attention in block {i}")
        for ls in ("ls_1", "ls_2"):
            m = getattr(blk, ls)
            if not (_is_identity(m) or type(m).__name__ == "LayerScale"):
                refuse(f"{ls} of type {type(m).__name__} in block {i}")
        mlp = blk.mlp
        if list(dict(mlp.named_children())) != ["c_fc", "gelu", "c_proj"]:
            refuse(f"an MLP with modules {list(dict(mlp.named_children()))} in block {i}")
        if mlp.c_fc.out_features != d_mlp or _act_name(mlp.gelu) != act:
            refuse(f"blocks with differing MLP widths or activations (block {i})")
        eps.add(layer_norm_eps(blk.ln_1, f"block {i} ln_1"))
        eps.add(layer_norm_eps(blk.ln_2, f"block {i} ln_2"))
    if len(eps) != 1:
        refuse(f"LayerNorms with different eps values {sorted(eps)}")
    image_size: Tuple[int, int] = (int(visual.image_size[0]), int(visual.image_size[1]))
    patch_size: Tuple[int, int] = (int(visual.patch_size[0]), int(visual.patch_size[1]))
    if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
        refuse(f"an image size {image_size} that is not a multiple of the patch size {patch_size}")
    pos = visual.positional_embedding
    n_patches = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
    if tuple(pos.shape) != (n_patches + 1, D):
        refuse(f"a position embedding of shape {tuple(pos.shape)} (expected {(n_patches + 1, D)})")
    proj = visual.proj
    n_classes = 0 if proj is None else int(proj.shape[1])
    after_pool = bool(getattr(visual, "final_ln_after_pool", False))
    if pool == "avg" and after_pool:  # mean of the patch tokens, then ln_post on the mean (CLIPA)
        has_ln_final, has_fc_norm = False, True
    else:  # ln_post on every token then pool; for [CLS] pooling, ln_post on [CLS] only is the same map
        has_ln_final, has_fc_norm = True, False
    return HookedViTConfig(
        n_layers=len(blocks),
        d_model=D,
        n_heads=H,
        d_head=D // H,
        d_mlp=d_mlp,
        n_classes=n_classes,
        image_size=image_size,
        patch_size=patch_size,
        in_chans=conv.in_channels,
        has_class_token=True,
        pos_embed_prefix=True,
        pooling="token" if pool == "tok" else "avg",
        act_fn=act,  # type: ignore[arg-type]
        eps=eps.pop(),
        normalization_type="LN",
        has_norm_pre=has_norm_pre,
        has_ln_final=has_ln_final,
        has_fc_norm=has_fc_norm,
        model_name=label,
    )


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def state_dict_from_open_clip(visual: Any, cfg: HookedViTConfig) -> Dict[str, torch.Tensor]:
    """OpenCLIP image-tower state -> HookedViT state dict (LayerScale folded into the output weights).

    ``in_proj_weight`` [3 * d_model, d_model] holds Q, K, V, each with head ``h`` in rows
    ``h * d_head .. (h + 1) * d_head``: ``W_Q[h] = in_proj_weight[q rows of h].T`` [d_model, d_head].
    """
    H, E, D = cfg.n_heads, cfg.d_head, cfg.d_model
    sd: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        conv = visual.conv1
        sd["embed.W_E"] = conv.weight
        sd["embed.b_E"] = torch.zeros(D, dtype=conv.weight.dtype, device=conv.weight.device)
        sd["embed.cls_token"] = visual.class_embedding.reshape(1, 1, D)
        sd["pos_embed.W_pos"] = visual.positional_embedding.unsqueeze(0)
        if cfg.has_norm_pre:
            sd["ln_pre.w"], sd["ln_pre.b"] = visual.ln_pre.weight, visual.ln_pre.bias
        for l, blk in enumerate(visual.transformer.resblocks):
            p = f"blocks.{l}."
            a = blk.attn
            w = a.in_proj_weight.view(3, H, E, D).permute(0, 1, 3, 2)  # [3, H, D, E]
            b = (a.in_proj_bias.view(3, H, E) if a.in_proj_bias is not None
                 else torch.zeros(3, H, E, dtype=w.dtype, device=w.device))
            for i, n in enumerate("QKV"):
                sd[p + f"attn.W_{n}"] = w[i]
                sd[p + f"attn.b_{n}"] = b[i]
            W_O = a.out_proj.weight.T.reshape(H, E, D)
            b_O = a.out_proj.bias if a.out_proj.bias is not None else torch.zeros_like(W_O[0, 0])
            W_out = blk.mlp.c_proj.weight.T
            b_out = blk.mlp.c_proj.bias if blk.mlp.c_proj.bias is not None else torch.zeros_like(W_out[0])
            if type(blk.ls_1).__name__ == "LayerScale":
                W_O, b_O = W_O * blk.ls_1.gamma, b_O * blk.ls_1.gamma
            if type(blk.ls_2).__name__ == "LayerScale":
                W_out, b_out = W_out * blk.ls_2.gamma, b_out * blk.ls_2.gamma
            sd[p + "attn.W_O"], sd[p + "attn.b_O"] = W_O, b_O
            sd[p + "mlp.W_in"] = blk.mlp.c_fc.weight.T
            sd[p + "mlp.b_in"] = (blk.mlp.c_fc.bias if blk.mlp.c_fc.bias is not None
                                  else torch.zeros_like(blk.mlp.c_fc.weight[:, 0]))
            sd[p + "mlp.W_out"], sd[p + "mlp.b_out"] = W_out, b_out
            sd[p + "ln1.w"], sd[p + "ln1.b"] = blk.ln_1.weight, blk.ln_1.bias
            sd[p + "ln2.w"], sd[p + "ln2.b"] = blk.ln_2.weight, blk.ln_2.bias
        norm = "ln_final" if cfg.has_ln_final else "fc_norm"
        sd[f"{norm}.w"], sd[f"{norm}.b"] = visual.ln_post.weight, visual.ln_post.bias
        if cfg.n_classes:
            sd["unembed.W_U"] = visual.proj
            sd["unembed.b_U"] = torch.zeros(cfg.n_classes, dtype=visual.proj.dtype, device=visual.proj.device)
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in sd.items()}


def data_config_of(visual: Any, cfg: HookedViTConfig, label: str) -> Dict[str, Any]:
    """OpenCLIP's eval transform as the timm data config :meth:`HookedViT.preprocess` reads.

    OpenCLIP's ``resize_mode='shortest'`` (resize the short side, centre crop) is timm's
    ``crop_pct=1.0, crop_mode='center'`` for square inputs; ``'squash'`` is timm's ``'squash'``.
    ``'longest'`` (pad to a square with OpenCLIP's fill colour) and ``'shortest'`` at a non-square
    size have no exact timm equivalent and are refused.
    """
    from open_clip import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    raw = dict(get_model_preprocess_cfg(visual) or {})
    known = {k: v for k, v in raw.items() if k in PreprocessCfg.__dataclass_fields__}
    pp = PreprocessCfg(**known)
    size = pp.size if isinstance(pp.size, (tuple, list)) else (pp.size, pp.size)
    size = (int(size[0]), int(size[1]))
    if size != tuple(cfg.image_size):
        raise UnsupportedModelError(
            f"{label}: OpenCLIP's preprocessing resizes to {size}, but the image tower takes {tuple(cfg.image_size)}; "
            "set the model's preprocessing size to its image size (open_clip.create_model(..., force_image_size=...))"
        )
    mode = pp.resize_mode or "shortest"
    if mode == "squash":
        crop_mode = "squash"
    elif mode == "shortest" and size[0] == size[1]:
        crop_mode = "center"
    else:
        raise UnsupportedModelError(
            f"{label}: OpenCLIP's resize_mode={mode!r} at size {size} has no exact equivalent in "
            "HookedViT.preprocess (which supports 'shortest' at square sizes and 'squash'); preprocess the images "
            "with OpenCLIP's own transform and pass the tensors, or create the model with "
            "force_preprocess_cfg=dict(resize_mode='squash')"
        )
    interpolation = "bilinear" if pp.interpolation == "bilinear" else "bicubic"  # OpenCLIP: anything else is bicubic
    return {
        "input_size": (cfg.in_chans, *size),
        "interpolation": interpolation,
        "mean": tuple(float(m) for m in pp.mean),
        "std": tuple(float(s) for s in pp.std),
        "crop_pct": 1.0,
        "crop_mode": crop_mode,
    }


# ---------------------------------------------------------------------------------------------
# the source interface
# ---------------------------------------------------------------------------------------------
def convert(model: nn.Module, *, name: Optional[str] = None) -> Converted:
    """An in-memory OpenCLIP model (or its ``.visual``) -> :class:`Converted`: the image tower's
    config, HookedViT state dict (copies, on the tower's device) and OpenCLIP's preprocessing.

    ``config.extra`` records ``source`` (``"open_clip"``), ``embed_dim`` (the image-text space's
    width, ``n_classes`` before text classes are set) and ``logit_scale`` (CLIP's learned
    temperature ``exp(logit_scale)``, when the full model is given) for zero-shot logits.
    The OpenCLIP model is not modified.
    """
    visual = _visual_of(model)
    label = name or f"{PREFIX}{type(model).__name__}"
    cfg = config_from_open_clip(visual, name=label)
    extra = cfg.extra
    extra["source"] = "open_clip"
    extra["embed_dim"] = cfg.n_classes
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.device.type != "meta":
        extra["logit_scale"] = float(scale.detach().exp())
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, torch.Tensor) and bias.numel() == 1 and bias.device.type != "meta":
        extra["logit_bias"] = float(bias.detach())
    if float(getattr(getattr(visual, "patch_dropout", None), "prob", 0.0) or 0.0) > 0:
        extra["patch_dropout"] = "ignored: the identity at evaluation"
    sd = state_dict_from_open_clip(visual, cfg)
    return Converted(cfg, sd, None, None, data_config_of(visual, cfg, label))


def _check_name(name: str) -> str:
    import open_clip

    if not isinstance(name, str) or not name:
        raise InputTypeError(f"an OpenCLIP model name must be a non-empty string, got {name!r}")
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if _model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"unknown OpenCLIP model name {name!r}.{hint} See open_clip.list_models().")
    feature = name_feature(name)
    if feature is not None:
        raise UnsupportedModelError(
            f"{name}: {feature} is not supported by HookedViT.from_open_clip. It converts OpenCLIP's VisionTransformer "
            "image towers (vit_lens.loading.sources.open_clip.supported_names()); a model you built yourself with "
            "open_clip.create_model(...) can be passed as an object, its image tower is then checked feature by feature."
        )
    return name


def load(name: str, *, checkpoint_path: Optional[Union[str, os.PathLike]] = None,
         pretrained: Optional[Union[str, os.PathLike]] = None,
         open_clip_kwargs: Optional[Dict[str, Any]] = None) -> Converted:
    """The source interface's ``load``: an OpenCLIP name -> :class:`Converted` (see :func:`open_model`;
    ``checkpoint_path`` is a local weights file, the same as ``pretrained=path``)."""
    if checkpoint_path is not None:
        if pretrained is not None:
            raise InputTypeError("give the weights once: pretrained= (a tag or a file) or checkpoint_path= (a file)")
        if not Path(checkpoint_path).expanduser().is_file():
            raise InputError(f"no weights file at {str(checkpoint_path)!r}")
        pretrained = checkpoint_path
    return open_model(name, pretrained=pretrained, open_clip_kwargs=open_clip_kwargs)[0]


def open_model(name: str, *, pretrained: Optional[Union[str, os.PathLike]] = None,
               open_clip_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[Converted, nn.Module]:
    """An OpenCLIP name -> (:class:`Converted`, the OpenCLIP model it came from, whose text tower
    :func:`vit_lens.clip.set_text_classes` can use).

    Args:
        name: an OpenCLIP model name (``"ViT-B-32"``), ``"local-dir:/folder"`` (a folder with
            ``open_clip_config.json`` and weights, offline) or ``"hf-hub:org/repo"``.
        pretrained: an OpenCLIP pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``: downloaded by
            OpenCLIP), a local weights file (loaded strictly by OpenCLIP), or None for random weights.
        open_clip_kwargs: more ``open_clip.create_model`` arguments (``force_quick_gelu``,
            ``force_image_size``, ...). A tag trained with QuickGELU (the ``openai`` weights) on a
            GELU config (``"ViT-B-32"``) is built with ``force_quick_gelu=True`` -- OpenCLIP itself only
            warns and builds GELU, which would not be the trained network -- unless you pass
            ``force_quick_gelu`` yourself.
    """
    import open_clip

    _check_name(name)
    kwargs = dict(open_clip_kwargs or {})
    if "pretrained" in kwargs:
        raise InputTypeError("pass the weights as from_open_clip(name, pretrained=...), not in open_clip_kwargs")
    label = f"{PREFIX}{name}"
    tag: Optional[str] = None
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)):
            raise InputTypeError(f"pretrained must be a tag, a file path or None, got {type(pretrained).__name__}")
        schema = name.startswith(("hf-hub:", "local-dir:"))
        tags = [] if schema else open_clip.list_pretrained_tags_by_model(name)
        if isinstance(pretrained, str) and pretrained in tags:
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
            if tag_cfg.get("quick_gelu", False) and not (_model_config(name) or {}).get("quick_gelu", False):
                kwargs.setdefault("force_quick_gelu", True)
            tag = pretrained
            label += f"/{pretrained}"
        else:
            path = Path(pretrained).expanduser()
            if schema:
                raise InputError(f"{name} names its own weights; leave pretrained=None (got {pretrained!r})")
            if not path.is_file():
                raise InputError(
                    f"{str(pretrained)!r} is neither an OpenCLIP pretrained tag of {name} ({tags}) nor an existing "
                    "weights file"
                )
            pretrained = str(path)
            label += f"/{path.name}"
    from vit_lens.loading.checkpoints import CheckpointMismatchError, CheckpointNotFoundError

    if name.startswith("local-dir:") and not Path(name[len("local-dir:"):]).expanduser().is_dir():
        raise CheckpointNotFoundError(
            f"{name!r}: no such folder; pass 'local-dir:/path/to/folder', a folder with open_clip_config.json and "
            "the weights (open_clip_pytorch_model.bin or open_clip_model.safetensors)"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")  # handled above
            model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        if name.startswith("hf-hub:") or (tag is not None and not name.startswith("local-dir:")):
            what = name if tag is None else f"{name}/{tag}"
            raise CheckpointNotFoundError(
                f"could not fetch the OpenCLIP weights {what} ({type(e).__name__}: {str(e)[:200]}). If this "
                f"machine is offline, pass a local copy: HookedViT.from_open_clip({name!r}, "
                "pretrained='path/to/open_clip_model.safetensors'), or a folder with open_clip_config.json and the "
                "weights: HookedViT.from_open_clip('local-dir:/path/to/folder'); weights already in the Hugging Face "
                "cache load with HF_HUB_OFFLINE=1."
            ) from e
        if isinstance(e, RuntimeError) and "state_dict" in str(e):  # OpenCLIP's strict load_state_dict
            raise CheckpointMismatchError(
                f"the weights of {label} do not fit the {name} architecture ({str(e)[:400]}); pass the weights file "
                "of this model, or the model name (config) the weights were trained with"
            ) from e
        raise
    model.eval()
    converted = convert(model, name=label)
    extra = converted.config.extra
    extra["open_clip_name"] = name
    extra["pretrained_tag"] = tag
    extra["checkpoint"] = str(pretrained) if pretrained is not None and tag is None else None
    if kwargs:
        extra["open_clip_kwargs"] = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}
    return converted, model


def from_open_clip(cls: Any, model_or_name: Any, pretrained: Optional[Union[str, os.PathLike]] = None, *,
                   device: Any = None, dtype: Optional[torch.dtype] = None,
                   open_clip_kwargs: Optional[Dict[str, Any]] = None, **processing: bool) -> Any:
    """See :meth:`vit_lens.HookedViT.from_open_clip`."""
    from vit_lens.loading.processing import validate_processing_options

    options: Dict[str, object] = dict(processing)
    validate_processing_options(options)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputTypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(model_or_name, str):
        if model_or_name.startswith(PREFIX):
            model_or_name = model_or_name[len(PREFIX):]
        if pretrained is None and "/" in model_or_name and not model_or_name.startswith(("hf-hub:", "local-dir:")):
            model_or_name, pretrained = model_or_name.split("/", 1)  # "ViT-B-32/openai"
        converted, _ = open_model(model_or_name, pretrained=pretrained, open_clip_kwargs=open_clip_kwargs)
        return build_model(cls, converted, device=device or "cpu", dtype=dtype or torch.float32, **processing)
    if not isinstance(model_or_name, nn.Module):
        raise InputTypeError(
            f"from_open_clip takes an OpenCLIP model, its .visual tower or a model name, got {type(model_or_name).__name__}"
        )
    if pretrained is not None:
        raise InputTypeError("pretrained= applies to a model name; the model object given already holds its weights")
    if open_clip_kwargs:
        raise InputTypeError("open_clip_kwargs apply to a model name; the model object given is already built")
    converted = convert(model_or_name)
    ref = next(model_or_name.parameters())
    return build_model(cls, converted, device=device if device is not None else ref.device,
                       dtype=dtype or ref.dtype, **processing)


# ---------------------------------------------------------------------------------------------
# the README's supported-models table
# ---------------------------------------------------------------------------------------------
_FAMILIES = (
    # (family, test of a built-in config, what is reproduced, class-space projection)
    ("CLIP ViT image towers", lambda c: not c.get("quick_gelu") and c["vision_cfg"].get("pool_type", "tok") == "tok"
     and c["vision_cfg"].get("ls_init_value") is None,
     "`ln_pre`, [CLS] pooling, no patch bias, GELU; head = the tower's projection `proj` into the image-text space",
     "`ln_final` (`ln_post`) on [CLS], then `proj`; text classes via `vit_lens.clip.set_text_classes` "
     "(`W_U = proj @ W_text`)"),
    ("CLIP ViT image towers, QuickGELU", lambda c: bool(c.get("quick_gelu")),
     "as above, with QuickGELU (`x * sigmoid(1.702 x)`); a QuickGELU-trained tag (`openai`) on a GELU name is built "
     "with `force_quick_gelu=True`", "as above"),
    ("CLIP ViT image towers, LayerScale", lambda c: c["vision_cfg"].get("ls_init_value") is not None,
     "as CLIP, LayerScale folded into `W_O`, `W_out`", "as above"),
    ("CLIPA image towers (average-pooled)", lambda c: c["vision_cfg"].get("pool_type") == "avg",
     "no `ln_pre`, mean of the patch tokens, then `ln_post` on the mean (`final_ln_after_pool`)",
     "`fc_norm` (`ln_post`) on the pooled (mean) vector, then `proj`; text classes as above"),
)


def table_rows() -> List[Tuple[str, str, str, str, str]]:
    """(source, family, names, what is reproduced, class-space projection) rows for the README table,
    one per kind of supported OpenCLIP image tower (markdown cells)."""
    names = supported_names()
    rows: List[Tuple[str, str, str, str, str]] = []
    taken: set = set()
    for family, test, what, projection in _FAMILIES:
        members = [n for n in names if n not in taken and test(_model_config(n))]
        taken.update(members)
        if members:
            rows.append(("OpenCLIP", family, ", ".join(f"`{n}`" for n in members), what, projection))
    left = [n for n in names if n not in taken]
    if left:
        rows.append(("OpenCLIP", "other VisionTransformer towers", ", ".join(f"`{n}`" for n in left),
                     "checked feature by feature", "`ln_final` or `fc_norm`, then `proj`"))
    return rows


__all__ = [
    "PREFIX",
    "config_from_open_clip",
    "convert",
    "data_config_of",
    "from_open_clip",
    "load",
    "name_feature",
    "open_model",
    "state_dict_from_open_clip",
    "supported_names",
    "table_rows",
]
