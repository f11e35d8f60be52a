"""The shared vocabulary (vit_lens.core): positions, targets, layers, heads, hook names, cache access.

Every entry point resolves positions and targets through these functions, so these tests pin the
one meaning each name has; the analyses' own tests check that they use it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_timm
from vit_lens import HookedViT
from vit_lens import class_space as cs
from vit_lens import patching as P
from vit_lens.core import (
    AmbiguousNameError,
    Box,
    InputError,
    OutOfRangeError,
    TokenLayout,
    UnknownNameError,
    VitLensError,
    class_index,
    grid_of,
    head_mask,
    hook_name,
    hook_names,
    position_labels,
    position_mask,
    resolve_layers,
    resolve_targets,
)


@pytest.fixture(scope="module")
def imagenet_model():
    """A small random model carrying the real ImageNet-1k class names and synsets (timm's tables)."""
    from timm.data import ImageNetInfo

    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=32, patch_size=16, num_classes=1000,
                                      depth=2).eval())
    info = ImageNetInfo()
    m.class_names, m.class_synsets = info.label_descriptions(), info.label_names()
    return m


@pytest.fixture(scope="module")
def small():
    """2 prefix tokens (CLS + distillation) and a 2x2 patch grid: 6 positions."""
    return HookedViT.from_timm(make_timm("deit_tiny_distilled_patch16_224", img_size=32, num_classes=5, depth=2).eval())


# ------------------------------------------------------------------ positions
def test_position_mask_forms():
    """(moved from test_class_space: the class-space resolver is now this one)"""
    lay = TokenLayout.from_counts(2, 6)
    m = position_mask(lay, "image", batch=2)
    assert m.tolist() == [[False, False, True, True, True, True]] * 2
    assert position_mask(lay, "prefix", batch=1)[0].tolist() == [True, True, False, False, False, False]
    assert position_mask(lay, [0, -1], batch=1)[0].tolist() == [True, False, False, False, False, True]
    patches = torch.tensor([True, False, False, True])
    assert position_mask(lay, patches, batch=1)[0].tolist() == [False, False, True, False, False, True]
    with pytest.raises(ValueError, match="position mask"):
        position_mask(lay, torch.ones(5, dtype=torch.bool), batch=1)
    # one vocabulary: "patches" is "image" everywhere (class_space used to refuse it)
    assert torch.equal(position_mask(lay, "patches"), position_mask(lay, "image"))


def test_position_vocabulary_on_a_model(small):
    n = small.cfg.n_ctx
    assert n == 6 and small.cfg.n_prefix_tokens == 2
    assert position_mask(small, None).all() and position_mask(small, "all").all()
    assert position_mask(small, "cls").nonzero().flatten().tolist() == [0]
    assert position_mask(small, "prefix").nonzero().flatten().tolist() == [0, 1]
    assert position_mask(small, 3).nonzero().flatten().tolist() == [3]
    assert position_mask(small, torch.tensor([2, 5])).nonzero().flatten().tolist() == [2, 5]
    grid = torch.tensor([[True, False], [False, True]])
    assert position_mask(small, grid).nonzero().flatten().tolist() == [2, 5]
    per_image = torch.tensor([[True, False, False, False], [False, False, False, True]])
    assert position_mask(small, per_image, batch=2).nonzero().tolist() == [[0, 2], [1, 5]]
    with pytest.raises(InputError, match=r"one per image \[batch=3"):
        position_mask(small, per_image, batch=3)
    with pytest.raises(InputError, match="boolean position mask"):
        position_mask(small, per_image)  # per-image masks need the batch
    # a pixel box: the 32x32 image has 16-pixel patches; a box over the right half
    assert position_mask(small, Box(16, 0, 32, 32)).nonzero().flatten().tolist() == [3, 5]
    assert position_mask(small, Box(0, 0, 20, 10, min_overlap=0)).nonzero().flatten().tolist() == [2, 3]
    with pytest.raises(InputError, match="empty"):
        position_mask(small, Box(5, 5, 5, 9))
    with pytest.raises(OutOfRangeError, match="out of range for 6 positions"):
        position_mask(small, [6])
    with pytest.raises(InputError, match="unknown positions 'patch'"):
        position_mask(small, "patch")
    with pytest.raises(TypeError, match="ambiguous"):
        position_mask(small, torch.tensor([0.0, 1.0]))
    assert position_labels(small) == ["CLS", "DIST", "0,0", "0,1", "1,0", "1,1"]


def test_the_same_resolver_behind_every_entry_point(small):
    """patching, the identifiability result and core agree on every name."""
    x = torch.randn(2, 3, 32, 32)
    _, cache = small.run_with_cache(x, names_filter=hook_names(small, "resid_post"))
    res = cs.identifiability(small, cache, [0, 1])
    for pos in ("cls", "prefix", "patches", "image", "all", [1, 4]):
        ref = position_mask(small, pos, batch=2)
        assert torch.equal(res.mask(pos), ref), pos
        assert torch.equal(P.position_mask(small, pos).expand(2, -1), ref), pos


def test_grid_of(small):
    assert grid_of(small, torch.randn(1, 3, 32, 32)) == (2, 2)
    assert grid_of(small, 6) == (2, 2)
    with pytest.raises(InputError, match="cannot infer the patch grid"):
        grid_of(small, 7)
    with pytest.raises(InputError, match="32x32"):
        grid_of(small, torch.randn(1, 3, 48, 48))


# ------------------------------------------------------------------ targets
def test_class_names_synsets_indices(imagenet_model):
    m = imagenet_model
    assert class_index(m, "tabby cat") == 281 == class_index(m, "Tabby, Tabby Cat") == class_index(m, "n02123045")
    assert class_index(m, "281") == 281 == class_index(m, np.int64(281)) == class_index(m, torch.tensor(281))
    with pytest.raises(OutOfRangeError, match="out of range for 1000 classes"):
        class_index(m, 1000)
    with pytest.raises(TypeError):
        class_index(m, True)


def test_ambiguous_class_name_lists_the_candidates(imagenet_model):
    """'crane' is both the bird (134) and the machine (517): never silently the first one."""
    with pytest.raises(AmbiguousNameError) as e:
        class_index(imagenet_model, "crane")
    msg = str(e.value)
    assert "134 'crane'" in msg and "517 'crane'" in msg and "n02012849" in msg and "n03126707" in msg
    assert isinstance(e.value, KeyError) and isinstance(e.value, VitLensError)
    assert class_index(imagenet_model, "n03126707") == 517  # the synset picks one


def test_near_miss_suggests_by_word_and_substring(imagenet_model):
    with pytest.raises(UnknownNameError) as e:
        class_index(imagenet_model, "cat")
    msg = str(e.value)
    for i, name in ((281, "tabby"), (282, "tiger cat"), (283, "Persian cat"), (284, "Siamese cat"), (285, "Egyptian cat")):
        assert f"{i} '" in msg and name in msg, (i, msg)
    with pytest.raises(UnknownNameError, match="Did you mean: .*espresso"):
        class_index(imagenet_model, "espreso")  # edit distance


def test_resolve_targets(imagenet_model):
    m = imagenet_model
    assert resolve_targets(m, "tabby cat", 3).tolist() == [281] * 3
    assert resolve_targets(m, ["tabby cat", 5, "n01440764"], 3).tolist() == [281, 5, 0]
    assert resolve_targets(m, np.array([1, 2]), 2).tolist() == [1, 2]
    x = torch.randn(2, 3, 32, 32)
    logits = m(x)
    assert torch.equal(resolve_targets(m, "pred", 2, images=x), logits.argmax(-1))
    assert torch.equal(resolve_targets(m, "pred", 2, logits=logits), logits.argmax(-1))
    with pytest.raises(InputError, match="'pred'"):
        resolve_targets(m, None, 2)
    with pytest.raises(InputError, match="needs the images"):
        resolve_targets(m, "pred", 2)
    with pytest.raises(InputError, match="one per image"):
        resolve_targets(m, [1, 2, 3], 2)
    with pytest.raises(TypeError, match="integer tensor"):
        resolve_targets(m, torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(AmbiguousNameError):
        resolve_targets(m, ["crane", 1], 2)


def test_metrics_resolve_names_against_their_model(imagenet_model):
    """logit_metric('tabby cat') used to fail inside torch; bound to a model it is logit_metric(281)."""
    m = imagenet_model
    logits = m(torch.randn(2, 3, 32, 32))
    named = P.logit_metric("tabby cat")
    with pytest.raises(UnknownNameError, match="not bound to a model"):
        named(logits)
    assert torch.equal(named.bind(m)(logits), logits[:, 281])
    assert torch.equal(P.logit_metric("tabby cat", model=m)(logits), logits[:, 281])
    assert torch.equal(P.logit_diff_metric(["tabby cat", 3], "tiger cat", model=m)(logits),
                       torch.stack([logits[0, 281], logits[1, 3]]) - logits[:, 282])
    with pytest.raises(AmbiguousNameError):
        P.logit_metric("crane", model=m)(logits)
    clean, corrupted = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    by_name = P.patch_positions_sweep(m, clean, corrupted, P.logit_metric("tabby cat"), layers=[1], progress=False)
    by_index = P.patch_positions_sweep(m, clean, corrupted, P.logit_metric(281), layers=[1], progress=False)
    assert torch.equal(by_name.values, by_index.values)


# ------------------------------------------------------------------ layers, heads, hook names, cache
def test_layers_heads_hook_names(small):
    assert resolve_layers(None, small) == [0, 1] and resolve_layers(-1, small) == [1] and resolve_layers([1, 0], 2) == [1, 0]
    with pytest.raises(OutOfRangeError, match="layer 2 out of range for a model with 2 blocks"):
        resolve_layers([2], small)
    with pytest.raises(InputError, match="empty"):
        resolve_layers([], small)
    assert resolve_layers([], small, allow_empty=True) == []
    with pytest.raises(TypeError):
        resolve_layers(1.0, small)
    assert head_mask(small, [0, -1]).tolist() == [True, False, True]
    with pytest.raises(OutOfRangeError, match="out of range for 3 heads"):
        head_mask(small, [3])
    for short in ("resid_pre", "hook_resid_pre"):
        assert hook_name(small, short, 1) == "blocks.1.hook_resid_pre"
    assert hook_name(small, "z", 0) == hook_name(small, "attn.hook_z", 0) == "blocks.0.attn.hook_z"
    assert hook_name(small, "mlp_post", 0) == "blocks.0.mlp.hook_post"
    assert hook_names(small, "resid_post", "ln_final.hook_scale") == [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "ln_final.hook_scale"]
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.hook_resid_prex'"):
        hook_name(small, "resid_prex", 0)
    with pytest.raises(UnknownNameError, match="unknown short hook name 'resid'"):
        hook_names(small, "resid")
    _, cache = small.run_with_cache(torch.randn(1, 3, 32, 32), names_filter=["blocks.0.hook_resid_post"])
    with pytest.raises(KeyError, match=r"the cache has no 'blocks.1.hook_mlp_out'.*names_filter"):
        cs.logit_lens(small, cache, layers=[1], hook="mlp_out")


# ------------------------------------------------------------------ one preprocessing default
def test_identify_paths_equals_identify_of_the_model_transform(tmp_path):
    """identify(model, paths) == identify(model, model.preprocess(paths)): one default (timm's transform)."""
    from vit_lens import sample_image_path

    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=64, num_classes=10, depth=2).eval())
    paths = [str(sample_image_path(n)) for n in ("chelsea", "coffee")]
    a, la = cs.identify(m, paths, progress=False)
    b, lb = cs.identify(m, m.preprocess(paths), progress=False)
    assert torch.equal(la, lb) and torch.equal(a.rank, b.rank)
    c, lc = cs.identify(m, paths, preprocess="paper", progress=False)
    assert torch.equal(lc, m(m.preprocess(paths, mode="paper")))
    assert not torch.equal(lc, la)  # the paper's resize-without-crop is another input


# ---------------------------------------------------------------- progress bars
def _bar_class(monkeypatch, *, kernel: bool, widgets: bool):
    import sys

    import IPython

    from vit_lens.core import batching

    class Shell:
        config = {"IPKernelApp": {}} if kernel else {}

    monkeypatch.setattr(batching, "_TQDM", None)
    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    if not widgets:
        monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import raises ImportError
    return batching._tqdm_class()


def test_progress_bar_text_outside_a_notebook(monkeypatch):
    import tqdm
    import tqdm.notebook

    cls = _bar_class(monkeypatch, kernel=False, widgets=True)
    assert cls is tqdm.tqdm


def test_progress_bar_in_a_notebook_without_ipywidgets_is_a_text_bar_and_does_not_warn(monkeypatch):
    import warnings

    import tqdm

    from vit_lens.core import batching

    cls = _bar_class(monkeypatch, kernel=True, widgets=False)
    assert cls is tqdm.tqdm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(batching.progress_bar(range(3), desc="x")) == [0, 1, 2]


def test_progress_bar_in_a_notebook_with_ipywidgets_is_the_widget(monkeypatch):
    pytest.importorskip("ipywidgets")
    import tqdm.notebook

    assert _bar_class(monkeypatch, kernel=True, widgets=True) is tqdm.notebook.tqdm
