"""The readout: final norm -> pooling -> classifier, and the class space it defines.

Everything that turns a residual stream into class scores lives here, once:

* the final norms: ``ln_final`` (timm's ``norm``, on every token) and ``fc_norm`` (on the pooled
  vector), either or both absent;
* the pooling (:attr:`HookedViTConfig.pooling`): ``"token"`` reads [CLS], ``"token_dist"`` reads
  [CLS] and the distillation token (one head each, averaged), ``"avg"`` averages the patch tokens,
  ``"token_avg"`` reads [CLS] and the mean of the patch tokens (one head each, summed: Hugging
  Face's ``Dinov2ForImageClassification``, whose one linear layer on ``concat([CLS], mean)`` is
  exactly ``[CLS] @ W[:D] + b + mean @ W[D:]``);
* the classifier(s) ``unembed`` (and ``unembed_dist``, or ``unembed_patch``): the class embeddings ``W_U``;
* the class directions a user sets (:meth:`Readout.set_class_directions`), and the state needed so
  that directions set later mean the same after weight processing and after save / load: the
  original head in the current basis (``head_source_*``) and the final norm's affine map folded
  away by ``fold_ln`` (``final_norm_*``). These are declared persistent buffers: ``state_dict()``
  holds them, :meth:`HookedViT.save` writes them and :meth:`HookedViT.load` restores them;
* :meth:`Readout.project`: the class-space projection of any residual-stream-shaped vectors, in
  the paper's mode (each vector through the final norm with its own statistics, then the
  classifier with its bias) or the linear DLA mode (frozen scale, no bias).

Hook names stay TransformerLens's (``ln_final.hook_scale``, ``fc_norm.hook_normalized``,
``hook_pooled``): :class:`~vit_lens.HookedViT` registers this module's hook points without the
``readout.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from vit_lens.components.head import Unembed
from vit_lens.components.layer_norm import LayerNorm
from vit_lens.config import HookedViTConfig
from vit_lens.core.errors import InputError, InputTypeError

Head = Optional[Literal["mean", "cls", "dist", "patch"]]
ProjectMode = Literal["paper", "dla"]

#: declared head state (persistent buffers; present once a head was snapshotted / a norm folded)
HEAD_STATE = ("head_source_W", "head_source_b", "head_source_W_dist", "head_source_b_dist", "final_norm_w", "final_norm_b",
              "head_source_W_patch", "head_source_b_patch")


@dataclass(frozen=True)
class ReadGroup:
    """Positions one classifier head reads, with the pooling weight of each.

    ``logits = sum over groups of weight * (sum over positions of normed token) @ W_head + ...``:
    ``positions`` is a slice of the sequence, ``weight`` the pooling weight of every token in it
    (1 for [CLS]; 1/2 for each head of a distilled model; 1 / n_patches for average pooling;
    for ``"token_avg"`` 1 on [CLS] (head ``"cls"``) and 1 / n_patches on every patch (head
    ``"patch"``)), ``head`` the classifier (``None``, ``"cls"``, ``"dist"`` or ``"patch"``).
    """

    positions: slice
    weight: float
    head: Head


class Readout(nn.Module):
    """Final norm(s), pooling and classifier(s) of a :class:`~vit_lens.HookedViT`.

    Input: the residual stream after the last block ``[batch, pos, d_model]``.
    Output: logits ``[batch, n_classes]`` (the pooled features ``[batch, d_model]`` when headless).
    """

    # the head state (HEAD_STATE): persistent buffers registered in __init__, None until set
    head_source_W: Optional[Tensor]
    head_source_b: Optional[Tensor]
    head_source_W_dist: Optional[Tensor]
    head_source_b_dist: Optional[Tensor]
    final_norm_w: Optional[Tensor]
    final_norm_b: Optional[Tensor]
    head_source_W_patch: Optional[Tensor]
    head_source_b_patch: Optional[Tensor]

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        affine = cfg.normalization_type == "LN"
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps, affine=affine) if cfg.has_ln_final else None
        self.fc_norm = LayerNorm(cfg.d_model, cfg.eps, affine=affine) if cfg.has_fc_norm else None
        self.hook_pooled = HookPoint()
        n = cfg.n_classes
        self.unembed = Unembed(cfg.d_model, n) if n > 0 else None
        self.unembed_dist = Unembed(cfg.d_model, n) if cfg.pooling == "token_dist" and n > 0 else None
        #: ``"token_avg"``: the head on the mean of the patch tokens (``W[D:]`` of HF's concat classifier;
        #: its bias is zero until ``fold_ln`` folds the final norm's bias through it)
        self.unembed_patch = Unembed(cfg.d_model, n) if cfg.pooling == "token_avg" and n > 0 else None
        for name in HEAD_STATE:
            self.register_buffer(name, None, persistent=True)
        #: class names, index-aligned with the columns of ``W_U`` (None if unknown)
        self.class_names: Optional[List[str]] = None
        #: WordNet ids of the classes (None if unknown)
        self.class_synsets: Optional[List[str]] = None

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # head state is optional: allocate the buffers a saved model had, so strict loading restores them
        for name in HEAD_STATE:
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                ref = state_dict[key]
                self._buffers[name] = torch.empty(ref.shape, dtype=ref.dtype, device=self._device())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _device(self) -> torch.device:
        for t in list(self.parameters()) + [b for b in self.buffers() if b is not None]:
            return t.device
        return torch.device("cpu")

    def _set_state(self, name: str, value: Optional[Tensor]) -> None:
        self._buffers[name] = None if value is None else value.detach().clone()

    def snapshot_head(self) -> None:
        """Remember the original classifier (in the current residual basis), once: ``space="head"``
        class directions compose with it (for CLIP: the projection into the image-text space)."""
        if self.head_source_W is not None or self.unembed is None:
            return
        self._set_state("head_source_W", self.unembed.W_U)
        self._set_state("head_source_b", self.unembed.b_U)
        if self.unembed_dist is not None:
            self._set_state("head_source_W_dist", self.unembed_dist.W_U)
            self._set_state("head_source_b_dist", self.unembed_dist.b_U)
        if self.unembed_patch is not None:
            self._set_state("head_source_W_patch", self.unembed_patch.W_U)
            self._set_state("head_source_b_patch", self.unembed_patch.b_U)

    def remember_final_norm(self, w: Optional[Tensor], b: Optional[Tensor]) -> None:
        """Record the final norm's affine map when ``fold_ln`` folds it away (see
        :meth:`set_class_directions`), and fold it into the head snapshot."""
        from vit_lens.loading.processing import fold_into

        self._set_state("final_norm_w", w)
        self._set_state("final_norm_b", b)
        for kW, kb in (("head_source_W", "head_source_b"), ("head_source_W_dist", "head_source_b_dist"),
                       ("head_source_W_patch", "head_source_b_patch")):
            if getattr(self, kW) is not None:
                W, bias = fold_into(getattr(self, kW), getattr(self, kb), w, b, 0)
                self._set_state(kW, W)
                self._set_state(kb, bias)

    # ------------------------------------------------------------------ the forward path
    @property
    def final_norms(self) -> List[LayerNorm]:
        """The norms between the residual stream and the classifier, in order."""
        return [n for n in (self.ln_final, self.fc_norm) if n is not None]

    @property
    def n_pooled_prefix(self) -> int:
        """How many leading tokens the classifier reads *and nothing else* (1 for [CLS], 2 distilled; 0 for
        average pooling and for ``"token_avg"``, whose patch head reads every patch)."""
        return {"token": 1, "token_dist": 2}.get(self.cfg.pooling, 0)

    @property
    def cls_head(self) -> Head:
        """The classifier that reads [CLS]: ``"cls"`` for a distilled model and for ``"token_avg"``
        (the [CLS] half of the concat classifier, with the bias), else ``None`` (its one head).
        Projections of [CLS] vectors use it."""
        return "cls" if self.cfg.pooling in ("token_dist", "token_avg") else None

    def read_groups(self, n_pos: int) -> List[ReadGroup]:
        """The positions each classifier head reads and their pooling weights (for a sequence of
        ``n_pos`` tokens); the exact weights of :meth:`pool`."""
        cfg = self.cfg
        if cfg.pooling == "token_dist":
            return [ReadGroup(slice(0, 1), 0.5, "cls"), ReadGroup(slice(1, 2), 0.5, "dist")]
        if cfg.pooling == "token":
            return [ReadGroup(slice(0, 1), 1.0, None)]
        n = n_pos - cfg.n_prefix_tokens
        if n <= 0:
            raise InputError(f"{cfg.model_name} averages its image tokens, but the sequence has none ({n_pos} positions)")
        if cfg.pooling == "token_avg":
            return [ReadGroup(slice(0, 1), 1.0, "cls"), ReadGroup(slice(cfg.n_prefix_tokens, n_pos), 1.0 / n, "patch")]
        return [ReadGroup(slice(cfg.n_prefix_tokens, n_pos), 1.0 / n, None)]

    def pool(self, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """The pooling alone (no norm): [CLS] ``[batch, d_model]``; [CLS, DIST] ``[batch, 2, d_model]``;
        the mean of the patch tokens ``[batch, d_model]``; or ``"token_avg"``: [CLS, mean of the
        patch tokens] ``[batch, 2, d_model]`` (registers and other prefix tokens are in neither)."""
        p = self.cfg.pooling
        if p == "token":
            return x[:, 0]
        if p == "token_dist":
            return x[:, :2]
        n_pre = self.cfg.n_prefix_tokens
        if x.shape[1] <= n_pre:
            raise InputError(
                f"{self.cfg.model_name} averages its image tokens, but the sequence has none ({x.shape[1]} positions, "
                f"{n_pre} prefix tokens): pass the whole residual stream [batch, pos, d_model]"
            )
        if p == "token_avg":
            return torch.stack([x[:, 0], x[:, n_pre:].mean(dim=1)], dim=1)
        return x[:, n_pre:].mean(dim=1)

    def pooled(self, resid: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """``ln_final`` -> pooling -> ``fc_norm`` -> ``hook_pooled``: the classifier input."""
        if self.ln_final is not None:
            resid = self.ln_final(resid)
        pooled = self.pool(resid)
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        return self.hook_pooled(pooled)

    def classify(self, pooled: Tensor) -> Tensor:
        """The classifier(s) on the pooled features (a headless model returns the features;
        a distilled one the mean of its two heads, as timm; ``"token_avg"`` the sum of the [CLS]
        head and the patch-mean head, which is HF's linear layer on the concat; headless
        ``"token_avg"``: the concat ``[batch, 2 * d_model]``, as HF's identity classifier)."""
        if self.unembed is None:
            if self.cfg.pooling == "token_avg":
                return pooled.flatten(1)
            return pooled.mean(dim=1) if self.cfg.pooling == "token_dist" else pooled
        if self.cfg.pooling == "token_dist":
            return (self.unembed(pooled[:, 0]) + self.unembed_dist(pooled[:, 1])) / 2  # type: ignore[misc]  # token_dist with a head has both
        if self.cfg.pooling == "token_avg":
            return self.unembed(pooled[:, 0]) + self.unembed_patch(pooled[:, 1])  # type: ignore[misc]  # token_avg with a head has both
        return self.unembed(pooled)

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Tensor:
        return self.classify(self.pooled(resid))

    def logits(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch n_classes"]:
        """What the classifier outputs if ``resid`` is the final residual stream, as a pure function
        (no hook fires): the model's logits for the last block's ``hook_resid_post``, a "logit lens"
        of the pooled readout for an earlier block's."""
        self.require_head()
        x = resid
        if self.ln_final is not None:
            x = _norm(self.ln_final, x)
        p = self.pool(x)
        if self.fc_norm is not None:
            p = _norm(self.fc_norm, p)
        return self.classify(p)

    # ------------------------------------------------------------------ class space
    def require_head(self) -> Unembed:
        if self.unembed is None:
            raise InputError(
                f"{self.cfg.model_name} has no classifier (n_classes=0), so it has no class space. "
                "Give it class directions with model.set_class_directions(W) (for example text "
                "embeddings of class names), then retry."
            )
        return self.unembed

    def head_weights(self, head: Head = None) -> Tuple[Tensor, Tensor]:
        """``(W [d_model, n_classes], b [n_classes])`` of the classifier ``head`` selects: distilled
        models ``"mean"`` (default), ``"cls"`` or ``"dist"``; ``"token_avg"`` models (HF's
        ``Dinov2ForImageClassification``) ``"cls"`` (``W[:D]`` of the concat classifier, with its
        bias), ``"patch"`` (``W[D:]``, reading the patch mean; bias zero unless ``fold_ln`` folded
        the final norm's bias into it) or ``None`` (default): their sum ``W[:D] + W[D:]`` with both
        biases, the classifier applied to a sequence whose every token is the vector; others have
        one head."""
        unembed = self.require_head()
        if self.cfg.pooling == "token_avg":
            patch = self.unembed_patch
            assert patch is not None  # token_avg with a head has both
            if head is None:
                return unembed.W_U + patch.W_U, unembed.b_U + patch.b_U
            if head == "cls":
                return unembed.W_U, unembed.b_U
            if head == "patch":
                return patch.W_U, patch.b_U
            raise InputError(
                f"head must be None (the sum of both heads), 'cls' (the [CLS] head) or 'patch' (the patch-mean head) "
                f"for {self.cfg.model_name}, whose classifier reads concat([CLS], mean of the patches); got {head!r}"
            )
        if self.cfg.pooling == "token_dist":
            head = head or "mean"
            if head == "cls":
                return unembed.W_U, unembed.b_U
            if head == "dist":
                return self.unembed_dist.W_U, self.unembed_dist.b_U  # type: ignore[union-attr]  # token_dist with a head has both
            if head == "mean":
                return (unembed.W_U + self.unembed_dist.W_U) / 2, (unembed.b_U + self.unembed_dist.b_U) / 2  # type: ignore[union-attr]
            raise InputError(f"head must be 'mean', 'cls' or 'dist' for a distilled model, got {head!r}")
        if head == "patch":
            raise InputError(
                f"head='patch' is only meaningful for models whose classifier reads concat([CLS], mean of the "
                f"patches) (pooling='token_avg'); {self.cfg.model_name} has pooling={self.cfg.pooling!r}: leave head=None"
            )
        if head not in (None, "cls", "mean"):
            raise InputError(
                f"head={head!r} is only meaningful for distilled models (two heads); "
                f"{self.cfg.model_name} has one classifier: leave head=None"
            )
        return unembed.W_U, unembed.b_U

    def class_directions(self, head: Head = None) -> Float[Tensor, "d_model n_classes"]:
        """``W_U`` with the weight of the norm right before the classifier folded in."""
        W, _ = self.head_weights(head)
        norm = self.fc_norm if self.fc_norm is not None else self.ln_final
        if norm is not None and norm.w is not None:
            W = norm.w[:, None] * W
        return W

    def dla_directions(self, head: Head = None) -> Float[Tensor, "d_model n_classes"]:
        """:meth:`class_directions`, centred over ``d_model`` when the readout has a LayerNorm
        (``(x - mean x) . d == x . (d - mean d)``: centring the directions once centres every vector)."""
        W = self.class_directions(head)
        return W - W.mean(dim=0, keepdim=True) if self.final_norms else W

    def constant(self, head: Head = None) -> Float[Tensor, "n_classes"]:
        """The input-independent part of a head's logits: ``b_U`` plus the final norm's bias
        through ``W_U`` (what :meth:`project` in ``"dla"`` mode leaves out)."""
        W, bias = self.head_weights(head)
        norm = self.fc_norm if self.fc_norm is not None else self.ln_final
        out = bias.clone()
        if norm is not None and norm.b is not None:
            out = out + norm.b @ W
        return out

    def normalize(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Each vector through the final norm(s) with its own statistics (pure: no hook fires)."""
        for norm in self.final_norms:
            x = _norm(norm, x)
        return x

    def project(
        self,
        x: Float[Tensor, "... d_model"],
        mode: ProjectMode = "paper",
        *,
        head: Head = None,
        scale: Optional[Tensor] = None,
    ) -> Float[Tensor, "... n_classes"]:
        """Class scores of residual-stream-shaped vectors.

        ``mode="paper"``: every vector through the model's final norm(s) with its *own* statistics
        and affine weights, then the classifier with its bias (Vilas et al., 2023). ``mode="dla"``:
        centred, divided by ``scale`` (the final norm's scale of the real residual stream,
        broadcast against ``x.shape[:-1]`` from the left), times :meth:`dla_directions`; no bias,
        so parts sum to the whole.
        """
        if not isinstance(x, Tensor) or x.shape[-1] != self.cfg.d_model:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"project expects vectors [..., d_model={self.cfg.d_model}], got {shape}")
        if mode == "paper":
            W, b = self.head_weights(head)
            return self.normalize(x) @ W + b
        if mode != "dla":
            raise InputError(f"mode must be 'paper' or 'dla', got {mode!r}")
        if scale is None:
            raise InputError("mode='dla' divides by the final norm's scale of the real residual stream: pass scale=")
        scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
        if scale.ndim > x.ndim - 1:
            raise InputError(f"scale {tuple(scale.shape)} has more axes than x.shape[:-1]={tuple(x.shape[:-1])}")
        scale = scale.reshape(*scale.shape, *([1] * (x.ndim - 1 - scale.ndim)), 1)
        return (x / scale) @ self.dla_directions(head)

    # ------------------------------------------------------------------ new class directions
    def new_heads(self, W: Tensor, bias: Optional[Tensor], space: str, applied: Sequence[str], *,
                  device: torch.device, dtype: torch.dtype) -> List[Tuple[Tensor, Tensor]]:
        """New class directions as classifier weights in the current basis (see
        :meth:`HookedViT.set_class_directions`); ``applied``: the weight processing done so far;
        ``device`` / ``dtype``: the model's.

        ``"token_avg"`` models (HF's ``Dinov2ForImageClassification``): ``space="residual"`` takes
        ``W [2 * d_model, n_classes]`` applied to the concat ``[final-norm [CLS], mean of the
        final-norm patches]`` (HF's classifier input), split into a [CLS] head ``W[:D]`` (with the
        bias) and a patch head ``W[D:]``; ``space="head"`` composes with both original heads (the
        bias added once)."""
        from vit_lens.loading.processing import fold_into

        ref = device
        try:
            W = torch.as_tensor(W).to(device=ref, dtype=dtype)
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(f"W must be a tensor [inputs, n_classes], got {type(W).__name__}") from None
        if W.ndim != 2:
            raise InputError(f"W must be a matrix [inputs, n_classes], got shape {tuple(W.shape)}")
        if not bool(torch.isfinite(W).all()):
            raise InputError("the class directions contain NaN or inf")
        n = W.shape[1]
        if n == 0:
            raise InputError("W has no columns: give at least one class direction")
        if bias is not None:
            bias = torch.as_tensor(bias).to(device=ref, dtype=dtype)
            if tuple(bias.shape) != (n,):
                raise InputError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
            if not bool(torch.isfinite(bias).all()):
                raise InputError("the bias contains NaN or inf")
        b = bias if bias is not None else torch.zeros(n, device=ref, dtype=dtype)
        # every check before the snapshot: a refused call leaves the model as it was
        if space not in ("residual", "head"):
            raise InputError(f"space must be 'residual' or 'head', got {space!r}")
        concat = self.cfg.pooling == "token_avg"
        D = self.cfg.d_model
        if space == "residual" and concat and W.shape[0] != 2 * D:
            raise InputError(
                f"{self.cfg.model_name} classifies concat([CLS], mean of the patch tokens) (pooling='token_avg'), so "
                f"space='residual' directions are [2 * d_model={2 * D}, n_classes] (rows :{D} read [CLS], rows {D}: the "
                f"patch mean), got {tuple(W.shape)}; to read [CLS] only pass torch.cat([W, torch.zeros_like(W)])"
            )
        if space == "residual" and not concat and W.shape[0] != self.cfg.d_model:
            raise InputError(
                f"W must be [d_model={self.cfg.d_model}, n_classes], got {tuple(W.shape)}; for directions in the space "
                "of the model's head outputs (e.g. CLIP text embeddings) pass space='head'."
            )
        if space == "head" and self.head_source_W is None and self.unembed is not None \
                and W.shape[0] != self.unembed.W_U.shape[1]:
            n_out = self.unembed.W_U.shape[1]
            raise InputError(
                f"space='head': W must be [n_head_outputs={n_out}, n_classes] (the model's original head "
                f"has {n_out} outputs), got {tuple(W.shape)}"
            )
        self.snapshot_head()
        with torch.no_grad():
            if space == "residual":
                if W.shape[0] != (2 * D if concat else D):
                    raise InputError(
                        f"W must be [d_model={D}, n_classes], got {tuple(W.shape)}; for directions in the space of "
                        "the model's head outputs (e.g. CLIP text embeddings) pass space='head'."
                    )
                parts = [(W[:D], b), (W[D:], torch.zeros_like(b))] if concat else [(W, b)]
                if self.final_norm_w is not None or self.final_norm_b is not None:
                    parts = [fold_into(Wp, bp, self.final_norm_w, self.final_norm_b, 0) for Wp, bp in parts]
                heads = list(parts)
            elif space == "head":
                src = self.head_source_W
                if src is None:
                    raise InputError(
                        f"{self.cfg.model_name} has no classifier or projection head of its own, so space='head' has "
                        "no meaning; give directions in the residual space: set_class_directions(W [d_model, n_classes])."
                    )
                if W.shape[0] != src.shape[1]:
                    raise InputError(
                        f"space='head': W must be [n_head_outputs={src.shape[1]}, n_classes] (the model's original head "
                        f"has {src.shape[1]} outputs), got {tuple(W.shape)}"
                    )
                heads = [(src @ W, self.head_source_b @ W + b)]  # type: ignore[operator]  # set with head_source_W
                if self.head_source_W_dist is not None:
                    heads.append((self.head_source_W_dist @ W, self.head_source_b_dist @ W + b))  # type: ignore[operator]
                if self.head_source_W_patch is not None:  # the concat classifier's two halves: the bias once
                    heads.append((self.head_source_W_patch @ W, self.head_source_b_patch @ W))  # type: ignore[operator]
            else:
                raise InputError(f"space must be 'residual' or 'head', got {space!r}")
            if "center_unembed" in applied:
                heads = [(Wh - Wh.mean(-1, keepdim=True), bh - bh.mean()) for Wh, bh in heads]
        return heads

    def set_heads(self, heads: List[Tuple[Tensor, Tensor]], labels: Optional[Sequence[str]]) -> None:
        """Install classifier weights from :meth:`new_heads` (and the class names)."""
        n = heads[0][0].shape[1]
        if labels is not None and len(labels) != n:
            raise InputError(f"{len(labels)} labels for {n} class directions")
        ref = heads[0][0]
        unembeds = []
        for W_h, b_h in heads:
            unembed = Unembed(self.cfg.d_model, n).to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                unembed.W_U.copy_(W_h)
                unembed.b_U.copy_(b_h)
            unembeds.append(unembed)
        self.unembed = unembeds[0]
        if self.cfg.pooling == "token_dist":
            self.unembed_dist = unembeds[-1]
        if self.cfg.pooling == "token_avg":
            if len(unembeds) != 2:
                raise InputError("pooling='token_avg' needs two heads ([CLS] and patch mean) from new_heads")
            self.unembed_patch = unembeds[1]
        self.cfg.n_classes = n
        self.class_names = list(labels) if labels is not None else None
        self.class_synsets = None

    def extra_state_dict(self) -> Dict[str, Any]:
        """What is not a tensor: the class names and synsets (written by ``save()``)."""
        return {"class_names": self.class_names, "class_synsets": self.class_synsets}


def _norm(norm: LayerNorm, x: Tensor) -> Tensor:
    """A final norm applied as a pure function (no hooks fire)."""
    return F.layer_norm(x, (norm.length,), norm.w, norm.b, norm.eps)
