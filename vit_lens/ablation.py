"""Attention knockout and context ablation.

Attention knockout
    Remove chosen attention edges (query token -> key token), in any subset of layers and heads.
    Two modes:

    * ``"mask"``: the scores of removed edges are set to ``-inf`` before the softmax, so every
      query's remaining attention is renormalised to sum to 1. Implemented with each attention
      module's ``attn_mask``, so the fused attention kernel keeps running unless the pattern itself
      is hooked (then the materialised path applies the same mask).
    * ``"paper"``: the attention probabilities of removed edges are set to 0 *after* the softmax
      and the rows are **not** renormalised (what Vilas et al., 2023 do). Implemented with a hook
      on ``blocks.{l}.attn.hook_pattern`` (which materialises the pattern).

    Edges are given as a boolean ``[query_pos, key_pos]`` mask where **True means the edge is
    removed** (``[batch, query_pos, key_pos]`` for one mask per image), or by name
    (:func:`knockout_edges`): ``"self_only"`` (image tokens attend only to themselves),
    ``"no_cls"`` (image tokens cannot attend to [CLS]), ``"cls_no_image"`` ([CLS] cannot attend
    to image tokens), ``"within"`` (tokens inside ``token_mask`` attend only to tokens inside it),
    ``"none"``. Use :func:`attention_knockout` as a context manager (any forward, ``run_with_cache``
    or ``run_with_hooks`` inside it sees the knockout), or :func:`knockout_hooks` for a hook list.

Context ablation
    Remove tokens from the sequence after the position embeddings are added (prefix tokens are
    always kept): :func:`context_ablation` (``method="remove"`` shortens the sequence, every
    cached activation from ``hook_embed`` on then has only the kept positions;
    ``method="attention"`` keeps the sequence and stops every token from attending to the removed
    ones, which gives the same values for the kept tokens). What to keep is a boolean mask over the
    patch grid, which :func:`grid_mask_from_segmentation` (a segmentation image, resized to the
    grid by nearest neighbour) and :func:`grid_mask_from_box` (a box in pixels) build.
    :func:`context_comparison` runs the paper's comparisons: class-labelled tokens with vs
    without their context, and context tokens with vs without the class-labelled tokens, as the
    class identifiability of the kept tokens.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_lens.core import head_mask, position_mask, resolve_layers, resolve_targets
from vit_lens.core.errors import InputError, InputTypeError

__all__ = [
    "EDGE_SETS",
    "KnockoutMode",
    "ContextAblation",
    "attention_knockout",
    "context_ablation",
    "context_ablation_hooks",
    "context_comparison",
    "grid_mask_from_box",
    "grid_mask_from_segmentation",
    "knockout_edges",
    "knockout_hooks",
    "token_mask_from_grid",
]

KnockoutMode = Literal["mask", "paper"]
EDGE_SETS = ("none", "self_only", "no_cls", "cls_no_image", "within")
Heads = Union[None, int, Sequence[int], Mapping[int, Sequence[int]]]


# =============================================================================================
# masks over the patch grid
# =============================================================================================
def _cfg(model: Any):
    return getattr(model, "cfg", model)


def grid_mask_from_box(
    box: Sequence[float],
    model: Any,
    *,
    image_size: Optional[Tuple[int, int]] = None,
    min_overlap: float = 0.5,
) -> Bool[Tensor, "rows cols"]:
    """The patches covered by a box.

    Args:
        box: ``(x0, y0, x1, y1)`` in pixels (x to the right, y down; x1, y1 exclusive).
        model: the :class:`~vit_lens.HookedViT` (or its config).
        image_size: ``(height, width)`` of the image the box coordinates refer to; default the
            model's input size. Coordinates are scaled linearly to the input size, which is exact
            for ``model.preprocess(..., mode="paper")`` (a plain resize); with ``mode="timm"``
            the center crop moves things, so give the box in input pixels instead.
        min_overlap: a patch is in the box when at least this fraction of its area is inside
            (``0`` means any overlap at all).

    Returns:
        bool ``[rows, cols]`` over the patch grid.
    """
    cfg = _cfg(model)
    if len(box) != 4:
        raise InputError(f"box must be (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"box {tuple(box)} is empty: need x0 < x1 and y0 < y1 (pixels, y down)")
    H, W = cfg.image_size
    if image_size is not None:
        ih, iw = image_size
        x0, x1 = x0 * W / iw, x1 * W / iw
        y0, y1 = y0 * H / ih, y1 * H / ih
    ph, pw = cfg.patch_size
    rows, cols = cfg.grid_size
    r = torch.arange(rows, dtype=torch.float64)
    c = torch.arange(cols, dtype=torch.float64)
    oy = ((torch.clamp(r * ph + ph, max=y1) - torch.clamp(r * ph, min=y0)).clamp(min=0)) / ph
    ox = ((torch.clamp(c * pw + pw, max=x1) - torch.clamp(c * pw, min=x0)).clamp(min=0)) / pw
    frac = oy[:, None] * ox[None, :]
    return frac > 0 if min_overlap <= 0 else frac >= min_overlap - 1e-12


def grid_mask_from_segmentation(
    segmentation: Any,
    model: Any,
    *,
    label: Optional[Union[int, Sequence[int]]] = None,
    grid_size: Optional[Tuple[int, int]] = None,
) -> Bool[Tensor, "... rows cols"]:
    """A segmentation mask resized to the patch grid (nearest neighbour: each patch takes the
    label at its centre).

    Args:
        segmentation: a PIL image, an image file path, or an array / tensor ``[H, W]`` (or a
            batch ``[B, H, W]``) of labels or booleans. RGB images count a pixel as foreground
            when any channel is non-zero.
        model: the :class:`~vit_lens.HookedViT` (or its config).
        label: the label(s) that count as foreground; default every non-zero value.
        grid_size: (rows, cols) if not the model's native grid.

    Returns:
        bool ``[rows, cols]`` (or ``[B, rows, cols]``).
    """
    import numpy as np

    cfg = _cfg(model)
    seg = segmentation
    if isinstance(seg, (str, os.PathLike)):
        from PIL import Image

        with Image.open(seg) as im:
            seg = np.array(im)
    elif hasattr(seg, "mode") and hasattr(seg, "size") and not isinstance(seg, (Tensor, np.ndarray)):
        seg = np.array(seg)
    seg = torch.as_tensor(np.asarray(seg) if not isinstance(seg, Tensor) else seg)
    if seg.ndim == 3 and seg.shape[-1] in (3, 4) and not isinstance(segmentation, Tensor):
        seg = seg[..., :3].ne(0).any(-1) if label is None else seg[..., 0]
    if seg.ndim not in (2, 3):
        raise InputError(f"a segmentation must be [H, W] or [B, H, W], got shape {tuple(seg.shape)}")
    if label is None:
        fg = seg.ne(0) if seg.dtype != torch.bool else seg
    else:
        labels = torch.as_tensor(label).reshape(-1).to(seg.dtype)
        fg = torch.isin(seg, labels)
    rows, cols = grid_size or cfg.grid_size
    out = F.interpolate(fg.float().reshape(-1, 1, *fg.shape[-2:]), size=(rows, cols), mode="nearest-exact")
    out = out[:, 0] > 0.5
    return out[0] if fg.ndim == 2 else out


def token_mask_from_grid(
    grid_mask: Bool[Tensor, "... rows cols"],
    model: Any,
    *,
    prefix: bool = True,
) -> Bool[Tensor, "... pos"]:
    """A patch-grid mask ``[rows, cols]`` (or ``[B, rows, cols]``, or flat ``[..., n_patches]``)
    as a mask over the whole sequence; the prefix tokens get ``prefix``."""
    cfg = _cfg(model)
    g = torch.as_tensor(grid_mask)
    if g.dtype != torch.bool:
        raise InputTypeError(f"expected a boolean mask, got dtype {g.dtype}")
    rows, cols = cfg.grid_size
    if g.ndim >= 2 and tuple(g.shape[-2:]) == (rows, cols):
        flat = g.reshape(*g.shape[:-2], rows * cols)
    elif g.shape[-1] == cfg.n_patches:
        flat = g
    elif g.ndim >= 2:
        flat = g.reshape(*g.shape[:-2], -1)  # another grid size (dynamic image sizes)
    else:
        raise InputError(
            f"expected a patch-grid mask [{rows}, {cols}] or [{cfg.n_patches}] (optionally with a batch axis), "
            f"got {tuple(g.shape)}"
        )
    pre = torch.full((*flat.shape[:-1], cfg.n_prefix_tokens), prefix, dtype=torch.bool)
    return torch.cat([pre, flat.cpu()], dim=-1)


# =============================================================================================
# attention knockout
# =============================================================================================
def knockout_edges(
    model: Any,
    edges: Union[str, Tensor] = "self_only",
    *,
    token_mask: Optional[Tensor] = None,
    grid_size: Optional[Tuple[int, int]] = None,
) -> Bool[Tensor, "... query_pos key_pos"]:
    """The attention edges to remove, as a boolean ``[query_pos, key_pos]`` mask (True = removed).

    Args:
        model: the :class:`~vit_lens.HookedViT` (or its config).
        edges: a name or a boolean mask:

            * ``"self_only"``: image tokens attend only to themselves (not to other image tokens,
              not to prefix tokens); prefix tokens are unaffected.
            * ``"no_cls"``: image tokens cannot attend to [CLS].
            * ``"cls_no_image"``: [CLS] cannot attend to image tokens.
            * ``"within"``: tokens inside ``token_mask`` attend only to tokens inside it (tokens
              outside are unaffected).
            * ``"none"``: nothing removed.
            * a boolean tensor ``[query_pos, key_pos]`` or ``[batch, query_pos, key_pos]``,
              True = remove the edge.
        token_mask: for ``"within"``: a boolean mask over the sequence ``[pos]`` / ``[batch, pos]``,
            or over the patch grid ``[rows, cols]`` / ``[batch, rows, cols]`` (prefix tokens then
            count as inside).
        grid_size: (rows, cols) if not the model's native grid.

    Returns:
        bool ``[P, P]`` (or ``[batch, P, P]``), True where the edge is removed.
    """
    cfg = _cfg(model)
    rows, cols = grid_size or cfg.grid_size
    n_pre = cfg.n_prefix_tokens
    P = n_pre + rows * cols
    if isinstance(edges, Tensor):
        if edges.dtype != torch.bool:
            raise InputTypeError(f"an edge mask must be boolean (True = remove the edge), got dtype {edges.dtype}")
        if edges.ndim not in (2, 3) or tuple(edges.shape[-2:]) != (P, P):
            raise InputError(
                f"an edge mask must be [query_pos, key_pos] = [{P}, {P}] or [batch, {P}, {P}], got {tuple(edges.shape)}"
            )
        return edges
    if not isinstance(edges, str):
        raise InputTypeError(f"edges must be one of {EDGE_SETS} or a boolean tensor, got {type(edges).__name__}")
    is_img = torch.zeros(P, dtype=torch.bool)
    is_img[n_pre:] = True
    out = torch.zeros(P, P, dtype=torch.bool)
    if edges == "none":
        return out
    if edges == "self_only":
        return is_img[:, None] & ~torch.eye(P, dtype=torch.bool)
    if edges in ("no_cls", "cls_no_image"):
        if not cfg.has_class_token:
            raise InputError(f"{cfg.model_name} has no [CLS] token, so {edges!r} removes nothing; pick other edges")
        if edges == "no_cls":
            out[n_pre:, 0] = True
        else:
            out[0, n_pre:] = True
        return out
    if edges == "within":
        if token_mask is None:
            raise InputError("edges='within' needs token_mask (a boolean mask over positions or over the patch grid)")
        m = torch.as_tensor(token_mask)
        if m.shape[-1] != P:
            m = token_mask_from_grid(m, cfg, prefix=True) if (rows, cols) == tuple(cfg.grid_size) else _grid_tokens(m, n_pre)
        m = m.cpu()
        return m[..., :, None] & ~m[..., None, :]
    raise InputError(f"unknown edge set {edges!r}; choose one of {EDGE_SETS} or pass a boolean [query, key] mask")


def _grid_tokens(m: Tensor, n_pre: int) -> Tensor:
    flat = m.reshape(*m.shape[:-2], -1) if m.ndim >= 2 else m
    pre = torch.ones((*flat.shape[:-1], n_pre), dtype=torch.bool)
    return torch.cat([pre, flat], -1)


def _heads_for(model: Any, layers: List[int], heads: Heads) -> Dict[int, Optional[Tensor]]:
    """layer -> bool [n_heads] (None = all heads)."""
    if isinstance(heads, Mapping):
        L = model.cfg.n_layers
        per = {int(k) % L: v for k, v in heads.items()}
        unknown = set(per) - set(layers)
        if unknown:
            raise InputError(f"heads given for layers {sorted(unknown)} that are not knocked out (layers={layers})")
        return {l: head_mask(model, per[l]) if l in per else None for l in layers}
    return {l: head_mask(model, heads) for l in layers}


def _blocked_per_layer(
    model: Any, edges: Union[str, Tensor], layers: Any, heads: Heads, token_mask: Optional[Tensor],
    grid_size: Optional[Tuple[int, int]],
) -> Dict[int, Tensor]:
    """layer -> bool [batch or 1, heads or 1, P, P], True = edge removed (layers with no edge left out)."""
    blocked = knockout_edges(model, edges, token_mask=token_mask, grid_size=grid_size)
    if blocked.ndim == 2:
        blocked = blocked[None]
    blocked = blocked[:, None]  # [B|1, 1, P, P]
    layer_list = resolve_layers(layers, model, allow_empty=True)
    out = {}
    for l, h in _heads_for(model, layer_list, heads).items():
        b = blocked if h is None else blocked & h[None, :, None, None]
        if bool(b.any()):
            out[l] = b
    return out


class _ShapeGuard:
    """A forward pre-hook on an attention module that checks the knockout mask fits the run."""

    def __init__(self, shape: Tuple[int, ...], what: str):
        self.shape = shape
        self.what = what

    def __call__(self, module: Any, args: Tuple[Tensor, ...]) -> None:
        x = args[0]
        B, N = x.shape[0], x.shape[1]
        b, q, k = self.shape[0], self.shape[-2], self.shape[-1]
        if q not in (1, N) or k != N:
            raise InputError(
                f"the {self.what} mask is for {q} tokens but this run has {N}; build it for this "
                "image size (grid_size=...) or run images of the model's native size"
            )
        if b not in (1, B):
            raise InputError(f"the {self.what} mask has one entry per image for {b} images, but the batch has {B}")


@contextmanager
def _attn_masks(model: Any, allow: Dict[int, Tensor], what: str) -> Iterator[None]:
    """Set (AND with any existing) ``attn_mask`` on the given layers; restore on exit."""
    saved, handles = {}, []
    try:
        for l, a in allow.items():
            attn = model.blocks[l].attn
            a = a.to(next(model.parameters()).device)
            saved[l] = attn.attn_mask
            attn.attn_mask = a if attn.attn_mask is None else (attn.attn_mask & a)
            handles.append(attn.register_forward_pre_hook(_ShapeGuard(tuple(a.shape), what)))
        yield
    finally:
        for h in handles:
            h.remove()
        for l, prev in saved.items():
            model.blocks[l].attn.attn_mask = prev


def knockout_hooks(
    model: Any,
    edges: Union[str, Tensor] = "self_only",
    *,
    layers: Any = None,
    heads: Heads = None,
    mode: KnockoutMode = "mask",
    token_mask: Optional[Tensor] = None,
    grid_size: Optional[Tuple[int, int]] = None,
) -> List[Tuple[str, Any]]:
    """Attention knockout as a hook list for ``model.run_with_hooks`` / ``model.hooks``.

    ``mode="mask"`` hooks ``blocks.{l}.attn.hook_attn_scores`` (scores of removed edges -> -inf,
    then the usual softmax renormalises); ``mode="paper"`` hooks ``blocks.{l}.attn.hook_pattern``
    (probabilities of removed edges -> 0, no renormalisation). Both materialise the pattern;
    :func:`attention_knockout` with ``mode="mask"`` gives the same result with the fused kernel.
    Arguments as in :func:`attention_knockout`.
    """
    if mode not in ("mask", "paper"):
        raise InputError(f"mode must be 'mask' (-inf before the softmax) or 'paper' (zero after it), got {mode!r}")
    blocked = _blocked_per_layer(model, edges, layers, heads, token_mask, grid_size)
    hooks = []
    for l, b in blocked.items():
        if mode == "mask":

            def hook(scores: Tensor, hook: Any = None, *, _b=b) -> Tensor:
                _check_fit(_b, scores, "knockout")
                return scores.masked_fill(_b.to(scores.device), float("-inf"))

            hooks.append((f"blocks.{l}.attn.hook_attn_scores", hook))
            if bool(b.all(-1).any()):  # a query with no key left attends to nothing (as the fused path)

                def fix(pattern: Tensor, hook: Any = None) -> Tensor:
                    return torch.nan_to_num(pattern)

                hooks.append((f"blocks.{l}.attn.hook_pattern", fix))
        else:

            def hook(pattern: Tensor, hook: Any = None, *, _b=b) -> Tensor:
                _check_fit(_b, pattern, "knockout")
                return pattern.masked_fill(_b.to(pattern.device), 0.0)

            hooks.append((f"blocks.{l}.attn.hook_pattern", hook))
    return hooks


def _check_fit(mask: Tensor, x: Tensor, what: str) -> None:
    if mask.shape[-1] != x.shape[-1] or mask.shape[0] not in (1, x.shape[0]):
        raise InputError(
            f"the {what} mask {tuple(mask.shape)} does not fit attention of shape {tuple(x.shape)} "
            "(tokens per image and batch size must match)"
        )


@contextmanager
def attention_knockout(
    model: Any,
    edges: Union[str, Tensor] = "self_only",
    *,
    layers: Any = None,
    heads: Heads = None,
    mode: KnockoutMode = "mask",
    token_mask: Optional[Tensor] = None,
    grid_size: Optional[Tuple[int, int]] = None,
) -> Iterator[Any]:
    """Context manager: every forward pass inside it runs with the attention edges removed.

    Composes with ``model(...)``, ``run_with_cache`` (caches show the knocked-out pattern),
    ``run_with_hooks`` and with other knockouts (masks are combined). The model's weights are not
    touched; everything is undone on exit.

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        edges: which edges to remove (True = removed): a name from :data:`EDGE_SETS` or a
            boolean mask, see :func:`knockout_edges`.
        layers: layers to knock out (an int, a sequence, default all; negative from the end).
        heads: heads to knock out in each layer (a sequence, default all) or a dict
            ``{layer: heads}``.
        mode: ``"mask"`` (scores -inf before the softmax, rows renormalised; fused attention stays
            fused) or ``"paper"`` (probabilities zeroed after the softmax, not renormalised; uses a
            hook on ``hook_pattern``).
        token_mask: for ``edges="within"``.
        grid_size: (rows, cols) for images of another size than the model's native one.

    Yields:
        the model.

    Example::

        with attention_knockout(model, "self_only", mode="paper"):
            logits, cache = model.run_with_cache(images)
    """
    if mode not in ("mask", "paper"):
        raise InputError(f"mode must be 'mask' (-inf before the softmax) or 'paper' (zero after it), got {mode!r}")
    blocked = _blocked_per_layer(model, edges, layers, heads, token_mask, grid_size)
    if not blocked:  # nothing removed: the plain forward, exactly
        yield model
        return
    if mode == "mask":
        with _attn_masks(model, {l: ~b for l, b in blocked.items()}, "knockout"):
            yield model
    else:
        hooks = knockout_hooks(
            model, edges, layers=layers, heads=heads, mode="paper", token_mask=token_mask, grid_size=grid_size
        )
        with model.hooks(fwd_hooks=hooks):
            yield model


# =============================================================================================
# context ablation
# =============================================================================================
@dataclass
class ContextAblation:
    """What a :func:`context_ablation` keeps.

    Attributes:
        keep: bool ``[batch or 1, pos]`` over the original sequence (prefix tokens True).
        positions: ``[batch or 1, n_kept]`` original sequence index of every kept token, in order
            (with ``method="remove"`` position ``i`` of every cached activation is the original
            token ``positions[:, i]``; with ``method="attention"`` the sequence is unchanged).
        method: ``"remove"`` or ``"attention"``.
    """

    keep: Tensor
    positions: Tensor
    method: str

    def scatter(self, x: Tensor, fill: float = float("nan")) -> Tensor:
        """Put values over the kept positions ``[batch, n_kept, ...]`` back on the full sequence
        ``[batch, pos, ...]`` (``fill`` elsewhere)."""
        B, K = x.shape[0], x.shape[1]
        P = self.keep.shape[-1]
        out = torch.full((B, P, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        idx = self.positions.to(x.device).expand(B, K)
        idx = idx.reshape(B, K, *([1] * (x.ndim - 2))).expand_as(x)
        return out.scatter(1, idx, x)


def _keep_mask(model: Any, keep: Any) -> Tensor:
    """bool [B|1, P] from a grid / patch / sequence mask (prefix tokens always kept)."""
    cfg = model.cfg
    k = torch.as_tensor(keep)
    if k.dtype != torch.bool:
        raise InputTypeError(
            f"keep must be a boolean mask over the patch grid (True = keep), got dtype {k.dtype}; "
            "build one with grid_mask_from_box / grid_mask_from_segmentation"
        )
    if k.shape[-1] == cfg.n_ctx and not (k.ndim >= 2 and tuple(k.shape[-2:]) == tuple(cfg.grid_size)):
        tokens = k.clone().cpu()
        tokens[..., : cfg.n_prefix_tokens] = True
    else:
        tokens = token_mask_from_grid(k, cfg, prefix=True)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise InputError(f"keep must be [rows, cols] or [batch, rows, cols], got {tuple(k.shape)}")
    return tokens


def context_ablation_hooks(model: Any, keep: Any) -> Tuple[List[Tuple[str, Any]], ContextAblation]:
    """Hooks that remove the tokens not in ``keep`` from the sequence (``method="remove"``), for
    ``run_with_hooks``. Returns ``(hooks, info)``; see :func:`context_ablation`."""
    tokens = _keep_mask(model, keep)
    counts = tokens.sum(-1)
    if bool((counts != counts[0]).any()):
        raise InputError(
            f"method='remove' needs the same number of kept tokens in every image of the batch (got "
            f"{counts.tolist()}); run the images one at a time, group them by count, or use method='attention'"
        )
    K = int(counts[0])
    positions = torch.nonzero(tokens)[:, 1].reshape(tokens.shape[0], K)
    info = ContextAblation(keep=tokens, positions=positions, method="remove")

    def take(x: Tensor, hook: Any = None) -> Tensor:
        B, P = x.shape[0], x.shape[1]
        if P != tokens.shape[-1]:
            raise InputError(f"the keep mask covers {tokens.shape[-1]} tokens but this run has {P}")
        if positions.shape[0] not in (1, B):
            raise InputError(f"the keep mask has {positions.shape[0]} per-image masks but the batch has {B}")
        idx = positions.to(x.device).expand(B, K)
        return x.gather(1, idx[..., None].expand(B, K, x.shape[-1]))

    return [("hook_embed", take), ("hook_pos_embed", take)], info


@contextmanager
def context_ablation(
    model: Any,
    keep: Any,
    *,
    method: Literal["remove", "attention"] = "remove",
) -> Iterator[ContextAblation]:
    """Context manager: forward passes inside it see only the kept tokens.

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        keep: True = keep. A boolean mask over the patch grid ``[rows, cols]``, one per image
            ``[batch, rows, cols]``, over the patches ``[n_patches]``, or over the whole sequence
            ``[pos]``. Prefix tokens ([CLS], ...) are always kept. See
            :func:`grid_mask_from_box` and :func:`grid_mask_from_segmentation`.
        method: ``"remove"``: the tokens are cut out of the sequence right after the position
            embeddings are added (hooks on ``hook_embed`` and ``hook_pos_embed``), so every
            activation from there on -- and every cache -- has only the kept positions (the same
            number in every image of the batch). ``"attention"``: the sequence is kept whole and
            no token may attend to a removed one (an attention mask in every layer); the kept
            tokens get the same values as with ``"remove"``, and any batch of masks works. With
            average pooling the removed tokens still enter the mean with ``"attention"``.

    Yields:
        a :class:`ContextAblation` with the kept positions.
    """
    if method == "remove":
        hooks, info = context_ablation_hooks(model, keep)
        if bool(info.keep.all()):  # keeping everything: the plain forward, exactly
            yield info
            return
        with model.hooks(fwd_hooks=hooks):
            yield info
    elif method == "attention":
        tokens = _keep_mask(model, keep)
        counts = tokens.sum(-1)
        positions = torch.nonzero(tokens)[:, 1]
        if bool((counts == counts[0]).all()):
            positions = positions.reshape(tokens.shape[0], int(counts[0]))
        info = ContextAblation(keep=tokens, positions=positions, method="attention")
        if bool(tokens.all()):
            yield info
            return
        allow = tokens[:, None, None, :]  # [B|1, 1, 1, P]: every query may attend to kept keys only
        with _attn_masks(model, {l: allow for l in range(model.cfg.n_layers)}, "context-ablation"):
            yield info
    else:
        raise InputError(f"method must be 'remove' or 'attention', got {method!r}")


def context_comparison(
    model: Any,
    images: Float[Tensor, "batch chans height width"],
    classes: Any,
    class_masks: Any,
    *,
    layers: Optional[Sequence[int]] = None,
    method: Literal["remove", "attention"] = "remove",
    progress: bool = True,
):
    """The paper's context experiments, as class identifiability of the kept tokens.

    For every image, four conditions: the class-labelled tokens (``class_masks``) with their
    context (plain run) and without it (only they and the prefix tokens are kept); the context
    tokens (the rest) with the class-labelled tokens and without them.

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        images: a preprocessed batch ``[batch, chans, H, W]``.
        classes: the target class per image (an int or ``[batch]``).
        class_masks: bool ``[batch, rows, cols]`` (or one ``[rows, cols]`` for all), True on the
            class-labelled patches (e.g. from :func:`grid_mask_from_segmentation`).
        layers: blocks whose output is scored (default all).
        method: how tokens are removed (see :func:`context_ablation`).
        progress: show a tqdm bar.

    Returns:
        a tidy :class:`pandas.DataFrame` with columns ``image``, ``tokens`` (``"class"`` /
        ``"context"``), ``context`` (``"with"`` / ``"without"``), ``layer``, ``n_tokens``,
        ``identifiable_rate`` (fraction of the tokens whose top-1 class is the target) and
        ``mean_r`` (mean class identifiability ``1 - rank / n_classes``), with the projection and
        rank of :mod:`vit_lens.class_space` (``model.project_to_classes``, paper mode).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    cfg = model.cfg
    B = images.shape[0]
    L = cfg.n_layers
    layer_list = list(range(L)) if layers is None else [int(l) % L for l in layers]
    names = [f"blocks.{l}.hook_resid_post" for l in layer_list]
    c = resolve_targets(model, classes, B, images=images).cpu()
    m = torch.as_tensor(class_masks)
    if m.dtype != torch.bool:
        raise InputTypeError("class_masks must be boolean (True on the class-labelled patches)")
    grid = token_mask_from_grid(m, cfg, prefix=False)  # [B|1, P], prefix False
    if grid.ndim == 1:
        grid = grid[None]
    grid = grid.expand(B, -1)
    patches = position_mask(cfg, "patches")
    rows = []

    from vit_lens.class_space import class_rank

    def scores(imgs: Tensor, cls: Tensor) -> Tensor:  # rank of the target [b, layer, pos]
        _, cache = model.run_with_cache(imgs, names_filter=names, return_type=None)
        return torch.stack(
            [class_rank(model.project_to_classes(cache[n]), cls.to(imgs.device)[:, None]) for n in names], 1
        )

    with torch.inference_mode():
        full = scores(images, c).cpu()  # [B, layer, P]
        for i in tqdm(range(B), disable=not progress, desc="context comparison"):
            for tokens, sel in (("class", grid[i]), ("context", patches & ~grid[i])):
                n = int(sel.sum())
                if n == 0:
                    continue
                with_ctx = full[i][:, sel]  # [layer, n]
                with context_ablation(model, sel, method=method) as info:
                    s = scores(images[i : i + 1], c[i : i + 1]).cpu()[0]  # [layer, K or P]
                if method == "remove":
                    kept = info.positions[0]
                    without = s[:, sel[kept]]
                else:
                    without = s[:, sel]
                for cond, v in (("with", with_ctx), ("without", without)):
                    for j, l in enumerate(layer_list):
                        rows.append(
                            dict(
                                image=i,
                                tokens=tokens,
                                context=cond,
                                layer=l,
                                n_tokens=n,
                                identifiable_rate=float((v[j] == 0).float().mean()),
                                mean_r=float((1.0 - v[j].float() / cfg.n_classes).mean()),
                            )
                        )
    return pd.DataFrame(rows)
