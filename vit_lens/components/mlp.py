"""The MLP sublayer with TransformerLens's weight layout and hooks."""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from vit_lens.config import HookedViTConfig
from vit_lens.core.errors import InputError


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's QuickGELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
}


class MLP(nn.Module):
    """``W_in`` [d_model, d_mlp], ``b_in`` [d_mlp], ``W_out`` [d_mlp, d_model], ``b_out`` [d_model].

    Hooks: ``hook_pre`` (pre-activation, [batch, pos, d_mlp]) and ``hook_post`` (after the
    nonlinearity, [batch, pos, d_mlp]). Neuron ``i`` writes ``post[..., i] * W_out[i]`` to the
    residual stream.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        if cfg.act_fn not in ACTIVATIONS:
            raise InputError(f"unknown act_fn {cfg.act_fn!r}; supported: {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.act_fn]
        # TransformerLens shapes in nn.Linear's memory layout, so ``W.T`` below is contiguous (timm's GEMMs)
        self.W_in = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model).T)
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp).T)
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        # nested, so that the pre-activation is freed before the output projection (as in timm's Mlp)
        post = self.hook_post(self.act(self.hook_pre(F.linear(x, self.W_in.T, self.b_in))))
        return F.linear(post, self.W_out.T, self.b_out)
