"""Positions: one vocabulary for choosing tokens, and the patch grid.

Token layout: positions ``0 .. n_prefix - 1`` are the prefix tokens ([CLS], distillation,
registers, in timm's order), then the ``rows * cols`` patch tokens in row-major order.

Every public function that takes ``positions=`` accepts the same values (:data:`Positions`):

* ``"all"`` every position; ``"patches"`` (alias ``"image"``) the patch tokens; ``"prefix"`` the
  prefix tokens; ``"cls"`` the [CLS] token (an error for models without one);
* an int, or a sequence of ints (negative values count from the end of the sequence);
* a boolean tensor over the sequence ``[pos]``, over the patches ``[n_patches]`` or the patch grid
  ``[rows, cols]``; with a batch, one mask per image ``[batch, pos]`` / ``[batch, n_patches]`` /
  ``[batch, rows, cols]``;
* a pixel box :class:`Box` ``(x0, y0, x1, y1)``: the patches it covers.

``None`` means ``"all"`` (no restriction); each function documents its own default.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from vit_lens.core.errors import InputError, InputTypeError, OutOfRangeError

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = ["Box", "Positions", "TokenLayout", "box_grid_mask", "grid_of", "position_labels", "position_mask"]

POSITION_NAMES = ("all", "patches", "image", "prefix", "cls")


@dataclass(frozen=True)
class Box:
    """A pixel box ``(x0, y0, x1, y1)`` (x to the right, y down; x1, y1 exclusive).

    Attributes:
        image_size: ``(height, width)`` of the image the coordinates refer to; default the model's
            input size. Coordinates are scaled linearly, which is exact for a plain resize
            (``preprocess(..., mode="paper")``); after timm's center crop give input pixels.
        min_overlap: a patch is covered when at least this fraction of its area is inside the box
            (0: any overlap).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    image_size: Optional[Tuple[int, int]] = None
    min_overlap: float = 0.5


Positions = Union[None, str, int, Sequence[int], Tensor, Box]


@dataclass(frozen=True)
class TokenLayout:
    """How a token sequence is laid out: prefix tokens, then a ``rows x cols`` grid of patches."""

    n_prefix: int
    grid: Tuple[int, int]
    prefix_names: Tuple[str, ...] = ()
    patch_size: Optional[Tuple[int, int]] = None
    image_size: Optional[Tuple[int, int]] = None

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_pos(self) -> int:
        return self.n_prefix + self.n_patches

    @property
    def has_class_token(self) -> bool:
        if self.prefix_names:
            return self.prefix_names[0] == "CLS"
        return self.n_prefix > 0  # a layout known by counts: position 0 is taken to be [CLS]

    @classmethod
    def of(cls, model: Any, grid: Optional[Tuple[int, int]] = None) -> "TokenLayout":
        """The layout of a model (or config) at its native grid, or at ``grid``."""
        cfg = getattr(model, "cfg", model)
        g = tuple(grid) if grid is not None else tuple(cfg.grid_size)
        ph, pw = cfg.patch_size
        return cls(cfg.n_prefix_tokens, (int(g[0]), int(g[1])), tuple(cfg.prefix_token_names),
                   (ph, pw), (int(g[0]) * ph, int(g[1]) * pw))

    @classmethod
    def for_positions(cls, model: Any, n_pos: int) -> "TokenLayout":
        """The layout of a model's sequence of ``n_pos`` tokens (native grid, a square grid, or -- for
        other sizes -- a layout by counts, which still resolves names, indices and flat masks)."""
        cfg = getattr(model, "cfg", model)
        try:
            return cls.of(model, grid_of(model, n_pos))
        except InputError:
            return cls.from_counts(cfg.n_prefix_tokens, n_pos, cfg.prefix_token_names)

    @classmethod
    def from_counts(cls, n_prefix: int, n_pos: int, prefix_names: Sequence[str] = ()) -> "TokenLayout":
        """A layout known only by its counts (result objects): the grid is square when it can be."""
        n_patch = max(n_pos - n_prefix, 0)
        side = int(round(math.sqrt(n_patch)))
        grid = (side, side) if side * side == n_patch else (1, n_patch)
        return cls(n_prefix, grid, tuple(prefix_names))


def _layout(where: Any, grid_size: Optional[Tuple[int, int]] = None) -> TokenLayout:
    if isinstance(where, TokenLayout):
        return where if grid_size is None else TokenLayout(where.n_prefix, tuple(grid_size), where.prefix_names,  # type: ignore[arg-type]
                                                           where.patch_size, where.image_size)
    return TokenLayout.of(where, grid_size)


def grid_of(model: Any, x: Union[Tensor, int]) -> Tuple[int, int]:
    """The patch grid ``(rows, cols)`` of a batch of images ``[batch, chans, H, W]`` or of a token
    sequence of ``x`` positions (an int).

    Images are checked as the forward checks them (size, channels). A sequence length other than
    the native one is resolved only when its patches form a square grid.
    """
    cfg = getattr(model, "cfg", model)
    if isinstance(x, Tensor):
        return tuple(model._check_images(x))
    if isinstance(x, (bool, str, bytes)) or not isinstance(x, (int, float)) and not hasattr(x, "__index__"):
        raise InputTypeError(
            f"expected a preprocessed batch of images [batch, chans, H, W] (model.preprocess(...)) or a number of "
            f"positions, got {type(x).__name__}"
        )
    n_pos = int(x)
    if n_pos == cfg.n_ctx:
        return tuple(cfg.grid_size)
    n_patch = n_pos - cfg.n_prefix_tokens
    side = int(round(math.sqrt(max(n_patch, 0))))
    if n_patch > 0 and side * side == n_patch:
        return (side, side)
    raise InputError(
        f"cannot infer the patch grid for {n_pos} positions ({cfg.n_prefix_tokens} prefix tokens); pass images of "
        f"the model's native size {cfg.image_size} (or square images)"
    )


def position_labels(model: Any, grid_size: Optional[Tuple[int, int]] = None) -> List[str]:
    """One label per sequence position: the prefix token names, then ``"row,col"`` per patch."""
    lay = _layout(model, grid_size)
    rows, cols = lay.grid
    names = list(lay.prefix_names) or [f"PRE{i}" for i in range(lay.n_prefix)]
    return names + [f"{r},{c}" for r in range(rows) for c in range(cols)]


def box_grid_mask(box: Box, model: Any, grid_size: Optional[Tuple[int, int]] = None) -> Bool[Tensor, "rows cols"]:
    """The patches a :class:`Box` covers, as a bool ``[rows, cols]`` grid."""
    lay = _layout(model, grid_size)
    if lay.patch_size is None:
        raise InputError("a pixel box needs the model's patch size: pass the model, not a bare layout")
    given = (box.x0, box.y0, box.x1, box.y1)
    try:
        x0, y0, x1, y1 = (float(v) for v in given)
    except (TypeError, ValueError):
        raise InputTypeError(f"box must be four numbers (x0, y0, x1, y1) in pixels, got {given!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"box {given} has a non-finite coordinate; give four finite pixel coordinates")
    if not 0.0 <= float(box.min_overlap) <= 1.0:
        raise InputError(f"min_overlap is a fraction of a patch's area, in [0, 1]; got {box.min_overlap!r}")
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"box {given} is empty: need x0 < x1 and y0 < y1 (pixels, y down)")
    ph, pw = lay.patch_size
    rows, cols = lay.grid
    H, W = rows * ph, cols * pw
    if box.image_size is not None:
        ih, iw = box.image_size
        x0, x1 = x0 * W / iw, x1 * W / iw
        y0, y1 = y0 * H / ih, y1 * H / ih
    r = torch.arange(rows, dtype=torch.float64)
    c = torch.arange(cols, dtype=torch.float64)
    oy = ((torch.clamp(r * ph + ph, max=y1) - torch.clamp(r * ph, min=y0)).clamp(min=0)) / ph
    ox = ((torch.clamp(c * pw + pw, max=x1) - torch.clamp(c * pw, min=x0)).clamp(min=0)) / pw
    frac = oy[:, None] * ox[None, :]
    return frac > 0 if box.min_overlap <= 0 else frac >= box.min_overlap - 1e-12


def position_mask(
    model: Any,
    positions: Positions = None,
    *,
    batch: Optional[int] = None,
    grid_size: Optional[Tuple[int, int]] = None,
) -> Union[Bool[Tensor, "pos"], Bool[Tensor, "batch pos"]]:
    """Any way of naming positions (see the module docs) as a boolean mask over the sequence.

    Args:
        model: a :class:`~vit_lens.HookedViT`, its config, or a :class:`TokenLayout`.
        positions: what to select; ``None`` means every position.
        batch: give it to accept (and get) one mask per image: the result is then
            ``[batch, pos]`` (shared selections are expanded).
        grid_size: ``(rows, cols)`` if not the model's native grid.

    Returns:
        bool ``[pos]`` (or ``[batch, pos]`` when ``batch`` is given), on the CPU.
    """
    lay = _layout(model, grid_size)
    m = _mask(lay, positions, batch)
    if batch is not None and m.ndim == 1:
        return m.expand(batch, lay.n_pos).clone()
    return m


def _mask(lay: TokenLayout, positions: Positions, batch: Optional[int]) -> Tensor:
    n_pre, n = lay.n_prefix, lay.n_pos
    rows, cols = lay.grid
    mask = torch.zeros(n, dtype=torch.bool)
    if positions is None:
        return ~mask
    if isinstance(positions, str):
        key = positions.strip().lower()
        if key == "all":
            return ~mask
        if key in ("patches", "image"):
            mask[n_pre:] = True
            return mask
        if key == "prefix":
            mask[:n_pre] = True
            return mask
        if key == "cls":
            if not lay.has_class_token:
                raise InputError("positions='cls': this model has no [CLS] token; choose positions by index or 'prefix'")
            mask[0] = True
            return mask
        raise InputError(
            f"unknown positions {positions!r}; use one of {list(POSITION_NAMES)}, indices, a boolean mask or a Box"
        )
    if isinstance(positions, Box):
        mask[n_pre:] = box_grid_mask(positions, lay).reshape(-1)
        return mask
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        return _bool_mask(lay, positions.detach().cpu(), batch)
    if isinstance(positions, Tensor) and positions.is_floating_point():
        raise InputTypeError(
            f"positions as a float tensor (dtype {positions.dtype}) is ambiguous; pass indices (an integer tensor) "
            "or a boolean mask"
        )
    if isinstance(positions, slice):
        idx = torch.arange(n)[positions]
    else:
        if isinstance(positions, numbers.Integral) or (isinstance(positions, Tensor) and positions.ndim == 0):
            vals = [int(positions)]
        else:
            try:
                vals = [int(i) for i in (positions.reshape(-1).tolist() if isinstance(positions, Tensor) else positions)]  # type: ignore[union-attr]  # ints are Integral
            except (TypeError, ValueError):
                raise InputTypeError(
                    f"positions must be a name ({', '.join(POSITION_NAMES)}), an index, indices, a boolean mask or a "
                    f"Box; got {positions!r}"
                ) from None
            if any(isinstance(i, bool) for i in (positions if isinstance(positions, (list, tuple)) else [])):
                raise InputTypeError("positions as a list of booleans is ambiguous; pass a boolean tensor")
        idx = torch.tensor(vals, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise OutOfRangeError(
                f"positions {vals} out of range for {n} positions ({n_pre} prefix + {rows}x{cols} patches); "
                "see vit_lens.rowcol_to_patch_index"
            )
        idx = idx % n if idx.numel() else idx
    mask[idx] = True
    return mask


def _bool_mask(lay: TokenLayout, p: Tensor, batch: Optional[int]) -> Tensor:
    n_pre, n = lay.n_prefix, lay.n_pos
    rows, cols = lay.grid
    n_img = rows * cols
    lead = p.shape[:-1]
    if p.ndim >= 2 and tuple(p.shape[-2:]) == (rows, cols) and not (p.ndim == 2 and p.shape[-1] in (n, n_img)):
        p = p.reshape(*p.shape[:-2], n_img)
        lead = p.shape[:-1]
    if p.shape[-1] == n:
        full = p
    elif p.shape[-1] == n_img:
        full = torch.cat([torch.zeros(*lead, n_pre, dtype=torch.bool), p], dim=-1)
    else:
        full = None
    ok = full is not None and (full.ndim == 1 or (full.ndim == 2 and batch is not None and full.shape[0] == batch))
    if not ok:
        per_image = f", or one per image [batch={batch}, ...]" if batch is not None else ""
        raise InputError(
            f"a boolean position mask must be [pos={n}], [n_patches={n_img}] or the patch grid [{rows}, {cols}]"
            f"{per_image}; got shape {tuple(p.shape)}"
        )
    return full.clone()  # type: ignore[union-attr]  # ok implies full is not None
