"""vit_lens: mechanistic interpretability of Vision Transformers in class embedding space.

Public names are imported lazily, so ``import vit_lens`` stays cheap (no plotting or notebook
libraries are imported until used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    "NotDefinedError": "vit_lens.core.errors",
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
    # issue 13: class spaces from text for CLIP image towers
    "set_text_classes": "vit_lens.clip",
    "text_class_embeddings": "vit_lens.clip",
    # issue 14b: edge attribution, exact edge patching, circuit faithfulness
    "edge_graph": "vit_lens.edges",
    "edge_attribution": "vit_lens.edges",
    "patch_edges": "vit_lens.edges",
    "circuit_faithfulness": "vit_lens.edges",
    "faithfulness_curve": "vit_lens.edges",
    "EdgeResult": "vit_lens.edges",
}

if TYPE_CHECKING:  # what a type checker sees; at run time __getattr__ imports these on first use
    from vit_lens.model import (
        HookedViT as HookedViT,
    )
    from vit_lens.config import (
        HookedViTConfig as HookedViTConfig,
        patch_index_to_rowcol as patch_index_to_rowcol,
        rowcol_to_patch_index as rowcol_to_patch_index,
    )
    from vit_lens.loading import (
        UnsupportedModelError as UnsupportedModelError,
        supported_models as supported_models,
    )
    from vit_lens.core.errors import (
        VitLensError as VitLensError,
        InputError as InputError,
        InputTypeError as InputTypeError,
        OutOfRangeError as OutOfRangeError,
        UnknownNameError as UnknownNameError,
        AmbiguousNameError as AmbiguousNameError,
        NotDefinedError as NotDefinedError,
    )
    from vit_lens.samples import (
        sample_image as sample_image,
        sample_image_path as sample_image_path,
        SAMPLE_IMAGES as SAMPLE_IMAGES,
    )
    from vit_lens.explain import (
        class_space_importance as class_space_importance,
        direct_patch_attribution as direct_patch_attribution,
        attention_key_attribution as attention_key_attribution,
        attention_rollout as attention_rollout,
        chefer_relevance as chefer_relevance,
        upsample_map as upsample_map,
        overlay as overlay,
        model_view as model_view,
        perturbation_curve as perturbation_curve,
        random_perturbation_curves as random_perturbation_curves,
        perturbation_auc as perturbation_auc,
        compare_perturbation as compare_perturbation,
        PerturbationCurve as PerturbationCurve,
    )
    from vit_lens.probing import (
        ridge_fit as ridge_fit,
        fit_ridge_probe as fit_ridge_probe,
        RidgeProbe as RidgeProbe,
        linear_probe_sweep as linear_probe_sweep,
        probe_importance as probe_importance,
    )
    from vit_lens.data import (
        ImageSet as ImageSet,
        load_image_set as load_image_set,
        augmented_views as augmented_views,
    )
    from vit_lens.class_space import (
        project as project,
        logit_lens as logit_lens,
        identifiability as identifiability,
        identify as identify,
        IdentifiabilityResult as IdentifiabilityResult,
        random_twin as random_twin,
    )
    from vit_lens.attribution import (
        dla as dla,
        memories as memories,
    )
    from vit_lens.patching import (
        PatchingResult as PatchingResult,
        run_patched as run_patched,
        patching_hooks as patching_hooks,
        patch_positions_sweep as patch_positions_sweep,
        patch_heads_sweep as patch_heads_sweep,
        patch_block_every as patch_block_every,
        patch_components_sweep as patch_components_sweep,
        logit_metric as logit_metric,
        logit_diff_metric as logit_diff_metric,
        prob_metric as prob_metric,
        identifiability_metric as identifiability_metric,
    )
    from vit_lens.ablation import (
        attention_knockout as attention_knockout,
        knockout_hooks as knockout_hooks,
        knockout_edges as knockout_edges,
        context_ablation as context_ablation,
        context_comparison as context_comparison,
        grid_mask_from_box as grid_mask_from_box,
        grid_mask_from_segmentation as grid_mask_from_segmentation,
    )
    from vit_lens.clip import (
        set_text_classes as set_text_classes,
        text_class_embeddings as text_class_embeddings,
    )
    from vit_lens.edges import (
        edge_graph as edge_graph,
        edge_attribution as edge_attribution,
        patch_edges as patch_edges,
        circuit_faithfulness as circuit_faithfulness,
        faithfulness_curve as faithfulness_curve,
        EdgeResult as EdgeResult,
    )

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vit_lens' has no attribute {name!r}")


def __dir__():
    return __all__
