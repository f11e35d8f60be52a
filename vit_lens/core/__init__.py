"""The vocabulary every analysis shares (errors first; positions, targets, layers, hook names,
the patch grid and cache access live in the modules beside this one)."""

from vit_lens.core.errors import (
    AmbiguousNameError,
    InputError,
    InputTypeError,
    OutOfRangeError,
    UnknownNameError,
    VitLensError,
)

__all__ = [
    "AmbiguousNameError",
    "InputError",
    "InputTypeError",
    "OutOfRangeError",
    "UnknownNameError",
    "VitLensError",
]
