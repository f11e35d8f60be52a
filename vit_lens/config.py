"""Architecture description of a :class:`~vit_lens.HookedViT`.

The config holds the architecture only (sizes, token layout, which optional parts exist). It is
derived from a timm model by :mod:`vit_lens.loading`, never hard-coded to one model. The few
attribute names TransformerLens's :class:`~transformer_lens.ActivationCache` reads
(``n_layers``, ``n_heads``, ``d_model``, ``d_mlp``, ``normalization_type``, ``attn_only``) are kept
under the names it expects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Tuple

import torch
from vit_lens.core.errors import InputError, OutOfRangeError

Pooling = Literal["token", "avg", "token_dist", "token_avg"]
ActFn = Literal["gelu", "gelu_tanh", "quick_gelu"]


@dataclass
class HookedViTConfig:
    """Architecture of a Vision Transformer, in TransformerLens's vocabulary.

    Token layout: positions ``0 .. n_prefix_tokens - 1`` are prefix tokens in timm's order
    ([CLS], then the distillation token if any, then register tokens), followed by the
    ``grid_size[0] * grid_size[1]`` patch tokens in row-major order.

    Attributes:
        n_layers: number of transformer blocks.
        d_model: residual stream width.
        n_heads: attention heads per block.
        d_head: width of one head.
        d_mlp: hidden width of the MLP.
        n_classes: number of classifier outputs (0 for a headless model).
        image_size: (height, width) of the input images in pixels.
        patch_size: (height, width) of one patch in pixels.
        in_chans: number of input channels.
        has_class_token: whether position 0 is a learned [CLS] token.
        n_dist_tokens: 1 for distilled DeiT (a distillation token after [CLS]), else 0.
        n_register_tokens: number of register tokens.
        pos_embed_prefix: whether the learned position embedding covers the prefix tokens
            (timm's ``no_embed_class=False``); if False prefix tokens get no position embedding.
        pooling: ``"token"`` (classifier reads [CLS] after the final norm), ``"avg"`` (mean of the
            patch tokens), ``"token_dist"`` (mean of the [CLS] and distillation heads),
            ``"token_avg"`` (Hugging Face's ``Dinov2ForImageClassification``: one linear layer on
            ``concat([CLS], mean of the patch tokens)`` after the final norm, i.e. the sum of a
            ``"cls"`` head on [CLS] and a ``"patch"`` head on the patch mean).
        act_fn: MLP nonlinearity.
        eps: LayerNorm epsilon (all norms of the model).
        normalization_type: ``"LN"`` (LayerNorm with affine weights) or ``"LNPre"`` (weights folded
            away by ``fold_ln``), as TransformerLens names them.
        has_norm_pre: a LayerNorm before the first block (CLIP's ``ln_pre``).
        has_ln_final: a LayerNorm on every token after the last block (timm's ``norm``).
        has_fc_norm: a LayerNorm on the pooled vector before the classifier (timm's ``fc_norm``).
        post_norm: blocks normalise the sublayer *outputs* (timm's ``ResPostBlock``) instead of
            their inputs.
        dynamic_img_size: accept other image sizes by interpolating the position embedding.
        use_attn_result: a runtime switch, as in TransformerLens: compute and hook per-head
            outputs (``blocks.{l}.attn.hook_result``). Off by default because it costs memory.
        model_name: timm name the model was converted from (informational).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_classes: int
    image_size: Tuple[int, int] = (224, 224)
    patch_size: Tuple[int, int] = (16, 16)
    in_chans: int = 3
    has_class_token: bool = True
    n_dist_tokens: int = 0
    n_register_tokens: int = 0
    pos_embed_prefix: bool = True
    pooling: Pooling = "token"
    act_fn: ActFn = "gelu"
    eps: float = 1e-6
    normalization_type: Literal["LN", "LNPre"] = "LN"
    has_norm_pre: bool = False
    has_ln_final: bool = True
    has_fc_norm: bool = False
    post_norm: bool = False
    dynamic_img_size: bool = False
    use_attn_result: bool = False
    model_name: str = "custom"
    # --- read by transformer_lens.ActivationCache; fixed for ViTs ---
    attn_only: bool = False
    final_rms: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_size = _pair(self.image_size)
        self.patch_size = _pair(self.patch_size)
        for name in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"HookedViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_classes < 0:
            raise InputError(f"n_classes must be >= 0, got {self.n_classes}")
        if self.image_size[0] % self.patch_size[0] or self.image_size[1] % self.patch_size[1]:
            raise InputError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.pooling not in ("token", "avg", "token_dist", "token_avg"):
            raise InputError(
                f"pooling must be 'token', 'avg', 'token_dist' or 'token_avg', got {self.pooling!r}"
            )
        if self.pooling in ("token", "token_dist", "token_avg") and not self.has_class_token:
            raise InputError(f"pooling={self.pooling!r} needs a class token")
        if self.pooling == "token_dist" and self.n_dist_tokens != 1:
            raise InputError("pooling='token_dist' needs exactly one distillation token")
        if self.pooling == "token_avg" and self.has_fc_norm:
            raise InputError(
                "pooling='token_avg' reads the per-token final norm (ln_final) at [CLS] and at the patch mean; "
                "an fc_norm on the pooled vectors is not a readout any supported model has: set has_fc_norm=False"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_prefix_tokens(self) -> int:
        """Number of non-patch tokens at the start of the sequence."""
        return int(self.has_class_token) + self.n_dist_tokens + self.n_register_tokens

    @property
    def grid_size(self) -> Tuple[int, int]:
        """(rows, cols) of the patch grid at the native image size."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def n_ctx(self) -> int:
        """Sequence length at the native image size: prefix tokens plus patches."""
        return self.n_prefix_tokens + self.n_patches

    @property
    def prefix_token_names(self) -> list:
        """Human-readable names of the prefix positions, e.g. ``["CLS", "DIST", "REG0"]``."""
        names = ["CLS"] if self.has_class_token else []
        names += ["DIST"] * self.n_dist_tokens
        names += [f"REG{i}" for i in range(self.n_register_tokens)]
        return names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HookedViTConfig":
        return cls(**d)

    def replace(self, **changes: Any) -> "HookedViTConfig":
        return dataclasses.replace(self, **changes)


def _pair(x: Any) -> Tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    if isinstance(x, torch.Size):
        x = tuple(x)
    a, b = x
    return (int(a), int(b))


def patch_index_to_rowcol(index: int, cfg: HookedViTConfig, grid_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """Map a sequence position of a patch token to its (row, col) on the patch grid.

    Args:
        index: sequence position (prefix tokens count; ``cfg.n_prefix_tokens`` is patch (0, 0)).
        cfg: the model config.
        grid_size: override the grid (for dynamic image sizes).
    """
    rows, cols = grid_size or cfg.grid_size
    p = index - cfg.n_prefix_tokens
    if not 0 <= p < rows * cols:
        raise OutOfRangeError(
            f"position {index} is not a patch token (prefix tokens are 0..{cfg.n_prefix_tokens - 1}, "
            f"patches {cfg.n_prefix_tokens}..{cfg.n_prefix_tokens + rows * cols - 1})"
        )
    return divmod(p, cols)


def rowcol_to_patch_index(row: int, col: int, cfg: HookedViTConfig, grid_size: Optional[Tuple[int, int]] = None) -> int:
    """Inverse of :func:`patch_index_to_rowcol`: sequence position of the patch at (row, col)."""
    rows, cols = grid_size or cfg.grid_size
    if not (0 <= row < rows and 0 <= col < cols):
        raise OutOfRangeError(f"(row, col)=({row}, {col}) is outside the {rows}x{cols} patch grid")
    return cfg.n_prefix_tokens + row * cols + col
