"""Patch embedding with prefix tokens, and the position embedding."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from vit_lens.config import HookedViTConfig


class PatchEmbed(nn.Module):
    """Images -> token embeddings of every position, prefix tokens included.

    ``W_E`` is the convolutional patch projection [d_model, in_chans, patch_h, patch_w] and
    ``b_E`` its bias [d_model]. ``cls_token`` [1, 1, d_model], ``dist_token`` [1, 1, d_model] and
    ``reg_token`` [1, n_register_tokens, d_model] exist when the architecture has them.
    Output: [batch, n_prefix_tokens + n_patches, d_model], in timm's order.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.W_E = nn.Parameter(torch.empty(D, cfg.in_chans, *cfg.patch_size))
        self.b_E = nn.Parameter(torch.zeros(D))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.has_class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.n_dist_tokens else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, cfg.n_register_tokens, D)) if cfg.n_register_tokens else None
        )

    def forward(self, images: Float[Tensor, "batch chans height width"]) -> Float[Tensor, "batch pos d_model"]:
        x = F.conv2d(images, self.W_E, self.b_E, stride=self.cfg.patch_size)
        x = x.flatten(2).transpose(1, 2)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        return torch.cat(prefix + [x], dim=1) if prefix else x


class PosEmbed(nn.Module):
    """Learned absolute position embedding, ``W_pos`` [1, n_pos, d_model].

    ``n_pos`` is ``n_prefix_tokens + n_patches`` when the embedding covers the prefix tokens
    (``cfg.pos_embed_prefix``), else ``n_patches`` and the prefix positions get zeros.
    With ``cfg.dynamic_img_size`` the patch part is resampled (bicubic, in float32) to other grids;
    the prefix positions are kept as they are. Two flavours, one code path:

    - timm's (``dynamic_img_size=True``): antialiased bicubic.
    - Hugging Face's (``cfg.extra["pos_embed_antialias"] = False``): ``F.interpolate(mode="bicubic",
      align_corners=False)`` without antialiasing to ``size=grid_size``, as transformers' DINOv2 and,
      with ``from_hf(..., interpolate_pos_encoding=True)``, its ViT / DeiT / CLIP embeddings do. The
      native grid is never resampled (transformers skips it there too).
    Output: [batch, n_prefix_tokens + n_patches, d_model], so that ``hook_embed + hook_pos_embed``
    is the residual stream entering the first block.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        n_pos = cfg.n_patches + (cfg.n_prefix_tokens if cfg.pos_embed_prefix else 0)
        self.W_pos = nn.Parameter(torch.zeros(1, n_pos, cfg.d_model))

    def forward(self, batch: int, grid_size: Tuple[int, int]) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        W: Tensor = self.W_pos
        n_pre = cfg.n_prefix_tokens
        if tuple(grid_size) != tuple(cfg.grid_size):
            from timm.layers import resample_abs_pos_embed

            W = resample_abs_pos_embed(
                W, new_size=list(grid_size), old_size=list(cfg.grid_size),
                num_prefix_tokens=n_pre if cfg.pos_embed_prefix else 0,
                # Hugging Face interpolates without antialiasing (DINOv2 always; ViT / DeiT / CLIP with
                # interpolate_pos_encoding=True): cfg.extra from the hf source
                antialias=bool(cfg.extra.get("pos_embed_antialias", True)),
            )
        if not cfg.pos_embed_prefix and n_pre:
            W = torch.cat([W.new_zeros(1, n_pre, cfg.d_model), W], dim=1)
        return W.expand(batch, -1, -1)
