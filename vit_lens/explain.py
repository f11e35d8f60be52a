"""Which image parts matter for a class: importance maps, baselines, and the token-removal test.

Importance maps (all return maps on the patch grid, ``[batch, rows, cols]``, larger = more important;
``per_layer`` / ``per_head`` keep those axes in front of the grid):

* :func:`class_space_importance` -- the seed paper's method (Vilas et al., NeurIPS 2023, Sec. 6):
  project block ``l``'s attention output at [CLS] onto the classes (final norm with the vector's own
  statistics, then the classifier), take the cross-entropy with respect to the target class, and
  differentiate it with respect to that block's attention probabilities (``hook_pattern``), [CLS]
  query row over the image keys. The map is the *negative* gradient (attending more to a key lowers
  the loss), per block and head or summed. The paper's code applies a softmax before the
  cross-entropy (so two softmaxes); that is available as ``double_softmax=True``, off by default.
* :func:`direct_patch_attribution` -- each image token's direct contribution to the target logit
  through the attention heads at [CLS]: ``pattern[cls, key] * (v_key W_O) . u`` where ``u`` is the
  class direction seen through the final norm(s) with their scale frozen at its value in the run.
  Exact: summed over keys and heads, plus the ``b_O`` term, it equals the direct logit attribution of
  ``hook_attn_out`` at [CLS] (see :func:`attention_key_attribution`).
* :func:`attention_rollout` -- Abnar & Zuidema (2020), attention rollout.
* :func:`chefer_relevance` -- Chefer, Gur & Wolf (ICCV 2021), gradient x attention rollout
  (``R <- R + mean_h[(grad A * A)^+] R``, gradients of the target logit).

Helpers: :func:`upsample_map`, :func:`normalize_map`, :func:`model_view`, :func:`overlay`.

Token-removal evaluation (the paper's perturbation test, on any token grid and in batches):
:func:`perturbation_curve`, :func:`random_perturbation_curves`, :func:`perturbation_auc`,
:func:`compare_perturbation`. Removing a token drops it from the sequence right after the position
embedding (prefix tokens are always kept): :func:`keep_tokens_logits`, which uses
:func:`vit_lens.ablation.context_ablation` (``method="remove"``), or for image sizes other than the
native one a hook on ``blocks.0.hook_resid_pre`` that does the same.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_lens.core import PRED, Target, as_batch, chunks, grid_of, progress_bar, resolve_layers, resolve_targets
from vit_lens.core.errors import InputError, InputTypeError, NotDefinedError, OutOfRangeError

if TYPE_CHECKING:  # pragma: no cover  (annotations only: no import cycle at run time)
    from vit_lens.core.selection import CacheLike
    from vit_lens.model import HookedViT

PerturbationMode = Literal["negative", "positive"]

__all__ = [
    "class_space_importance",
    "direct_patch_attribution",
    "attention_key_attribution",
    "attention_rollout",
    "chefer_relevance",
    "upsample_map",
    "normalize_map",
    "model_view",
    "overlay",
    "token_order",
    "random_order",
    "keep_tokens_logits",
    "PerturbationCurve",
    "perturbation_curve",
    "random_perturbation_curves",
    "perturbation_auc",
    "compare_perturbation",
    "UndefinedAUCWarning",
]


# ---------------------------------------------------------------------------------------------
# small shared helpers
# ---------------------------------------------------------------------------------------------
def _require_cls(model, what: str) -> int:
    cfg = model.cfg
    if not cfg.has_class_token:
        raise InputError(
            f"{what} explains the [CLS] token, but {cfg.model_name} has no class token. "
            "Use attention_rollout or chefer_relevance, which handle average-pooled models."
        )
    return 0


def _require_token_pooling(model, what: str) -> None:
    if model.cfg.pooling == "token_avg":
        raise InputError(
            f"{what} explains the logit through [CLS] alone, but {model.cfg.model_name}'s classifier reads "
            "concat([CLS], mean of the patch tokens) (pooling='token_avg'), so the patch-mean head's share would be "
            "missing. Use vit_lens.attribution.dla(model, cache, target, by='position') (exact, both heads), or "
            "attention_rollout / chefer_relevance."
        )
    if model.cfg.pooling not in ("token", "token_dist"):
        raise InputError(
            f"{what} needs a model that classifies from [CLS] (pooling 'token' or 'token_dist'); "
            f"{model.cfg.model_name} uses pooling={model.cfg.pooling!r}, so [CLS] does not reach the "
            "classifier. Use attention_rollout or chefer_relevance instead."
        )


def _sorted_layers(model, layers: Optional[Iterable[int]]) -> List[int]:
    """The selected blocks in forward order, each once (maps accumulate over blocks in order)."""
    return sorted(set(resolve_layers(layers, model)))


def _pred_or(model, target: Target, n: int) -> Optional[Tensor]:
    """``None`` for ``target="pred"`` (read off each batch's own forward pass), else the targets."""
    if isinstance(target, str) and target.strip().lower() == PRED:
        return None
    return resolve_targets(model, target, n)


def _pattern_hooks(layers: Sequence[int], store: Dict[int, Tensor], name: str = "attn.hook_pattern"):
    def make(l):
        def hook(t, hook):
            store[l] = t
            return t

        return hook

    return [(f"blocks.{l}.{name}", make(l)) for l in layers]


def _reduce(
    per: Float[Tensor, "batch layer head n_patches"], grid: Tuple[int, int], per_layer: bool, per_head: bool
) -> Tensor:
    if not per_head:
        per = per.sum(2)
        if not per_layer:
            per = per.sum(1)
    elif not per_layer:
        per = per.sum(1)
    return per.reshape(*per.shape[:-1], *grid)


# ---------------------------------------------------------------------------------------------
# the paper's method
# ---------------------------------------------------------------------------------------------
def class_space_importance(
    model: HookedViT,
    images: Any,
    target: Target = PRED,
    *,
    layers: Optional[Iterable[int]] = None,
    per_layer: bool = False,
    per_head: bool = False,
    double_softmax: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> Float[Tensor, "batch *layer_head rows cols"]:
    """Image-token importance from the class-space loss of [CLS]'s attention output (the paper's method).

    For each block ``l``: ``loss_l = CE(project(attn_out_l[:, CLS]), target)`` where ``project`` is
    the final norm (with the vector's own mean/scale) followed by the classifier; the importance of
    patch ``k`` for head ``h`` is ``-d loss_l / d pattern_l[h, CLS, k]`` (the gradient with respect to
    the same block's attention probabilities). Gradients come from autograd through the HookedViT
    forward (float32 is fine), one backward per block, each touching only that block's path.

    Args:
        model: a :class:`~vit_lens.HookedViT` with a class token.
        images: a normalised batch [batch, C, H, W] (or anything ``model.preprocess`` accepts).
        target: the class to explain (see :func:`vit_lens.core.resolve_targets`; default ``"pred"``: the predicted class).
        layers: blocks to use (default all); the summed map sums over these, and the ``per_layer``
            axis lists them in increasing order.
        per_layer, per_head: keep the layer and/or head axis.
        double_softmax: the paper's code feeds softmax probabilities into the cross-entropy
            (softmax applied twice). Off by default (a single softmax); set True to reproduce it.
        batch_size: images per forward/backward.
        progress: show a progress bar.

    Returns:
        ``[batch, rows, cols]``; ``[batch, layer, rows, cols]`` with ``per_layer``;
        ``[batch, head, rows, cols]`` with ``per_head``; ``[batch, layer, head, rows, cols]`` with both.
        Larger means that attending more to the patch lowers the loss of the target class.
    """
    cls = _require_cls(model, "class_space_importance")
    x_all = as_batch(model, images)
    layers = _sorted_layers(model, layers)
    targets = resolve_targets(model, target, len(x_all), images=x_all, batch_size=batch_size)
    n_pre = model.cfg.n_prefix_tokens
    out = []
    for s in progress_bar(chunks(len(x_all), batch_size), progress=progress, desc="class-space importance"):
        patterns: Dict[int, Tensor] = {}
        attn_outs: Dict[int, Tensor] = {}
        hooks = _pattern_hooks(layers, patterns) + _pattern_hooks(layers, attn_outs, "hook_attn_out")
        x = x_all[s].detach().requires_grad_(True)  # gradients flow even if the weights are frozen
        grads = []
        with torch.enable_grad():
            model.run_with_hooks(x, stop_at_layer=max(layers) + 1, fwd_hooks=hooks)
            for i, l in enumerate(layers):
                logits = model.readout.project(attn_outs[l][:, cls], head=model.readout.cls_head)
                if double_softmax:
                    logits = logits.softmax(-1)
                loss = F.cross_entropy(logits, targets[s], reduction="sum")
                (g,) = torch.autograd.grad(loss, patterns[l], retain_graph=i < len(layers) - 1)
                grads.append(g[:, :, cls, n_pre:].detach())
        out.append(-torch.stack(grads, dim=1))  # [b, layer, head, n_patches]
    return _reduce(torch.cat(out), grid_of(model, x_all), per_layer, per_head)


# ---------------------------------------------------------------------------------------------
# direct attribution per patch (exact under the "dla" view)
# ---------------------------------------------------------------------------------------------
def _frozen_class_direction(model, cache, targets: Tensor) -> Float[Tensor, "batch d_model"]:
    """``u`` such that ``target logit = u . resid_final[:, CLS] + const`` exactly, with the final
    norm scales frozen at their cached values (the "dla" view)."""
    cfg = model.cfg
    u = model.W_U[:, targets].T  # [batch, d_model]
    if cfg.pooling == "token_dist":
        u = u / 2  # the [CLS] head's half of the averaged logit
    for norm, name in ((model.fc_norm, "fc_norm"), (model.ln_final, "ln_final")):
        if norm is None:
            continue
        if norm.w is not None:
            u = u * norm.w
        u = u - u.mean(-1, keepdim=True)
        scale = cache[f"{name}.hook_scale"]
        scale = scale[:, 0] if scale.ndim == 3 else scale  # [batch, 1]: at [CLS] (fc_norm: the pooled vector)
        u = u / scale
    return u


def attention_key_attribution(
    model: HookedViT, cache: CacheLike, target: Int[Tensor, "batch"], *, layers: Optional[Iterable[int]] = None
) -> Tuple[Float[Tensor, "batch layer head pos"], Float[Tensor, "batch layer"]]:
    """Per key and head, the direct contribution to the target logit of each block's attention at [CLS].

    ``contrib[b, l, h, k] = pattern_l[b, h, CLS, k] * (v_l[b, k, h] @ W_O[l, h]) . u_b`` and
    ``bias[b, l] = b_O[l] . u_b``, where ``u_b`` is the target class direction seen through the
    final norm(s) with their scale frozen at the cached value. Exact identity:
    ``contrib[b, l].sum() + bias[b, l] == u_b . attn_out_l[b, CLS]`` (the attn_out direct logit
    attribution), and summing that over every component of the residual stream plus the norm and
    classifier biases gives the logit.

    Args:
        cache: an ActivationCache (or dict) holding, for the layers used,
            ``blocks.{l}.attn.hook_pattern`` and ``blocks.{l}.attn.hook_v``, and the final norms'
            ``hook_scale`` (``ln_final`` and/or ``fc_norm``).
        target: one class index per image [batch].

    Returns:
        ``(contrib [batch, layer, head, pos], bias [batch, layer])`` over all key positions
        (prefix tokens included).
    """
    cls = _require_cls(model, "attention_key_attribution")
    _require_token_pooling(model, "attention_key_attribution")
    if model.cfg.post_norm:
        raise NotDefinedError(
            "per-key attribution needs attn_out to be linear in the values; post-norm blocks "
            "normalise the attention output. Use class_space_importance for this model."
        )
    layers = _sorted_layers(model, layers)
    target = torch.as_tensor(target, device=model.device).long()
    u = _frozen_class_direction(model, cache, target)  # [B, D]
    contribs, biases = [], []
    for l in layers:
        attn: Any = model.blocks[l].attn
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][:, :, cls, :]  # [B, H, P]
        v = cache[f"blocks.{l}.attn.hook_v"]  # [B, P, H, E]
        w_u = torch.einsum("hed,bd->bhe", attn.W_O, u)  # [B, H, E]
        contribs.append(pattern * torch.einsum("bphe,bhe->bhp", v, w_u))
        biases.append(u @ attn.b_O)
    return torch.stack(contribs, 1), torch.stack(biases, 1)


def _dla_cache_names(model, layers: Sequence[int]) -> List[str]:
    names = [f"blocks.{l}.attn.hook_{k}" for l in layers for k in ("pattern", "v")]
    if model.ln_final is not None:
        names.append("ln_final.hook_scale")
    if model.fc_norm is not None:
        names.append("fc_norm.hook_scale")
    return names


def direct_patch_attribution(
    model: HookedViT,
    images: Any,
    target: Target = PRED,
    *,
    layers: Optional[Iterable[int]] = None,
    per_layer: bool = False,
    per_head: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> Float[Tensor, "batch *layer_head rows cols"]:
    """How much each image token adds to the target logit through the attention heads at [CLS].

    Exact under the "dla" view (final-norm scale frozen): see :func:`attention_key_attribution`
    for the identity. Maps cover patch keys only (prefix tokens' contributions are left out).

    Returns:
        ``[batch, rows, cols]`` (``per_layer`` / ``per_head`` keep those axes, as in
        :func:`class_space_importance`), in logit units.
    """
    _require_cls(model, "direct_patch_attribution")
    _require_token_pooling(model, "direct_patch_attribution")
    x_all = as_batch(model, images)
    layers = _sorted_layers(model, layers)
    n_pre = model.cfg.n_prefix_tokens
    names = _dla_cache_names(model, layers)
    out = []
    provided = _pred_or(model, target, len(x_all))
    for s in progress_bar(chunks(len(x_all), batch_size), progress=progress, desc="direct patch attribution"):
        with torch.no_grad():
            logits, cache = model.run_with_cache(x_all[s], names_filter=names)
        t = logits.argmax(-1) if provided is None else provided[s]
        contrib, _ = attention_key_attribution(model, cache, t, layers=layers)
        out.append(contrib[..., n_pre:])
    return _reduce(torch.cat(out), grid_of(model, x_all), per_layer, per_head)


# ---------------------------------------------------------------------------------------------
# baselines: attention rollout and Chefer et al.
# ---------------------------------------------------------------------------------------------
def _query_rows(model, P: int, B: int, device, dtype) -> Float[Tensor, "batch pos"]:
    """The row vector whose relevance we propagate: [CLS], or the mean of patch rows for avg pooling;
    ``"token_avg"`` (a [CLS] head plus a patch-mean head): half [CLS], half the mean of the patch rows
    (each head's pooling weights, the two heads weighted equally)."""
    r = torch.zeros(B, P, device=device, dtype=dtype)
    if model.cfg.pooling == "token_avg":
        n_pre = model.cfg.n_prefix_tokens
        r[:, 0] = 0.5
        r[:, n_pre:] = 0.5 / (P - n_pre)
    elif model.cfg.pooling in ("token", "token_dist"):
        r[:, 0] = 1.0
    else:
        n_pre = model.cfg.n_prefix_tokens
        r[:, n_pre:] = 1.0 / (P - n_pre)
    return r


def attention_rollout(
    model: HookedViT,
    images: Any,
    *,
    head_fusion: Literal["mean", "max", "min"] = "mean",
    residual_weight: float = 0.5,
    layers: Optional[Iterable[int]] = None,
    batch_size: int = 32,
    progress: bool = True,
) -> Float[Tensor, "batch rows cols"]:
    """Attention rollout (Abnar & Zuidema, 2020).

    Each block's attention is fused over heads, mixed with the identity for the residual
    connection, ``A' = (1 - residual_weight) * A + residual_weight * I`` (rows renormalised), and the
    blocks are multiplied: ``rollout = A'_L ... A'_1``. The map is the [CLS] row over the patch
    keys (for average-pooled models, the mean of the patch rows). Computed as a row vector times
    the matrices, so it costs ``O(layers * pos^2)`` per image.

    Args:
        head_fusion: how heads are combined (``"mean"`` in the paper; ``"max"``/``"min"`` are common variants).
        residual_weight: weight of the identity (0.5 in the paper).
        layers: the blocks to roll out (default all, in order).
    """
    if head_fusion not in ("mean", "max", "min"):
        raise InputError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    if not 0.0 <= residual_weight <= 1.0:
        raise InputError(f"residual_weight must be in [0, 1], got {residual_weight}")
    x_all = as_batch(model, images)
    layers = _sorted_layers(model, layers)
    n_pre = model.cfg.n_prefix_tokens
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    out = []
    for s in progress_bar(chunks(len(x_all), batch_size), progress=progress, desc="attention rollout"):
        with torch.no_grad():
            _, cache = model.run_with_cache(x_all[s], names_filter=names, return_type=None, stop_at_layer=max(layers) + 1)
            P = cache[names[0]].shape[-1]
            r = _query_rows(model, P, len(x_all[s]), model.device, cache[names[0]].dtype)
            for l in reversed(layers):
                A = cache[f"blocks.{l}.attn.hook_pattern"]
                A = A.mean(1) if head_fusion == "mean" else (A.amax(1) if head_fusion == "max" else A.amin(1))
                A = (1 - residual_weight) * A + residual_weight * torch.eye(P, device=A.device, dtype=A.dtype)
                A = A / A.sum(-1, keepdim=True)
                r = torch.einsum("bq,bqk->bk", r, A)
        out.append(r[:, n_pre:])
    return torch.cat(out).reshape(len(x_all), *grid_of(model, x_all))


def chefer_relevance(
    model: HookedViT,
    images: Any,
    target: Target = PRED,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> Float[Tensor, "batch rows cols"]:
    """Gradient x attention rollout (Chefer, Gur & Wolf, ICCV 2021, Eq. 5-6).

    ``R = I``; for each block in order, ``A_bar = mean_heads[(dy_t/dA * A)^+]`` and
    ``R <- R + A_bar R``, where ``y_t`` is the target logit and ``A`` the block's attention
    probabilities. The map is ``R[CLS, patches]`` (for average-pooled models, the mean of the patch rows).
    One forward and one backward per batch.
    """
    x_all = as_batch(model, images)
    layers = list(range(model.cfg.n_layers))
    n_pre = model.cfg.n_prefix_tokens
    provided = _pred_or(model, target, len(x_all))
    out = []
    for s in progress_bar(chunks(len(x_all), batch_size), progress=progress, desc="Chefer relevance"):
        patterns: Dict[int, Tensor] = {}
        x = x_all[s].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.run_with_hooks(x, fwd_hooks=_pattern_hooks(layers, patterns))
            t = logits.argmax(-1) if provided is None else provided[s]
            y = logits.gather(1, t[:, None]).sum()
            grads = torch.autograd.grad(y, [patterns[l] for l in layers])
        with torch.no_grad():
            B, _, P, _ = patterns[0].shape
            r = _query_rows(model, P, B, model.device, patterns[0].dtype)
            # R = (I + A_bar_L) ... (I + A_bar_1); propagate the query row from the top.
            for l in reversed(layers):
                A_bar = (grads[l] * patterns[l]).clamp(min=0).mean(1)
                r = r + torch.einsum("bq,bqk->bk", r, A_bar)
        out.append(r[:, n_pre:].detach())
    return torch.cat(out).reshape(len(x_all), *grid_of(model, x_all))


# ---------------------------------------------------------------------------------------------
# maps -> images
# ---------------------------------------------------------------------------------------------
def upsample_map(
    maps: Float[Tensor, "*batch rows cols"],
    size: Union[int, Tuple[int, int]],
    mode: Literal["bilinear", "bicubic", "nearest"] = "bilinear",
) -> Float[Tensor, "*batch height width"]:
    """Resize maps on the patch grid to ``size`` (an int or (height, width)) in pixels."""
    if maps.ndim < 2:
        raise InputError(f"maps must be [..., rows, cols], got shape {tuple(maps.shape)}")
    hw: Tuple[int, ...] = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kw = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(flat, size=hw, mode=mode, **kw)
    return up.reshape(*lead, *hw).to(maps.dtype)


def normalize_map(maps: Float[Tensor, "*batch rows cols"], eps: float = 1e-12) -> Float[Tensor, "*batch rows cols"]:
    """Min-max scale each map (over its last two axes) to [0, 1]; a constant map becomes 0."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp(min=eps)


def model_view(model: HookedViT, image: Any, mode: Literal["timm", "paper"] = "timm"):
    """The image as the model sees it (resized and cropped by ``model.preprocess(mode=mode)``, not
    normalised), as an RGB PIL image of the model's input size: the picture to overlay maps on."""
    from vit_lens.preprocess import build_transform, load_image

    img = load_image(image)
    for t in build_transform(model.data_config, mode).transforms:
        if "ToTensor" in type(t).__name__:
            break
        img = t(img)
    return img


def _colormap(x: np.ndarray, name: str) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    if name == "jet":
        rgb = [np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)]
    elif name == "hot":
        rgb = [np.clip(3 * x - c, 0, 1) for c in (0, 1, 2)]
    elif name == "gray":
        rgb = [x, x, x]
    else:
        raise InputError(f"colormap must be 'jet', 'hot' or 'gray', got {name!r}")
    return np.stack(rgb, -1)


def overlay(
    image: Any,
    heatmap: Float[Tensor, "rows cols"],
    *,
    alpha: float = 0.5,
    colormap: Literal["jet", "hot", "gray"] = "jet",
    mode: Literal["bilinear", "bicubic", "nearest"] = "bilinear",
):
    """Blend a map (min-max normalised, upsampled to the image) over an image; returns a PIL image.

    Args:
        image: a PIL image, path or uint8 array -- usually :func:`model_view` of the input, so that
            the map's grid lines up with what the model saw.
        heatmap: one map on the patch grid [rows, cols].
        alpha: opacity of the heatmap (0 = image only, 1 = heatmap only).
    """
    from PIL import Image

    from vit_lens.preprocess import load_image

    if heatmap.ndim != 2:
        raise InputError(f"overlay takes one map [rows, cols], got shape {tuple(heatmap.shape)}; index the batch first")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    img = load_image(image)
    W, H = img.size
    m = normalize_map(upsample_map(heatmap.detach().float().cpu(), (H, W), mode=mode)).numpy()
    base = np.asarray(img, dtype=np.float32) / 255.0
    blended = (1 - alpha) * base + alpha * _colormap(m, colormap)
    return Image.fromarray((blended * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# token-removal (perturbation) evaluation
# ---------------------------------------------------------------------------------------------
def token_order(
    maps: Float[Tensor, "batch *grid"], *, tie_seed: Optional[int] = 0
) -> Int[Tensor, "batch n_patches"]:
    """Patch indices (0 = top-left patch) sorted from most to least important.

    Tied scores are put in a seeded random order (``tie_seed``; None keeps row-major order), so
    that a map with many ties (e.g. integer ranks) does not silently favour the top rows.
    """
    flat = maps.reshape(maps.shape[0], -1).float()
    if tie_seed is None:
        return torch.sort(flat, dim=-1, descending=True, stable=True).indices
    perm = random_order(flat.shape[0], flat.shape[1], tie_seed, flat.device)
    idx = torch.sort(flat.gather(1, perm), dim=-1, descending=True, stable=True).indices
    return perm.gather(1, idx)


def random_order(n_images: int, n_patches: int, seed: int, device: Any = None) -> Int[Tensor, "batch n_patches"]:
    """A random importance order per image (a fresh permutation per image, reproducible by seed)."""
    g = torch.Generator().manual_seed(int(seed))
    order = torch.argsort(torch.rand(n_images, n_patches, generator=g), dim=-1)
    return order.to(device) if device is not None else order


def keep_tokens_logits(
    model: HookedViT, images: Float[Tensor, "batch chans height width"], keep: Int[Tensor, "batch n_keep"]
) -> Float[Tensor, "batch n_classes"]:
    """Logits with only the given patch tokens (indices 0..n_patches-1) plus all prefix tokens.

    The other patch tokens are cut out of the sequence right after the position embedding is
    added, so the remaining tokens keep their own position embeddings (the paper's token removal).
    This is :func:`vit_lens.ablation.context_ablation` with ``method="remove"``; every image in the
    batch keeps the same number of tokens.
    """
    B = images.shape[0]
    keep = torch.as_tensor(keep, device=images.device).long()
    if keep.ndim != 2 or keep.shape[0] != B:
        raise InputError(f"keep must be [batch={B}, n_keep] patch indices, got shape {tuple(keep.shape)}")
    rows, cols = grid_of(model, images)
    N = rows * cols
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= N):
        raise OutOfRangeError(f"patch indices must be in 0..{N - 1}")
    mask = torch.zeros(B, N, dtype=torch.bool, device=images.device)
    mask.scatter_(1, keep, True)
    if int(mask.sum(-1).min()) != keep.shape[1]:
        raise InputError("keep has repeated patch indices in some image")
    context_ablation: Any
    try:
        from vit_lens.ablation import context_ablation
    except ImportError:  # pragma: no cover - the ablation module ships with the package
        context_ablation = None
    if context_ablation is not None and (rows, cols) == tuple(model.cfg.grid_size):
        with context_ablation(model, mask.reshape(B, rows, cols), method="remove"):
            return model(images)
    return _drop_tokens_logits(model, images, keep)


def _drop_tokens_logits(model, images: Tensor, keep: Tensor) -> Tensor:
    """The same token removal with one hook on ``blocks.0.hook_resid_pre`` (any grid size)."""
    B = images.shape[0]
    n_pre = model.cfg.n_prefix_tokens
    idx = torch.cat([torch.arange(n_pre, device=images.device).expand(B, -1), keep.sort(-1).values + n_pre], 1)

    def drop(resid, hook):
        return resid.gather(1, idx[..., None].expand(-1, -1, resid.shape[-1]))

    return model.run_with_hooks(images, fwd_hooks=[("blocks.0.hook_resid_pre", drop)])


def perturbation_auc(curve: Union[Tensor, Sequence[float], np.ndarray], n_patches: int) -> float:
    """The paper's AUC of a token-removal curve: ``sum(curve) / (max(curve) * n_patches)``.

    ``curve`` holds the accuracy (or target probability) for keeping ``n = 1 .. n_patches - 1``
    tokens. For a curve evaluated at a subset of those ``n``, the sum is estimated as
    ``(n_patches - 1) * mean(curve)`` (identical when every ``n`` is used).

    Returns:
        the AUC in ``(0, 1)``, or NaN when the curve is 0 at every step: then the normalisation
        is 0 / 0 and the AUC is undefined (an accuracy curve is all zero when no image is
        classified as its target at any evaluated step, typically because the targets are not the
        model's top-1 class even with every token kept). :class:`PerturbationCurve` and
        :func:`compare_perturbation` say so in an :class:`UndefinedAUCWarning`.
    """
    if isinstance(curve, Tensor):  # any device and dtype (numpy takes neither CUDA nor bfloat16 tensors)
        c = curve.detach().to(device="cpu", dtype=torch.float64)
    else:
        c = torch.as_tensor(np.asarray(curve, dtype=np.float64))
    if c.numel() == 0:
        raise InputError("empty curve")
    mx = float(c.max())
    if mx <= 0:
        return float("nan")
    return float((n_patches - 1) * c.mean() / (mx * n_patches))


def _resolve_steps(steps: Union[None, int, Sequence[int]], N: int) -> List[int]:
    if N < 2:
        raise InputError(f"the perturbation test needs at least 2 patch tokens, got {N}")
    if steps is None:
        return list(range(1, N))
    if isinstance(steps, int):
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        return sorted(set(int(round(v)) for v in np.linspace(1, N - 1, min(steps, N - 1))))
    out = sorted(set(int(s) for s in steps))
    if not out or out[0] < 1 or out[-1] > N - 1:
        raise InputError(f"steps must be numbers of kept tokens in 1..{N - 1}, got {list(steps)[:5]}...")
    return out


class UndefinedAUCWarning(UserWarning):
    """A token-removal AUC is undefined (NaN): the accuracy curve is 0 at every evaluated step."""


def _never_correct(correct: Tensor) -> List[int]:
    """Images never classified as their target at any step ([batch, steps] -> indices)."""
    return (~correct.any(1)).nonzero().flatten().tolist()


def _short(idx: Sequence[int], k: int = 10) -> str:
    idx = list(idx)
    return str(idx) if len(idx) <= k else f"{idx[:k]} ... ({len(idx)} in all)"


_AUC_WHY = (
    "so the accuracy curve is 0 everywhere and the paper's AUC, sum(accuracy) / (max(accuracy) x n_patches), "
    "is 0 / 0"
)
_AUC_ADVICE = (
    "Drop the images whose target is not the model's top-1 class, or pass targets='pred' (each image's own "
    "top-1 class); prob_auc (the same normalisation on the target probability) stays defined unless that "
    "probability is 0 at every step."
)


@dataclass
class PerturbationCurve:
    """Result of a token-removal run.

    Attributes:
        n_kept: numbers of patch tokens kept, one per step [steps].
        n_patches: patch tokens in the full image (N).
        mode: ``"negative"`` (least important removed first: keep the n most important) or
            ``"positive"`` (most important removed first: keep the n least important).
        correct: top-1 prediction equals the target, per image and step [batch, steps].
        target_prob: softmax probability of the target, per image and step [batch, steps].
    """

    n_kept: Int[Tensor, "steps"]
    n_patches: int
    mode: str
    correct: Bool[Tensor, "batch steps"]
    target_prob: Float[Tensor, "batch steps"]

    @property
    def accuracy(self) -> Float[Tensor, "steps"]:
        return self.correct.float().mean(0)

    @property
    def mean_target_prob(self) -> Float[Tensor, "steps"]:
        return self.target_prob.mean(0)

    @property
    def auc(self) -> float:
        """The paper's AUC of the accuracy curve (see :func:`perturbation_auc`).

        NaN, with an :class:`UndefinedAUCWarning` that names the images, when no image is
        classified as its target at any evaluated step (the AUC's normalisation is 0 / 0).
        """
        value = perturbation_auc(self.accuracy, self.n_patches)
        if math.isnan(value):
            warnings.warn(
                f"{self.mode} perturbation AUC is undefined (NaN): images {_short(_never_correct(self.correct))} "
                f"(all of them) are never classified as their target at any of the {len(self.n_kept)} steps, "
                f"{_AUC_WHY}. {_AUC_ADVICE}",
                UndefinedAUCWarning, stacklevel=2,
            )
        return value

    @property
    def undefined(self) -> bool:
        """Whether :attr:`auc` is undefined (the accuracy is 0 at every step)."""
        return not bool(self.correct.any())

    @property
    def prob_auc(self) -> float:
        """Same normalisation, on the mean target-class probability."""
        return perturbation_auc(self.mean_target_prob, self.n_patches)

    def to_frame(self):
        """A tidy pandas table: n_kept, fraction_removed, accuracy, target_prob."""
        import pandas as pd

        n = self.n_kept.cpu().numpy()
        return pd.DataFrame(
            {
                "n_kept": n,
                "fraction_removed": 1 - n / self.n_patches,
                "accuracy": self.accuracy.cpu().numpy(),
                "target_prob": self.mean_target_prob.cpu().numpy(),
            }
        )


def perturbation_curve(
    model: HookedViT,
    images: Any,
    targets: Target,
    maps: Optional[Tensor] = None,
    *,
    order: Optional[Int[Tensor, "batch n_patches"]] = None,
    mode: PerturbationMode = "negative",
    steps: Union[None, int, Sequence[int]] = None,
    batch_size: int = 32,
    tie_seed: Optional[int] = 0,
    progress: bool = True,
) -> PerturbationCurve:
    """The token-removal test: keep ``n`` patch tokens chosen by a map, for ``n = 1 .. N-1``.

    Args:
        images: a normalised batch [batch, C, H, W] (or anything ``model.preprocess`` accepts).
        targets: the class each image should be recognised as (see :func:`vit_lens.core.resolve_targets`;
            ``"pred"``: the model's own prediction on the full image).
        maps: importance maps [batch, rows, cols] (or [batch, n_patches]); larger = more important.
        order: alternatively, patch indices from most to least important [batch, n_patches].
        mode: ``"negative"`` removes the least important tokens first (keeps the top-n; a good map
            keeps accuracy high), ``"positive"`` removes the most important first (keeps the bottom-n).
        steps: the numbers of kept tokens to evaluate: None = every n in 1..N-1 (the paper's
            curve), an int k = k evenly spaced values, or an explicit list.
        batch_size: images per forward.
        tie_seed: how tied map values are ordered (see :func:`token_order`).

    Returns:
        a :class:`PerturbationCurve` (``.accuracy``, ``.auc``, ``.to_frame()``).
    """
    if mode not in ("negative", "positive"):
        raise InputError(f"mode must be 'negative' or 'positive', got {mode!r}")
    x_all = as_batch(model, images)
    B = len(x_all)
    rows, cols = grid_of(model, x_all)
    N = rows * cols
    if (maps is None) == (order is None):
        raise InputError("give exactly one of maps= (importance maps) or order= (patch indices, most important first)")
    if maps is not None:
        if not isinstance(maps, Tensor) or not maps.is_floating_point():
            got = f"dtype {maps.dtype}" if isinstance(maps, Tensor) else type(maps).__name__
            raise InputTypeError(f"maps must be a float tensor [batch, {rows}, {cols}] of importance scores, got {got}")
        if maps.ndim < 2 or maps.shape[0] != B or maps[0].numel() != N:
            raise InputError(
                f"maps must be [batch={B}, {rows}, {cols}] (or [batch, {N}]) for these images, got {tuple(maps.shape)}"
            )
        if not bool(torch.isfinite(maps).all()):
            raise InputError("maps contain NaN or inf: they give no order of the patches; check the method that made them")
        order = token_order(maps, tie_seed=tie_seed)
    order = torch.as_tensor(order).long().to(x_all.device)
    if tuple(order.shape) != (B, N):
        raise InputError(f"order must be [batch={B}, n_patches={N}], got {tuple(order.shape)}")
    t = resolve_targets(model, targets, B, images=x_all, batch_size=batch_size).to(x_all.device)
    n_list = _resolve_steps(steps, N)
    correct = torch.zeros(B, len(n_list), dtype=torch.bool)
    probs = torch.zeros(B, len(n_list))
    with torch.no_grad():
        for j, n in enumerate(progress_bar(n_list, progress=progress, desc=f"{mode} perturbation")):
            keep = order[:, :n] if mode == "negative" else order[:, N - n:]
            for s in chunks(B, batch_size):
                logits = keep_tokens_logits(model, x_all[s], keep[s]).float()
                correct[s, j] = (logits.argmax(-1) == t[s]).cpu()
                probs[s, j] = logits.softmax(-1).gather(1, t[s, None])[:, 0].cpu()
    return PerturbationCurve(torch.tensor(n_list), N, mode, correct, probs)


def random_perturbation_curves(
    model: HookedViT,
    images: Any,
    targets: Target,
    *,
    seeds: Iterable[int] = range(5),
    mode: PerturbationMode = "negative",
    steps: Union[None, int, Sequence[int]] = None,
    batch_size: int = 32,
    progress: bool = True,
) -> List[PerturbationCurve]:
    """The random-order baseline: one :class:`PerturbationCurve` per seed (a fresh random
    permutation of the patches per image and seed)."""
    x_all = as_batch(model, images)
    rows, cols = grid_of(model, x_all)
    return [
        perturbation_curve(
            model, x_all, targets, order=random_order(len(x_all), rows * cols, seed, x_all.device),
            mode=mode, steps=steps, batch_size=batch_size, progress=progress,
        )
        for seed in seeds
    ]


def compare_perturbation(
    model: HookedViT,
    images: Any,
    targets: Target,
    maps: Mapping[str, Tensor],
    *,
    modes: Sequence[PerturbationMode] = ("negative", "positive"),
    random_seeds: Iterable[int] = range(5),
    steps: Union[None, int, Sequence[int]] = None,
    batch_size: int = 32,
    progress: bool = True,
):
    """Run the token-removal test for several maps and the random baseline.

    Args:
        maps: method name -> maps [batch, rows, cols].
        random_seeds: seeds of the random-order baseline (empty to skip it).

    Returns:
        ``(table, curves)``: a pandas table with one row per method and mode (columns method, mode,
        auc, auc_std (across seeds, random only), prob_auc, n_images, n_patches, n_steps) and a dict
        ``(method, mode) -> PerturbationCurve`` (a list of curves for ``"random"``).

    Undefined AUCs: when no image is classified as its target at any evaluated step of a run (e.g. a
    single image whose target is not the model's top-1 class), that run's accuracy curve is all zero
    and its AUC ``sum / (max x n_patches)`` is 0 / 0: the row's ``auc`` is NaN (for ``"random"``: NaN
    when any seed's is, not a mean over the others) and one :class:`UndefinedAUCWarning` names the
    runs and the images that are not classified as their target even with every token kept, and
    says what to do (drop them, or ``targets="pred"`` for each image's own prediction). ``prob_auc``
    stays defined unless the target probability underflows to 0 at every step.
    """
    import pandas as pd

    x_all = as_batch(model, images)
    # "pred": each image's prediction, computed once for all runs
    targets = resolve_targets(model, targets, len(x_all), images=x_all, batch_size=batch_size)
    rows_out: List[Dict[str, Any]] = []
    curves: Dict[Tuple[str, str], Any] = {}
    undefined: List[str] = []

    def auc_of(c: PerturbationCurve) -> float:
        return perturbation_auc(c.accuracy, c.n_patches)  # NaN when undefined; reported once below

    seeds = list(random_seeds)
    for mode in modes:
        for name, m in maps.items():
            c = perturbation_curve(model, x_all, targets, m, mode=mode, steps=steps, batch_size=batch_size, progress=progress)
            curves[(name, mode)] = c
            if c.undefined:
                undefined.append(f"{name}/{mode}")
            rows_out.append(dict(method=name, mode=mode, auc=auc_of(c), auc_std=float("nan"), prob_auc=c.prob_auc,
                                 n_images=len(x_all), n_patches=c.n_patches, n_steps=len(c.n_kept)))
        if seeds:
            rc = random_perturbation_curves(model, x_all, targets, seeds=seeds, mode=mode, steps=steps,
                                            batch_size=batch_size, progress=progress)
            curves[("random", mode)] = rc
            bad = [s_ for s_, c in zip(seeds, rc) if c.undefined]
            if bad:
                undefined.append(f"random/{mode} (seeds {bad})")
            # the mean over seeds is undefined when one seed's AUC is: NaN, not a mean of the others
            aucs = np.array([auc_of(c) for c in rc])
            rows_out.append(dict(method="random", mode=mode, auc=float(aucs.mean()),
                                 auc_std=float(aucs.std()),
                                 prob_auc=float(np.mean([c.prob_auc for c in rc])),
                                 n_images=len(x_all), n_patches=rc[0].n_patches, n_steps=len(rc[0].n_kept)))
    if undefined:
        warnings.warn(_undefined_auc_message(model, x_all, targets, undefined, batch_size), UndefinedAUCWarning,
                      stacklevel=2)
    return pd.DataFrame(rows_out), curves


def _undefined_auc_message(model, x_all: Tensor, targets: Target, rows: List[str], batch_size: int) -> str:
    """Why some AUCs of compare_perturbation are NaN: which images are not top-1 with every token kept."""
    t = resolve_targets(model, targets, len(x_all), images=x_all, batch_size=batch_size)
    with torch.no_grad():
        pred = torch.cat([model(x_all[s]).argmax(-1) for s in chunks(len(x_all), batch_size)])
    wrong = (pred != t).nonzero().flatten().tolist()
    names = model.class_names or []

    def nm(i: int) -> str:
        return repr(names[i]) if i < len(names) else repr(f"class {i}")

    detail = "; ".join(f"image {i}: target {nm(int(t[i]))}, top-1 {nm(int(pred[i]))}" for i in wrong[:5])
    if len(wrong) > 5:
        detail += f"; ... ({len(wrong)} images in all)"
    if wrong:
        why = (f"{len(wrong)} of the {len(x_all)} images are not classified as their target even with every token "
               f"kept ({detail})")
        if len(wrong) < len(x_all):
            why += f"; the other {len(x_all) - len(wrong)} lose their target once tokens are removed"
    else:
        why = "every image is classified as its target with all tokens kept, but loses it once tokens are removed"
    return (f"AUC undefined (NaN) for {', '.join(rows)}: in those runs no image is classified as its target at any "
            f"evaluated step (n = 1 .. n_patches - 1 kept tokens), {_AUC_WHY}. {why}. {_AUC_ADVICE}")
