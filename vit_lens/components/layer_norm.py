"""LayerNorm with TransformerLens's hook points (``hook_scale``, ``hook_normalized``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint


def read_only(hook_point: HookPoint) -> bool:
    """True when every forward hook on ``hook_point`` declares that it never edits its activation
    (a ``read_only = True`` attribute, as the caching hooks of :meth:`HookedViT.get_caching_hooks`
    have), so the forward may skip checks for edits."""
    return all(getattr(h.user_hook, "read_only", False) for h in hook_point.fwd_hooks)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, hooked as in TransformerLens.

    ``hook_scale`` sees ``sqrt(var + eps)`` with shape ``[..., 1]``; ``hook_normalized`` sees the
    output after the affine weights (``w``, ``b``). With ``affine=False`` (TransformerLens's
    ``LNPre``, after ``fold_ln``) there are no weights.

    When neither hook is in use the fused ``torch.nn.functional.layer_norm`` runs. Otherwise the
    fused kernel still computes the output, mean and scale in one pass; a hook that replaces or
    edits ``hook_scale`` (in place or by returning a new tensor) makes the output be recomputed
    from the edited scale, so each hook's return value feeds the rest of the forward.
    """

    def __init__(self, length: int, eps: float, affine: bool = True):
        super().__init__()
        self.length = length
        self.eps = eps
        self.affine = affine
        if affine:
            self.w = nn.Parameter(torch.ones(length))
            self.b = nn.Parameter(torch.zeros(length))
        else:
            self.register_parameter("w", None)
            self.register_parameter("b", None)
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., length]

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return F.layer_norm(x, (self.length,), self.w, self.b, self.eps)
        if torch.is_grad_enabled() and (x.requires_grad or (self.w is not None and self.w.requires_grad)):
            # gradients flow through every hook (backward hooks on hook_scale fire): explicit form
            var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
            scale = self.hook_scale((var + self.eps).sqrt())
            x = (x - mean) / scale
            if self.affine:
                x = torch.addcmul(self.b, x, self.w)
            return self.hook_normalized(x)
        # Without gradients, one fused pass gives the output, the mean and 1 / scale (about 4x cheaper on a CPU than
        # var_mean, subtract, divide and the affine map as separate passes). The scale hook's return
        # value still feeds the forward: when a hook replaced or edited the scale in place, the
        # output is recomputed from the edited scale.
        out, mean, rstd = torch.native_layer_norm(x, (self.length,), self.w, self.b, self.eps)
        given = rstd.reciprocal().to(x.dtype)
        if read_only(self.hook_scale):  # e.g. run_with_cache's hooks: they store, never edit
            scale = self.hook_scale(given)
            edited = scale is not given
        else:  # [..., 1]: a copy to compare with is cheap (inference tensors have no version counter)
            before = given.clone()
            scale = self.hook_scale(given)
            edited = scale is not given or not torch.equal(scale, before)
        if edited:
            out = (x - mean.to(x.dtype)) / scale
            if self.affine:
                out = torch.addcmul(self.b, out, self.w)
        return self.hook_normalized(out)

    def extra_repr(self) -> str:
        return f"{self.length}, eps={self.eps}, affine={self.affine}"
