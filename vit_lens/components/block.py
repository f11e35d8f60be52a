"""A transformer block: pre-norm (timm ``Block``) or post-norm (timm ``ResPostBlock``)."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from vit_lens.components.attention import Attention
from vit_lens.components.layer_norm import LayerNorm
from vit_lens.components.mlp import MLP
from vit_lens.config import HookedViTConfig
from vit_lens.core.errors import InputError


class TransformerBlock(nn.Module):
    """One block.

    Pre-norm (the default)::

        resid_mid  = resid_pre + attn_out,  attn_out = attn(ln1(resid_pre))
        resid_post = resid_mid + mlp_out,   mlp_out  = mlp(ln2(resid_mid))

    Post-norm (``cfg.post_norm``, timm's ``ResPostBlock``): ``attn_out = ln1(attn(resid_pre))`` and
    ``mlp_out = ln2(mlp(resid_mid))``. LayerScale, when the timm model has it, is folded into the
    output weights at conversion time, so ``hook_attn_out`` / ``hook_mlp_out`` are always exactly
    what the sublayer adds to the residual stream.

    Hooks (all [batch, pos, d_model]): ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``,
    ``hook_mlp_out``, ``hook_resid_post``.
    """

    def __init__(self, cfg: HookedViTConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        affine = cfg.normalization_type == "LN" or cfg.post_norm
        # registered in forward order, so model.hook_dict lists hook points in the order they fire
        self.hook_resid_pre = HookPoint()
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps, affine=affine)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps, affine=affine)
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], n_queries: Optional[int] = None
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """The block on every token, or with ``n_queries`` (pre-norm blocks only) the block's output
        at the first ``n_queries`` positions: every token gives keys and values, only those tokens
        are updated (hooks after the attention see ``n_queries`` positions)."""
        resid_pre = self.hook_resid_pre(x)
        if n_queries is not None and self.cfg.post_norm:
            raise InputError("n_queries needs a pre-norm block (a post-norm block normalises the attention output)")
        if self.cfg.post_norm:
            attn_out = self.hook_attn_out(self.ln1(self.attn(resid_pre)))
        else:
            attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), n_queries))
        if n_queries is not None:
            resid_pre = resid_pre[:, :n_queries]
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        # free the attention output now, as timm's ``x = x + attn(...)`` does: kept alive through the
        # MLP it sat below the MLP's temporaries, whose release then left a free heap top large enough
        # for glibc to trim in every block (and the next block to page-fault it in again)
        del attn_out
        if self.cfg.post_norm:
            mlp_out = self.hook_mlp_out(self.ln2(self.mlp(resid_mid)))
        else:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)
