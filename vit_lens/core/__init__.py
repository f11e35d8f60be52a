"""The vocabulary every analysis shares, one home per concept.

* :mod:`vit_lens.core.errors` -- the exceptions raised on bad input.
* :mod:`vit_lens.core.positions` -- positions (``"cls"``, ``"prefix"``, ``"patches"``/``"image"``,
  ``"all"``, indices, boolean masks, pixel :class:`Box`\\ es) and the patch grid.
* :mod:`vit_lens.core.targets` -- target classes (indices, names, synsets, ``"pred"``, one per image).
* :mod:`vit_lens.core.selection` -- layers, heads, hook short names and cache access.
* :mod:`vit_lens.core.batching` -- images to batches, chunks, progress bars.

Analysis modules import from here (and from the model and its components), never each other's
private helpers.
"""

from vit_lens.core.batching import as_batch, chunks, progress_bar
from vit_lens.core.errors import (
    AmbiguousNameError,
    InputError,
    InputTypeError,
    NotDefinedError,
    MissingFileError,
    OutOfRangeError,
    UnknownNameError,
    VitLensError,
)
from vit_lens.core.positions import Box, Positions, TokenLayout, box_grid_mask, grid_of, position_labels, position_mask
from vit_lens.core.selection import (
    BLOCK_HOOKS,
    Layers,
    cache_get,
    cache_has,
    head_mask,
    hook_layer,
    hook_name,
    hook_names,
    int_list,
    resolve_layers,
)
from vit_lens.core.targets import PRED, Target, class_index, resolve_targets, suggest_classes

__all__ = [
    "AmbiguousNameError",
    "BLOCK_HOOKS",
    "Box",
    "InputError",
    "InputTypeError",
    "NotDefinedError",
    "Layers",
    "MissingFileError",
    "OutOfRangeError",
    "PRED",
    "Positions",
    "Target",
    "TokenLayout",
    "UnknownNameError",
    "VitLensError",
    "as_batch",
    "box_grid_mask",
    "cache_get",
    "cache_has",
    "chunks",
    "class_index",
    "grid_of",
    "head_mask",
    "hook_layer",
    "hook_name",
    "hook_names",
    "int_list",
    "position_labels",
    "position_mask",
    "progress_bar",
    "resolve_layers",
    "resolve_targets",
    "suggest_classes",
]
