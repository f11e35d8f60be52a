"""TransformerLens-style weight processing for HookedViT: ``fold_ln``, ``center_writing_weights``,
``center_unembed``, ``fold_value_biases``, in any combination.

Each option rewrites weights so that the model computes the same function, and the hooks keep
the meaning TransformerLens documents:

``fold_ln``
    Every LayerNorm that is read by a linear map has its weight and bias folded into that map
    (``ln1`` into ``W_Q``/``W_K``/``W_V``, ``ln2`` into ``W_in``, the final norm - ``ln_final``
    or ``fc_norm`` - into ``W_U`` and, for distilled models, ``W_U_dist``); those norms become
    ``LNPre`` (centre and scale only; ``cfg.normalization_type == "LNPre"``) and the folded
    reading weights are centred across ``d_model``, as in TransformerLens. ``hook_q/k/v``,
    ``mlp.hook_pre``, the residual stream and the logits are unchanged; ``ln*.hook_normalized``
    is now the normalised vector without the affine map. Not folded: ``ln_pre`` (CLIP's
    pre-norm writes its output into the residual stream, so there is no following linear map),
    and post-norm blocks (``ResPostBlock``: their norms write into the residual stream), for
    which ``fold_ln`` is refused. Headless models are refused too (the final norm has no
    classifier to fold into): give them class directions first, then call
    :func:`process_weights`.
``center_writing_weights``
    Every weight that writes into the residual stream is centred across ``d_model``: the
    convolutional patch embedding ``W_E`` [d_model, in_chans, ph, pw] per input pixel (i.e.
    across its first axis), ``b_E``, the [CLS]/distillation/register tokens, ``W_pos``, ``W_O``,
    ``b_O``, ``W_out``, ``b_out``. Every reader of the residual stream is a LayerNorm, which
    ignores the mean, so the logits are unchanged and the residual stream (every
    ``hook_resid_*``, ``hook_attn_out``, ``hook_mlp_out``, ``hook_embed``, ``hook_pos_embed``)
    has zero mean. Exception: with a pre-norm (``ln_pre``, CLIP) the stream entering block 0
    is ``ln_pre``'s output, whose mean no weight edit can remove; the stream then keeps that
    mean (later writes are centred). Refused for post-norm blocks (attention reads the
    residual stream directly) and for models whose output reads the stream without a norm.
``center_unembed``
    ``W_U`` (and ``W_U_dist``) minus its mean over classes, ``b_U`` minus its mean: logits
    change by a per-example constant, softmax and every logit difference are unchanged. For a
    CLIP projection head this shifts the image embedding along the all-ones direction, so do
    not use cosine similarities of a centred projection. Refused for headless models.
``fold_value_biases``
    ``b_O += sum_h b_V[h] @ W_O[h]`` and ``b_V = 0``: exact because every attention row sums to
    one (an attention-knockout mask that removes every key of a row breaks this identity).
    ``hook_v``/``hook_z``/``hook_result`` lose the bias term; ``hook_attn_out`` is unchanged.

The transformations are pure functions of a state dict (:func:`process_state_dict`);
:func:`process_weights` applies them to a model (replacing the folded LayerNorms by ``LNPre``
ones) and keeps what :meth:`HookedViT.set_class_directions` needs so that class directions set
later mean the same with or without processing.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor
from vit_lens.core.errors import InputError, InputTypeError

PROCESSING_OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")

#: state-dict prefix of the readout component (final norms and heads)
R = "readout."


class ProcessingError(InputError):
    """A weight-processing option that would not preserve this model."""


def validate_processing_options(options: Mapping[str, object]) -> None:
    """Refuse unknown keywords (nothing passed to ``from_pretrained`` is silently dropped)."""
    unknown = sorted(set(options) - set(PROCESSING_OPTIONS))
    if unknown:
        raise InputTypeError(
            f"unexpected keyword argument(s) {unknown}; weight-processing options are {list(PROCESSING_OPTIONS)}"
            + ("; interpolate_pos_encoding is an option of Hugging Face models (HookedViT.from_hf, 'hf:NAME'): a timm "
               "model accepts other image sizes with timm_kwargs=dict(dynamic_img_size=True)"
               if "interpolate_pos_encoding" in unknown else "")
        )
    for k, v in options.items():
        if not isinstance(v, bool):
            raise InputTypeError(f"{k} must be True or False, got {v!r}")


def check_processing(cfg, has_head: bool, options: Dict[str, bool]) -> None:
    """Raise :class:`ProcessingError` if a requested option cannot preserve a model of ``cfg``."""
    name = cfg.model_name
    if options.get("fold_ln"):
        if cfg.normalization_type != "LN":
            raise ProcessingError(f"{name}: fold_ln was already applied (normalization_type={cfg.normalization_type!r})")
        if cfg.post_norm:
            raise ProcessingError(
                f"{name}: fold_ln is not possible for post-norm blocks (ResPostBlock): their LayerNorms normalise "
                "the sublayer outputs written into the residual stream, with no linear map after them to fold "
                "into. Load without fold_ln (fold_value_biases and center_unembed work)."
            )
        if cfg.has_ln_final and cfg.has_fc_norm:
            raise ProcessingError(f"{name}: fold_ln with both ln_final and fc_norm is not supported")
        if not has_head and (cfg.has_ln_final or cfg.has_fc_norm):
            raise ProcessingError(
                f"{name} has no classifier, so its final LayerNorm has nothing to fold into. Give it class "
                "directions first (model.set_class_directions(W)), then call "
                "vit_lens.loading.process_weights(model, fold_ln=True)."
            )
    if options.get("center_writing_weights"):
        if cfg.post_norm:
            raise ProcessingError(
                f"{name}: center_writing_weights is not possible for post-norm blocks (ResPostBlock): attention "
                "reads the residual stream without a LayerNorm, so its mean matters."
            )
        if not (cfg.has_ln_final or cfg.has_fc_norm):
            raise ProcessingError(
                f"{name}: center_writing_weights needs every reader of the residual stream to be a LayerNorm, "
                "but its output reads the stream without a final norm."
            )
    if options.get("center_unembed") and not has_head:
        raise ProcessingError(f"{name} has no classifier (n_classes=0): center_unembed has nothing to centre")


# ---------------------------------------------------------------------------------------------
# pure state-dict transformations
# ---------------------------------------------------------------------------------------------
def fold_into(W: Tensor, b_next: Tensor, w: Optional[Tensor], b: Optional[Tensor], d_axis: int) -> Tuple[Tensor, Tensor]:
    """Fold a LayerNorm's affine map ``x -> w * x + b`` into the linear map that reads it.

    ``W`` has the ``d_model`` axis at ``d_axis`` ([d_model, out] or [heads, d_model, d_head]);
    returns ``(W', b')`` with ``(w * x + b) @ W + b_next == x @ W' + b'`` for every ``x`` of
    zero mean (``W'`` is centred across ``d_model``).
    """
    if b is not None:
        b_next = b_next + torch.tensordot(b, W, dims=([0], [d_axis]))  # [out] or [heads, d_head]
    if w is not None:
        shape = [1] * W.ndim
        shape[d_axis] = -1
        W = W * w.reshape(shape)
    W = W - W.mean(dim=d_axis, keepdim=True)
    return W, b_next


def _center(x: Tensor, dim: int = -1) -> Tensor:
    return x - x.mean(dim=dim, keepdim=True)


def _head_keys(sd: Dict[str, Tensor]) -> List[Tuple[str, str]]:
    return [(f"{R}{h}.W_U", f"{R}{h}.b_U") for h in ("unembed", "unembed_dist", "unembed_patch") if f"{R}{h}.W_U" in sd]


def process_state_dict(
    sd: Dict[str, Tensor],
    cfg,
    *,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> Dict[str, Tensor]:
    """Apply weight processing to a HookedViT state dict (pure: ``sd`` is not modified).

    Args:
        sd: ``HookedViT.state_dict()``.
        cfg: its :class:`~vit_lens.HookedViTConfig` (read only).
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: see the module docs.

    Returns:
        the new state dict. With ``fold_ln`` the folded LayerNorms' ``.w``/``.b`` entries are
        gone: load it into a model whose config has ``normalization_type="LNPre"``.
    """
    opts = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    check_processing(cfg, bool(_head_keys(sd)), opts)
    sd = dict(sd)
    L = cfg.n_layers
    with torch.no_grad():
        if fold_ln:
            for l in range(L):
                p = f"blocks.{l}."
                w, b = sd.pop(p + "ln1.w"), sd.pop(p + "ln1.b")
                for n in "QKV":
                    sd[p + f"attn.W_{n}"], sd[p + f"attn.b_{n}"] = fold_into(
                        sd[p + f"attn.W_{n}"], sd[p + f"attn.b_{n}"], w, b, d_axis=1
                    )
                w, b = sd.pop(p + "ln2.w"), sd.pop(p + "ln2.b")
                sd[p + "mlp.W_in"], sd[p + "mlp.b_in"] = fold_into(sd[p + "mlp.W_in"], sd[p + "mlp.b_in"], w, b, 0)
            final = R + "ln_final" if cfg.has_ln_final else (R + "fc_norm" if cfg.has_fc_norm else None)
            if final is not None:
                w, b = sd.pop(f"{final}.w"), sd.pop(f"{final}.b")
                for kW, kb in _head_keys(sd):
                    sd[kW], sd[kb] = fold_into(sd[kW], sd[kb], w, b, d_axis=0)
        if center_writing_weights:
            sd["embed.W_E"] = _center(sd["embed.W_E"], dim=0)  # per input pixel, across d_model
            for k in ("embed.b_E", "embed.cls_token", "embed.dist_token", "embed.reg_token", "pos_embed.W_pos"):
                if k in sd:
                    sd[k] = _center(sd[k])
            for l in range(L):
                p = f"blocks.{l}."
                for k in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out"):
                    sd[p + k] = _center(sd[p + k])
        if center_unembed:
            for kW, kb in _head_keys(sd):
                sd[kW], sd[kb] = _center(sd[kW], dim=-1), _center(sd[kb])
        if fold_value_biases:
            for l in range(L):
                p = f"blocks.{l}."
                b_V, W_O = sd[p + "attn.b_V"], sd[p + "attn.W_O"]
                sd[p + "attn.b_O"] = sd[p + "attn.b_O"] + torch.einsum("he,hed->d", b_V, W_O)
                sd[p + "attn.b_V"] = torch.zeros_like(b_V)
    return sd


# ---------------------------------------------------------------------------------------------
# applying to a model
# ---------------------------------------------------------------------------------------------
def applied_processing(model) -> List[str]:
    """The weight-processing options applied to ``model`` so far."""
    return list(model.cfg.extra.get("weight_processing", []))


def process_weights(model, **options: bool):
    """Apply weight processing to ``model`` in place and return it.

    Args:
        model: a :class:`~vit_lens.HookedViT`.
        **options: ``fold_ln``, ``center_writing_weights``, ``center_unembed``,
            ``fold_value_biases`` (booleans; see the module docs for what each does and when it
            is refused).

    Raises:
        ProcessingError: an option that cannot preserve this model (post-norm blocks, headless
            models, ...), raised before anything is modified.
    """
    from vit_lens.components import LayerNorm

    validate_processing_options(options)
    opts = {k: bool(options.get(k, False)) for k in PROCESSING_OPTIONS}
    if not any(opts.values()):
        return model
    cfg = model.cfg
    check_processing(cfg, model.unembed is not None, opts)
    readout = model.readout
    with torch.no_grad():
        readout.snapshot_head()
        final = readout.ln_final if cfg.has_ln_final else readout.fc_norm
        if opts["fold_ln"] and final is not None:
            # the final norm's affine map: folded into the head snapshot (original head, current basis) and
            # kept for set_class_directions, so that later class directions mean the same as unprocessed
            readout.remember_final_norm(final.w, final.b)
        # the readout's head state is part of the state dict (and passes through processing unchanged)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        new = process_state_dict(sd, cfg, **opts)
        if opts["fold_ln"]:
            for blk in model.blocks:
                blk.ln1 = LayerNorm(cfg.d_model, cfg.eps, affine=False)
                blk.ln2 = LayerNorm(cfg.d_model, cfg.eps, affine=False)
            if readout.ln_final is not None:
                readout.ln_final = LayerNorm(cfg.d_model, cfg.eps, affine=False)
            if readout.fc_norm is not None:
                readout.fc_norm = LayerNorm(cfg.d_model, cfg.eps, affine=False)
            cfg.normalization_type = "LNPre"
            model.setup()
        model.load_state_dict(new, strict=True)
    done = applied_processing(model) + [k for k, v in opts.items() if v]
    cfg.extra["weight_processing"] = [k for k in PROCESSING_OPTIONS if k in done]
    return model
