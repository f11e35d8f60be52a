"""Class spaces from text for CLIP image towers: text embeddings of class names as class directions.

A CLIP image tower converted to a :class:`~vit_lens.HookedViT` (``HookedViT.from_open_clip``, timm's
``vit_*_clip_*`` towers, or a Hugging Face ``CLIPVisionModelWithProjection``) outputs the image
embedding: its head is the projection into the image-text space. :func:`set_text_classes` encodes
prompts for each class name with the matching *text* tower, averages the normalised embeddings over
the prompt templates (then normalises again, as CLIP's zero-shot classifiers do) and sets them as
class directions in head space (``model.set_class_directions(W_text, labels=names, space="head")``,
so ``W_U = W_proj @ W_text``). Then::

    logits[i, c] = image_embedding_i . W_text[:, c] = |image_embedding_i| * cos(image_i, class_c)

i.e. CLIP's zero-shot cosine scores times a positive per-image factor: the same ranking of classes
for every image (:func:`zero_shot_logits` gives CLIP's own scaled cosine logits,
:func:`image_embedding` the image embedding). Every class-space
analysis (identifiability, logit lens, DLA per head, patching metrics) then reads these classes.

Text towers: an OpenCLIP model (anything with ``encode_text``) with its tokenizer
(``open_clip.get_tokenizer(name)``), or a Hugging Face ``CLIPModel`` / ``CLIPTextModelWithProjection``
with a tokenizer: a Hugging Face tokenizer, or any callable returning token ids (OpenCLIP's
tokenizer gives the same ids as OpenAI CLIP's BPE).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from vit_lens.core.batching import progress_bar
from vit_lens.core.errors import InputError, InputTypeError

#: a short default set of prompt templates (``{}`` is the class name); pass your own with ``templates=``
DEFAULT_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a drawing of a {}.",
)

Template = Union[str, Callable[[str], str]]


def _texts(class_names: Sequence[str], templates: Sequence[Template]) -> List[List[str]]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise InputTypeError(f"class_names must be a list of strings, got {type(class_names).__name__}")
    names = list(class_names)
    if not names:
        raise InputError("class_names is empty; pass at least one class name")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise InputTypeError(f"class names must be non-empty strings, got {bad[:3]}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"class names must be distinct (their labels name the classes); repeated: {dup[:5]}")
    # names are looked up ignoring case and surrounding spaces (model.class_index), and CLIP's tokenizers
    # lower-case the prompts: "cat" and "Cat " would be one class twice, with equal scores
    keys: dict = {}
    for n in names:
        keys.setdefault(n.strip().lower(), []).append(n)
    same = [v for v in keys.values() if len(v) > 1]
    if same:
        raise InputError(
            f"class names must be distinct ignoring case and surrounding spaces (names are looked up that way, and "
            f"CLIP's tokenizers lower-case the prompts); these name one class: {same[:3]}. Keep one of each"
        )
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise InputTypeError("templates must be a non-empty list of strings with '{}' (or callables name -> prompt)")
    out = []
    for t in templates:
        if callable(t):
            out.append(t)
        elif isinstance(t, str) and "{}" in t:
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError) as e:
                raise InputError(
                    f"template {t!r} must have exactly one '{{}}' for the class name and no other braces "
                    f"({type(e).__name__}: {e}); write literal braces as '{{{{' and '}}}}', e.g. 'a photo of a {{}}.'"
                ) from None
            out.append(t.format)
        else:
            raise InputError(f"template {t!r} has no '{{}}' for the class name; e.g. 'a photo of a {{}}.'")
    prompts = [[f(n) for f in out] for n in names]
    bad_p = [p for row in prompts for p in row if not isinstance(p, str)]
    if bad_p:
        raise InputTypeError(f"a callable template must return the prompt as a string, got {bad_p[:2]}")
    return prompts


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers comes with transformer-lens
        return False
    return isinstance(tokenizer, PreTrainedTokenizerBase)


def _tokenize(tokenizer: Any, texts: List[str]) -> Tuple[Tensor, Optional[Tensor]]:
    """(input ids [n, ctx] long, attention mask [n, ctx] or None) from either kind of tokenizer."""
    if not callable(tokenizer):
        raise InputTypeError(f"tokenizer must be callable (texts -> token ids), got {type(tokenizer).__name__}")
    out = tokenizer(texts, padding=True, return_tensors="pt") if _is_hf_tokenizer(tokenizer) else tokenizer(texts)
    mask = None
    if isinstance(out, Mapping):
        if "input_ids" not in out:
            raise InputTypeError(f"the tokenizer returned a mapping without 'input_ids' (keys {list(out)})")
        ids, mask = out["input_ids"], out.get("attention_mask")
    else:
        ids = out
    ids = torch.as_tensor(ids)
    if ids.ndim != 2 or ids.shape[0] != len(texts) or ids.dtype.is_floating_point:
        raise InputTypeError(
            f"the tokenizer must return integer token ids [n_texts={len(texts)}, context], got {tuple(ids.shape)} {ids.dtype}"
        )
    return ids.long(), (torch.as_tensor(mask) if mask is not None else None)


def _text_kind(text_model: Any) -> str:
    if hasattr(text_model, "encode_text"):
        return "open_clip"
    if hasattr(text_model, "get_text_features"):
        return "hf_clip"
    if type(text_model).__name__ == "CLIPTextModelWithProjection":
        return "hf_text_projection"
    raise InputTypeError(
        f"{type(text_model).__name__} has no text tower this function knows: pass an OpenCLIP model (with encode_text), "
        "or a Hugging Face CLIPModel / CLIPTextModelWithProjection"
    )


def _encode(text_model: Any, kind: str, ids: Tensor, mask: Optional[Tensor]) -> Tensor:
    ref = next(text_model.parameters())
    ids = ids.to(ref.device)
    if kind == "open_clip":
        ctx = getattr(text_model, "context_length", None)
        if isinstance(ctx, int) and ids.shape[1] != ctx:
            raise InputError(
                f"the token ids have context {ids.shape[1]}, but this OpenCLIP text tower takes {ctx}; use its own "
                "tokenizer, open_clip.get_tokenizer(model_name)"
            )
        vocab = getattr(text_model, "vocab_size", None)
        if isinstance(vocab, int) and int(ids.max()) >= vocab:
            raise InputError(f"token id {int(ids.max())} is outside the text tower's vocabulary of {vocab}; use its own tokenizer")
        return text_model.encode_text(ids)
    cfg = getattr(text_model, "config", None)
    vocab = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None)
    if isinstance(vocab, int) and int(ids.max()) >= vocab:
        raise InputError(f"token id {int(ids.max())} is outside the text tower's vocabulary of {vocab}; use its tokenizer")
    kwargs = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask.to(ref.device)
    if kind == "hf_clip":
        out = text_model.get_text_features(**kwargs)
        return out if isinstance(out, Tensor) else out.pooler_output  # transformers >= 5: a model output
    return text_model(**kwargs).text_embeds


def text_class_embeddings(
    text_model: Any,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Optional[Sequence[Template]] = None,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> Float[Tensor, "embed_dim n_classes"]:
    """Zero-shot class embeddings from text: for each class, the prompts ``template.format(name)``
    encoded by the text tower, each normalised to unit length, averaged over the templates and
    normalised again.

    Args:
        text_model: an OpenCLIP model (``encode_text``) or a Hugging Face ``CLIPModel`` /
            ``CLIPTextModelWithProjection``; it is run in evaluation mode without gradients and
            not modified.
        tokenizer: the text tower's tokenizer: OpenCLIP's (``open_clip.get_tokenizer(name)``), a
            Hugging Face tokenizer, or any callable ``list of texts -> ids [n, context]``.
        class_names: one name per class (distinct).
        templates: prompt templates with ``{}`` (or callables name -> prompt); default
            :data:`DEFAULT_TEMPLATES`.
        batch_size: prompts encoded per text-tower call.
        progress: show a progress bar over the batches.

    Returns:
        ``W_text`` [embed_dim, n_classes] float32 on the text tower's device, unit-norm columns.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    prompts = _texts(class_names, templates if templates is not None else DEFAULT_TEMPLATES)
    kind = _text_kind(text_model)
    n_t = len(prompts[0])
    flat = [p for row in prompts for p in row]
    was_training = bool(getattr(text_model, "training", False))
    text_model.eval()
    feats = []
    try:
        with torch.no_grad():
            starts = range(0, len(flat), batch_size)
            for s in progress_bar(starts, progress=progress and len(starts) > 1, desc="text classes"):
                ids, mask = _tokenize(tokenizer, flat[s:s + batch_size])
                feats.append(_encode(text_model, kind, ids, mask).float())
    finally:
        text_model.train(was_training)
    emb = F.normalize(torch.cat(feats), dim=-1).view(len(prompts), n_t, -1)
    if not bool(torch.isfinite(emb).all()):
        raise InputError("the text tower returned NaN / inf embeddings; check its weights and the tokenizer")
    return F.normalize(emb.mean(1), dim=-1).T.contiguous()


def set_text_classes(
    model: Any,
    text_model: Any,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Optional[Sequence[Template]] = None,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> Float[Tensor, "embed_dim n_classes"]:
    """Give a CLIP image tower classes defined by text: :func:`text_class_embeddings` set as class
    directions in head space, labelled with ``class_names``.

    Args:
        model: a :class:`~vit_lens.HookedViT` of a CLIP image tower (its head projects into the
            image-text space: ``cfg.n_classes`` = the embedding width, before any classes are set;
            later calls replace the classes, always composing with the original projection).
        text_model, tokenizer, class_names, templates, batch_size, progress: as
            :func:`text_class_embeddings`; the text tower must belong to the same CLIP model.

    After the call ``model(x)[i, c] = |image_embedding_i| * cos(image_i, text_c)``: the ranking of
    classes is CLIP's zero-shot ranking. Returns ``W_text`` [embed_dim, n_classes].
    """
    W = text_class_embeddings(text_model, tokenizer, class_names, templates, batch_size=batch_size, progress=progress)
    width = _head_outputs(model)
    if W.shape[0] != width:
        raise InputError(
            f"the text tower embeds into {W.shape[0]} dimensions, but the image tower's projection outputs {width}; "
            "pass the text tower of the same CLIP model"
        )
    model.set_class_directions(W.to(device=model.device, dtype=model.dtype), labels=list(class_names), space="head")
    return W


def _check_hooked(model: Any, what: str) -> None:
    from vit_lens.model import HookedViT

    if not isinstance(model, HookedViT):
        raise InputTypeError(
            f"{what} takes the HookedViT of a CLIP image tower as model, got {type(model).__name__}; convert it first: "
            "HookedViT.from_open_clip(clip_model) or HookedViT.from_hf(clip_model)"
        )


def _head_outputs(model: Any) -> int:
    """The width of the model's original head (the image embedding of a CLIP tower)."""
    _check_hooked(model, "set_text_classes")
    state = model.readout.head_source_W
    if state is not None:
        return int(state.shape[-1])
    if model.readout.unembed is None:
        raise InputError(
            f"{model.cfg.model_name} has no head: a CLIP image tower's head is its projection into the image-text "
            "space (load it with HookedViT.from_open_clip, or timm's vit_*_clip_* towers)"
        )
    return int(model.cfg.n_classes)


def zero_shot_logits(
    model: Any,
    images: Float[Tensor, "batch chans height width"],
    W_text: Float[Tensor, "embed_dim n_classes"],
) -> Float[Tensor, "batch n_classes"]:
    """CLIP's own zero-shot logits ``logit_scale * cos(image_embedding, text_embedding)``.

    Args:
        model: a :class:`~vit_lens.HookedViT` of a CLIP image tower (text classes set or not).
        images: a normalised batch [batch, chans, height, width] (``model.preprocess(...)``).
        W_text: the text class embeddings [embed_dim, n_classes] (what :func:`set_text_classes`
            returns), unit-norm columns.

    ``logit_scale`` is the CLIP model's learned temperature (``cfg.extra["logit_scale"]``, recorded by
    ``from_open_clip`` when converting a full model; 1.0 when unknown, giving the cosines). Exact
    under every weight-processing option (``model(images)`` is CLIP's cosine ranking times
    ``|image_embedding|``, shifted by a per-image constant after ``center_unembed``).
    """
    _check_hooked(model, "zero_shot_logits")
    if not isinstance(W_text, Tensor):
        raise InputTypeError(f"W_text must be a tensor [embed_dim, n_classes] (what set_text_classes returns), "
                             f"got {type(W_text).__name__}")
    emb = F.normalize(image_embedding(model, images), dim=-1)
    W = W_text.to(device=emb.device, dtype=emb.dtype)
    if W.ndim != 2 or W.shape[0] != emb.shape[-1] or W.shape[1] == 0:
        raise InputError(f"W_text must be [embed_dim={emb.shape[-1]}, n_classes >= 1], got {tuple(W.shape)}")
    if not W_text.is_floating_point():
        raise InputTypeError(f"W_text must be a float tensor (unit-norm text embeddings), got dtype {W_text.dtype}")
    if not torch.isfinite(W).all():
        raise InputError("W_text contains NaN or inf; recompute it with text_class_embeddings")
    scale = float(model.cfg.extra.get("logit_scale", 1.0))
    return scale * emb @ W


def image_embedding(model: Any, images: Float[Tensor, "batch chans height width"]) -> Float[Tensor, "batch embed_dim"]:
    """The CLIP image embedding (``encode_image``, unnormalised) of a model whose classes were
    replaced: the pooled features through the original head."""
    _check_hooked(model, "image_embedding")
    readout = model.readout
    if readout.unembed is None and readout.head_source_W is None:
        raise InputError(f"{model.cfg.model_name} has no head: it is not a CLIP image tower with a projection")
    with torch.no_grad():
        pooled = model.run_with_cache(images, names_filter="hook_pooled", return_type=None)[1]["hook_pooled"]
        W, b = readout.head_source_W, readout.head_source_b
        if W is None:  # classes never replaced nor weights processed: the head is the projection
            return readout.classify(pooled)
        return pooled @ W + (b if b is not None else 0)


__all__ = ["DEFAULT_TEMPLATES", "image_embedding", "set_text_classes", "text_class_embeddings", "zero_shot_logits"]
