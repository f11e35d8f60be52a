"""Class spaces from text for CLIP image towers (vit_lens.clip).

References: OpenCLIP's own zero-shot classifier (``open_clip.build_zero_shot_classifier``), its
``encode_image`` / ``encode_text`` cosine scores and ``get_logits``; for Hugging Face, ``CLIPModel``'s
own forward (``logits_per_image``), fed token ids from OpenCLIP's bundled tokenizer (the same BPE as
OpenAI CLIP) and from a ``CLIPTokenizer`` built in the test from that vocabulary. All models have
small random weights (no hub offline).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

import vit_lens  # noqa: E402
from vit_lens import HookedViT  # noqa: E402
from vit_lens.clip import DEFAULT_TEMPLATES, image_embedding, set_text_classes, text_class_embeddings, zero_shot_logits  # noqa: E402
from vit_lens.core.errors import InputError, InputTypeError  # noqa: E402

from conftest import OPTION_SETS  # noqa: E402

TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2)  # short prompts: 16 tokens
VISION = dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32)
NAMES = ["tabby cat", "golden retriever", "sports car", "oak tree", "sailboat", "espresso"]


def perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return perturb(open_clip.CLIP(embed_dim=24, vision_cfg=dict(VISION), text_cfg=dict(TEXT))).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)  # bundled BPE, offline


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def reference_classifier(model, tokenizer, names, templates):
    fns = [t if callable(t) else (lambda c, t=t: t.format(c)) for t in templates]
    return open_clip.build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=names, templates=fns,
                                                num_classes_per_batch=4, device="cpu", use_tqdm=False)


@pytest.mark.parametrize("templates", [None, ["a photo of a {}."], ["itap of a {}.", lambda c: f"{c}, in a museum"]])
def test_embeddings_equal_open_clips_zero_shot_classifier(clip_model, tokenizer, templates):
    W = text_class_embeddings(clip_model, tokenizer, NAMES, templates, batch_size=5, progress=False)
    ref = reference_classifier(clip_model, tokenizer, NAMES, templates or DEFAULT_TEMPLATES)
    assert W.shape == (24, len(NAMES))
    assert (W - ref).abs().max().item() <= 1e-6
    assert torch.allclose(W.norm(dim=0), torch.ones(len(NAMES)), atol=1e-6)


@pytest.mark.parametrize("option_set", ["none", "center_unembed", "all"])
def test_ranking_equals_open_clip_cosine_scores(clip_model, tokenizer, images, option_set):
    options = OPTION_SETS[option_set]
    model = HookedViT.from_open_clip(clip_model, **options)
    W = set_text_classes(model, clip_model, tokenizer, NAMES, progress=False)
    assert model.class_names == NAMES and model.cfg.n_classes == len(NAMES)
    with torch.no_grad():
        logits = model(images)
        cos = clip_model.encode_image(images, normalize=True) @ reference_classifier(
            clip_model, tokenizer, NAMES, DEFAULT_TEMPLATES)
    assert torch.equal(logits.argsort(-1, descending=True), cos.argsort(-1, descending=True))
    emb = clip_model.encode_image(images).detach()
    if not options.get("center_unembed"):  # logits = |image embedding| * cos
        assert (logits - emb.norm(dim=-1, keepdim=True) * cos).abs().max().item() <= 1e-4
    assert (image_embedding(model, images) - emb).abs().max().item() <= 1e-4
    # CLIP's own logits (one prompt per class: open_clip's get_logits)
    W1 = set_text_classes(model, clip_model, tokenizer, NAMES, ["a photo of a {}."], progress=False)
    with torch.no_grad():
        ref_logits, _ = clip_model.get_logits(images, tokenizer([f"a photo of a {n}." for n in NAMES]))
    assert (zero_shot_logits(model, images, W1) - ref_logits).abs().max().item() <= 1e-4
    assert torch.equal(model(images).argmax(-1), ref_logits.argmax(-1))


def test_classes_set_before_processing_and_saved(clip_model, tokenizer, images, tmp_path):
    from vit_lens.loading import process_weights

    model = HookedViT.from_open_clip(clip_model)
    set_text_classes(model, clip_model, tokenizer, NAMES, progress=False)
    with torch.no_grad():
        before = model(images)
    process_weights(model, fold_ln=True, center_writing_weights=True)
    back = HookedViT.load(model.save(tmp_path / "clip_text.safetensors"))
    with torch.no_grad():
        assert (back(images) - before).abs().max().item() <= 1e-4
    assert back.class_names == NAMES


def test_class_space_analyses_on_text_classes(clip_model, tokenizer, images):
    """DLA per head, identifiability and the logit lens read the text-defined classes by name."""
    model = HookedViT.from_open_clip(clip_model, fold_ln=True)
    set_text_classes(model, clip_model, tokenizer, NAMES, progress=False)
    logits, cache = model.run_with_cache(images)
    res = vit_lens.dla(model, cache, "sailboat", by="head")
    assert (res.total() - logits[:, NAMES.index("sailboat")]).abs().max().item() <= 1e-4
    assert res.values.shape[:2] == (model.cfg.n_layers, model.cfg.n_heads)
    lens = vit_lens.logit_lens(model, cache)
    assert lens.shape[-1] == len(NAMES)
    ident = vit_lens.identifiability(model, cache, "tabby cat")
    assert ident is not None


# ------------------------------------------------------------------ Hugging Face CLIP text towers
@pytest.fixture(scope="module")
def hf_clip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    torch.manual_seed(0)
    return perturb(transformers.CLIPModel(cfg)).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A transformers CLIPTokenizer built from OpenCLIP's bundled vocabulary and merges (OpenAI CLIP's BPE)."""
    from transformers import CLIPTokenizer

    st = open_clip.tokenizer.SimpleTokenizer()
    inv = {v: k for k, v in st.encoder.items()}
    special = {inv[st.sot_token_id]: "<|startoftext|>", inv[st.eot_token_id]: "<|endoftext|>"}
    d = tmp_path_factory.mktemp("clip_tokenizer")
    (d / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in st.encoder.items()}))
    merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


def test_hf_text_tower_matches_hf_clips_own_logits(hf_clip, tokenizer, hf_tokenizer):
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompts = [f"a photo of a {n}." for n in NAMES]
    with torch.no_grad():
        out = hf_clip(input_ids=tokenizer(prompts), pixel_values=pixels)
    for tok in (tokenizer, hf_tokenizer):
        W = text_class_embeddings(hf_clip, tok, NAMES, ["a photo of a {}."], progress=False)
        scores = hf_clip.logit_scale.exp().item() * out.image_embeds @ W
        assert (scores - out.logits_per_image).abs().max().item() <= 1e-4
        assert torch.equal(scores.argsort(-1), out.logits_per_image.argsort(-1))
    # template averaging: the normalised mean of the normalised prompt embeddings
    W = text_class_embeddings(hf_clip, hf_tokenizer, NAMES, progress=False)
    per = []
    for t in DEFAULT_TEMPLATES:
        with torch.no_grad():
            o = hf_clip(input_ids=tokenizer([t.format(n) for n in NAMES]), pixel_values=pixels[:1])
        per.append(o.text_embeds)  # HF's own normalised text embeddings
    ref = F.normalize(torch.stack(per).mean(0), dim=-1).T
    assert (W - ref).abs().max().item() <= 1e-5


def test_hf_text_model_with_projection(hf_clip, hf_tokenizer):
    import copy

    from transformers import CLIPTextModelWithProjection

    cfg = copy.deepcopy(hf_clip.config.text_config)
    cfg.projection_dim = hf_clip.config.projection_dim
    tm = CLIPTextModelWithProjection(cfg).eval()
    tm.text_model.load_state_dict(hf_clip.text_model.state_dict())
    tm.text_projection.load_state_dict(hf_clip.text_projection.state_dict())
    a = text_class_embeddings(tm, hf_tokenizer, NAMES, progress=False)
    b = text_class_embeddings(hf_clip, hf_tokenizer, NAMES, progress=False)
    assert (a - b).abs().max().item() <= 1e-6


def test_hf_image_tower_ranking_when_from_hf_exists(hf_clip, tokenizer):
    if not hasattr(HookedViT, "from_hf"):
        pytest.skip("HookedViT.from_hf (issue 13a) is not in this checkout")
    from transformers import CLIPVisionModelWithProjection

    vision_config = copy.deepcopy(hf_clip.config.vision_config)
    vision_config.projection_dim = hf_clip.config.projection_dim  # the projection's size lives on CLIPConfig
    vm = CLIPVisionModelWithProjection(vision_config).eval()
    vm.vision_model.load_state_dict(hf_clip.vision_model.state_dict())
    vm.visual_projection.load_state_dict(hf_clip.visual_projection.state_dict())
    model = HookedViT.from_hf(vm)
    set_text_classes(model, hf_clip, tokenizer, NAMES, ["a photo of a {}."], progress=False)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_clip(input_ids=tokenizer([f"a photo of a {n}." for n in NAMES]), pixel_values=pixels).logits_per_image
        assert torch.equal(model(pixels).argsort(-1), ref.argsort(-1))
        # a CLIPModel given whole: its image tower with the projection as the head, the same ranking
        whole = HookedViT.from_hf(hf_clip)
        set_text_classes(whole, hf_clip, tokenizer, NAMES, ["a photo of a {}."], progress=False)
        assert torch.equal(whole(pixels).argsort(-1), ref.argsort(-1))


# ------------------------------------------------------------------ refusals
def test_refusals(clip_model, tokenizer):
    model = HookedViT.from_open_clip(clip_model)
    torch.manual_seed(1)
    other = open_clip.CLIP(embed_dim=16, vision_cfg=dict(VISION), text_cfg=dict(TEXT)).eval()
    with pytest.raises(InputError, match="same CLIP model"):
        set_text_classes(model, other, tokenizer, NAMES, progress=False)
    assert model.cfg.n_classes == 24  # a refused call leaves the model as it was
    with pytest.raises(InputError, match="context"):
        text_class_embeddings(clip_model, lambda texts: tokenizer(texts)[:, :10], NAMES, progress=False)
    with pytest.raises(InputError, match="empty"):
        text_class_embeddings(clip_model, tokenizer, [], progress=False)
    with pytest.raises(InputError, match="distinct"):
        text_class_embeddings(clip_model, tokenizer, ["cat", "cat"], progress=False)
    with pytest.raises(InputError, match="has no"):
        text_class_embeddings(clip_model, tokenizer, NAMES, ["a photo"], progress=False)
    with pytest.raises(InputTypeError, match="list of strings"):
        text_class_embeddings(clip_model, tokenizer, "cat", progress=False)
    with pytest.raises(InputTypeError, match="text tower"):
        text_class_embeddings(torch.nn.Linear(2, 2), tokenizer, NAMES, progress=False)
    with pytest.raises(InputError, match="W_text"):
        zero_shot_logits(model, torch.randn(1, 3, 32, 32), torch.randn(7, 3))
