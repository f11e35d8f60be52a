"""Hostile inputs at every public entry point: each one raises a library error that says what is wrong
(a :class:`~vit_lens.core.errors.VitLensError`, never an error from torch internals or a bare built-in
exception), and no call changes a weight (every parameter and buffer is hashed before and after).

The knockout / context-ablation cases live in ``tests/test_ablation.py``
(``test_hostile_inputs_raise_library_errors_and_touch_no_weight``); this table covers the model, preprocessing,
the class-space functions, DLA, the patching sweeps, explain, probing, save/load, ``set_class_directions``
and the CLI. Models are small and random (a 7-class 32x32 ViT with a 4x4 patch grid and 2 blocks; a
1000-class one carrying timm's ImageNet class names for the name cases), so the file runs in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WEIGHTS, REAL_VIT, make_timm, weights_hash

from vit_lens import HookedViT
from vit_lens.core.errors import (
    AmbiguousNameError,
    InputError,
    InputTypeError,
    MissingFileError,
    OutOfRangeError,
    UnknownNameError,
    VitLensError,
)

KW = dict(img_size=32, patch_size=8, depth=2, num_classes=7)


def _images(n: int = 2, seed: int = 0, size: int = 32, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _nan(n: int = 2) -> torch.Tensor:
    x = _images(n)
    x[1, 0, 3, 4] = float("nan")
    return x


def _inf(n: int = 2) -> torch.Tensor:
    x = _images(n)
    x[0, 2, 5, 5] = float("inf")
    return x


def _nan_cache(c):
    """The clean cache with one NaN in image 1's residual stream, from block 1 on (a hook that edits
    activations, or a float16 overflow, gives such a cache)."""
    out = {}
    for k, v in c.cache.items():
        v = v.clone()
        if k.startswith("blocks.1.") or k.startswith(("ln_final", "hook_pooled")):
            v[(1,) + (0,) * (v.ndim - 1)] = float("nan")
        out[k] = v
    return out


class Ctx:
    """The models and a clean cache the cases run on."""

    def __init__(self):
        self.m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", **KW))
        from timm.data import ImageNetInfo

        self.big = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=2,
                                                 num_classes=1000))
        info = ImageNetInfo()
        self.big.class_names, self.big.class_synsets = info.label_descriptions(), info.label_names()
        self.x = _images(2)
        with torch.no_grad():
            _, self.cache = self.m.run_with_cache(self.x)
            _, self.big_cache = self.big.run_with_cache(_images(2))

    def models(self):
        return (self.m, self.big)


@pytest.fixture(scope="module")
def ctx():
    return Ctx()


def _cases():  # noqa: C901 - a table
    from vit_lens import attribution as A
    from vit_lens import class_space as C
    from vit_lens import explain as E
    from vit_lens import patching as P
    from vit_lens import probing as R

    def metric(c):
        return P.logit_metric(0, model=c.m)

    def sweep(fn, clean=None, corrupted=None, **kw):
        def run(c):
            fn(c.m, c.x if clean is None else clean, _images(2, 1) if corrupted is None else corrupted, metric(c),
               progress=False, **kw)
        return run

    def fwd(images):
        return lambda c: c.m(images)

    noop = lambda act, hook: None  # noqa: E731
    cases = {
        # ---------------------------------------------------------------- HookedViT forward / run_with_cache / run_with_hooks
        "forward, NaN image": (fwd(_nan()), InputError, r"images \[1\] of the batch contain NaN or inf"),
        "forward, inf image": (fwd(_inf()), InputError, r"images \[0\] of the batch contain NaN or inf"),
        "forward, wrong size": (fwd(_images(2, size=48)), InputError, "takes 32x32 images, got 48x48.*preprocess"),
        "forward, wrong channel count": (fwd(_images(2, chans=4)), InputError, "expected 3 channels.*4 channels"),
        "forward, channels last": (fwd(_images(2).permute(0, 2, 3, 1)), InputError, "expected 3 channels"),
        "forward, empty batch": (fwd(_images(0)), InputError, "batch is empty"),
        "forward, single image": (fwd(_images(1)[0]), InputError, r"single image.*images\[None\]"),
        "forward, uint8": (fwd((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)), InputTypeError,
                           "expected a float tensor, got dtype torch.uint8.*preprocess"),
        "forward, int64": (fwd(torch.zeros(2, 3, 32, 32, dtype=torch.long)), InputTypeError, "dtype torch.int64"),
        "forward, a list": (fwd([[0.0] * 3]), InputTypeError, "expects a float tensor.*got list.*preprocess"),
        "forward, a numpy array": (fwd(np.zeros((2, 3, 32, 32), np.float32)), InputTypeError, "got ndarray"),
        "forward, bad return_type": (lambda c: c.m(c.x, return_type="loss"), InputError, "return_type must be"),
        "forward, stop_at_layer out of range": (lambda c: c.m(c.x, stop_at_layer=5), OutOfRangeError,
                                                "stop_at_layer.*-2..2"),
        "forward, start_at_layer out of range": (lambda c: c.m(c.cache["blocks.0.hook_resid_pre"], start_at_layer=5),
                                                 InputError, "start_at_layer must be an int in -2..2"),
        "forward, start_at_layer with images": (lambda c: c.m(c.x, start_at_layer=1), InputError,
                                                "pass the residual stream"),
        "run_with_cache, NaN image": (lambda c: c.m.run_with_cache(_nan()), InputError, "NaN or inf"),
        "run_with_cache, empty batch": (lambda c: c.m.run_with_cache(_images(0)), InputError, "batch is empty"),
        "run_with_cache, unknown hook name": (lambda c: c.m.run_with_cache(c.x, names_filter="blocks.0.hook_resid"),
                                              InputError, "unknown hook name 'blocks.0.hook_resid'"),
        "run_with_cache, hook of a missing layer": (lambda c: c.m.run_with_cache(c.x,
                                                                                 names_filter=["blocks.5.hook_resid_pre"]),
                                                    InputError, "unknown hook name.*layers 0..1"),
        "run_with_hooks, unknown hook name": (lambda c: c.m.run_with_hooks(c.x, fwd_hooks=[("blocks.0.hook_nope", noop)]),
                                              InputError, "unknown hook name 'blocks.0.hook_nope'"),
        "run_with_hooks, hook of a missing layer": (lambda c: c.m.run_with_hooks(
            c.x, fwd_hooks=[("blocks.2.hook_resid_post", noop)]), InputError, "unknown hook name.*layers 0..1"),
        "run_with_hooks, NaN image": (lambda c: c.m.run_with_hooks(_nan(), fwd_hooks=[("blocks.0.hook_resid_pre", noop)]),
                                      InputError, "NaN or inf"),
        "run_with_hooks, hook_result without use_attn_result": (lambda c: c.m.run_with_hooks(
            c.x, fwd_hooks=[("blocks.0.attn.hook_result", noop)]), InputError, "set_use_attn_result"),
        # ---------------------------------------------------------------- preprocess
        "preprocess, missing file": (lambda c: c.m.preprocess("/nonexistent/cat.jpg"), MissingFileError,
                                     "no image file at .*cat.jpg.*check the path"),
        "preprocess, not an image": (lambda c: c.m.preprocess(__file__), InputError, "image"),
        "preprocess, an int": (lambda c: c.m.preprocess(3), InputTypeError, "int"),
        "preprocess, empty list": (lambda c: c.m.preprocess([]), InputError, "no image"),
        "preprocess, 5-channel array": (lambda c: c.m.preprocess(np.zeros((20, 20, 5), np.uint8)), InputError,
                                        "channel"),
        "preprocess, NaN float array": (lambda c: c.m.preprocess(np.full((20, 20, 3), np.nan, np.float32)),
                                        VitLensError, "NaN|uint8|float"),
        # ---------------------------------------------------------------- class space
        "identify, NaN image": (lambda c: C.identify(c.m, _nan(), progress=False), InputError, "NaN or inf"),
        "identify, inf image": (lambda c: C.identify(c.m, _inf(), progress=False), InputError, "NaN or inf"),
        "identify, wrong size": (lambda c: C.identify(c.m, _images(2, size=40), progress=False), InputError,
                                 "takes 32x32 images"),
        "identify, wrong channels": (lambda c: C.identify(c.m, _images(2, chans=1), progress=False), InputError,
                                     "expected 3 channels"),
        "identify, empty batch": (lambda c: C.identify(c.m, _images(0), progress=False), InputError, "empty"),
        "identify, class out of range": (lambda c: C.identify(c.m, c.x, 7, progress=False), OutOfRangeError,
                                         "class index 7 out of range"),
        "identify, negative class": (lambda c: C.identify(c.m, c.x, -1, progress=False), OutOfRangeError,
                                     "class index -1 out of range"),
        "identify, unknown class name": (lambda c: C.identify(c.big, _images(1), "tabby catt", progress=False),
                                         UnknownNameError, "tabby catt.*tabby"),
        "identify, ambiguous class name": (lambda c: C.identify(c.big, _images(1), "crane", progress=False),
                                           AmbiguousNameError, "crane.*(134|517)"),
        "identify, 3 targets for 2 images": (lambda c: C.identify(c.m, c.x, [0, 1, 2], progress=False), InputError,
                                             "3 targets for a batch of 2"),
        "identify, unknown mode": (lambda c: C.identify(c.m, c.x, mode="lens", progress=False), InputError,
                                   "mode must be 'paper' or 'dla'"),
        "identify, batch_size 0": (lambda c: C.identify(c.m, c.x, batch_size=0, progress=False), InputError,
                                   "batch_size must be >= 1"),
        "identifiability, layer out of range": (lambda c: C.identifiability(c.m, c.cache, 0, layers=[2]),
                                                OutOfRangeError, "out of range"),
        "identifiability, unknown hook": (lambda c: C.identifiability(c.m, c.cache, 0, hook="resid_middle"),
                                          InputError, "hook must be one of.*got 'resid_middle'"),
        "identifiability, class out of range": (lambda c: C.identifiability(c.m, c.cache, 9), OutOfRangeError,
                                                "class index 9"),
        "identifiability, ambiguous name": (lambda c: C.identifiability(c.big, c.big_cache, "crane"),
                                            AmbiguousNameError, "crane"),
        "identifiability, cache without the hook": (lambda c: C.identifiability(c.m, {}, 0), UnknownNameError,
                                                    "blocks.0.hook_resid_post"),
        "identifiability, unknown mode": (lambda c: C.identifiability(c.m, c.cache, 0, mode="x"), InputError,
                                          "mode must be"),
        "identifiability, NaN cache": (lambda c: C.identifiability(c.m, {k: v * float("nan") for k, v in c.cache.items()},
                                                                   0), InputError, "NaN"),
        "categorical_updates, NaN cache": (lambda c: C.categorical_updates(c.m, _nan_cache(c), 0), InputError, "NaN"),
        "categorical_updates, NaN cache, ranks": (lambda c: C.categorical_updates(c.m, _nan_cache(c), 0,
                                                                                  quantity="rank"), InputError, "NaN"),
        "change_rate, NaN cache": (lambda c: C.change_rate(c.m, _nan_cache(c), 0), InputError, "NaN"),
        "identifiability_rate, NaN residual": (lambda c: C.identifiability_rate(
            c.m, _nan_cache(c)["blocks.1.hook_resid_post"], 0), InputError, "NaN"),
        "dla, NaN cache": (lambda c: A.dla(c.m, _nan_cache(c), 0), InputError, "NaN"),
        "identify, int64 tensor": (lambda c: C.identify(c.m, torch.zeros(2, 3, 32, 32, dtype=torch.long),
                                                        progress=False), InputTypeError, "uint8"),
        "identify, a string that is no file": (lambda c: C.identify(c.m, "no_such_cat.jpg", progress=False),
                                               MissingFileError, "no_such_cat.jpg"),
        "identify, float tensor, single image": (lambda c: C.identify(c.m, _images(1)[0], progress=False), InputError,
                                                 "single image"),
        "logit_lens, layer out of range": (lambda c: C.logit_lens(c.m, c.cache, layers=[-3]), OutOfRangeError,
                                           "out of range"),
        "logit_lens, unknown hook": (lambda c: C.logit_lens(c.m, c.cache, hook="attn"), InputError, "hook must be one of.*got 'attn'"),
        "logit_lens, position out of range": (lambda c: C.logit_lens(c.m, c.cache, positions=[17]), OutOfRangeError,
                                              r"positions \[17\] out of range for 17 positions"),
        "logit_lens, unknown mode": (lambda c: C.logit_lens(c.m, c.cache, mode="x"), InputError, "mode must be"),
        "project, wrong d_model": (lambda c: C.project(c.m, torch.randn(2, 5, 100)), InputError, "192"),
        "project, not a tensor": (lambda c: C.project(c.m, [1.0, 2.0]), InputError, "d_model=192.*got list"),
        "project, unknown mode": (lambda c: C.project(c.m, torch.randn(2, 192), "x"), InputError, "mode must be"),
        "project, dla without cache": (lambda c: C.project(c.m, torch.randn(2, 17, 192), "dla"), InputError,
                                       "pass cache="),
        "target_logit, class out of range": (lambda c: C.target_logit(c.m, torch.randn(2, 17, 192), 7),
                                             OutOfRangeError, "class index 7"),
        "target_logit, unknown name": (lambda c: C.target_logit(c.big, torch.randn(1, 5, 192), "dragon"),
                                       UnknownNameError, "dragon"),
        "target_logit, wrong d_model": (lambda c: C.target_logit(c.m, torch.randn(2, 17, 100), 0), InputError, "192"),
        "target_logit, not a tensor": (lambda c: C.target_logit(c.m, "resid", 0), InputError, "d_model=192.*got str"),
        "target_logit, unknown mode": (lambda c: C.target_logit(c.m, torch.randn(2, 17, 192), 0, "x"), InputError,
                                       "mode must be"),
        "categorical_updates, class out of range": (lambda c: C.categorical_updates(c.m, c.cache, 7), OutOfRangeError,
                                                    "class index 7"),
        "categorical_updates, unknown variant": (lambda c: C.categorical_updates(c.m, c.cache, 0, variant="x"),
                                                 InputError, "variant"),
        "categorical_updates, unknown quantity": (lambda c: C.categorical_updates(c.m, c.cache, 0, quantity="prob"),
                                                  InputError, "quantity"),
        "categorical_updates, ambiguous name": (lambda c: C.categorical_updates(c.big, c.big_cache, "crane"),
                                                AmbiguousNameError, "crane"),
        "change_rate, class out of range": (lambda c: C.change_rate(c.m, c.cache, 8), OutOfRangeError, "class index 8"),
        "change_rate, position out of range": (lambda c: C.change_rate(c.m, c.cache, 0, positions=[20]),
                                               OutOfRangeError, r"positions \[20\] out of range for 17 positions"),
        "change_rate, unknown position name": (lambda c: C.change_rate(c.m, c.cache, 0, positions="patch"),
                                               VitLensError, "patch"),
        # ---------------------------------------------------------------- DLA
        "dla, class out of range": (lambda c: A.dla(c.m, c.cache, 7), OutOfRangeError, "class index 7"),
        "dla, unknown class name": (lambda c: A.dla(c.big, c.big_cache, "not a class"), UnknownNameError,
                                    "not a class"),
        "dla, ambiguous class name": (lambda c: A.dla(c.big, c.big_cache, "crane"), AmbiguousNameError, "crane"),
        "dla, baseline out of range": (lambda c: A.dla(c.m, c.cache, 0, baseline=99), OutOfRangeError, "class index 99"),
        "dla, 3 targets for 2 images": (lambda c: A.dla(c.m, c.cache, [0, 1, 2]), InputError, "3 targets"),
        "dla, unknown by": (lambda c: A.dla(c.m, c.cache, 0, by="block"), InputError, "by"),
        "dla, empty cache": (lambda c: A.dla(c.m, {}, 0), UnknownNameError, "hook|cache"),
        # ---------------------------------------------------------------- patching
        "positions sweep, empty batch": (sweep(P.patch_positions_sweep, _images(0), _images(0)), InputError, "empty"),
        "positions sweep, NaN clean": (sweep(P.patch_positions_sweep, _nan()), InputError, "NaN or inf"),
        "positions sweep, inf corrupted": (sweep(P.patch_positions_sweep, None, _inf()), InputError, "NaN or inf"),
        "positions sweep, mismatched shapes": (sweep(P.patch_positions_sweep, _images(3)), InputError,
                                               "same shape"),
        "positions sweep, wrong size": (sweep(P.patch_positions_sweep, _images(2, size=64), _images(2, size=64)),
                                        InputError, "32x32"),
        "positions sweep, uint8": (sweep(P.patch_positions_sweep, torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
                                   InputTypeError, "uint8"),
        "positions sweep, not a tensor": (sweep(P.patch_positions_sweep, [[0.0]]), InputTypeError,
                                          "preprocessed batch"),
        "positions sweep, layer out of range": (sweep(P.patch_positions_sweep, layers=[2]), OutOfRangeError,
                                                "out of range"),
        "positions sweep, position out of range": (sweep(P.patch_positions_sweep, positions=[17]), OutOfRangeError,
                                                   r"positions \[17\] out of range for 17 positions"),
        "positions sweep, unknown hook": (sweep(P.patch_positions_sweep, hook="resid"), InputError, "unknown hook name 'blocks.0.hook_resid'"),
        "heads sweep, head out of range": (sweep(P.patch_heads_sweep, heads=[3]), OutOfRangeError, "out of range"),
        "heads sweep, layer out of range": (sweep(P.patch_heads_sweep, layers=5), OutOfRangeError, "out of range"),
        "heads sweep, mismatched shapes": (sweep(P.patch_heads_sweep, _images(1)), InputError, "same shape"),
        "components sweep, unknown component": (sweep(P.patch_components_sweep, components=("mlp",)),
                                                InputError, "unknown hook name 'blocks.0.hook_mlp'.*hook_mlp_out"),
        "components sweep, NaN": (sweep(P.patch_components_sweep, _nan()), InputError, "NaN or inf"),
        "block every, layer out of range": (sweep(P.patch_block_every, layers=[-3]), OutOfRangeError, "out of range"),
        "block every, empty batch": (sweep(P.patch_block_every, _images(0), _images(0)), InputError, "empty"),
        "run_patched, unknown hook": (lambda c: P.run_patched(c.m, c.x, "blocks.0.hook_nope", c.cache), InputError,
                                      "hook_nope"),
        "run_patched, NaN images": (lambda c: P.run_patched(c.m, _nan(), "blocks.0.hook_resid_pre", c.cache),
                                    InputError, "NaN or inf"),
        "run_patched, source of another shape": (lambda c: P.run_patched(
            c.m, c.x, "blocks.0.hook_resid_pre", {"blocks.0.hook_resid_pre": torch.zeros(2, 5, 192)}), InputError,
            r"source shape \(2, 5, 192\) vs run shape \(2, 17, 192\)"),
        "run_patched, position out of range": (lambda c: P.run_patched(
            c.m, c.x, "blocks.0.hook_resid_pre", c.cache, positions=[40]), OutOfRangeError, r"positions \[40\] out of range"),
        "run_patched, head out of range": (lambda c: P.run_patched(
            c.m, c.x, "blocks.0.attn.hook_z", c.cache, heads=[3]), OutOfRangeError, "out of range"),
        "run_patched, unknown value": (lambda c: P.run_patched(c.m, c.x, "blocks.0.hook_resid_pre", value="noise"),
                                       InputError, "value"),
        "run_sweep, no runs": (lambda c: P.run_sweep(c.m, c.x, _images(2, 1), metric(c), [], progress=False),
                               InputError, "non-empty list of PatchRuns"),
        "run_sweep, mismatched shapes": (lambda c: P.run_sweep(c.m, c.x, _images(1), metric(c),
                                                               [P.PatchRuns("blocks.0.hook_resid_pre")], progress=False),
                                         InputError, "same shape"),
        "run_sweep, NaN clean": (lambda c: P.run_sweep(c.m, _nan(), _images(2, 1), metric(c),
                                                       [P.PatchRuns("blocks.0.hook_resid_pre")], progress=False),
                                 InputError, "NaN or inf"),
        "run_sweep, unknown hook": (lambda c: P.run_sweep(c.m, c.x, _images(2, 1), metric(c),
                                                          [P.PatchRuns("blocks.9.hook_resid_pre")], progress=False),
                                    InputError, "unknown hook name 'blocks.9.hook_resid_pre'"),
        "logit metric, class out of range": (lambda c: P.patch_positions_sweep(c.m, c.x, _images(2, 1),
                                                                               P.logit_metric(7, model=c.m),
                                                                               progress=False),
                                             OutOfRangeError, "class index 7"),
        "positions sweep, metric not callable": (lambda c: P.patch_positions_sweep(c.m, c.x, _images(2, 1), "logit",
                                                                                   progress=False),
                                                 InputTypeError, "metric must be a function.*got str"),
        "positions sweep, unknown option": (sweep(P.patch_positions_sweep, chunks=3), InputTypeError,
                                            r"unknown sweep option\(s\) \['chunks'\]"),
        "positions sweep, metric of the wrong shape": (lambda c: P.patch_positions_sweep(
            c.m, c.x, _images(2, 1), lambda logits: logits.sum(), progress=False), InputError,
            "one value per image"),
        "heads sweep, hook without heads": (sweep(P.patch_heads_sweep, hook="resid_pre"), InputError, "no head axis"),
        "run_patched, source batch of another size": (lambda c: P.run_patched(c.m, c.x, "blocks.0.hook_resid_pre",
                                                                              _images(3)), InputError,
                                                      r"source shape \(3, 17, 192\)"),
        "run_patched, NaN source images": (lambda c: P.run_patched(c.m, c.x, "blocks.0.hook_resid_pre", _nan()),
                                           InputError, "NaN or inf"),
        # ---------------------------------------------------------------- explain
        "class_space_importance, NaN": (lambda c: E.class_space_importance(c.m, _nan(), progress=False), InputError,
                                        "NaN or inf"),
        "class_space_importance, layer out of range": (lambda c: E.class_space_importance(c.m, c.x, layers=[2],
                                                                                           progress=False),
                                                       OutOfRangeError, "out of range"),
        "class_space_importance, ambiguous name": (lambda c: E.class_space_importance(c.big, _images(1), "crane",
                                                                                       progress=False),
                                                   AmbiguousNameError, "crane"),
        "direct_patch_attribution, empty batch": (lambda c: E.direct_patch_attribution(c.m, _images(0), progress=False),
                                                  InputError, "empty"),
        "direct_patch_attribution, class out of range": (lambda c: E.direct_patch_attribution(c.m, c.x, 7,
                                                                                               progress=False),
                                                         OutOfRangeError, "class index 7"),
        "attention_rollout, wrong channels": (lambda c: E.attention_rollout(c.m, _images(2, chans=2), progress=False),
                                              InputError, "3 channels"),
        "attention_rollout, unknown head_fusion": (lambda c: E.attention_rollout(c.m, c.x, head_fusion="median",
                                                                                 progress=False), InputError,
                                                   "head_fusion"),
        "attention_rollout, layer out of range": (lambda c: E.attention_rollout(c.m, c.x, layers=[4], progress=False),
                                                  OutOfRangeError, "out of range"),
        "chefer_relevance, inf": (lambda c: E.chefer_relevance(c.m, _inf(), progress=False), InputError, "NaN or inf"),
        "chefer_relevance, unknown class": (lambda c: E.chefer_relevance(c.big, _images(1), "unicorn", progress=False),
                                            UnknownNameError, "unicorn"),
        "perturbation_curve, NaN": (lambda c: E.perturbation_curve(c.m, _nan(), 0, torch.rand(2, 4, 4), progress=False),
                                    InputError, "NaN or inf"),
        "perturbation_curve, wrong-size maps": (lambda c: E.perturbation_curve(c.m, c.x, 0, torch.rand(2, 3, 3),
                                                                               progress=False), InputError, "4, 4|16"),
        "perturbation_curve, maps for 3 images": (lambda c: E.perturbation_curve(c.m, c.x, 0, torch.rand(3, 4, 4),
                                                                                 progress=False), InputError, "3"),
        "perturbation_curve, unknown mode": (lambda c: E.perturbation_curve(c.m, c.x, 0, torch.rand(2, 4, 4),
                                                                            mode="both", progress=False), InputError,
                                             "mode"),
        "perturbation_curve, class out of range": (lambda c: E.perturbation_curve(c.m, c.x, 9, torch.rand(2, 4, 4),
                                                                                  progress=False), OutOfRangeError,
                                                   "class index 9"),
        "perturbation_curve, steps out of range": (lambda c: E.perturbation_curve(c.m, c.x, 0, torch.rand(2, 4, 4),
                                                                                  steps=[0, 20], progress=False),
                                                   VitLensError, "20|16"),
        "perturbation_curve, NaN maps": (lambda c: E.perturbation_curve(c.m, c.x, 0, torch.full((2, 4, 4), float("nan")),
                                                                        progress=False), InputError,
                                         "maps contain NaN or inf"),
        "perturbation_curve, maps as a list": (lambda c: E.perturbation_curve(c.m, c.x, 0, [[0.0]], progress=False),
                                               InputTypeError, "maps must be a float tensor.*got list"),
        "perturbation_curve, order out of range": (lambda c: E.perturbation_curve(
            c.m, c.x, 0, order=torch.arange(16).repeat(2, 1) + 5, progress=False), OutOfRangeError, "0..15"),
        "perturbation_curve, maps and order": (lambda c: E.perturbation_curve(
            c.m, c.x, 0, torch.rand(2, 4, 4), order=torch.arange(16).repeat(2, 1), progress=False), InputError,
            "exactly one of maps="),
        "attention_rollout, residual_weight > 1": (lambda c: E.attention_rollout(c.m, c.x, residual_weight=1.5,
                                                                                 progress=False), InputError,
                                                   r"residual_weight must be in \[0, 1\]"),
        # ---------------------------------------------------------------- probing
        "fit_ridge_probe, NaN features": (lambda c: R.fit_ridge_probe(torch.full((6, 4), float("nan")),
                                                                      torch.arange(6) % 2), InputError, "NaN|finite"),
        "fit_ridge_probe, label count mismatch": (lambda c: R.fit_ridge_probe(torch.randn(6, 4), torch.arange(5) % 2),
                                                  InputError, "6.*5|5.*6"),
        "fit_ridge_probe, float labels": (lambda c: R.fit_ridge_probe(torch.randn(6, 4), torch.rand(6)),
                                          InputTypeError, "label"),
        "fit_ridge_probe, empty": (lambda c: R.fit_ridge_probe(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
                                   InputError, "has no samples"),
        "fit_ridge_probe, not a tensor": (lambda c: R.fit_ridge_probe("features", torch.arange(6)), InputTypeError,
                                          "tensor"),
        "fit_ridge_probe, negative alpha": (lambda c: R.fit_ridge_probe(torch.randn(6, 4), torch.arange(6) % 2,
                                                                        alpha=-1.0), InputError, "alpha"),
        "linear_probe_sweep, NaN train": (lambda c: R.linear_probe_sweep(c.m, _nan(4), torch.arange(4) % 2, c.x,
                                                                         torch.arange(2), progress=False),
                                          InputError, "NaN or inf"),
        "linear_probe_sweep, label count mismatch": (lambda c: R.linear_probe_sweep(c.m, _images(4), torch.arange(3),
                                                                                    c.x, torch.arange(2),
                                                                                    progress=False),
                                                     InputError, "4.*3|3.*4"),
        "linear_probe_sweep, layer out of range": (lambda c: R.linear_probe_sweep(c.m, _images(4), torch.arange(4) % 2,
                                                                                  c.x, torch.arange(2), layers=[2],
                                                                                  progress=False),
                                                   OutOfRangeError, "out of range"),
        "linear_probe_sweep, unknown component": (lambda c: R.linear_probe_sweep(c.m, _images(4), torch.arange(4) % 2,
                                                                                 c.x, torch.arange(2),
                                                                                 components=("mlp",), progress=False),
                                                  InputError, "unknown component 'mlp'; choose from"),
        "fit_ridge_probe, NaN alpha": (lambda c: R.fit_ridge_probe(torch.randn(6, 4), torch.arange(6) % 2,
                                                                   alpha=float("nan")), InputError, "alpha must be > 0"),
        "fit_ridge_probe, int features": (lambda c: R.fit_ridge_probe(torch.ones(6, 4, dtype=torch.long),
                                                                      torch.arange(6) % 2), InputTypeError,
                                          "X must be a float tensor.*int64"),
        "linear_probe_sweep, float labels": (lambda c: R.linear_probe_sweep(c.m, _images(4), torch.rand(4), c.x,
                                                                            torch.arange(2), progress=False),
                                             InputTypeError, "train_labels must be integer class indices.*float32"),
        "linear_probe_sweep, position out of range": (lambda c: R.linear_probe_sweep(
            c.m, _images(4), torch.arange(4) % 2, c.x, torch.arange(2), positions=[40], progress=False),
            OutOfRangeError, r"positions \[40\] out of range"),
        # ---------------------------------------------------------------- set_class_directions
        "set_class_directions, wrong d_model": (lambda c: c.m.set_class_directions(torch.randn(100, 7)), InputError,
                                                r"W must be \[d_model=192, n_classes\], got \(100, 7\)"),
        "set_class_directions, NaN": (lambda c: c.m.set_class_directions(torch.full((192, 7), float("nan"))),
                                      InputError, "NaN|finite"),
        "set_class_directions, labels count": (lambda c: c.m.set_class_directions(torch.randn(192, 3), ["a", "b"]),
                                               InputError, "2 labels for 3 class directions"),
        "set_class_directions, wrong bias": (lambda c: c.m.set_class_directions(torch.randn(192, 3),
                                                                                bias=torch.zeros(4)),
                                             InputError, "bias"),
        "set_class_directions, unknown space": (lambda c: c.m.set_class_directions(torch.randn(192, 3), space="text"),
                                                InputError, "space"),
        "set_class_directions, not a tensor": (lambda c: c.m.set_class_directions("W"), InputTypeError, "W must be a tensor.*got str"),
        "set_class_directions, head space wrong size": (lambda c: c.m.set_class_directions(torch.randn(192, 3),
                                                                                           space="head"),
                                                        InputError, "7"),
        "set_class_directions, 1-d": (lambda c: c.m.set_class_directions(torch.randn(192)), InputError, "192"),
        "set_class_directions, NaN bias": (lambda c: c.m.set_class_directions(torch.randn(192, 3),
                                                                              bias=torch.full((3,), float("nan"))),
                                           InputError, "bias contains NaN or inf"),
        "set_class_directions, labels as a string": (lambda c: c.m.set_class_directions(torch.randn(192, 3), "abc"),
                                                     InputTypeError, "labels must be a list of class names"),
        # ---------------------------------------------------------------- save / load
        "load, missing file": (lambda c: HookedViT.load("/nonexistent/model.safetensors"), MissingFileError,
                               "no such file.*model.safetensors.*model.save"),
        "load, not a safetensors file": (lambda c: HookedViT.load(__file__), InputError, "safetensors|save"),
        "from_pretrained, unknown model": (lambda c: HookedViT.from_pretrained("vit_nonexistent_patch16"),
                                           InputError, "unknown model name 'vit_nonexistent_patch16'"),
        "class_index, ambiguous name": (lambda c: c.big.class_index("crane"), AmbiguousNameError, "crane"),
        "class_index, unknown name": (lambda c: c.big.class_index("cat"), UnknownNameError, "cat"),
        "class_index, out of range": (lambda c: c.m.class_index(7), OutOfRangeError, "class index 7"),
    }
    return cases


_CASES = _cases()


@pytest.mark.parametrize("case", list(_CASES))
def test_hostile_input_raises_a_library_error_and_touches_no_weight(ctx, case):
    run, exc, pattern = _CASES[case]
    before = [weights_hash(m) for m in ctx.models()]
    with pytest.raises(exc, match=pattern) as err:
        run(ctx)
    assert isinstance(err.value, VitLensError), f"{type(err.value).__name__}: {err.value}"
    assert [weights_hash(m) for m in ctx.models()] == before
    for m in ctx.models():
        assert not any(hp._forward_hooks for _, hp in m.hook_dict.items())  # nothing left behind


def test_save_load_errors(ctx, tmp_path):
    """A file of plain tensors (not written by HookedViT.save) and a folder are refused clearly."""
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(VitLensError, match="save|HookedViT"):
        HookedViT.load(plain)
    before = weights_hash(ctx.m)
    with pytest.raises(VitLensError, match="save to a .safetensors file"):
        ctx.m.save(tmp_path)
    assert weights_hash(ctx.m) == before


def test_float64_images_on_a_float32_model_just_work(ctx):
    """float64 pixels are cast to the model's dtype (exact for pixel values): same logits as float32."""
    from vit_lens import class_space as C

    before = weights_hash(ctx.m)
    with torch.no_grad():
        a, b = ctx.m(ctx.x), ctx.m(ctx.x.double())
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    r64, _ = C.identify(ctx.m, ctx.x.double(), 0, progress=False)
    r32, _ = C.identify(ctx.m, ctx.x, 0, progress=False)
    assert torch.equal(r64.rank, r32.rank)
    from vit_lens import explain as E
    from vit_lens import patching as P

    torch.testing.assert_close(E.attention_rollout(ctx.m, ctx.x.double(), progress=False),
                               E.attention_rollout(ctx.m, ctx.x, progress=False), rtol=0, atol=1e-6)
    a = P.patch_positions_sweep(ctx.m, ctx.x.double(), _images(2, 1).double(), P.logit_metric(0, model=ctx.m),
                                layers=[1], progress=False)
    b = P.patch_positions_sweep(ctx.m, ctx.x, _images(2, 1), P.logit_metric(0, model=ctx.m), layers=[1],
                                progress=False)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)
    assert weights_hash(ctx.m) == before


def test_float32_images_on_a_float64_model_just_work():
    """The other way round (a new user's report: torch's 'Input type (float) and bias type (double)'):
    the model casts, and its float64 logits match timm's float64 model."""
    t = make_timm("vit_tiny_patch16_224", **KW).double()
    m = HookedViT.from_timm(t)
    assert m.dtype == torch.float64
    before = weights_hash(m)
    x = _images(2)
    with torch.no_grad():
        got, ref = m(x), t(x.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert weights_hash(m) == before


# ---------------------------------------------------------------- the CLI: status 2, one line, no traceback
def _write(tmp, name, data):
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def _folder_with_text(tmp):
    d = tmp / "photos"
    d.mkdir()
    (d / "notes.jpg").write_bytes(b"not a jpeg")
    return d


CLI_CASES = {
    "unknown model": (lambda tmp: ["identify", "--model", "vit_nonexistent_patch16", "--out", "-"],
                      "vit_nonexistent_patch16"),
    "missing image": (lambda tmp: ["identify", str(tmp / "missing.jpg"), "--out", "-"], "missing.jpg"),
    "not an image": (lambda tmp: ["identify", _write(tmp, "notes.jpg", b"hello"), "--out", "-"], "notes.jpg"),
    "missing labels csv": (lambda tmp: ["identify", "--labels", str(tmp / "labels.csv"), "--out", "-"], "labels.csv"),
    "missing checkpoint": (lambda tmp: ["identify", "--checkpoint", str(tmp / "w.safetensors"), "--out", "-"],
                           "w.safetensors"),
    "checkpoint not weights": (lambda tmp: ["identify", "--checkpoint", _write(tmp, "w.txt", b"101"), "--out", "-"],
                               "w.txt"),
    "folder with a non-image": (lambda tmp: ["identify", str(_folder_with_text(tmp)), "--out", "-"], "notes.jpg"),
    "labels csv without the columns": (lambda tmp: ["identify", "--labels", _write(tmp, "l.csv", b"a,b\n1,2\n"),
                                                    "--out", "-"], "path,class_index"),
    "invalid --mode": (lambda tmp: ["identify", "--mode", "lens", "--out", "-"], "invalid choice: 'lens'"),
    "unknown option": (lambda tmp: ["identify", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "unknown command": (lambda tmp: ["explain"], "invalid choice: 'explain'"),
    "batch size not a number": (lambda tmp: ["identify", "--batch-size", "many"], "invalid int value: 'many'"),
}
REAL_CLI_CASES = {  # need the real checkpoint (the class names are checked after the model loads)
    "unknown class": (lambda tmp: ["identify", "--label", "tabby catt", "--out", "-"], "tabby catt"),
    "ambiguous class": (lambda tmp: ["identify", "--label", "crane", "--out", "-"], "crane"),
}


def _run_cli(argv, capsys):
    from vit_lens.cli import main

    status = main(argv)
    out = capsys.readouterr()
    return status, out.err.strip().splitlines(), out.out


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_hostile_input_exits_2_with_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, phrase = CLI_CASES[case]
    status, err, _ = _run_cli(argv(tmp_path), capsys)
    assert status == 2, err
    errors = [line for line in err if line.startswith("vit-lens")]  # (a folder also reports "N images found")
    assert len(errors) == 1 and len(err) <= 2, err
    assert not any("Traceback" in line for line in err) and phrase in errors[0], err


@pytest.mark.parametrize("case", list(REAL_CLI_CASES))
def test_cli_hostile_class_exits_2_with_one_line(case, tmp_path, capsys, monkeypatch):
    if not (WEIGHTS / f"{REAL_VIT}.safetensors").exists():
        pytest.skip("real ViT-Ti checkpoint not found")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIT_LENS_CHECKPOINTS", str(WEIGHTS))
    argv, phrase = REAL_CLI_CASES[case]
    status, err, _ = _run_cli(argv(tmp_path), capsys)
    assert status == 2, err
    errors = [line for line in err if line.startswith("vit-lens")]  # (a folder also reports "N images found")
    assert len(errors) == 1 and len(err) <= 2, err
    assert not any("Traceback" in line for line in err) and phrase in errors[0], err


# ---------------------------------------------------------------- the other sources and CLIP text classes
# from_hf, from_open_clip, from_pretrained("hf:..." / "open_clip:...") and vit_lens.clip: every case raises a
# library error that says what to do, and no model (the HF model, the OpenCLIP model, the hooked tower) changes.
# Small random models; the hub is never reached (HF_HUB_OFFLINE, an empty HF_HOME).
HF_SMALL = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128)
CLIP_TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1)
CLIP_VISION = dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32)


class SourceCtx:
    def __init__(self, tmp):
        import json
        import warnings

        import open_clip
        import transformers

        self.tmp = tmp
        torch.manual_seed(0)
        self.hf = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_SMALL, num_labels=7)).eval()
        self.hf.save_pretrained(tmp / "vit")
        # a directory whose config.json says width 64 and whose weights are width 96: transformers would
        # re-initialise every tensor at random (ignore_mismatched_sizes) -- refused
        wide = transformers.ViTForImageClassification(transformers.ViTConfig(**dict(HF_SMALL, hidden_size=96),
                                                                             num_labels=7))
        wide.save_pretrained(tmp / "mismatch")
        (tmp / "mismatch" / "config.json").write_text((tmp / "vit" / "config.json").read_text())
        (tmp / "empty").mkdir()
        self.clip = open_clip.CLIP(embed_dim=24, vision_cfg=dict(CLIP_VISION), text_cfg=dict(CLIP_TEXT)).eval()
        self.tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)  # bundled BPE, offline
        self.tower = HookedViT.from_open_clip(self.clip)
        # an OpenCLIP folder whose config is width 32 and whose weights are width 48
        other = open_clip.CLIP(embed_dim=24, vision_cfg=dict(CLIP_VISION, width=48), text_cfg=dict(CLIP_TEXT))
        (tmp / "oc_mismatch").mkdir()
        (tmp / "oc_mismatch" / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": {"embed_dim": 24, "vision_cfg": CLIP_VISION, "text_cfg": CLIP_TEXT}, "preprocess_cfg": {}}))
        torch.save(other.state_dict(), tmp / "oc_mismatch" / "open_clip_pytorch_model.bin")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.beit = transformers.BeitModel(transformers.BeitConfig(
                image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64))
        self.clip_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
        self.x = _images(2)

    def models(self):
        return (self.hf, self.clip, self.tower)


@pytest.fixture(scope="module")
def sctx(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("open_clip")
    return SourceCtx(tmp_path_factory.mktemp("sources"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _source_cases():  # noqa: C901 - a table
    from vit_lens.clip import set_text_classes, text_class_embeddings, zero_shot_logits
    from vit_lens.loading.checkpoints import CheckpointMismatchError, CheckpointNotFoundError
    from vit_lens.loading.sources.timm import UnsupportedModelError

    def stc(names=("cat", "dog"), templates=None, **kw):
        return lambda c: set_text_classes(c.tower, c.clip, c.tok, list(names) if isinstance(names, tuple) else names,
                                          templates, progress=False, **kw)

    def zsl(W, model=None):
        return lambda c: zero_shot_logits(c.tower if model is None else model(c), c.x, W)

    return {
        # ---------------------------------------------------------------- from_hf
        "from_hf, an int": (lambda c: HookedViT.from_hf(3), InputTypeError,
                            "from_hf expects a transformers PreTrainedModel.*got int"),
        "from_hf, a timm model": (lambda c: HookedViT.from_hf(make_timm("vit_tiny_patch16_224", **KW)), InputTypeError,
                                  "got VisionTransformer.*HookedViT.from_timm"),
        "from_hf, an OpenCLIP model": (lambda c: HookedViT.from_hf(c.clip), InputTypeError, "got CLIP"),
        "from_hf, an unsupported class": (lambda c: HookedViT.from_hf(c.beit), InputError,
                                          "BeitModel.*relative position bias.*not supported"),
        "from_hf, a text model": (lambda c: HookedViT.from_hf(c.clip_text), InputError, "CLIPTextModel.*a text model"),
        "from_hf, weights of another size": (lambda c: HookedViT.from_hf(str(c.tmp / "mismatch")),
                                             CheckpointMismatchError,
                                             "could not load ViTForImageClassification.*check that config.json"),
        "from_hf, missing local directory": (lambda c: HookedViT.from_hf(str(c.tmp / "nothing")),
                                             CheckpointNotFoundError, "not a directory written by save_pretrained"),
        "from_hf, a file, not a directory": (lambda c: HookedViT.from_hf(str(c.tmp / "vit" / "config.json")),
                                             CheckpointNotFoundError, "not a directory"),
        "from_hf, a directory without config.json": (lambda c: HookedViT.from_hf(str(c.tmp / "empty")),
                                                     CheckpointNotFoundError, "no readable config.json.*save_pretrained"),
        "from_hf, missing checkpoint_path": (lambda c: HookedViT.from_hf("google/vit-base-patch16-224",
                                                                         checkpoint_path=c.tmp / "nothing"),
                                             CheckpointNotFoundError, "checkpoint_path=.*is not a directory"),
        "from_hf, hub id offline": (lambda c: HookedViT.from_hf("google/vit-base-patch16-224"), CheckpointNotFoundError,
                                    "save_pretrained.*HF_HUB_OFFLINE=1"),
        "from_hf, checkpoint_path with a model": (lambda c: HookedViT.from_hf(c.hf, checkpoint_path=c.tmp / "vit"),
                                                  InputTypeError, "checkpoint_path is for loading by name"),
        "from_hf, dtype not a dtype": (lambda c: HookedViT.from_hf(c.hf, dtype="float32"), InputTypeError,
                                       "dtype must be a floating torch.dtype"),
        "from_hf, unknown option": (lambda c: HookedViT.from_hf(c.hf, fold_everything=True), InputTypeError,
                                    r"unexpected keyword argument\(s\) \['fold_everything'\]"),
        "from_hf, option not a bool": (lambda c: HookedViT.from_hf(c.hf, fold_ln="yes"), InputTypeError,
                                       "fold_ln must be True or False"),
        "from_hf, interpolate_pos_encoding not a bool": (lambda c: HookedViT.from_hf(c.hf, interpolate_pos_encoding=1),
                                                         InputTypeError, "interpolate_pos_encoding must be True or False"),
        "from_hf, image_processor a string": (lambda c: HookedViT.from_hf(c.hf, image_processor="ViTImageProcessor"),
                                              InputTypeError, "image_processor must be a transformers image processor"),
        # ---------------------------------------------------------------- from_pretrained("hf:...")
        "from_pretrained hf:, weights of another size": (lambda c: HookedViT.from_pretrained(f"hf:{c.tmp / 'mismatch'}"),
                                                         CheckpointMismatchError, "could not load"),
        "from_pretrained hf:, missing directory": (lambda c: HookedViT.from_pretrained(f"hf:{c.tmp / 'nothing'}"),
                                                   CheckpointNotFoundError, "not a directory"),
        "from_pretrained hf:, hub id offline": (lambda c: HookedViT.from_pretrained("hf:google/vit-base-patch16-224"),
                                                CheckpointNotFoundError, "HF_HUB_OFFLINE=1"),
        "from_pretrained hf:, empty name": (lambda c: HookedViT.from_pretrained("hf:"), InputTypeError, "non-empty"),
        "from_pretrained hf:, timm_kwargs": (lambda c: HookedViT.from_pretrained(f"hf:{c.tmp / 'vit'}",
                                                                                 timm_kwargs=dict(img_size=32)),
                                             InputTypeError, "timm_kwargs is for timm models"),
        "from_pretrained timm, interpolate_pos_encoding": (
            lambda c: HookedViT.from_pretrained("vit_tiny_patch16_224", interpolate_pos_encoding=True), InputTypeError,
            "interpolate_pos_encoding is an option of Hugging Face models.*dynamic_img_size=True"),
        # ---------------------------------------------------------------- from_open_clip / from_pretrained("open_clip:...")
        "from_open_clip, an int": (lambda c: HookedViT.from_open_clip(3), InputTypeError, "got int"),
        "from_open_clip, a Linear": (lambda c: HookedViT.from_open_clip(torch.nn.Linear(2, 2)), InputTypeError,
                                     "expected an OpenCLIP model.*got Linear"),
        "from_open_clip, an HF model": (lambda c: HookedViT.from_open_clip(c.hf), InputTypeError,
                                        "got ViTForImageClassification"),
        "from_open_clip, unknown name": (lambda c: HookedViT.from_open_clip("ViT-B-33"), InputError,
                                         "unknown OpenCLIP model name 'ViT-B-33'.*ViT-B-32"),
        "from_open_clip, unknown option": (lambda c: HookedViT.from_open_clip(c.clip, fold_everything=True),
                                           InputTypeError, "fold_everything"),
        "from_open_clip, option not a bool": (lambda c: HookedViT.from_open_clip(c.clip, fold_ln=1), InputTypeError,
                                              "fold_ln must be True or False"),
        "from_open_clip, missing weights file": (lambda c: HookedViT.from_open_clip("ViT-B-32",
                                                                                    pretrained=str(c.tmp / "no.pt")),
                                                 InputError, "neither an OpenCLIP pretrained tag.*nor an existing"),
        "from_open_clip, missing local-dir": (lambda c: HookedViT.from_open_clip(f"local-dir:{c.tmp / 'nothing'}"),
                                              CheckpointNotFoundError, "no such folder.*open_clip_config.json"),
        "from_open_clip, weights of another size": (lambda c: HookedViT.from_open_clip(f"local-dir:{c.tmp / 'oc_mismatch'}"),
                                                    CheckpointMismatchError, "do not fit"),
        "from_pretrained open_clip:, missing local-dir": (
            lambda c: HookedViT.from_pretrained(f"open_clip:local-dir:{c.tmp / 'nothing'}"), CheckpointNotFoundError,
            "no such folder"),
        "from_pretrained open_clip:, hub offline": (lambda c: HookedViT.from_pretrained("open_clip:hf-hub:org/none"),
                                                    CheckpointNotFoundError, "local copy.*HF_HUB_OFFLINE=1"),
        "from_pretrained open_clip:, a tag and a file": (
            lambda c: HookedViT.from_pretrained("open_clip:ViT-B-32/openai", checkpoint_path=c.tmp / "w.pt"),
            InputError, "give one of them"),
        "from_pretrained open_clip:, empty name": (lambda c: HookedViT.from_pretrained("open_clip:"), InputTypeError,
                                                   "non-empty"),
        "from_pretrained open_clip:, timm_kwargs": (lambda c: HookedViT.from_pretrained("open_clip:ViT-B-32",
                                                                                        timm_kwargs={}),
                                                    InputTypeError, "timm_kwargs is for timm models"),
        # ---------------------------------------------------------------- vit_lens.clip
        "set_text_classes, not a HookedViT": (lambda c: set_text_classes(c.clip, c.clip, c.tok, ["cat"], progress=False),
                                              InputTypeError, "takes the HookedViT of a CLIP image tower.*from_open_clip"),
        "set_text_classes, empty class list": (stc(()), InputError, "class_names is empty"),
        "set_text_classes, duplicate names": (stc(("cat", "dog", "cat")), InputError, r"distinct.*repeated: \['cat'\]"),
        "set_text_classes, names equal but for case": (stc(("cat", "Cat ")), InputError,
                                                       "distinct ignoring case and surrounding spaces"),
        "set_text_classes, names a string": (stc("cat"), InputTypeError, "class_names must be a list of strings"),
        "set_text_classes, names not strings": (stc((1, 2)), InputTypeError, "class names must be non-empty strings"),
        "set_text_classes, template without {}": (stc(templates=["a photo of a cat"]), InputError, "has no '{}'"),
        "set_text_classes, template with two {}": (stc(templates=["a {} and a {}"]), InputError,
                                                   "exactly one '{}'.*IndexError"),
        "set_text_classes, template with {name}": (stc(templates=["a {} {name}"]), InputError, "exactly one '{}'"),
        "set_text_classes, templates a string": (stc(templates="a photo of a {}"), InputTypeError,
                                                 "templates must be a non-empty list"),
        "set_text_classes, template returns no string": (stc(templates=[lambda n: 3]), InputTypeError,
                                                         "must return the prompt as a string"),
        "set_text_classes, tokenizer None": (lambda c: set_text_classes(c.tower, c.clip, None, ["cat"], progress=False),
                                             InputTypeError, "tokenizer must be callable"),
        "set_text_classes, no text tower": (lambda c: set_text_classes(c.tower, torch.nn.Linear(2, 2), c.tok, ["cat"],
                                                                       progress=False),
                                            InputTypeError, "no text tower this function knows"),
        "set_text_classes, batch_size 0": (stc(batch_size=0), InputError, "batch_size must be a positive int"),
        "text_class_embeddings, empty class list": (lambda c: text_class_embeddings(c.clip, c.tok, [], progress=False),
                                                    InputError, "class_names is empty"),
        "text_class_embeddings, duplicate names": (lambda c: text_class_embeddings(c.clip, c.tok, ["a", "a"],
                                                                                   progress=False),
                                                   InputError, "distinct"),
        "zero_shot_logits, not a HookedViT": (zsl(torch.randn(24, 3), lambda c: c.clip), InputTypeError,
                                              "zero_shot_logits takes the HookedViT"),
        "zero_shot_logits, W a list": (zsl([[0.0] * 3] * 24), InputTypeError, "W_text must be a tensor"),
        "zero_shot_logits, W wrong width": (zsl(torch.randn(7, 3)), InputError, r"W_text must be \[embed_dim=24"),
        "zero_shot_logits, W no classes": (zsl(torch.randn(24, 0)), InputError, "n_classes >= 1"),
        "zero_shot_logits, W NaN": (zsl(torch.full((24, 3), float("nan"))), InputError, "W_text contains NaN"),
        "zero_shot_logits, W integer": (zsl(torch.ones(24, 3, dtype=torch.long)), InputTypeError, "float tensor"),
        "zero_shot_logits, images of another size": (lambda c: zero_shot_logits(c.tower, _images(2, size=48),
                                                                                torch.randn(24, 3)),
                                                     InputError, "takes 32x32 images, got 48x48"),
    }


_SOURCE_CASES = _source_cases()


@pytest.mark.parametrize("case", list(_SOURCE_CASES))
def test_sources_and_clip_hostile_inputs_raise_library_errors(sctx, offline, case):
    import warnings

    run, exc, pattern = _SOURCE_CASES[case]
    before = [weights_hash(m) for m in sctx.models()]
    classes = (sctx.tower.cfg.n_classes, sctx.tower.class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own load report on the mismatched directory
        with pytest.raises(exc, match=pattern) as err:
            run(sctx)
    assert isinstance(err.value, VitLensError), f"{type(err.value).__name__}: {err.value}"
    assert [weights_hash(m) for m in sctx.models()] == before
    assert (sctx.tower.cfg.n_classes, sctx.tower.class_names) == classes  # a refused call sets no classes


# ---------------------------------------------------------------- weights holding NaN / inf
def _poisoned(module, name_part: str, value: float):
    """A copy of ``module`` with one element of the first parameter whose name contains ``name_part`` set to ``value``."""
    import copy

    m = copy.deepcopy(module)
    name, p = next((n, p) for n, p in m.named_parameters() if name_part in n)
    with torch.no_grad():
        p.view(-1)[3] = value
    return m, name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused_by_every_source(sctx, tmp_path, value):
    """A corrupt checkpoint (NaN / inf in a weight) is refused by timm, Hugging Face, OpenCLIP and HookedViT.load,
    naming the tensor; never converted into a model whose every score is NaN."""
    from safetensors.torch import load_file, save_file

    from vit_lens.loading.checkpoints import CheckpointError

    tm, _ = _poisoned(make_timm("vit_tiny_patch16_224", **KW), "blocks.1.attn.qkv.weight", value)
    with pytest.raises(CheckpointError, match=r"contain NaN or inf \(blocks\.1\.attn\.W_Q"):
        HookedViT.from_timm(tm)
    ckpt = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(ckpt))
    with pytest.raises(CheckpointError, match="NaN or inf"):
        HookedViT.from_pretrained("vit_tiny_patch16_224", checkpoint_path=ckpt, timm_kwargs=KW)
    hf, _ = _poisoned(sctx.hf, "layers.0.mlp.fc2.weight", value)
    with pytest.raises(CheckpointError, match=r"NaN or inf \(blocks\.0\.mlp\.W_out"):
        HookedViT.from_hf(hf)
    oc, _ = _poisoned(sctx.clip, "visual.proj", value) if any("visual.proj" in n for n, _ in sctx.clip.named_parameters()) \
        else _poisoned(sctx.clip, "visual.conv1.weight", value)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        HookedViT.from_open_clip(oc)
    good = tmp_path / "good.safetensors"
    HookedViT.from_timm(make_timm("vit_tiny_patch16_224", **KW)).save(good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(good))
    sd["blocks.0.mlp.W_in"].view(-1)[0] = value
    save_file(sd, str(tmp_path / "saved_bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"NaN or inf \(blocks\.0\.mlp\.W_in\)"):
        HookedViT.load(tmp_path / "saved_bad.safetensors")
    assert HookedViT.load(good).cfg.n_layers == 2  # the untouched file still loads
