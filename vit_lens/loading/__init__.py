"""Loading models into HookedViT: one module per source, the registry of supported families, and
weight processing.

Layout::

    sources/__init__.py   the source interface: Converted (config + HookedViT state dict + class
                          names + data config) and build_model (Converted -> HookedViT, strict)
    sources/timm.py       timm: names, architecture checks, conversion, strict checkpoint loading
    checkpoints.py        reading weights files; accounting for every tensor (CheckpointError ...)
    registry.py           the supported families (each with a parity test)
    processing.py         weight processing (fold_ln, ...)
    saving.py             HookedViT.save / HookedViT.load
    timm_vit.py           the old import path of sources/timm.py (kept for compatibility)
"""

from vit_lens.loading.processing import (
    PROCESSING_OPTIONS,
    ProcessingError,
    applied_processing,
    process_state_dict,
    process_weights,
)
from vit_lens.loading.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWarning,
    read_checkpoint,
)
from vit_lens.loading.sources import SOURCES, Converted, build_model
from vit_lens.loading.sources.timm import (
    CHECKPOINT_ENV,
    UNKNOWN_TAG,
    UnsupportedModelError,
    config_from_timm,
    convert_timm_model,
    create_timm_model,
    load_pretrained,
    resolve_model_name,
    state_dict_from_timm,
)

__all__ = [
    "CHECKPOINT_ENV",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "Converted",
    "SOURCES",
    "UNKNOWN_TAG",
    "build_model",
    "read_checkpoint",
    "FAMILIES",
    "ModelFamily",
    "PROCESSING_OPTIONS",
    "ProcessingError",
    "UnsupportedModelError",
    "applied_processing",
    "config_from_timm",
    "convert_timm_model",
    "create_timm_model",
    "family_of",
    "load_pretrained",
    "process_state_dict",
    "process_weights",
    "resolve_model_name",
    "state_dict_from_timm",
    "supported_models",
]

_REGISTRY_NAMES = ("FAMILIES", "ModelFamily", "family_of", "supported_models")


def __getattr__(name):
    # the registry is imported on first use, so `python -m vit_lens.loading.registry` runs cleanly
    if name in _REGISTRY_NAMES:
        from vit_lens.loading import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'vit_lens.loading' has no attribute {name!r}")
