"""Backward-compatible names: timm's conversion lives in :mod:`vit_lens.loading.sources.timm`."""

from vit_lens.loading.sources.timm import (  # noqa: F401
    CHECKPOINT_ENV,
    UNKNOWN_TAG,
    UNSUPPORTED_CLASS_FEATURES,
    UNSUPPORTED_MODULE_FEATURES,
    VIT_MODULES,
    UnsupportedModelError,
    check_architecture_fast,
    check_supported_architecture,
    config_from_timm,
    convert_timm_model,
    create_timm_model,
    load_pretrained,
    local_checkpoint,
    resolve_model_name,
    state_dict_from_timm,
)
