"""Hugging Face DINOv2 classifier (concat([CLS], mean of patches)) and DINOv2 with registers.

References are independent of the code under test: transformers' own forward (eager and SDPA
attention, its ``hidden_states``), HF's own ``classifier`` module applied to HF's own features,
and exact identities (DLA parts sum to HF's logits; a rollout with the identity as attention keeps
the query row). Small random models (hub unreachable); real-size configs are in test_hf.py.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vit_lens import HookedViT  # noqa: E402
from vit_lens.config import HookedViTConfig  # noqa: E402
from vit_lens.core.errors import InputError, VitLensError  # noqa: E402

TOL = 1e-4
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
             patch_size=7, layerscale_value=0.5)
CASES = {
    "Dinov2ForImageClassification": (transformers.Dinov2Config, dict(num_labels=5)),
    "Dinov2WithRegistersForImageClassification": (transformers.Dinov2WithRegistersConfig,
                                                  dict(num_register_tokens=3, num_labels=5)),
    "Dinov2WithRegistersModel": (transformers.Dinov2WithRegistersConfig, dict(num_register_tokens=3)),
}
CLASSIFIERS = ["Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"]
#: native 4x4 grid; 2x2 (downsampled: antialiasing matters); 3x5 (non-square, upsampled)
SIZES = [(28, 28), (14, 14), (21, 35)]


def make(cls_name, attn="eager", seed=0, **overrides):
    cfg_cls, kw = CASES[cls_name]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**SMALL, **kw, **overrides})
    cfg._attn_implementation = attn
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # HF initialises biases / norms / registers to 0 or 1: make every tensor matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images(size=(28, 28), batch=2, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def hf_run(model, x):
    """(output, hidden states) of HF's own forward; the output is the logits, or the final-norm [CLS]."""
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    ref = out.logits if hasattr(out, "logits") else out.pooler_output
    return ref, out.hidden_states


def backbone(model):
    return model.dinov2_with_registers if hasattr(model, "dinov2_with_registers") else model.dinov2


# --------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", sorted(CASES))
def test_parity_with_transformers_at_native_and_other_sizes(cls_name, attn, size):
    model = make(cls_name, attn)
    hooked = HookedViT.from_hf(model)
    x = images(size)
    ref, hidden = hf_run(model, x)
    with torch.no_grad():
        out, cache = hooked.run_with_cache(x)
    assert out.shape == ref.shape and (out - ref).abs().max() <= TOL
    assert (cache["blocks.0.hook_resid_pre"] - hidden[0]).abs().max() <= 1e-5  # registers included, in HF's order
    for l in range(hooked.cfg.n_layers):
        assert (cache[f"blocks.{l}.hook_resid_post"] - hidden[l + 1]).abs().max() <= TOL, l


def test_registers_layout_and_antialiased_interpolation():
    model = make("Dinov2WithRegistersForImageClassification")
    hooked = HookedViT.from_hf(model)
    cfg = hooked.cfg
    assert (cfg.n_register_tokens, cfg.n_prefix_tokens, cfg.pooling) == (3, 4, "token_avg")
    assert cfg.prefix_token_names == ["CLS", "REG0", "REG1", "REG2"] and not cfg.pos_embed_prefix
    emb = backbone(model).embeddings
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images())
    # HF adds position 0 to [CLS] and nothing to the registers: here folded into the token
    assert torch.equal(cache["hook_pos_embed"][:, :4], torch.zeros_like(cache["hook_pos_embed"][:, :4]))
    assert torch.allclose(cache["hook_embed"][0, 0], (emb.cls_token + emb.position_embeddings[:, 0])[0, 0])
    assert torch.equal(cache["hook_embed"][0, 1:4], emb.register_tokens[0])
    # the test can fail: without antialiasing the downsampled (2x2) position embeddings differ from HF's
    x = images((14, 14))
    ref, _ = hf_run(model, x)
    hooked.cfg.extra["pos_embed_antialias"] = False
    with torch.no_grad():
        assert (hooked(x) - ref).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- the readout
@pytest.mark.parametrize("cls_name", CLASSIFIERS)
def test_the_concat_classifier_is_two_heads_exactly(cls_name):
    model = make(cls_name)
    hooked = HookedViT.from_hf(model)
    D, n_pre = hooked.cfg.d_model, hooked.cfg.n_prefix_tokens
    W, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    ro = hooked.readout
    assert hooked.cfg.pooling == "token_avg" and ro.cls_head == "cls" and ro.n_pooled_prefix == 0
    Wc, bc = ro.head_weights("cls")
    Wp, bp = ro.head_weights("patch")
    Ws, bs = ro.head_weights()
    assert torch.equal(Wc, W[:, :D].T) and torch.equal(bc, b)
    assert torch.equal(Wp, W[:, D:].T) and torch.equal(bp, torch.zeros_like(b))
    assert torch.equal(Ws, Wc + Wp) and torch.equal(bs, b)
    x = images()
    ref, hidden = hf_run(model, x)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(x)
        r = cache[f"blocks.{hooked.cfg.n_layers - 1}.hook_resid_post"]
        split = hooked.project_to_classes(r[:, 0], head="cls") + hooked.project_to_classes(r[:, n_pre:], head="patch").mean(1)
        assert (split - ref).abs().max() <= TOL
        # the default head: HF's classifier on a sequence whose every token is the vector
        v = r[:, 3]
        ln = backbone(model).layernorm(v)
        assert (hooked.project_to_classes(v) - model.classifier(torch.cat([ln, ln], -1))).abs().max() <= TOL
        assert (hooked.class_directions("patch") - backbone(model).layernorm.weight[:, None] * W[:, D:].T).abs().max() == 0
        # the pooled hook holds HF's classifier input, as two vectors
        pooled = cache["hook_pooled"]
        feats = backbone(model).layernorm(hidden[-1])
        assert pooled.shape == (2, 2, D)
        assert (pooled.flatten(1) - torch.cat([feats[:, 0], feats[:, n_pre:].mean(1)], -1)).abs().max() <= 1e-5
        assert (hooked.readout.logits(r) - ref).abs().max() <= TOL


def test_head_names_that_mean_nothing_are_refused():
    hooked = HookedViT.from_hf(make("Dinov2ForImageClassification"))
    for bad in ("dist", "mean", "both"):
        with pytest.raises(InputError, match="'cls'.*'patch'"):
            hooked.class_directions(bad)
    token = HookedViT.from_hf(transformers.Dinov2Model(transformers.Dinov2Config(**SMALL)).eval())
    token.set_class_directions(torch.randn(32, 4))
    with pytest.raises(InputError, match="token_avg"):
        token.class_directions("patch")


def test_config_validates_token_avg():
    base = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, n_classes=3, image_size=8, patch_size=4)
    HookedViTConfig(**base, pooling="token_avg")
    with pytest.raises(InputError, match="class token"):
        HookedViTConfig(**base, pooling="token_avg", has_class_token=False)
    with pytest.raises(InputError, match="fc_norm"):
        HookedViTConfig(**base, pooling="token_avg", has_fc_norm=True)
    with pytest.raises(InputError, match="pooling must be"):
        HookedViTConfig(**base, pooling="concat")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- DLA
@pytest.mark.parametrize("processing", [{}, {"fold_ln": True, "center_writing_weights": True, "fold_value_biases": True}],
                         ids=["plain", "processed"])
@pytest.mark.parametrize("cls_name", CLASSIFIERS)
def test_dla_parts_sum_to_the_hf_logits(cls_name, processing):
    from vit_lens.attribution import dla

    model = make(cls_name)
    hooked = HookedViT.from_hf(model, **processing)
    x = images()
    ref, _ = hf_run(model, x)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(x)
    t, other = torch.tensor([1, 3]), torch.tensor([4, 0])
    for by in ("component", "layer", "head", "neuron", "position", "head_position"):
        res = dla(hooked, cache, t, by=by)
        want = ref.gather(1, t[:, None])[:, 0]
        assert (res.total() - want).abs().max() <= TOL, by
        diff = dla(hooked, cache, t, other, by=by)
        assert (diff.total() - (want - ref.gather(1, other[:, None])[:, 0])).abs().max() <= TOL, by
    # the constant is the bias through both heads, from HF's modules: b + ln.b @ (W[:D] + W[D:])
    if not processing:
        D = hooked.cfg.d_model
        W, b, ln_b = model.classifier.weight, model.classifier.bias, backbone(model).layernorm.bias
        want_c = (b + ln_b @ W[:, :D].T + ln_b @ W[:, D:].T)[t]
        assert (dla(hooked, cache, t).constant - want_c).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------- class directions
OPTIONS = [{}, {"fold_ln": True}, {"center_writing_weights": True}, {"center_unembed": True},
           {"fold_value_biases": True},
           {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}]


def _centred(x):
    return x - x.mean(-1, keepdim=True)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o) or "none")
def test_class_directions_mean_the_same_under_weight_processing(opts, tmp_path):
    model = make("Dinov2WithRegistersForImageClassification", seed=3)
    x = images(seed=4)
    ref, hidden = hf_run(model, x)
    eq = _centred if opts.get("center_unembed") else (lambda v: v)
    hooked = HookedViT.from_hf(model, **opts)
    with torch.no_grad():
        assert (eq(hooked(x)) - eq(ref)).abs().max() <= TOL
    # space="head": composes with HF's classifier (the bias once)
    g = torch.Generator().manual_seed(5)
    W2, b2 = torch.randn(5, 6, generator=g), torch.randn(6, generator=g)
    hooked.set_class_directions(W2, bias=b2, space="head")
    with torch.no_grad():
        assert (eq(hooked(x)) - eq(ref @ W2 + b2)).abs().max() <= TOL
    # space="residual": [2 * d_model, n] on HF's classifier input concat([CLS], patch mean) after the final norm
    D = hooked.cfg.d_model
    feats = backbone(model).layernorm(hidden[-1]).detach()
    concat = torch.cat([feats[:, 0], feats[:, 1 + 3:].mean(1)], -1)
    W3, b3 = torch.randn(2 * D, 4, generator=g), torch.randn(4, generator=g)
    hooked.set_class_directions(W3, labels=["a", "b", "c", "d"], bias=b3)
    with torch.no_grad():
        assert (eq(hooked(x)) - eq(concat @ W3 + b3)).abs().max() <= TOL
    with pytest.raises(InputError, match=r"2 \* d_model"):
        hooked.set_class_directions(torch.randn(D, 4))
    # save / load keeps the heads and the head state (a later space="head" call still composes with HF's head)
    again = HookedViT.load(hooked.save(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert (eq(again(x)) - eq(concat @ W3 + b3)).abs().max() <= TOL
    again.set_class_directions(W2, bias=b2, space="head")
    with torch.no_grad():
        assert (eq(again(x)) - eq(ref @ W2 + b2)).abs().max() <= TOL
    assert again.class_names is None and again.cfg.pooling == "token_avg"


# --------------------------------------------------------------------------------------------- the analyses
def test_last_layer_patching_reads_every_patch():
    """The sweep's last-layer shortcut (update only the pooled prefix tokens) must not apply: the
    patch head reads every patch. Each sweep value equals an independent patched run."""
    from vit_lens.patching import logit_metric, patch_positions_sweep, run_patched

    hooked = HookedViT.from_hf(make("Dinov2ForImageClassification"))
    L = hooked.cfg.n_layers
    clean, corrupted = images(seed=6), images(seed=7)
    metric = logit_metric(torch.tensor([2, 2]))
    res = patch_positions_sweep(hooked, clean, corrupted, metric, hook="resid_pre", layers=[L - 1], progress=False)
    _, clean_cache = hooked.run_with_cache(clean)
    name = f"blocks.{L - 1}.hook_resid_pre"
    for k, p in enumerate(res.positions.tolist()):
        with torch.no_grad():
            want = run_patched(hooked, corrupted, name, clean_cache, positions=[p], metric=metric)
        assert (res.values[0, k] - want).abs().max() <= TOL, p
    assert (res.values[0, -1] - res.corrupted).abs().max() > 1e-6  # a patch position moves the logit


def test_explain_refuses_cls_only_attributions_and_rollout_weights_both_heads():
    from vit_lens import explain

    hooked = HookedViT.from_hf(make("Dinov2WithRegistersForImageClassification"))
    x = images()
    with pytest.raises(InputError, match=r"dla\(model, cache, target, by='position'\)"):
        explain.direct_patch_attribution(hooked, x, progress=False)
    with pytest.raises(InputError, match="token_avg"):
        explain.attention_key_attribution(hooked, hooked.run_with_cache(x)[1], torch.tensor([0, 1]))
    # with the identity as every attention (residual_weight=1) the rollout keeps the query row: half on
    # [CLS] (not in the map), half spread evenly over the 16 patches; the registers get nothing
    roll = explain.attention_rollout(hooked, x, residual_weight=1.0, progress=False)
    assert roll.shape == (2, 4, 4) and torch.allclose(roll, torch.full_like(roll, 0.5 / 16))
    assert torch.isfinite(explain.chefer_relevance(hooked, x, progress=False)).all()


def test_ablation_and_class_space_on_token_avg():
    from vit_lens import ablation
    from vit_lens.class_space import identifiability, readout_logits

    hooked = HookedViT.from_hf(make("Dinov2WithRegistersForImageClassification"))
    x = images()
    with pytest.raises(InputError, match="keeps no patch"):
        with ablation.context_ablation(hooked, torch.zeros(4, 4, dtype=torch.bool)):
            hooked(x)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[1:3, 1:3] = True
    with torch.no_grad(), ablation.context_ablation(hooked, keep):
        kept = hooked(x)
    assert torch.isfinite(kept).all()
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(x)
    res = identifiability(hooked, cache, logits.argmax(-1))
    L = hooked.cfg.n_layers
    assert res.rank.shape == (L, 2, hooked.cfg.n_ctx)
    assert (readout_logits(hooked, cache[f"blocks.{L - 1}.hook_resid_post"]) - logits).abs().max() <= TOL
    assert int(res.readout_rank[-1].max()) == 0  # the readout of the last block is the model's prediction


def test_num_labels_zero_is_refused():
    with pytest.raises(VitLensError, match="dinov2_with_registers"):
        HookedViT.from_hf(make("Dinov2WithRegistersForImageClassification", num_labels=0))


def test_local_directory_loads_strictly_with_labels_and_the_bit_processor(tmp_path):
    from vit_lens.loading.checkpoints import CheckpointMismatchError

    model = make("Dinov2WithRegistersForImageClassification", id2label={i: f"kind {i}" for i in range(5)})
    model.save_pretrained(tmp_path / "m")
    proc = transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    proc.save_pretrained(tmp_path / "m")
    hooked = HookedViT.from_pretrained(f"hf:{tmp_path / 'm'}")
    x = images()
    ref, _ = hf_run(model, x)
    with torch.no_grad():
        assert (hooked(x) - ref).abs().max() <= TOL
    assert hooked.class_names == [f"kind {i}" for i in range(5)]
    assert hooked.data_config["hf_image_processor"]["class"] == "BitImageProcessor"
    assert hooked.data_config["input_size"] == (3, 28, 28)
    # a classifier of another width in the files is refused (not silently re-initialised)
    other = make("Dinov2WithRegistersForImageClassification", num_labels=3)
    other.save_pretrained(tmp_path / "o")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "o")
    cfg.num_labels = 5
    cfg.save_pretrained(tmp_path / "o")
    with pytest.raises(CheckpointMismatchError):
        HookedViT.from_hf(str(tmp_path / "o"))
