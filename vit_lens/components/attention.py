"""Multi-head self-attention with TransformerLens's weight layout and hooks."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from vit_lens.config import HookedViTConfig


class Attention(nn.Module):
    """Bidirectional multi-head attention.

    Weights: ``W_Q``, ``W_K``, ``W_V`` [n_heads, d_model, d_head]; ``b_Q``, ``b_K``, ``b_V``
    [n_heads, d_head]; ``W_O`` [n_heads, d_head, d_model]; ``b_O`` [d_model].

    Hooks (shapes): ``hook_q``, ``hook_k``, ``hook_v``, ``hook_z`` [batch, pos, head, d_head];
    ``hook_attn_scores``, ``hook_pattern`` [batch, head, query_pos, key_pos];
    ``hook_result`` [batch, pos, head, d_model] (only when ``cfg.use_attn_result``).

    When no hook on ``hook_attn_scores`` / ``hook_pattern`` is active, the fused
    :func:`torch.nn.functional.scaled_dot_product_attention` runs and the pattern is never
    materialised. ``attn_mask`` (set by interventions such as attention knockout) is a boolean
    tensor broadcastable to [batch, head, query_pos, key_pos]; ``True`` means the query may attend
    to the key. Masked scores are set to ``-inf`` before the softmax in both paths.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        H, D, E = cfg.n_heads, cfg.d_model, cfg.d_head
        # Shapes are TransformerLens's; the memory layout is nn.Linear's ([out, in] row-major), so
        # the forward runs the same GEMMs as timm on views, without copying weights. W_Q, W_K, W_V
        # are moreover slices of one buffer (see _share_qkv_storage): timm's fused qkv weight.
        # Layouts survive load_state_dict, .to() and to_empty(); any other layout (e.g. after
        # `W_V.data = t`) is still correct, only slower.
        self.W_Q = nn.Parameter(torch.empty(H, E, D).transpose(1, 2))
        self.W_K = nn.Parameter(torch.empty(H, E, D).transpose(1, 2))
        self.W_V = nn.Parameter(torch.empty(H, E, D).transpose(1, 2))
        self.b_Q = nn.Parameter(torch.zeros(H, E))
        self.b_K = nn.Parameter(torch.zeros(H, E))
        self.b_V = nn.Parameter(torch.zeros(H, E))
        self.W_O = nn.Parameter(torch.empty(D, H, E).permute(1, 2, 0))
        self.b_O = nn.Parameter(torch.zeros(D))
        self.attn_mask: Optional[Bool[Tensor, "... query_pos key_pos"]] = None

        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()
        self._share_qkv_storage()

    # ------------------------------------------------------------------ fused q/k/v weight
    def _share_qkv_storage(self) -> None:
        """Re-point W_Q, W_K, W_V at consecutive slices of one new [3, n_heads, d_head, d_model]
        buffer. Values, shapes, dtypes and devices are unchanged; they stay separate parameters."""
        params = (self.W_Q, self.W_K, self.W_V)
        if len({(p.dtype, p.device, p.shape) for p in params}) != 1:
            return  # mixed dtypes/devices: leave alone (the forward falls back to three GEMMs)
        with torch.no_grad():
            buf = torch.empty((3, *params[0].transpose(1, 2).shape), dtype=params[0].dtype, device=params[0].device)
            for i, p in enumerate(params):
                buf[i].copy_(p.transpose(1, 2))
                p.data = buf[i].transpose(1, 2)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / to_empty() give each parameter its own storage: share it again
        out = super()._apply(fn, *args, **kwargs)
        self._share_qkv_storage()
        return out

    def __setstate__(self, state):
        # copy.deepcopy / pickle copy each parameter separately: share again
        super().__setstate__(state)
        self._share_qkv_storage()

    def _fused_qkv_weight(self) -> Optional[Tensor]:
        """timm's fused qkv weight [3 * n_heads * d_head, d_model]: a view of the buffer W_Q, W_K,
        W_V share; None when they do not share one, or when gradients are needed (a view across
        three parameters gives none of them a gradient)."""
        W = (self.W_Q, self.W_K, self.W_V)
        if torch.is_grad_enabled() and any(p.requires_grad for p in W):
            return None
        H, D, E = W[0].shape
        ptr, off = W[0].untyped_storage().data_ptr(), W[0].storage_offset()
        for i, p in enumerate(W):
            if (
                p.untyped_storage().data_ptr() != ptr
                or p.storage_offset() != off + i * H * D * E
                or p.stride() != (E * D, 1, D)
                or p.dtype != W[0].dtype
            ):
                return None
        return W[0].detach().as_strided((3 * H * E, D), (D, 1), off)

    @property
    def needs_pattern(self) -> bool:
        """True when a hook reads or edits the scores or the pattern (then they are materialised)."""
        return self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()

    def _project(self, x: Tensor, W: Tensor, b: Tensor) -> Float[Tensor, "batch pos head d_head"]:
        """``x @ W + b`` for a [n_heads, d_model, d_head] weight, as one GEMM on a weight view."""
        B, N, _ = x.shape
        H, _, E = W.shape
        return F.linear(x, W.transpose(1, 2).reshape(H * E, -1), b.reshape(H * E)).view(B, N, H, E)

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], n_queries: Optional[int] = None
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """Attention of every token (or, with ``n_queries``, of the first ``n_queries`` tokens only:
        every token still gives keys and values; the output and the query-side hooks then have
        ``n_queries`` positions -- the readout of a [CLS]-pooled model needs no more)."""
        return self.forward_qkv(*self.project_qkv(x, n_queries))

    def project_qkv(
        self, x: Float[Tensor, "batch pos d_model"], n_queries: Optional[int] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The queries ``[batch, query_pos, head, d_head]`` (``query_pos`` = ``n_queries`` or every
        position), keys and values ``[batch, pos, head, d_head]`` of ``x``, before their hooks; the
        first step of :meth:`forward`."""
        B, N, _ = x.shape
        H, E = self.cfg.n_heads, self.cfg.d_head
        W = self._fused_qkv_weight() if n_queries is None else None
        if W is not None:  # one GEMM, exactly timm's
            bias = torch.cat([self.b_Q.reshape(-1), self.b_K.reshape(-1), self.b_V.reshape(-1)])
            qkv = F.linear(x, W, bias).view(B, N, 3, H, E)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = self._project(x if n_queries is None else x[:, :n_queries], self.W_Q, self.b_Q)
            k = self._project(x, self.W_K, self.b_K)
            v = self._project(x, self.W_V, self.b_V)
        return q, k, v

    def forward_qkv(
        self,
        q: Float[Tensor, "batch query_pos head d_head"],
        k: Float[Tensor, "batch pos head d_head"],
        v: Float[Tensor, "batch pos head d_head"],
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """The attention from given queries, keys and values (the projections already made), from
        ``hook_q`` on: every hook from there fires as in :meth:`forward`, which is this after the
        projections. Patching sweeps use it to reuse the keys and values a patch leaves unchanged."""
        q = self.hook_q(q)  # [batch, query_pos, head, d_head]
        k = self.hook_k(k)
        v = self.hook_v(v)
        if self.needs_pattern:
            return self.forward_scores(self._scores(q, k), v)
        return self.forward_z(self._fused_z(q, k, v))

    def _mask(self, n_queries: int, n_keys: int) -> Optional[Tensor]:
        """``attn_mask`` for the first ``n_queries`` queries."""
        mask = self.attn_mask
        if mask is not None and n_queries != n_keys and mask.shape[-2] != 1:
            mask = mask[..., :n_queries, :]
        return mask

    def _scores(self, q: Tensor, k: Tensor) -> Float[Tensor, "batch head query_pos key_pos"]:
        """The scaled (and masked) scores, before ``hook_attn_scores``."""
        B, N = k.shape[0], k.shape[1]
        H, E = self.cfg.n_heads, self.cfg.d_head
        Nq = q.shape[1]
        mask = self._mask(Nq, N)
        # [b, h, q, k]; the 1/sqrt(d_head) scale is applied inside the GEMM (no extra pass)
        qh = q.transpose(1, 2).reshape(B * H, Nq, E)
        kh = k.permute(0, 2, 3, 1).reshape(B * H, E, N)
        scores = torch.baddbmm(qh.new_zeros(()).expand(1, 1, 1), qh, kh, beta=0.0, alpha=1.0 / math.sqrt(E))
        scores = scores.view(B, H, Nq, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores

    def _fused_z(self, q: Tensor, k: Tensor, v: Tensor) -> Float[Tensor, "batch query_pos head d_head"]:
        """The heads' outputs by the fused kernel (the pattern never materialised), before ``hook_z``."""
        B, N = k.shape[0], k.shape[1]
        H = self.cfg.n_heads
        Nq = q.shape[1]
        mask = self._mask(Nq, N)
        if mask is not None:
            mask = mask.expand(B, H, Nq, N)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )  # [batch, head, query_pos, d_head]
        z = z.transpose(1, 2)
        if mask is not None:
            z = torch.nan_to_num(z)
        return z

    def forward_scores(
        self, scores: Float[Tensor, "batch head query_pos key_pos"], v: Float[Tensor, "batch pos head d_head"]
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """The attention from its (masked) scores and the values (after ``hook_v``), from
        ``hook_attn_scores`` on: the materialised path of :meth:`forward_qkv`."""
        scores = self.hook_attn_scores(scores)
        pattern = torch.softmax(scores, dim=-1)
        if self.attn_mask is not None:
            pattern = torch.nan_to_num(pattern)  # rows with every key masked attend to nothing
        return self.forward_pattern(pattern, v)

    def forward_pattern(
        self, pattern: Float[Tensor, "batch head query_pos key_pos"], v: Float[Tensor, "batch pos head d_head"]
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """The attention from its pattern and the values (after ``hook_v``), from ``hook_pattern`` on."""
        pattern = self.hook_pattern(pattern)
        z = torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2)
        return self.forward_z(z)

    def forward_z(self, z: Float[Tensor, "batch query_pos head d_head"]) -> Float[Tensor, "batch query_pos d_model"]:
        """The attention output from the heads' outputs before ``W_O``, from ``hook_z`` on."""
        z = self.hook_z(z)  # [batch, query_pos, head, d_head]
        if self.cfg.use_attn_result:
            return self.forward_result(torch.einsum("bphe,hed->bphd", z, self.W_O))
        B, Nq = z.shape[0], z.shape[1]
        H, E = self.cfg.n_heads, self.cfg.d_head
        return F.linear(z.reshape(B, Nq, H * E), self.W_O.reshape(H * E, -1).T, self.b_O)

    def forward_result(
        self, result: Float[Tensor, "batch query_pos head d_model"]
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """The attention output from the per-head outputs ``z @ W_O`` (``cfg.use_attn_result``), from
        ``hook_result`` on."""
        result = self.hook_result(result)
        return result.sum(dim=-2) + self.b_O
