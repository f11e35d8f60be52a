"""vit_lens: mechanistic interpretability of Vision Transformers in class embedding space.

Public names are imported lazily, so ``import vit_lens`` stays cheap (no plotting or notebook
libraries are imported until used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "HookedViT": "vit_lens.model",
    "HookedViTConfig": "vit_lens.config",
    "patch_index_to_rowcol": "vit_lens.config",
    "rowcol_to_patch_index": "vit_lens.config",
    "UnsupportedModelError": "vit_lens.loading",
    # the exceptions every entry point raises on bad input (each also a ValueError / IndexError / KeyError / TypeError)
    "VitLensError": "vit_lens.core.errors",
    "InputError": "vit_lens.core.errors",
    "InputTypeError": "vit_lens.core.errors",
    "OutOfRangeError": "vit_lens.core.errors",
    "UnknownNameError": "vit_lens.core.errors",
    "AmbiguousNameError": "vit_lens.core.errors",
    "supported_models": "vit_lens.loading",
    "sample_image": "vit_lens.samples",
    "sample_image_path": "vit_lens.samples",
    "SAMPLE_IMAGES": "vit_lens.samples",
    # issue 6: importance maps, perturbation evaluation, linear probes, image-folder datasets
    "class_space_importance": "vit_lens.explain",
    "direct_patch_attribution": "vit_lens.explain",
    "attention_key_attribution": "vit_lens.explain",
    "attention_rollout": "vit_lens.explain",
    "chefer_relevance": "vit_lens.explain",
    "upsample_map": "vit_lens.explain",
    "overlay": "vit_lens.explain",
    "model_view": "vit_lens.explain",
    "perturbation_curve": "vit_lens.explain",
    "random_perturbation_curves": "vit_lens.explain",
    "perturbation_auc": "vit_lens.explain",
    "compare_perturbation": "vit_lens.explain",
    "PerturbationCurve": "vit_lens.explain",
    "ridge_fit": "vit_lens.probing",
    "fit_ridge_probe": "vit_lens.probing",
    "RidgeProbe": "vit_lens.probing",
    "linear_probe_sweep": "vit_lens.probing",
    "probe_importance": "vit_lens.probing",
    "ImageSet": "vit_lens.data",
    "load_image_set": "vit_lens.data",
    "augmented_views": "vit_lens.data",
    # issue 4: class-embedding-space analysis (more in vit_lens.class_space / vit_lens.attribution)
    "project": "vit_lens.class_space",
    "logit_lens": "vit_lens.class_space",
    "identifiability": "vit_lens.class_space",
    "identify": "vit_lens.class_space",
    "IdentifiabilityResult": "vit_lens.class_space",
    "random_twin": "vit_lens.class_space",
    "dla": "vit_lens.attribution",
    "memories": "vit_lens.attribution",
    # issue 5: activation patching, attention knockout, context ablation
    "PatchingResult": "vit_lens.patching",
    "run_patched": "vit_lens.patching",
    "patching_hooks": "vit_lens.patching",
    "patch_positions_sweep": "vit_lens.patching",
    "patch_heads_sweep": "vit_lens.patching",
    "patch_block_every": "vit_lens.patching",
    "patch_components_sweep": "vit_lens.patching",
    "logit_metric": "vit_lens.patching",
    "logit_diff_metric": "vit_lens.patching",
    "prob_metric": "vit_lens.patching",
    "identifiability_metric": "vit_lens.patching",
    "attention_knockout": "vit_lens.ablation",
    "knockout_hooks": "vit_lens.ablation",
    "knockout_edges": "vit_lens.ablation",
    "context_ablation": "vit_lens.ablation",
    "context_comparison": "vit_lens.ablation",
    "grid_mask_from_box": "vit_lens.ablation",
    "grid_mask_from_segmentation": "vit_lens.ablation",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vit_lens' has no attribute {name!r}")


def __dir__():
    return __all__
