"""HookedViT: a timm Vision Transformer as a TransformerLens ``HookedRootModule``."""

from __future__ import annotations

import difflib
import operator
import os
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union, overload

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice

from vit_lens.components import LayerNorm, PatchEmbed, PosEmbed, TransformerBlock, Unembed
from vit_lens.components.readout import Readout
from vit_lens.config import HookedViTConfig
from vit_lens.core.errors import InputError, InputTypeError, OutOfRangeError

ReturnType = Optional[Literal["logits"]]

_READOUT = "readout."
#: state-dict prefixes of the readout before it was one component (files saved by vit_lens 0.1 format 1)
_LEGACY_READOUT = ("ln_final.", "fc_norm.", "unembed.", "unembed_dist.", "head_source_", "final_norm_",
                   "unembed_patch.")


def _legacy_readout_keys(state_dict, prefix, *args, **kwargs) -> None:
    """Load state dicts that name the readout's tensors without the ``readout.`` prefix (timm
    conversion output, format-1 files)."""
    for key in list(state_dict):
        rel = key[len(prefix):]
        if key.startswith(prefix) and rel.startswith(_LEGACY_READOUT):
            state_dict[prefix + _READOUT + rel] = state_dict.pop(key)


def _pooled_hook(name: str) -> bool:
    """Hooks without a token axis ([batch, d_model]): pos_slice leaves them whole."""
    return name == "hook_pooled" or name.startswith("fc_norm.")


def _pos_dim(name: str) -> int:
    """The token axis of a hook's activation, from the end (TransformerLens's convention)."""
    return -3 if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")) else -2


class CachingHook:
    """The hook :meth:`HookedViT.get_caching_hooks` returns: stores ``hook.name`` (+ ``suffix``) ->
    the activation, detached, in ``cache``.

    Options: ``pos_slice`` (a ``transformer_lens.utilities.Slice``: the kept token positions, as an
    owned copy), ``device`` (copies from a GPU to the CPU go to pinned memory without blocking: wait
    for the device before reading them, as :meth:`HookedViT.run_with_cache` does),
    ``dtype`` (floating activations are cast), ``remove_batch_dim``. It never edits the activation
    (``read_only``), which lets the forward skip its checks for edits.
    """

    read_only = True

    def __init__(self, cache: Dict[str, Tensor], *, device: Any = None, dtype: Optional[torch.dtype] = None,
                 pos_slice: Any = None, remove_batch_dim: bool = False, suffix: str = ""):
        self.cache, self.pos_slice, self.remove_batch_dim, self.suffix = cache, pos_slice, remove_batch_dim, suffix
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype

    def __call__(self, tensor: Tensor, hook: HookPoint) -> None:
        name = hook.name
        if name is None:
            raise RuntimeError("a HookPoint without a name: call model.setup() after adding modules")
        t = tensor.detach()
        if self.remove_batch_dim and t.ndim > 0 and t.shape[0] == 1:
            t = t.squeeze(0)
        if self.pos_slice is not None and not _pooled_hook(name) and t.ndim >= -_pos_dim(name):
            t = self.pos_slice.apply(t, dim=_pos_dim(name))
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        device = self.device if self.device is not None else t.device
        if device.type == "cpu" and t.device.type == "cuda":
            out = torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=True)
            t = out.copy_(t, non_blocking=True)
        elif device != t.device or dtype != t.dtype:
            t = t.to(device=device, dtype=dtype)
        elif self.pos_slice is not None and t.untyped_storage().nbytes() > t.numel() * t.element_size():
            t = t.clone()  # a view (hook_pooled too: [CLS] of the final norm) would keep every position alive
        self.cache[name + self.suffix] = t

    def __repr__(self) -> str:
        return f"CachingHook(device={self.device}, dtype={self.dtype}, pos_slice={self.pos_slice is not None})"


class HookedViT(HookedRootModule):
    """A Vision Transformer whose every intermediate activation has a named hook point.

    Build one with :meth:`from_pretrained` (a timm name) or :meth:`from_timm` (an in-memory timm
    model). The forward pass reproduces timm's in float32 (max abs difference <= 1e-4).

    Hook points (TransformerLens names; shapes for a batch of ``B`` images, ``P`` positions)::

        hook_embed                       [B, P, d_model]  patch embeddings + prefix tokens
        hook_pos_embed                   [B, P, d_model]  position embedding (0 where none)
        ln_pre.hook_scale/hook_normalized                  (CLIP-style models only)
        blocks.{l}.hook_resid_pre        [B, P, d_model]
        blocks.{l}.ln1.hook_scale        [B, P, 1]
        blocks.{l}.ln1.hook_normalized   [B, P, d_model]
        blocks.{l}.attn.hook_q/k/v/z     [B, P, n_heads, d_head]
        blocks.{l}.attn.hook_attn_scores [B, n_heads, P, P]  (materialised only when hooked)
        blocks.{l}.attn.hook_pattern     [B, n_heads, P, P]
        blocks.{l}.attn.hook_result      [B, P, n_heads, d_model]  (cfg.use_attn_result)
        blocks.{l}.hook_attn_out         [B, P, d_model]
        blocks.{l}.hook_resid_mid        [B, P, d_model]
        blocks.{l}.ln2.hook_scale/hook_normalized
        blocks.{l}.mlp.hook_pre/hook_post [B, P, d_mlp]
        blocks.{l}.hook_mlp_out          [B, P, d_model]
        blocks.{l}.hook_resid_post       [B, P, d_model]
        ln_final.hook_scale/hook_normalized  [B, P, 1] / [B, P, d_model]  (timm's ``norm``)
        fc_norm.hook_scale/hook_normalized   [B, 1] / [B, d_model]  (pooled models only)
        hook_pooled                      [B, d_model]  the classifier input

    The classifier is the class-embedding matrix ``W_U`` [d_model, n_classes] with bias ``b_U``.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg)
        self.hook_embed = HookPoint()
        self.pos_embed = PosEmbed(cfg)
        self.hook_pos_embed = HookPoint()
        self.ln_pre = LayerNorm(cfg.d_model, cfg.eps) if cfg.has_norm_pre else None
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        #: final norm(s) -> pooling -> classifier(s), class directions and their declared state
        self.readout = Readout(cfg)
        #: timm data config used by :meth:`preprocess` (input_size, interpolation, mean, std, crop)
        self.data_config: dict = {
            "input_size": (cfg.in_chans, *cfg.image_size),
            "interpolation": "bicubic",
            "mean": (0.5,) * cfg.in_chans,
            "std": (0.5,) * cfg.in_chans,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }
        self._register_load_state_dict_pre_hook(_legacy_readout_keys)
        self.setup()

    def setup(self) -> None:
        """TransformerLens's setup, with the readout's hook points and modules under their
        TransformerLens names (``ln_final.hook_scale``, ``fc_norm.*``, ``hook_pooled``: no
        ``readout.`` prefix)."""
        super().setup()
        renamed_mods, renamed_hooks = {}, {}
        for name, module in self.mod_dict.items():
            short = name[len(_READOUT):] if name.startswith(_READOUT) else name
            module.name = short  # type: ignore[assignment]  # a plain attribute, not a submodule
            renamed_mods[short] = module
            if name in self.hook_dict:
                renamed_hooks[short] = module
        self.mod_dict, self.hook_dict = renamed_mods, renamed_hooks  # type: ignore[assignment]  # hook_dict's values are the HookPoints

    # the readout's parts, under the names TransformerLens code and users know
    @property
    def ln_final(self) -> Optional[LayerNorm]:
        return self.readout.ln_final

    @property
    def fc_norm(self) -> Optional[LayerNorm]:
        return self.readout.fc_norm

    @property
    def hook_pooled(self) -> HookPoint:
        return self.readout.hook_pooled

    @property
    def unembed(self) -> Optional[Unembed]:
        return self.readout.unembed

    @property
    def unembed_dist(self) -> Optional[Unembed]:
        return self.readout.unembed_dist

    @property
    def class_names(self) -> Optional[List[str]]:
        """Class names, index-aligned with the columns of ``W_U`` (None if unknown)."""
        return self.readout.class_names

    @class_names.setter
    def class_names(self, names: Optional[Sequence[str]]) -> None:
        self.readout.class_names = list(names) if names is not None else None

    @property
    def class_synsets(self) -> Optional[List[str]]:
        """WordNet ids of the classes (None if unknown)."""
        return self.readout.class_synsets

    @class_synsets.setter
    def class_synsets(self, synsets: Optional[Sequence[str]]) -> None:
        self.readout.class_synsets = list(synsets) if synsets is not None else None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: Union[Float[Tensor, "batch chans height width"], Float[Tensor, "batch pos d_model"]],
        return_type: ReturnType = "logits",
        stop_at_layer: Optional[int] = None,
        start_at_layer: Optional[int] = None,
    ) -> Union[Float[Tensor, "batch n_classes"], Float[Tensor, "batch pos d_model"], None]:
        """Run the model.

        Args:
            images: a normalised batch [batch, in_chans, height, width] (see :meth:`preprocess`);
                with ``start_at_layer``, the residual stream [batch, pos, d_model] entering that
                block instead (e.g. ``cache["blocks.6.hook_resid_pre"]``).
            return_type: ``"logits"`` returns the class logits [batch, n_classes] (the pooled
                classifier input [batch, d_model] for a headless model); ``None`` returns nothing
                (useful with :meth:`run_with_cache`).
            stop_at_layer: if given, run blocks ``0 .. stop_at_layer - 1`` only and return the
                residual stream entering block ``stop_at_layer`` [batch, pos, d_model]
                (negative values count from the end, as in TransformerLens).
            start_at_layer: if given, skip the embeddings and blocks ``0 .. start_at_layer - 1``
                and run from block ``start_at_layer`` on the residual stream passed as ``images``;
                ``n_layers`` runs only the final norm and head. Negative values count from the
                end. Hooks before that block do not fire. Combines with ``stop_at_layer``.
        """
        if return_type not in ("logits", None):
            raise InputError(f"return_type must be 'logits' or None, got {return_type!r}")
        if start_at_layer is None:
            grid = self._check_images(images)
            images = self._finite_in_model_dtype(images)
            embed = self.hook_embed(self.embed(images))
            pos = self.hook_pos_embed(self.pos_embed(embed.shape[0], grid))
            resid = embed + pos
            if self.ln_pre is not None:
                resid = self.ln_pre(resid)
            start = 0
        else:
            start = self._check_residual(images, start_at_layer)
            resid = images
        if stop_at_layer is not None:
            L = self.cfg.n_layers
            if isinstance(stop_at_layer, bool) or not hasattr(stop_at_layer, "__index__"):
                raise InputTypeError(f"stop_at_layer must be an int in -{L}..{L}, got {stop_at_layer!r}")
            if not -L <= operator.index(stop_at_layer) <= L:
                raise OutOfRangeError(
                    f"stop_at_layer={stop_at_layer} out of range: {self.cfg.model_name} has {L} blocks, so it must be in "
                    f"-{L}..{L} ({L}: the output of the last block)"
                )
        stop = len(range(self.cfg.n_layers)[:stop_at_layer])  # slice semantics, as before
        if stop < start:
            raise InputError(f"stop_at_layer ({stop_at_layer}) comes before start_at_layer ({start_at_layer})")
        for block in self.blocks[start:stop]:
            resid = block(resid)
        if stop_at_layer is not None:
            return resid
        pooled = self.readout.pooled(resid)
        if return_type is None:
            return None
        return self.readout.classify(pooled)

    def _check_residual(self, resid: Any, start_at_layer: int) -> int:
        """Validate a residual-stream input for ``start_at_layer``; returns the block index."""
        cfg = self.cfg
        L = cfg.n_layers
        given = start_at_layer
        try:
            start_at_layer = operator.index(start_at_layer)
        except TypeError:
            start_at_layer = None  # type: ignore[assignment]  # a non-int is refused just below
        if start_at_layer is None or not -L <= start_at_layer <= L:
            raise InputError(f"start_at_layer must be an int in -{L}..{L} ({cfg.model_name} has {L} blocks), got {given!r}")
        start = start_at_layer if start_at_layer >= 0 else start_at_layer + L
        where = f"blocks.{start}.hook_resid_pre" if start < L else f"blocks.{L - 1}.hook_resid_post"
        if not isinstance(resid, Tensor) or resid.ndim != 3 or resid.shape[-1] != cfg.d_model:
            got = tuple(resid.shape) if isinstance(resid, Tensor) else type(resid).__name__
            raise InputError(
                f"with start_at_layer, pass the residual stream [batch, pos, {cfg.d_model}] entering that block "
                f"(e.g. cache['{where}']), not images; got {got}"
            )
        if resid.shape[1] <= cfg.n_prefix_tokens and cfg.pooling not in ("token", "token_dist"):
            raise InputError(
                f"the residual stream has {resid.shape[1]} positions; {cfg.model_name} averages its image "
                f"tokens, so it needs its {cfg.n_prefix_tokens} prefix token(s) and at least one image token"
            )
        return start

    def _finite_in_model_dtype(self, images: Tensor) -> Tensor:
        """Images in the model's dtype (pixels are exact in any float dtype, so a float32 batch runs
        on a float64 model), refusing NaN / inf pixels: they would propagate into every token and
        every score silently."""
        ref = self.embed.W_E
        if images.device != ref.device:
            raise InputError(
                f"the images are on {images.device} but the model is on {ref.device}; move them with "
                f"images.to(model.device) (model.preprocess(...) does this)"
            )
        if images.dtype != ref.dtype:
            images = images.to(ref.dtype)
        # one reduction instead of an elementwise check: NaN / inf make the sum non-finite (a finite
        # batch whose sum overflows falls through to the exact check below)
        if not bool(torch.isfinite(images.sum())) and not bool(torch.isfinite(images).all()):
            bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
            raise InputError(
                f"images {bad} of the batch contain NaN or inf pixels; every score computed from them would be "
                "meaningless. Check how they were loaded or normalised (model.preprocess(paths) gives a clean batch)."
            )
        return images

    def _check_images(self, images: Any) -> tuple:
        cfg = self.cfg
        if not isinstance(images, Tensor):
            raise InputTypeError(
                f"HookedViT expects a float tensor [batch, {cfg.in_chans}, H, W]; got {type(images).__name__}. "
                "Use model.preprocess(images) to turn PIL images, paths or uint8 arrays into a batch."
            )
        if images.ndim == 3:
            raise InputError(
                f"expected a batch [batch, {cfg.in_chans}, H, W], got a single image of shape {tuple(images.shape)}; "
                "add a batch axis with images[None] or images.unsqueeze(0)."
            )
        if images.ndim != 4:
            raise InputError(f"expected images of shape [batch, {cfg.in_chans}, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise InputTypeError(
                f"expected a float tensor, got dtype {images.dtype}; use model.preprocess(images) "
                "to convert uint8 images (it resizes and normalises them with the model's own config)."
            )
        if images.shape[0] == 0:
            raise InputError(
                f"the batch is empty (shape {tuple(images.shape)}); pass at least one image [batch >= 1, {cfg.in_chans}, H, W]"
            )
        if images.shape[1] != cfg.in_chans:
            raise InputError(
                f"expected {cfg.in_chans} channels, got images of shape {tuple(images.shape)} "
                f"({images.shape[1]} channels); channels come second: [batch, channels, height, width]."
            )
        H, W = images.shape[-2:]
        ph, pw = cfg.patch_size
        if cfg.dynamic_img_size:
            if H % ph or W % pw:
                raise InputError(
                    f"image size {H}x{W} is not a multiple of the patch size {ph}x{pw}; "
                    "resize the images, or use model.preprocess(images)."
                )
            return (H // ph, W // pw)
        if (H, W) != tuple(cfg.image_size):
            raise InputError(
                f"{cfg.model_name} takes {cfg.image_size[0]}x{cfg.image_size[1]} images, got {H}x{W}. "
                "Use model.preprocess(images) to resize and normalise them with the model's own config."
                + _other_sizes_hint(cfg)
            )
        return cfg.grid_size

    # ------------------------------------------------------------------ hooks & caching
    def _hook_is_live(self, name: str) -> bool:
        """Whether a hook on this point would fire (``hook_result`` needs ``use_attn_result``)."""
        return not (name.endswith("attn.hook_result") and not self.cfg.use_attn_result)

    def _check_hook_name(self, name: str) -> None:
        if name not in self.hook_dict:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise InputError(
                f"unknown hook name {name!r}.{hint} List them with list(model.hook_dict) "
                f"(block hooks look like 'blocks.0.attn.hook_pattern'; layers 0..{self.cfg.n_layers - 1})."
            )
        if not self._hook_is_live(name):
            raise InputError(
                f"{name!r} only fires when per-head results are computed; call "
                "model.set_use_attn_result(True) first (or use hook_z and W_O)."
            )

    def _enable_hook(self, name: Union[str, Callable], hook: Callable, dir: Literal["fwd", "bwd"]):
        if isinstance(name, str):
            self._check_hook_name(name)
            return super()._enable_hook(name, hook, dir)
        matched = [n for n in self.hook_dict if name(n)]
        live = [n for n in matched if self._hook_is_live(n)]
        if matched and not live:
            raise InputError(
                f"the hook filter matches only {matched[:3]}..., which fire only with "
                "model.set_use_attn_result(True)"
            )
        for n in live:
            self.hook_dict[n].add_hook(hook, dir=dir, level=self.context_level)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        if isinstance(name, str):
            self._check_hook_name(name)
        return super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def get_caching_hooks(
        self, names_filter=None, incl_bwd=False, device=None, remove_batch_dim=False, cache=None, pos_slice=None,
        dtype: Optional[torch.dtype] = None,
    ):
        """As TransformerLens's, but unknown names are an error, hooks that cannot fire are skipped, and:

        * ``device``: where to store the cache (e.g. ``"cpu"`` while the model runs on a GPU); copies
          from a GPU go to pinned memory without blocking (:meth:`run_with_cache` waits for them).
        * ``dtype``: store floating activations in this precision (e.g. ``torch.bfloat16``: half the memory).
        * ``pos_slice``: keep only these token positions (an int, a list of ints, a ``slice`` or
          ``(start, stop[, step])``); each kept tensor owns its memory (TransformerLens keeps a view
          holding every position alive). The pooled hooks (``hook_pooled``, ``fc_norm.*``) have no
          token axis and are kept whole; ``hook_attn_scores`` / ``hook_pattern`` are sliced on the
          query axis, ``hook_q/k/v/z/result`` on their position axis.

        The hooks are :class:`CachingHook` objects: they never edit an activation (``read_only``), so
        the forward runs its fast paths (fused LayerNorm) while they are attached.
        """
        names_filter = self._names_filter(names_filter)
        cache = {} if cache is None else cache
        sl = None if pos_slice is None else Slice.unwrap(pos_slice)
        fwd_hooks, bwd_hooks = [], []
        for name in self.hook_dict:
            if names_filter(name):
                fwd_hooks.append((name, CachingHook(cache, device=device, dtype=dtype, pos_slice=sl,
                                                    remove_batch_dim=remove_batch_dim)))
                if incl_bwd:
                    bwd_hooks.append((name, CachingHook(cache, device=device, dtype=dtype, pos_slice=sl,
                                                        remove_batch_dim=remove_batch_dim, suffix="_grad")))
        self.is_caching = True
        return cache, fwd_hooks, bwd_hooks

    def _names_filter(self, names_filter) -> Callable[[str], bool]:
        """A hook-name predicate from None (every hook that can fire), a name, a list of names
        (each checked) or a function name -> bool."""
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple)):
            for n in names_filter:
                self._check_hook_name(n)
            return set(names_filter).__contains__
        if names_filter is None:
            return self._hook_is_live
        if callable(names_filter):
            user_filter = names_filter
            return lambda n: bool(user_filter(n)) and self._hook_is_live(n)
        raise InputTypeError("names_filter must be None, a hook name, a list of hook names, or a function name -> bool")

    @overload
    def run_with_cache(
        self, *model_args: Any, return_type: None, return_cache_object: Literal[True] = True,
        remove_batch_dim: bool = False, **kwargs: Any,
    ) -> Tuple[None, ActivationCache]: ...

    @overload
    def run_with_cache(
        self, *model_args: Any, return_cache_object: Literal[False], remove_batch_dim: bool = False, **kwargs: Any
    ) -> Tuple[Optional[Tensor], Dict[str, Tensor]]: ...

    @overload
    def run_with_cache(
        self, *model_args: Any, return_cache_object: Literal[True] = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> Tuple[Tensor, ActivationCache]: ...

    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> Tuple[Optional[Tensor], Union[ActivationCache, Dict[str, Tensor]]]:
        """Run the model and cache activations.

        Accepts TransformerLens's arguments (``names_filter``, ``device``, ``remove_batch_dim``,
        ``incl_bwd``, ``pos_slice``, ...) plus this model's ``forward`` arguments, and ``dtype``
        (store the cache in e.g. ``torch.bfloat16``). Memory options for big models (see
        :meth:`get_caching_hooks`): ``device="cpu"`` caches to host memory while the model runs on a
        GPU, ``dtype=torch.float16`` halves the cache, ``pos_slice=0`` keeps only [CLS], and
        :meth:`stream_reductions` keeps only reductions over a whole dataset.

        Speed: run it under ``torch.inference_mode()`` (or ``torch.no_grad()``): without gradients the
        LayerNorms stay fused while cached; with gradients they run the explicit (slower) form so that
        gradients reach every hook. In a loop of caches (one batch after another), call
        ``vit_lens.perf.keep_freed_memory()`` once first: glibc then keeps the memory of a dropped cache
        for the next one instead of handing it back to the OS and page-faulting it in again (the full
        cache then costs about a forward more; results bit-identical; the process keeps that memory).

        Returns:
            ``(output, cache)`` where ``cache`` is a :class:`transformer_lens.ActivationCache`
            (a plain dict if ``return_cache_object=False``).
        """
        names_filter = kwargs.pop("names_filter", None)
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        incl_bwd = kwargs.pop("incl_bwd", False)
        pos_slice = kwargs.pop("pos_slice", None)
        reset_hooks_end = kwargs.pop("reset_hooks_end", True)
        clear_contexts = kwargs.pop("clear_contexts", False)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputTypeError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
        if remove_batch_dim and model_args and isinstance(model_args[0], Tensor) and model_args[0].ndim > 0 \
                and model_args[0].shape[0] != 1:
            raise InputError(f"remove_batch_dim=True needs a batch of one image, got a batch of {model_args[0].shape[0]}")
        cache_dict, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, pos_slice=pos_slice, dtype=dtype
        )
        with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*model_args, **kwargs)
            if incl_bwd:
                out.backward()
        if device is not None and self.device.type == "cuda" and torch.device(device).type == "cpu":
            torch.cuda.synchronize(self.device)  # the non-blocking copies to pinned memory have landed
        if return_cache_object:
            return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
        return out, cache_dict

    def stream_reductions(
        self,
        batches: Any,
        reductions: Dict[str, Union[Literal["sum", "mean", "max", "min"], Callable[[Tensor], Tensor]]],
        *,
        device: Any = None,
        progress: bool = True,
        total: Optional[int] = None,
        **forward_kwargs: Any,
    ) -> Dict[str, Tensor]:
        """Run the model over a dataset, keeping for each named hook only a reduction of its activation.

        The full cache of one ViT-B/16 batch of 32 is about 7 GB; this keeps, per hook, only what an
        analysis needs, computed inside the hook (the activation is dropped as the forward moves on).

        Args:
            batches: an iterable of image batches [batch, chans, H, W] (e.g. a DataLoader's image tensors);
                batches on another device are moved to the model's.
            reductions: hook name -> ``"sum"`` / ``"mean"`` / ``"max"`` / ``"min"`` over every image of
                every batch (result: the activation's shape without the batch axis; sums and means are
                accumulated in float64), or a function ``f(act [batch, ...]) -> [batch, ...]`` whose
                per-image results are concatenated in batch order (result: [n_images, ...]), e.g.
                ``lambda a: a[:, 0]`` keeps [CLS] only and ``lambda a: a.norm(dim=-1)`` one norm per token.
            device: where the results are kept (default: the model's device).
            progress: show a progress bar over the batches; ``total`` its length.
            **forward_kwargs: passed to :meth:`forward` (``return_type=None`` is set unless given).

        Returns:
            hook name -> the reduced tensor. Runs under ``torch.inference_mode()``.
        """
        from vit_lens.core.batching import progress_bar

        if not isinstance(reductions, dict) or not reductions:
            raise InputTypeError(
                "reductions must be a non-empty dict hook name -> 'sum' | 'mean' | 'max' | 'min' | function, "
                "e.g. {'blocks.5.hook_resid_post': 'mean'}"
            )
        for name, how in reductions.items():
            self._check_hook_name(name)
            if not callable(how) and how not in ("sum", "mean", "max", "min"):
                raise InputError(f"reduction of {name!r} must be 'sum', 'mean', 'max', 'min' or a function, got {how!r}")
        forward_kwargs.setdefault("return_type", None)
        keep: Dict[str, Any] = {}  # name -> accumulated tensor, or the list of per-batch results
        state = {"n": 0}

        def make_hook(name: str, how: Any) -> Callable[..., None]:
            def hook(act: Tensor, hook: Any = None) -> None:
                a = act.detach()
                if callable(how):
                    r = how(a)
                    if not isinstance(r, Tensor) or r.ndim == 0 or r.shape[0] != a.shape[0]:
                        got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
                        raise InputError(
                            f"the reduction of {name!r} must return one row per image ([{a.shape[0]}, ...]), got {got}; "
                            "use 'sum' / 'mean' / 'max' / 'min' for reductions over the images"
                        )
                    keep.setdefault(name, []).append(r.to(out_device))
                    return
                if how in ("sum", "mean"):
                    r = a.sum(0, dtype=torch.float64 if a.device.type != "mps" else torch.float32)
                    keep[name] = r if name not in keep else keep[name] + r
                else:
                    r = a.amax(0) if how == "max" else a.amin(0)
                    keep[name] = r if name not in keep else torch.maximum(keep[name], r) if how == "max" \
                        else torch.minimum(keep[name], r)

            hook.read_only = True  # type: ignore[attr-defined]  # lets the forward keep its fast paths
            return hook

        out_device = self.device if device is None else torch.device(device)
        hooks: List[Tuple[Union[str, Callable[..., Any]], Callable[..., Any]]] = [
            (name, make_hook(name, how)) for name, how in reductions.items()
        ]
        with torch.inference_mode():
            for images in progress_bar(batches, progress=progress, total=total, desc="batches", unit="batch"):
                if isinstance(images, Tensor) and images.device != self.device:
                    images = images.to(self.device)
                self.run_with_hooks(images, fwd_hooks=hooks, **forward_kwargs)
                state["n"] += images.shape[0]
        if state["n"] == 0:
            raise InputError("no batches: pass an iterable of image batches [batch, chans, H, W]")
        result: Dict[str, Tensor] = {}
        for name, how in reductions.items():
            if name not in keep:
                raise InputError(f"{name!r} did not fire (e.g. a block outside start_at_layer / stop_at_layer)")
            v = keep[name]
            if callable(how):
                result[name] = torch.cat(v)
            elif how == "mean":
                result[name] = (v / state["n"]).to(out_device)
            else:
                result[name] = v.to(out_device)
        return result

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head outputs and fire ``blocks.{l}.attn.hook_result`` (costs memory)."""
        self.cfg.use_attn_result = bool(use_attn_result)

    # ------------------------------------------------------------------ class space (delegates to self.readout)
    @property
    def W_U(self) -> Float[Tensor, "d_model n_classes"]:
        """The class embeddings (classifier weight), one column per class."""
        return self.readout.require_head().W_U

    @property
    def b_U(self) -> Float[Tensor, "n_classes"]:
        return self.readout.require_head().b_U

    def to_single_token(self, name: Union[str, int]) -> int:
        """Class index of a class name (TransformerLens's name for :meth:`class_index`)."""
        return self.class_index(name)

    def class_index(self, name: Union[str, int]) -> int:
        """Class index from an index, a class name (``"tabby cat"``, ``"tabby, tabby cat"``) or a
        WordNet id; see :func:`vit_lens.core.class_index` (ambiguous names are an error listing the
        candidates; unknown ones suggest close names)."""
        from vit_lens.core.targets import class_index

        return class_index(self, name)

    def tokens_to_residual_directions(
        self, classes: Union[int, str, Int[Tensor, "..."]]
    ) -> Float[Tensor, "... d_model"]:
        """Residual-stream direction of a class, as ``ActivationCache.logit_attrs`` needs it.

        The direction is the class embedding ``W_U[:, c]`` with the final LayerNorm's weight
        folded in (``ln_final.w * W_U[:, c]``), so that for a residual vector ``r`` whose final-norm
        scale is ``s``::

            logit_c = (r - mean(r)) / s . direction_c  +  ln_final.b . W_U[:, c]  +  b_U[c]

        (with ``fold_ln=True`` the weight is 1 and the bias is folded into ``b_U``).
        Distilled models: the mean of both heads' directions (``class_directions(head=...)``
        gives each head's). ``"token_avg"`` models (HF's ``Dinov2ForImageClassification``): the sum
        of the [CLS] and patch-mean heads' directions; for the exact share of one position use
        ``class_directions(head="cls")`` at [CLS] and ``class_directions(head="patch") / n_patches``
        at each patch, or :func:`vit_lens.attribution.dla`. Models with ``fc_norm`` (average pooling) have no ``ln_final``:
        ``ActivationCache.apply_ln_to_stack`` then has no final scale to use; project with
        :meth:`project_to_classes` instead.
        """
        W = self.class_directions()
        if isinstance(classes, str) or isinstance(classes, int):
            return W[:, self.class_index(classes)]
        classes = torch.as_tensor(classes, device=W.device)
        return W.T[classes]

    def class_directions(self, head: Optional[Literal["mean", "cls", "dist", "patch"]] = None) -> Float[Tensor, "d_model n_classes"]:
        """``W_U`` with the weight of the norm right before the classifier folded in.

        Distilled models (``cfg.pooling == "token_dist"``) have two heads: ``head="cls"`` gives the
        [CLS] head's directions, ``"dist"`` the distillation head's and ``"mean"`` (their default)
        the average of both, the directions :meth:`project_to_classes` uses. ``"token_avg"`` models
        (HF's ``Dinov2ForImageClassification``, one linear layer ``W`` on concat([CLS], mean of the
        patches)) have two heads too: ``head="cls"`` gives ``W[:D]`` (reads [CLS], carries the bias),
        ``"patch"`` gives ``W[D:]`` (reads the patch mean, no bias), and the default (None) their sum,
        the classifier applied to a sequence whose every token is the vector. Other models have one
        head (``head`` may be None or ``"cls"``).
        """
        return self.readout.class_directions(head)

    @property
    def W_U_dist(self) -> Float[Tensor, "d_model n_classes"]:
        """The distillation head's class embeddings (distilled DeiT only)."""
        return self._dist_head().W_U

    @property
    def b_U_dist(self) -> Float[Tensor, "n_classes"]:
        return self._dist_head().b_U

    def _dist_head(self) -> Unembed:
        if self.cfg.pooling != "token_dist":
            raise InputError(f"{self.cfg.model_name} has no distillation head (pooling={self.cfg.pooling!r})")
        self.readout.require_head()
        return self.readout.unembed_dist  # type: ignore[return-value]  # a distilled model with a head has both

    def project_to_classes(
        self,
        x: Float[Tensor, "... d_model"],
        *,
        head: Optional[Literal["mean", "cls", "dist", "patch"]] = None,
    ) -> Float[Tensor, "... n_classes"]:
        """Project residual-stream vectors onto the classes, each vector on its own.

        Applies, to every vector ``x[..., :]`` separately, the model's own final normalisation
        (with that vector's own mean and scale) and its classifier, bias included: ``ln_final``
        (if the model has one), then ``fc_norm`` (if it has one), then ``x @ W_U + b_U``. This
        is the "class embedding space" projection of Vilas et al. (2023). It fires no hooks and
        does not modify the model.

        What the "final LayerNorm" is, per pooling kind, and the exact identity with the logits
        (``r = cache["blocks.{L-1}.hook_resid_post"]``, ``n = cfg.n_prefix_tokens``):

        * ``"token"`` ([CLS] pooling): ``ln_final``.
          ``logits == project_to_classes(r[:, 0])``.
        * ``"avg"`` with ``fc_norm`` (timm's default for average pooling, e.g. the ``rpn`` model):
          ``fc_norm`` on the pooled vector. ``logits == project_to_classes(r[:, n:].mean(1))``.
        * ``"avg"`` with ``ln_final`` and no ``fc_norm`` (timm ``fc_norm=False``, the ``*_gap_*``
          models): ``ln_final`` on each token, then the mean. As the classifier is linear,
          ``logits == project_to_classes(r[:, n:]).mean(1)``.
        * ``"token_dist"`` (distilled DeiT): ``ln_final``, then by default the mean of both heads
          (``head="cls"`` / ``"dist"`` selects one).
          ``logits == (project_to_classes(r[:, 0], head="cls") + project_to_classes(r[:, 1], head="dist")) / 2``.
        * ``"token_avg"`` (HF's ``Dinov2ForImageClassification`` and ``...WithRegisters...``):
          ``ln_final`` on each token, then the [CLS] head on [CLS] plus the patch head on the mean of
          the patch tokens (register tokens are read by neither); by default the sum of both heads.
          ``logits == project_to_classes(r[:, 0], head="cls") + project_to_classes(r[:, n:], head="patch").mean(1)``.

        Args:
            x: residual vectors [..., d_model] (any leading axes: batch, position, component...).
            head: distilled models: ``"mean"`` (default), ``"cls"`` or ``"dist"``; ``"token_avg"``
                models: None (default, the sum), ``"cls"`` or ``"patch"``.

        Returns:
            class scores [..., n_classes]. A headless model needs :meth:`set_class_directions` first.
        """
        return self.readout.project(x, "paper", head=head)

    def set_class_directions(
        self,
        W: Float[Tensor, "d_in n_classes"],
        labels: Optional[Sequence[str]] = None,
        bias: Optional[Float[Tensor, "n_classes"]] = None,
        *,
        space: Literal["residual", "head"] = "residual",
    ) -> None:
        """Replace (or give a headless model) the class embeddings: the "class space".

        Args:
            W: class directions, one column per class.
                ``space="residual"``: [d_model, n_classes], applied to the model's pooled
                features as the unprocessed model computes them (after its final norm: timm's
                pre-logits), so ``logits = pooled_features @ W + bias``. A linear probe trained
                on timm's ``forward_head(x, pre_logits=True)`` plugs in directly.
                ``space="head"``: [n_head_outputs, n_classes], applied to the outputs of the
                model's original head, so ``logits = original_outputs @ W + bias`` and
                ``W_U = W_head @ W``. For CLIP image towers, whose head projects into the
                image-text space, pass the text embeddings of the class names
                [proj_dim, n_classes]: the logits are then ``image_embedding @ W_text``, i.e.
                CLIP's zero-shot cosine logits times ``|image_embedding|`` (a positive
                per-image factor: same ranking of classes, not the same softmax) when the
                columns of ``W_text`` have unit norm. Distilled models compose each head.
                ``"token_avg"`` models (HF's ``Dinov2ForImageClassification``): ``space="residual"``
                takes ``[2 * d_model, n_classes]`` applied to HF's classifier input
                concat(final-norm [CLS], mean of the final-norm patches) (rows ``:D`` read [CLS],
                rows ``D:`` the patch mean); ``space="head"`` composes with both halves, the bias once.
            labels: class names, one per column.
            bias: optional bias [n_classes] (zeros by default).
            space: ``"residual"`` (default) or ``"head"``.

        Weight processing applied at load time (``fold_ln``, ``center_unembed``) is applied to
        the new directions as well, so the same ``W`` gives the same logits (up to the
        per-example constant of ``center_unembed``) with or without processing.
        """
        from vit_lens.loading.processing import applied_processing

        if isinstance(labels, str):
            raise InputTypeError(f"labels must be a list of class names, one per column of W, got the string {labels!r}")
        if labels is not None and isinstance(W, Tensor) and W.ndim == 2 and len(labels) != W.shape[1]:
            raise InputError(f"{len(labels)} labels for {W.shape[1]} class directions; give one label per column of W")
        heads = self.readout.new_heads(W, bias, space, applied_processing(self), device=self.device, dtype=self.dtype)
        self.readout.set_heads(heads, labels)
        self.setup()

    # ------------------------------------------------------------------ weights, TransformerLens-style
    def _stack(self, getter: Callable[[TransformerBlock], Tensor]) -> Tensor:
        return torch.stack([getter(b) for b in self.blocks], dim=0)  # type: ignore[arg-type]  # blocks holds TransformerBlocks

    @property
    def W_E(self) -> Tensor:
        """Patch projection [d_model, in_chans, patch_h, patch_w]."""
        return self.embed.W_E

    @property
    def W_pos(self) -> Tensor:
        return self.pos_embed.W_pos

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.mlp.b_out)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, "d_model"]:
        """The biases the sublayers write into the residual stream before a point, summed
        (TransformerLens's method, which ``ActivationCache.get_full_resid_decomposition`` calls).

        Args:
            layer: ``0 .. n_layers``: biases of blocks ``0 .. layer - 1`` (``n_layers``: all).
            mlp_input: also the attention bias ``b_O`` of block ``layer`` (the stream entering its MLP).
            include_mlp_biases: include the MLP biases ``b_out`` (False when the MLP outputs are split
                into neurons, whose decomposition leaves the bias out).

        Exact for pre-norm blocks, where each sublayer adds ``... + bias`` to the stream. Post-norm
        blocks (timm's ``ResPostBlock``) normalise the sublayer output, so a bias is not a term of
        the stream there: refused.
        """
        L = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= L:
            raise OutOfRangeError(f"layer must be an int in 0..{L} (n_layers: every block), got {layer!r}")
        if self.cfg.post_norm:
            raise InputError(
                f"{self.cfg.model_name} has post-norm blocks: their LayerNorm rescales each sublayer output, so "
                "biases are not additive terms of the residual stream and no bias decomposition is exact"
            )
        total = torch.zeros(self.cfg.d_model, device=self.device, dtype=self.dtype)
        for l in range(layer):
            total = total + self.blocks[l].attn.b_O  # type: ignore[operator, union-attr]  # blocks holds TransformerBlocks
            if include_mlp_biases:
                total = total + self.blocks[l].mlp.b_out  # type: ignore[operator, union-attr]  # blocks holds TransformerBlocks
        if mlp_input:
            if layer >= L:
                raise OutOfRangeError(f"mlp_input=True needs a block: layer must be in 0..{L - 1}, got {layer}")
            total = total + self.blocks[layer].attn.b_O  # type: ignore[operator, union-attr]  # blocks holds TransformerBlocks
        return total

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_timm(cls, model: nn.Module, *, device: Any = None, dtype: Optional[torch.dtype] = None, **processing: bool) -> "HookedViT":
        """Convert an in-memory timm ``VisionTransformer`` (e.g. your own fine-tuned one).

        Args:
            model: a timm Vision Transformer; it is not modified.
            device, dtype: where and in which precision to put the converted model
                (default: those of ``model``).
            **processing: weight-processing options (see :func:`vit_lens.loading.process_weights`).
        """
        from vit_lens.loading import convert_timm_model

        return convert_timm_model(cls, model, device=device, dtype=dtype, **processing)  # type: ignore[arg-type]  # a `name=` keyword would reach convert_timm_model's name

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
        timm_kwargs: Optional[dict] = None,
        **processing: bool,
    ) -> "HookedViT":
        """Load a pretrained timm ViT by name and convert it.

        Args:
            name: a timm model name, with or without a pretrained tag
                (``"vit_tiny_patch16_224"`` means timm's default tag,
                ``"vit_tiny_patch16_224.augreg_in21k_ft_in1k"``); ``"timm:NAME"`` is the same. A source
                prefix loads from another library with the same options: ``"hf:google/vit-base-patch16-224"``
                (:meth:`from_hf`; ``checkpoint_path`` = a local ``save_pretrained`` directory) and
                ``"open_clip:ViT-B-32/openai"`` (``from_open_clip("ViT-B-32", pretrained="openai")``).
            checkpoint_path: a local weights file (``.safetensors``, ``.pth``, ``.bin``) in timm's
                state-dict layout, e.g. your own fine-tune. Without it,
                ``$VIT_LENS_CHECKPOINTS/<name.tag>.safetensors`` is used when it exists, else timm
                downloads the weights from the hub.
            device: where to put the model (default CPU).
            dtype: parameter dtype (default float32).
            timm_kwargs: extra ``timm.create_model`` arguments, e.g. ``dict(dynamic_img_size=True)``
                to accept other image sizes (position embeddings interpolated as timm does) or
                ``dict(img_size=448)``.
            **processing: weight-processing options ``fold_ln``, ``center_writing_weights``,
                ``center_unembed``, ``fold_value_biases`` (see :mod:`vit_lens.loading.processing`).

        A weights file is loaded strictly: every tensor in it must fit the model (a missing or
        unexpected key, or another shape, is a :class:`~vit_lens.loading.CheckpointMismatchError`
        naming the keys), so no weight is ever left randomly initialised. ``num_classes`` is read
        from the file's ``head.weight`` (0 without a head), and ``in_chans``, ``patch_size`` and a
        square ``img_size`` from its patch and position embeddings, unless given in
        ``timm_kwargs`` (a ``num_classes`` that contradicts the file is an error). A file whose
        name (``<arch>.<tag>.safetensors``), metadata or ``config.json`` names another model is
        refused with that model's name; a file that names no pretrained tag (and ``name`` gives
        none) loads as ``cfg.model_name == "<arch>.unknown"`` with the architecture's default
        preprocessing and a :class:`~vit_lens.loading.CheckpointWarning`. Class names are timm's
        ImageNet labels only when the head has as many classes as that label set (so a 10-class
        fine-tune has none).

        Supported families: ``vit_lens.supported_models()``; anything else is refused with
        :class:`~vit_lens.UnsupportedModelError` naming the feature, before weights are read.
        """
        from vit_lens.loading import load_pretrained

        if isinstance(name, str) and name.startswith(("hf:", "open_clip:")):
            source, _, rest = name.partition(":")
            if timm_kwargs is not None:
                raise InputTypeError(f"timm_kwargs is for timm models; {name!r} is a {source} model: leave it out")
            if source == "hf":
                return cls.from_hf(rest, checkpoint_path=checkpoint_path, device=device, dtype=dtype, **processing)
            if not hasattr(cls, "from_open_clip"):
                from vit_lens.core.errors import NotDefinedError

                raise NotDefinedError(f"{name!r}: this vit_lens has no OpenCLIP source (HookedViT.from_open_clip)")
            if rest.startswith(("hf-hub:", "local-dir:")):  # a folder or hub id: its "/" are no tag
                arch, tag = rest, ""
            else:
                arch, _, tag = rest.partition("/")
            if checkpoint_path is not None:  # a weights file is OpenCLIP's `pretrained=`
                if tag:
                    raise InputError(f"{name!r} names the weights (tag {tag!r}) and checkpoint_path gives a file: "
                                     "give one of them")
                tag = os.fspath(checkpoint_path)
            return cls.from_open_clip(arch, pretrained=tag or None, device=device, dtype=dtype, open_clip_kwargs=None,
                                      **processing)
        if isinstance(name, str) and name.startswith("timm:"):
            name = name[len("timm:"):]
        return load_pretrained(
            cls, name, checkpoint_path=checkpoint_path, device=device, dtype=dtype, timm_kwargs=timm_kwargs, **processing
        )

    @classmethod
    def from_hf(
        cls,
        model_or_name: Any,
        *,
        image_processor: Any = None,
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        interpolate_pos_encoding: bool = False,
        **processing: bool,
    ) -> "HookedViT":
        """Convert a Hugging Face ``transformers`` image model (in memory, a hub id or a local directory).

        Args:
            model_or_name: a ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
                ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``,
                ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel`` (its image tower),
                ``Dinov2Model``, ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel`` or
                ``Dinov2WithRegistersForImageClassification`` -- yours, with any number of labels (``id2label`` -> ``class_names``) -- or
                a hub id (``"google/vit-base-patch16-224"``) or a directory written by ``save_pretrained``
                (the class is ``config.architectures[0]``; weights are loaded strictly).
            image_processor: the ``transformers`` image processor whose output :meth:`preprocess`
                reproduces; default: the directory's / hub's one when loading by name, else the
                family's defaults at the config's image size (recorded in ``model.data_config``).
            checkpoint_path: a local ``save_pretrained`` directory to read instead of the hub.
            device, dtype: default those of the model (in memory), else CPU / float32.
            interpolate_pos_encoding: ViT / DeiT / CLIP: accept other image sizes (multiples of the
                patch size), interpolating the position embeddings exactly as transformers' forward with
                ``interpolate_pos_encoding=True`` does (kept in ``model.cfg``, saved and loaded). Without
                it, other sizes are refused, as HF's default forward refuses them. DINOv2 always
                interpolates, as HF's.
            **processing: weight-processing options (``fold_ln`` ...), as :meth:`from_pretrained`.

        ``ViTModel`` / ``DeiTModel`` carry a tanh ``pooler`` that is not the class-space path: the
        hooked model's output is the final-norm [CLS] token, as for timm's headless models.
        ``Dinov2ForImageClassification`` and ``Dinov2WithRegisters{Model,ForImageClassification}``
        are converted too (concat pooling as ``pooling="token_avg"``). Anything
        else (SigLIP's attention-pool head, ``Dinov2Backbone``, ...)
        is refused with :class:`~vit_lens.UnsupportedModelError` naming the feature.
        ``from_pretrained("hf:NAME")`` is the same as ``from_hf("NAME")``.
        """
        from vit_lens.loading.sources.hf import load_hf

        return load_hf(cls, model_or_name, image_processor=image_processor, checkpoint_path=checkpoint_path,
                       device=device, dtype=dtype, interpolate_pos_encoding=interpolate_pos_encoding, **processing)

    def save(self, path: Union[str, os.PathLike]) -> "os.PathLike":
        """Save weights, config (weight processing and class directions included), class names
        and preprocessing config to one ``.safetensors`` file; :meth:`load` reads it back.

        Use this rather than ``safetensors.torch.save_file(model.state_dict())``, which refuses
        the shared Q/K/V storage of a HookedViT (``torch.save(model.state_dict())`` works too).
        """
        from vit_lens.loading.saving import save_hooked

        return save_hooked(self, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, device: Any = None, dtype: Optional[torch.dtype] = None) -> "HookedViT":
        """Load a model written by :meth:`save` (no timm checkpoint or hub access needed)."""
        from vit_lens.loading.saving import load_hooked

        return load_hooked(cls, path, device=device, dtype=dtype)

    # ------------------------------------------------------------------ images
    def preprocess(self, images: Any, *, mode: Literal["timm", "paper"] = "timm") -> Float[Tensor, "batch chans height width"]:
        """Turn images into a normalised batch on the model's device.

        Args:
            images: a PIL image, a file path, a uint8 array/tensor ([H, W, C] or [C, H, W]),
                or a list of these (a uint8 tensor [B, C, H, W] counts as a list).
            mode: ``"timm"`` applies the model's own timm eval transform (resize, center crop,
                mean/std); ``"paper"`` resizes straight to the input size without cropping, as
                the seed paper does, then normalises with the same mean/std.

        Returns:
            [batch, in_chans, height, width] float tensor.
        """
        from vit_lens.preprocess import preprocess_images

        return preprocess_images(images, self.data_config, mode=mode).to(device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"HookedViT({c.model_name}: {c.n_layers} layers, d_model={c.d_model}, {c.n_heads} heads, "
            f"{c.n_classes} classes, {c.image_size[0]}x{c.image_size[1]} images, "
            f"{c.n_prefix_tokens}+{c.n_patches} tokens)"
        )

    # ------------------------------------------------------------------ more sources (issue 13)
    @classmethod
    def from_open_clip(
        cls,
        model_or_name: Any,
        pretrained: Optional[Union[str, os.PathLike]] = None,
        *,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        open_clip_kwargs: Optional[dict] = None,
        **processing: bool,
    ) -> "HookedViT":
        """Convert the image tower of an OpenCLIP model (``VisionTransformer`` towers: ViT-B-32,
        ViT-B-16, ViT-L-14, ViT-H-14, the ``-quickgelu`` variants, ...).

        Args:
            model_or_name: an OpenCLIP model (``open_clip.create_model(...)``; ``CLIP``,
                ``CustomTextCLIP``), its ``.visual`` tower, or a name: ``"ViT-B-32"``,
                ``"ViT-B-32/openai"``, ``"open_clip:ViT-B-32/openai"``, ``"local-dir:/folder"``.
            pretrained: with a name: an OpenCLIP tag (``"openai"``; OpenCLIP downloads it), a local
                weights file (loaded strictly by OpenCLIP), or None (random weights).
            device, dtype: where and in which precision (default: the model's; CPU float32 for a name).
            open_clip_kwargs: more ``open_clip.create_model`` arguments, with a name.
            **processing: weight-processing options (``fold_ln``, ``center_writing_weights``,
                ``center_unembed``, ``fold_value_biases``).

        The head is the tower's projection into the image-text space (``W_U = proj``
        [width, embed_dim], no bias): the logits are OpenCLIP's ``encode_image`` (unnormalised).
        Give it classes from text with :func:`vit_lens.clip.set_text_classes`.
        ``model.preprocess`` is OpenCLIP's own eval transform (mean / std / size / resize mode of
        the model). Anything that cannot be converted exactly is refused with
        :class:`~vit_lens.UnsupportedModelError` naming the feature.
        """
        from vit_lens.loading.sources.open_clip import from_open_clip

        return from_open_clip(cls, model_or_name, pretrained, device=device, dtype=dtype,
                              open_clip_kwargs=open_clip_kwargs, **processing)


def _other_sizes_hint(cfg: HookedViTConfig) -> str:
    """How a model of this source is loaded to accept other image sizes (for the wrong-size message)."""
    rows, cols = cfg.grid_size
    if cfg.extra.get("source") == "hf" and rows == cols and cfg.patch_size[0] == cfg.patch_size[1]:
        return (" To run other sizes, load it with HookedViT.from_hf(..., interpolate_pos_encoding=True) "
                "(position embeddings interpolated as transformers does).")
    return ""
