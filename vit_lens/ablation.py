"""Attention knockout and context ablation.

Attention knockout
    Remove chosen attention edges (query token -> key token), in any subset of layers and heads.
    ``A`` below is a layer's softmaxed attention pattern ``[batch, head, query_pos, key_pos]``
    (``blocks.{l}.attn.hook_pattern``). Three modes:

    * ``"mask"`` (default): the scores of removed edges are set to ``-inf`` before the softmax, so
      every query's remaining attention is renormalised to sum to 1. Any edge set. Implemented with
      each attention module's ``attn_mask``, so the fused attention kernel keeps running unless the
      pattern itself is hooked (then the materialised path applies the same mask).
    * ``"paper"``: the edits Vilas et al. (2023) make to ``A`` after the softmax, for the edge sets
      the paper uses:

      - ``"self_only"``: every image-token query row is replaced by a one-hot on the diagonal
        (``A[t, :] = 0; A[t, t] = 1`` for every image token ``t``), so the edited rows sum to 1
        (this is the same pattern ``"mask"`` mode gives for these edges);
      - ``"no_cls"``: the [CLS] column of every image-token query is set to 0 (``A[t, 0] = 0``) and
        the row is not renormalised (it sums to ``1 - A[t, 0]`` of the plain run);
      - ``"none"``: nothing.

      A boolean edge mask equal to one of these edge sets (per image, too) gets that edit; any
      other edge set (``"cls_no_image"``, ``"within"``, other masks) is refused, since the paper
      defines no operation for it: use ``"mask"`` or ``"zero_edges"``. Implemented with a hook on
      ``blocks.{l}.attn.hook_pattern`` (which materialises the pattern).
    * ``"zero_edges"``: the probabilities of the removed edges are set to 0 after the softmax and
      nothing else changes: rows are not renormalised and no weight moves anywhere, so a query row
      sums to 1 minus the probability it lost (for ``"self_only"`` only ``A[t, t]`` is left, at
      its softmax value, so the rows sum to ``A[t, t]``, not 1). Any edge set. (Before the paper's
      one-hot edit was implemented, this was what ``mode="paper"`` computed.)

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

import difflib
import operator
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from vit_lens.core import Box, box_grid_mask, head_mask, int_list, position_mask, progress_bar, resolve_layers, resolve_targets
from vit_lens.core.errors import InputError, InputTypeError, OutOfRangeError
from vit_lens.core.selection import FwdHooks  # the type of knockout_hooks' result

if TYPE_CHECKING:  # pragma: no cover  (annotations only: no import cycle at run time)
    from vit_lens.config import HookedViTConfig
    from vit_lens.model import HookedViT

__all__ = [
    "EDGE_SETS",
    "KNOCKOUT_MODES",
    "PAPER_EDGE_SETS",
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

KnockoutMode = Literal["mask", "paper", "zero_edges"]
KNOCKOUT_MODES = ("mask", "paper", "zero_edges")
EDGE_SETS = ("none", "self_only", "no_cls", "cls_no_image", "within")
PAPER_EDGE_SETS = ("none", "self_only", "no_cls")  # the edge sets mode="paper" has a definition for
Heads = Union[None, int, Sequence[int], Mapping[int, Sequence[int]]]


# =============================================================================================
# masks over the patch grid
# =============================================================================================
def _cfg(model: Any):
    return getattr(model, "cfg", model)


def _grid(cfg: Any, grid_size: Any) -> Tuple[int, int]:
    """(rows, cols): ``grid_size`` checked, or the model's native grid."""
    if grid_size is None:
        return tuple(cfg.grid_size)
    try:
        rows, cols = (operator.index(v) for v in grid_size)
    except (TypeError, ValueError):
        raise InputTypeError(f"grid_size must be (rows, cols), two ints, got {grid_size!r}") from None
    if rows <= 0 or cols <= 0:
        raise InputError(f"grid_size must be two positive ints (rows, cols), got {grid_size!r}")
    return rows, cols


_MASK_HINT = "build one with grid_mask_from_box / grid_mask_from_segmentation"


def _bool_tensor(x: Any, what: str, meaning: str) -> Tensor:
    """``x`` as a boolean tensor, or an InputTypeError that says what to pass instead."""
    if x is None:
        raise InputTypeError(f"{what} is None: pass a boolean mask (True = {meaning}); {_MASK_HINT}")
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise InputTypeError(
            f"{what} must be a boolean mask (True = {meaning}), got {type(x).__name__}; {_MASK_HINT}"
        ) from None
    if t.dtype != torch.bool:
        raise InputTypeError(
            f"{what} must be a boolean mask (True = {meaning}), got dtype {t.dtype}; "
            f"{_MASK_HINT}, or compare a label map with a value (seg == label)"
        )
    return t


def grid_mask_from_box(
    box: Sequence[float],
    model: Union[HookedViT, HookedViTConfig],
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
    try:
        coords = list(box)
    except TypeError:
        raise InputTypeError(f"box must be four numbers (x0, y0, x1, y1) in pixels, got {box!r}") from None
    if len(coords) != 4:
        raise InputError(f"box must be (x0, y0, x1, y1), got {box!r}")
    return box_grid_mask(Box(coords[0], coords[1], coords[2], coords[3], image_size=image_size, min_overlap=min_overlap),
                         _cfg(model))


def grid_mask_from_segmentation(
    segmentation: Any,
    model: Union[HookedViT, HookedViTConfig],
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
    model: Union[HookedViT, HookedViTConfig],
    *,
    prefix: bool = True,
    grid_size: Optional[Tuple[int, int]] = None,
) -> Bool[Tensor, "... pos"]:
    """A patch-grid mask as a mask over the whole sequence; the prefix tokens get ``prefix``.

    Args:
        grid_mask: bool ``[rows, cols]``, ``[batch, rows, cols]``, ``[n_patches]`` or
            ``[batch, n_patches]`` (patches row by row).
        model: the :class:`~vit_lens.HookedViT` (or its config).
        prefix: the value of the prefix tokens ([CLS], ...).
        grid_size: (rows, cols) for images of another size than the model's native one.

    Returns:
        bool ``[pos]`` or ``[batch, pos]`` with ``pos = n_prefix_tokens + rows * cols``.

    Raises:
        InputError: for any other shape (a mask for another grid is never reshaped to fit).
    """
    cfg = _cfg(model)
    rows, cols = _grid(cfg, grid_size)
    g = _bool_tensor(grid_mask, "the patch-grid mask", "the patch is selected")
    shape = tuple(g.shape)
    if g.ndim in (2, 3) and shape[-2:] == (rows, cols):
        flat = g.reshape(*shape[:-2], rows * cols)
    elif g.ndim in (1, 2) and shape[-1] == rows * cols:
        flat = g
    else:
        raise InputError(
            f"expected a patch-grid mask [rows, cols] = [{rows}, {cols}] or [n_patches] = [{rows * cols}] "
            f"(optionally with a batch axis in front), got {shape}; build it for this model "
            "(grid_mask_from_box / grid_mask_from_segmentation), or pass grid_size= for images of another size"
        )
    pre = torch.full((*flat.shape[:-1], cfg.n_prefix_tokens), prefix, dtype=torch.bool)
    return torch.cat([pre, flat.cpu()], dim=-1)


# =============================================================================================
# attention knockout
# =============================================================================================
def knockout_edges(
    model: Union[HookedViT, HookedViTConfig],
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
            or over the patch grid ``[rows, cols]`` / ``[batch, rows, cols]`` / ``[n_patches]`` /
            ``[batch, n_patches]`` (prefix tokens then count as inside).
        grid_size: (rows, cols) if not the model's native grid.

    Returns:
        bool ``[P, P]`` (or ``[batch, P, P]``), True where the edge is removed.
    """
    cfg = _cfg(model)
    rows, cols = _grid(cfg, grid_size)
    n_pre = cfg.n_prefix_tokens
    P = n_pre + rows * cols
    if isinstance(edges, Tensor):
        if edges.dtype != torch.bool:
            raise InputTypeError(f"an edge mask must be boolean (True = remove the edge), got dtype {edges.dtype}")
        if edges.ndim not in (2, 3) or tuple(edges.shape[-2:]) != (P, P) or edges.shape[0] == 0:
            raise InputError(
                f"an edge mask must be [query_pos, key_pos] = [{P}, {P}] or [batch, {P}, {P}], got {tuple(edges.shape)}"
                + ("" if grid_size is not None else "; for images of another size pass grid_size=(rows, cols)")
            )
        return edges.cpu()
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
        m = _bool_tensor(token_mask, "token_mask", "the token is inside")
        is_grid = m.ndim in (2, 3) and tuple(m.shape[-2:]) == (rows, cols)
        if m.ndim in (1, 2) and m.shape[-1] == P and not is_grid:
            m = m.cpu()  # over the whole sequence
        else:
            m = token_mask_from_grid(m, cfg, prefix=True, grid_size=(rows, cols))
        if m.ndim == 2 and m.shape[0] == 0:
            raise InputError("token_mask has an empty batch axis; give one mask, or one per image")
        return m[..., :, None] & ~m[..., None, :]
    close = difflib.get_close_matches(edges, EDGE_SETS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InputError(f"unknown edge set {edges!r}; {hint}choose one of {EDGE_SETS} or pass a boolean [query, key] mask")


def _check_mode(mode: Any) -> None:
    if not isinstance(mode, str) or mode not in KNOCKOUT_MODES:
        raise InputError(
            f"mode must be 'mask' (scores -inf before the softmax, rows renormalised), 'paper' (the paper's "
            "edits: one-hot rows for 'self_only', the [CLS] column zeroed for 'no_cls') or 'zero_edges' "
            f"(removed probabilities zeroed after the softmax, not renormalised), got {mode!r}"
        )


def _heads_for(model: Any, layers: List[int], heads: Heads) -> Dict[int, Optional[Tensor]]:
    """layer -> bool [n_heads] (None = all heads); layer keys and head indices range-checked."""

    if isinstance(heads, Mapping):
        L = model.cfg.n_layers
        per = {}
        for key, v in heads.items():
            ks = int_list(key, "the layers (keys) of a heads dict")
            if len(ks) != 1:
                raise InputTypeError(f"a heads dict maps one layer (an int) to its heads, got the key {key!r}")
            k = ks[0]
            if not -L <= k < L:
                raise OutOfRangeError(
                    f"heads given for layer {k} out of range for a model with {L} blocks (0..{L - 1}); "
                    "give {layer: heads} for blocks that exist"
                )
            per[k % L] = v
        unknown = set(per) - set(layers)
        if unknown:
            raise InputError(f"heads given for layers {sorted(unknown)} that are not knocked out (layers={layers})")
        return {l: head_mask(model, per[l]) if l in per else None for l in layers}
    m = head_mask(model, heads)
    return {l: m for l in layers}


def _blocked_per_layer(
    model: Any, edges: Union[str, Tensor], layers: Any, heads: Heads, token_mask: Optional[Tensor],
    grid_size: Optional[Tuple[int, int]],
) -> Tuple[Dict[int, Tensor], Tuple[int, int, int]]:
    """(layer -> bool [batch or 1, heads or 1, P, P], True = edge removed (layers with no edge
    left out); the edge mask's shape (batch or 1, P, P) for the run-time checks)."""
    blocked = knockout_edges(model, edges, token_mask=token_mask, grid_size=grid_size)
    if blocked.ndim == 2:
        blocked = blocked[None]
    shape = cast(Tuple[int, int, int], tuple(blocked.shape))
    blocked = blocked[:, None]  # [B|1, 1, P, P]
    layer_list = resolve_layers(layers, model, allow_empty=True)
    out = {}
    for l, h in _heads_for(model, layer_list, heads).items():
        b = blocked if h is None else blocked & h[None, :, None, None]
        if bool(b.any()):
            out[l] = b
    return out, shape


def _paper_edits(
    model: Any, edges: Union[str, Tensor], token_mask: Optional[Tensor], grid_size: Optional[Tuple[int, int]]
) -> Tuple[Tensor, Tensor]:
    """The paper's edits for an edge set: ``(one_hot, zero)`` with ``one_hot`` bool ``[B|1, P]``
    (query rows replaced by a one-hot on the diagonal) and ``zero`` bool ``[B|1, P, P]`` (entries
    set to 0, rows not renormalised). Edge sets the paper has no operation for are refused."""
    cfg = _cfg(model)
    refuse = (
        "mode='paper' is the paper's operation and is defined only for the edge sets {sets}; {what} is none of "
        "them: use mode='mask' (scores -inf before the softmax, rows renormalised) or mode='zero_edges' "
        "(removed probabilities zeroed after the softmax, not renormalised)"
    )
    if isinstance(edges, str) and edges in EDGE_SETS and edges not in PAPER_EDGE_SETS:
        raise InputError(refuse.format(sets=PAPER_EDGE_SETS, what=f"edges={edges!r}"))
    blocked = knockout_edges(model, edges, token_mask=token_mask, grid_size=grid_size)
    b = blocked if blocked.ndim == 3 else blocked[None]
    B, P = b.shape[0], b.shape[-1]
    self_only = knockout_edges(cfg, "self_only", grid_size=grid_size)
    no_cls = knockout_edges(cfg, "no_cls", grid_size=grid_size) if cfg.has_class_token else None
    is_img = torch.zeros(P, dtype=torch.bool)
    is_img[cfg.n_prefix_tokens:] = True
    one_hot = torch.zeros(B, P, dtype=torch.bool)
    zero = torch.zeros(B, P, P, dtype=torch.bool)
    for i in range(B):
        if not bool(b[i].any()):
            continue
        if torch.equal(b[i], self_only):
            one_hot[i] = is_img
        elif no_cls is not None and torch.equal(b[i], no_cls):
            zero[i] = no_cls
        else:
            what = "this edge mask" + (f" (image {i})" if B > 1 else "")
            raise InputError(refuse.format(sets=PAPER_EDGE_SETS, what=what))
    return one_hot, zero


def _paper_per_layer(
    model: Any, edges: Union[str, Tensor], layers: Any, heads: Heads, token_mask: Optional[Tensor],
    grid_size: Optional[Tuple[int, int]],
) -> Tuple[Dict[int, Tuple[Tensor, Tensor]], Tuple[int, int, int]]:
    """layer -> (one_hot bool [B|1, H|1, P], zero bool [B|1, H|1, P, P]), layers with no edit left out."""
    one_hot, zero = _paper_edits(model, edges, token_mask, grid_size)
    shape = cast(Tuple[int, int, int], tuple(zero.shape))
    one_hot, zero = one_hot[:, None], zero[:, None]
    out = {}
    for l, h in _heads_for(model, resolve_layers(layers, model, allow_empty=True), heads).items():
        oh = one_hot if h is None else one_hot & h[None, :, None]
        z = zero if h is None else zero & h[None, :, None, None]
        if bool(oh.any()) or bool(z.any()):
            out[l] = (oh, z)
    return out, shape


class _ShapeGuard:
    """A forward pre-hook on an attention module that checks a mask fits the run."""

    def __init__(self, shape: Tuple[int, ...], what: str):
        self.shape = shape
        self.what = what

    def __call__(self, module: Any, args: Tuple[Tensor, ...]) -> None:
        x = args[0]
        _check_run(self.shape[0], self.shape[-1], x.shape[0], x.shape[1], self.what)


def _check_run(mask_batch: int, mask_tokens: int, batch: int, tokens: int, what: str) -> None:
    """Refuse a run whose batch size or tokens per image do not fit a mask."""
    if mask_tokens != tokens:
        raise InputError(
            f"the {what} mask is for {mask_tokens} tokens per image but this run has {tokens}; build it for "
            "this image size (grid_size=(rows, cols)) or run images of the model's native size"
        )
    if mask_batch not in (1, batch):
        raise InputError(
            f"the {what} mask has {mask_batch} per-image masks (one entry per image for {mask_batch} images), "
            f"but the batch has {batch}; "
            "give one mask for all images or exactly one per image"
        )


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


@contextmanager
def _guard_only(model: Any, shape: Tuple[int, ...], what: str) -> Iterator[None]:
    """Only the run-time check of a mask that edits nothing (so a misfit mask is refused anyway)."""
    handle = model.blocks[0].attn.register_forward_pre_hook(_ShapeGuard(shape, what)) if model.cfg.n_layers else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _fit_hook(shape: Tuple[int, ...], what: str) -> Any:
    """A ``hook_embed`` hook ([B, P, D]) that checks a mask of shape ``(batch or 1, ..., P)`` fits the run."""

    def check(x: Tensor, hook: Any = None) -> None:
        _check_run(shape[0], shape[-1], x.shape[0], x.shape[1], what)

    return check


def knockout_hooks(
    model: HookedViT,
    edges: Union[str, Tensor] = "self_only",
    *,
    layers: Any = None,
    heads: Heads = None,
    mode: KnockoutMode = "mask",
    token_mask: Optional[Tensor] = None,
    grid_size: Optional[Tuple[int, int]] = None,
) -> FwdHooks:
    """Attention knockout as a hook list for ``model.run_with_hooks`` / ``model.hooks``.

    ``mode="mask"`` hooks ``blocks.{l}.attn.hook_attn_scores`` (scores of removed edges -> -inf,
    then the usual softmax renormalises); ``mode="paper"`` hooks ``blocks.{l}.attn.hook_pattern``
    with the paper's edits (``"self_only"``: image-token rows -> one-hot on the diagonal;
    ``"no_cls"``: ``A[t, 0] -> 0``, not renormalised); ``mode="zero_edges"`` hooks
    ``hook_pattern`` too (probabilities of removed edges -> 0, nothing else changes). All of them
    materialise the pattern; :func:`attention_knockout` with ``mode="mask"`` gives the same result
    with the fused kernel. Arguments as in :func:`attention_knockout`.

    Returns:
        ``[(hook_name, hook_fn), ...]``; empty when nothing is removed (a per-image edge mask
        that removes nothing still gets a ``hook_embed`` hook that checks the batch size).
    """
    _check_mode(mode)
    edits: Dict[int, Any]  # layer -> bool mask, or (one_hot, zero) in mode "paper"
    if mode == "paper":
        edits, shape = _paper_per_layer(model, edges, layers, heads, token_mask, grid_size)
    else:
        edits, shape = _blocked_per_layer(model, edges, layers, heads, token_mask, grid_size)
    if not edits:
        return [("hook_embed", _fit_hook(shape, "knockout"))] if shape[0] > 1 else []
    hooks: FwdHooks = []
    e: Any  # a bool mask, or (one_hot, zero) in mode "paper"
    for l, e in edits.items():
        if mode == "mask":

            def mask_hook(scores: Tensor, hook: Any = None, *, _b=e) -> Tensor:
                _check_fit(_b, scores, "knockout")
                return scores.masked_fill(_b.to(scores.device), float("-inf"))

            hooks.append((f"blocks.{l}.attn.hook_attn_scores", mask_hook))
            if bool(e.all(-1).any()):  # a query with no key left attends to nothing (as the fused path)

                def fix(pattern: Tensor, hook: Any = None) -> Tensor:
                    return torch.nan_to_num(pattern)

                hooks.append((f"blocks.{l}.attn.hook_pattern", fix))
        elif mode == "zero_edges":

            def zero_hook(pattern: Tensor, hook: Any = None, *, _b=e) -> Tensor:
                _check_fit(_b, pattern, "knockout")
                return pattern.masked_fill(_b.to(pattern.device), 0.0)

            hooks.append((f"blocks.{l}.attn.hook_pattern", zero_hook))
        else:
            oh, z = e

            def hook(
                pattern: Tensor, hook: Any = None, *, _oh=oh, _z=z, _any_oh=bool(oh.any()), _any_z=bool(z.any())
            ) -> Tensor:
                _check_fit(_z, pattern, "knockout")
                out = pattern
                if _any_z:  # A[t, k] = 0 for the removed edges, no renormalisation
                    out = out.masked_fill(_z.to(pattern.device), 0.0)
                if _any_oh:  # A[t, :] = 0; A[t, t] = 1
                    eye = torch.eye(pattern.shape[-2], pattern.shape[-1], dtype=pattern.dtype, device=pattern.device)
                    out = torch.where(_oh.to(pattern.device)[..., None], eye, out)
                return out

            hooks.append((f"blocks.{l}.attn.hook_pattern", hook))
    return hooks


def _check_fit(mask: Tensor, x: Tensor, what: str) -> None:
    """mask [B|1, H|1, P, P] against attention [batch, heads, P, P]."""
    _check_run(mask.shape[0], mask.shape[-1], x.shape[0], x.shape[-1], what)


@contextmanager
def attention_knockout(
    model: HookedViT,
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
    ``run_with_hooks`` and with other knockouts (masks are combined; paper-mode edits are applied
    one after the other). The model's weights are not touched; everything is undone on exit.

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        edges: which edges to remove (True = removed): a name from :data:`EDGE_SETS` or a
            boolean mask ``[P, P]`` / ``[batch, P, P]``, see :func:`knockout_edges`.
        layers: layers to knock out (an int, a sequence, default all; negative from the end).
        heads: heads to knock out in each layer (a sequence, default all) or a dict
            ``{layer: heads}``.
        mode: on the softmaxed pattern ``A`` ``[batch, head, query, key]``:

            * ``"mask"``: scores of removed edges -inf before the softmax, rows renormalised (any
              edges; the fused attention stays fused).
            * ``"paper"``: the paper's edits (Vilas et al. 2023), only for :data:`PAPER_EDGE_SETS`:
              ``"self_only"``: every image-token row becomes a one-hot on the diagonal
              (``A[t, :] = 0; A[t, t] = 1``; rows sum to 1); ``"no_cls"``: ``A[t, 0] = 0`` for
              every image token ``t``, not renormalised. Other edges are refused.
            * ``"zero_edges"``: ``A`` of removed edges set to 0, nothing else changed (rows sum
              to 1 minus what they lost; any edges).

            ``"paper"`` and ``"zero_edges"`` hook ``hook_pattern``.
        token_mask: for ``edges="within"``.
        grid_size: (rows, cols) for images of another size than the model's native one.

    Yields:
        the model.

    Raises:
        InputError / InputTypeError / OutOfRangeError: for unknown edge sets or modes, edge masks
        of the wrong shape or dtype, layers or heads that do not exist, edges the paper defines
        no operation for (``mode="paper"``); inside, for a run whose batch size or image size
        does not fit a per-image or ``grid_size`` mask.

    Example::

        with attention_knockout(model, "self_only", mode="paper"):
            logits, cache = model.run_with_cache(images)
    """
    _check_mode(mode)
    edits: Dict[int, Any]  # layer -> bool mask, or (one_hot, zero) in mode "paper"
    if mode == "paper":
        edits, shape = _paper_per_layer(model, edges, layers, heads, token_mask, grid_size)
    else:
        edits, shape = _blocked_per_layer(model, edges, layers, heads, token_mask, grid_size)
    if not edits:  # nothing removed: the plain forward, exactly (a per-image mask's fit is still checked)
        if shape[0] > 1:
            with _guard_only(model, shape, "knockout"):
                yield model
        else:
            yield model
        return
    if mode == "mask":
        with _attn_masks(model, {l: ~cast(Tensor, b) for l, b in edits.items()}, "knockout"):
            yield model
    else:
        hooks = knockout_hooks(
            model, edges, layers=layers, heads=heads, mode=mode, token_mask=token_mask, grid_size=grid_size
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


def _keep_mask(model: Any, keep: Any, grid_size: Optional[Tuple[int, int]] = None) -> Tensor:
    """bool [B|1, P] from a grid / patch / sequence mask (prefix tokens always kept).

    Accepted shapes (rows, cols = ``grid_size`` or the model's grid; P = prefix tokens + patches):
    ``[rows, cols]``, ``[batch, rows, cols]``, ``[n_patches]``, ``[batch, n_patches]``, ``[P]``,
    ``[batch, P]``. Anything else is refused, whatever its values."""
    cfg = _cfg(model)
    rows, cols = _grid(cfg, grid_size)
    n_pre, n_patch = cfg.n_prefix_tokens, rows * cols
    P = n_pre + n_patch
    k = _bool_tensor(keep, "keep", "keep the token")
    shape = tuple(k.shape)
    if k.ndim in (2, 3) and shape[-2:] == (rows, cols):
        tokens = token_mask_from_grid(k, cfg, prefix=True, grid_size=(rows, cols))
    elif k.ndim in (1, 2) and shape[-1] == n_patch:
        tokens = token_mask_from_grid(k, cfg, prefix=True, grid_size=(rows, cols))
    elif k.ndim in (1, 2) and shape[-1] == P:
        tokens = k.clone().cpu()
        tokens[..., :n_pre] = True
    else:
        seq = f", the whole sequence [{P}]" if n_pre else ""
        raise InputError(
            f"keep has shape {shape}, but for this model (a {rows} x {cols} patch grid, {n_pre} prefix token(s)) it "
            f"must be the patch grid [rows, cols] = [{rows}, {cols}], the patches [n_patches] = [{n_patch}]{seq}, "
            "each optionally with a batch axis in front ([batch, ...]); build it with grid_mask_from_box / "
            "grid_mask_from_segmentation for this model, or pass grid_size=(rows, cols) for images of another size"
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[0] == 0:
        raise InputError("keep has an empty batch axis ([0, ...]); give one mask for all images or one per image")
    return tokens


def _check_something_left(cfg: Any, tokens: Tensor, method: str) -> None:
    """Refuse masks that leave the classifier nothing to read."""
    n_pre = cfg.n_prefix_tokens
    patches_kept = tokens[:, n_pre:].sum(-1)
    empty = torch.nonzero(patches_kept == 0).reshape(-1).tolist()
    if not empty:
        return
    which = "the keep mask" if tokens.shape[0] == 1 else f"the keep mask of image(s) {empty}"
    if n_pre == 0:
        raise InputError(
            f"{which} keeps no token at all and this model has no prefix tokens, so nothing is left to classify "
            "from; keep at least one patch"
        )
    if cfg.pooling in ("avg", "token_avg") and method == "remove":
        raise InputError(
            f"{which} keeps no patch, but this model's classifier averages the patch tokens (pooling={cfg.pooling!r}), "
            "so the mean it reads is undefined; keep at least one patch"
        )


def context_ablation_hooks(
    model: HookedViT, keep: Any, *, grid_size: Optional[Tuple[int, int]] = None
) -> Tuple[FwdHooks, ContextAblation]:
    """Hooks that remove the tokens not in ``keep`` from the sequence (``method="remove"``), for
    ``run_with_hooks``. Returns ``(hooks, info)``; see :func:`context_ablation`. The hooks refuse
    a run whose batch size or tokens per image do not fit ``keep``."""
    tokens = _keep_mask(model, keep, grid_size)
    _check_something_left(model.cfg, tokens, "remove")
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
        _check_run(tokens.shape[0], tokens.shape[-1], B, P, "keep")
        idx = positions.to(x.device).expand(B, K)
        return x.gather(1, idx[..., None].expand(B, K, x.shape[-1]))

    return [("hook_embed", take), ("hook_pos_embed", take)], info


@contextmanager
def context_ablation(
    model: HookedViT,
    keep: Any,
    *,
    method: Literal["remove", "attention"] = "remove",
    grid_size: Optional[Tuple[int, int]] = None,
) -> Iterator[ContextAblation]:
    """Context manager: forward passes inside it see only the kept tokens.

    Args:
        model: the :class:`~vit_lens.HookedViT`.
        keep: True = keep. A boolean mask over the patch grid ``[rows, cols]``, one per image
            ``[batch, rows, cols]``, over the patches ``[n_patches]`` / ``[batch, n_patches]``,
            or over the whole sequence ``[pos]`` / ``[batch, pos]``. Prefix tokens ([CLS], ...)
            are always kept. A mask of any other shape is refused (also one that keeps or
            removes everything). See :func:`grid_mask_from_box` and
            :func:`grid_mask_from_segmentation`.
        method: ``"remove"``: the tokens are cut out of the sequence right after the position
            embeddings are added (hooks on ``hook_embed`` and ``hook_pos_embed``), so every
            activation from there on -- and every cache -- has only the kept positions (the same
            number in every image of the batch). ``"attention"``: the sequence is kept whole and
            no token may attend to a removed one (an attention mask in every layer); the kept
            tokens get the same values as with ``"remove"``, and any batch of masks works. With
            average pooling the removed tokens still enter the mean with ``"attention"``.
        grid_size: (rows, cols) of the images that will be run, if not the model's native grid
            (models with ``dynamic_img_size``).

    Yields:
        a :class:`ContextAblation` with the kept positions.

    Raises:
        InputError / InputTypeError: for a mask that is not boolean, has the wrong shape or an
        empty batch axis, or leaves nothing to classify from (no token at all; no patch when
        the classifier averages patches and ``method="remove"``); an unknown ``method``. Inside,
        for a run whose batch size (per-image masks) or tokens per image do not fit ``keep``.
        Keeping only the prefix tokens of a [CLS]-pooled model is allowed (the [CLS] then reads
        only the prefix tokens).
    """
    if method not in ("remove", "attention"):
        raise InputError(f"method must be 'remove' or 'attention', got {method!r}")
    if method == "remove":
        hooks, info = context_ablation_hooks(model, keep, grid_size=grid_size)
        if bool(info.keep.all()):  # keeping everything: the plain forward, exactly (the fit still checked)
            hooks = [("hook_embed", _fit_hook(tuple(info.keep.shape), "keep"))]
        with model.hooks(fwd_hooks=hooks):
            yield info
    else:
        tokens = _keep_mask(model, keep, grid_size)
        _check_something_left(model.cfg, tokens, "attention")
        counts = tokens.sum(-1)
        positions = torch.nonzero(tokens)[:, 1]
        if bool((counts == counts[0]).all()):
            positions = positions.reshape(tokens.shape[0], int(counts[0]))
        info = ContextAblation(keep=tokens, positions=positions, method="attention")
        if bool(tokens.all()):
            with model.hooks(fwd_hooks=[("hook_embed", _fit_hook(tuple(tokens.shape), "keep"))]):
                yield info
            return
        allow = tokens[:, None, None, :]  # [B|1, 1, 1, P]: every query may attend to kept keys only
        with _attn_masks(model, {l: allow for l in range(model.cfg.n_layers)}, "keep"):
            yield info


def context_comparison(
    model: HookedViT,
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

    cfg = model.cfg
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise InputTypeError(
            "images must be a preprocessed batch tensor [batch, chans, H, W] (model.preprocess(paths)), got "
            + (f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__)
        )
    B = images.shape[0]
    if B == 0:
        raise InputError("images is an empty batch [0, ...]; give at least one image")
    layer_list = resolve_layers(layers, model)
    names = [f"blocks.{l}.hook_resid_post" for l in layer_list]
    c = resolve_targets(model, classes, B, images=images).cpu()
    m = _bool_tensor(class_masks, "class_masks", "a class-labelled patch")
    grid = token_mask_from_grid(m, cfg, prefix=False)  # [B|1, P], prefix False; refuses other shapes
    if grid.ndim == 1:
        grid = grid[None]
    if grid.shape[0] not in (1, B):
        raise InputError(
            f"class_masks has {grid.shape[0]} per-image masks for a batch of {B} images; give one mask for all "
            "images or exactly one per image"
        )
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
        for i in progress_bar(range(B), progress=progress, desc="context comparison"):
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
