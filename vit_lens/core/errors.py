"""The exceptions vit_lens raises for bad input.

Every error a user can cause (a wrong shape, an unknown name, an out-of-range index, a checkpoint
of another model) is one of these, so ``except vit_lens.VitLensError`` catches them all, while each
is also the built-in exception its kind has always been (``ValueError``, ``IndexError``,
``KeyError``, ``TypeError``), so existing ``except ValueError`` code keeps working. The message
always says what to do instead.
"""

from __future__ import annotations


class VitLensError(Exception):
    """Base class of every error vit_lens raises on purpose."""

    def __str__(self) -> str:  # KeyError would quote the message; show it as written
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InputError(VitLensError, ValueError):
    """A value the function cannot work with: wrong shape, size, dtype, non-finite pixels, ..."""


class InputTypeError(VitLensError, TypeError, ValueError):
    """An argument of the wrong type (also a ``ValueError``, so one ``except`` catches bad input)."""


class OutOfRangeError(VitLensError, IndexError):
    """An index outside the model: a layer, head, position or class that does not exist."""


class UnknownNameError(VitLensError, KeyError):
    """A name that does not exist: a hook, a class, a cache entry, a model."""


class NotDefinedError(VitLensError, NotImplementedError):
    """A quantity that is not defined for this model (e.g. per-head attribution of post-norm blocks);
    the message says which function or option to use instead."""


class AmbiguousNameError(UnknownNameError):
    """A name that matches more than one thing (e.g. ``"crane"``: the bird and the machine)."""


class MissingFileError(VitLensError, FileNotFoundError):
    """No file where one was asked for (an image, a saved model); also a ``FileNotFoundError``."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


__all__ = [
    "AmbiguousNameError",
    "InputError",
    "InputTypeError",
    "NotDefinedError",
    "MissingFileError",
    "OutOfRangeError",
    "UnknownNameError",
    "VitLensError",
]
