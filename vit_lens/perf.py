"""Process-wide allocator settings that make repeated caching as cheap as a forward (issue 17).

Why: a full :meth:`~vit_lens.HookedViT.run_with_cache` allocates hundreds of MiB of fresh tensors
(1.35 GiB for ViT-B/16 on a batch of 8). With glibc's default settings the memory of a dropped cache
goes back to the operating system (large blocks are ``mmap``-ed and unmapped on free; the top of the
heap is trimmed), so the next call page-faults every page in again, and the kernel zeroes each one:
263k faults per ViT-Ti/16 batch-32 call, about half a forward's time. Keeping freed memory inside the
process lets the next cache reuse those pages. Results are bit-identical either way: only where the
memory comes from changes.

    import vit_lens.perf
    vit_lens.perf.keep_freed_memory()     # once, before a loop of run_with_cache calls
    ...
    vit_lens.perf.release_freed_memory()  # optional: hand the kept memory back to the OS

The same settings can be given before Python starts, for any script:
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_MMAP_MAX_=0 python script.py``.

Trade-off: the setting is process-wide and the process keeps the memory it freed (its resident size
stays near its peak, e.g. the size of the largest cache it held) until :func:`release_freed_memory`
or exit. That suits a dataset run or a benchmark loop (the next batch reuses the memory); in a long-lived notebook that caches once and moves on, leave it off, or
release after use. The ``vit-lens`` command turns it on (``VIT_LENS_KEEP_FREED_MEMORY=0`` turns
it off there). Blocks larger than glibc's largest ``mmap`` threshold (32 MiB on 64-bit: e.g. the
attention scores of ViT-B/16 from a batch of 24 up) are kept too: ``keep_freed_memory`` also sets
``M_MMAP_MAX`` to 0, so the main thread's allocations of any size come from the heap
(``keep_large_blocks=False`` leaves them to ``mmap``, returned on free). Allocations of other
threads larger than their arena (64 MiB) still get their own ``mmap``: glibc falls back to it.
Measured (glibc 2.36, a 64 MiB tensor allocated and freed in a loop): the first 4-5 allocations grow
the heap (a freed block is a few bytes short of the next aligned request until freed neighbours
merge), after which none faults; the process then holds about 4 such blocks beyond its peak.

Only glibc (Linux) has these knobs: elsewhere (macOS, Windows, musl) the functions do nothing and
say so in the returned :class:`AllocatorStatus` (``applied=False`` and a ``note``).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Optional

__all__ = ["AllocatorStatus", "glibc_version", "keep_freed_memory", "release_freed_memory", "freed_memory_kept"]

# glibc's <malloc.h> parameter numbers for mallopt()
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc's default M_MMAP_MAX (DEFAULT_MMAP_MAX: at most this many blocks mmap-ed at once)
_DEFAULT_MMAP_MAX = 65536
#: glibc's largest accepted mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long))
MMAP_THRESHOLD_MAX = 32 * 2**20
#: glibc's defaults (before its dynamic adjustment): 128 KiB each
_DEFAULT_THRESHOLD = 128 * 2**10

_state = {"kept": False}


@dataclass(frozen=True)
class AllocatorStatus:
    """What :func:`keep_freed_memory` did.

    Attributes:
        applied: the settings are in force (glibc accepted them).
        allocator: ``"glibc 2.36"`` or a description of why there is nothing to set.
        mmap_threshold / trim_threshold: the values set, in bytes (None when not applied; a trim
            threshold of None with ``applied=True``: never trim).
        note: a sentence for a log or a benchmark header.
        large_blocks_kept: blocks above the mmap threshold come from the heap too (``M_MMAP_MAX``
            0), so they are kept as well.
    """

    applied: bool
    allocator: str
    mmap_threshold: Optional[int]
    trim_threshold: Optional[int]
    note: str
    large_blocks_kept: bool = False


def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
    except (OSError, AttributeError):  # not glibc (musl has no gnu_get_libc_version)
        return None
    return libc


def glibc_version() -> Optional[str]:
    """The running glibc's version (e.g. ``"2.36"``), or None when the C library is not glibc."""
    libc = _libc()
    return None if libc is None else libc.gnu_get_libc_version().decode()


def _env_keeps() -> bool:
    """True when the process was started with glibc's environment variables keeping freed memory."""
    try:
        mmap = int(os.environ.get("MALLOC_MMAP_THRESHOLD_", "0"))
        trim = int(os.environ.get("MALLOC_TRIM_THRESHOLD_", "0"))
    except ValueError:
        return False
    return mmap >= 2**20 and trim >= 2**30


def freed_memory_kept() -> bool:
    """Whether freed memory stays in the process: :func:`keep_freed_memory` was applied (and not
    undone), or the process started with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set
    as in this module's docstring (glibc only)."""
    if glibc_version() is None:
        return False
    return _state["kept"] or _env_keeps()


def keep_freed_memory(
    enable: bool = True,
    *,
    mmap_threshold: int = MMAP_THRESHOLD_MAX,
    trim_threshold: Optional[int] = None,
    keep_large_blocks: bool = True,
) -> AllocatorStatus:
    """Keep freed memory in the process (glibc ``mallopt``), so repeated caches reuse it.

    Sets ``M_MMAP_THRESHOLD`` (blocks up to this size come from the heap rather than their own
    ``mmap``, which is unmapped on free) and ``M_TRIM_THRESHOLD`` (the free top of the heap is handed
    back only above this size) and, with ``keep_large_blocks``, ``M_MMAP_MAX`` to 0 (larger blocks
    come from the heap too instead of their own ``mmap``). Process-wide, for every thread; see the
    module docstring for the trade-off (memory held by the process).

    Args:
        enable: ``False`` sets glibc's default values back (128 KiB each). glibc's own dynamic
            adjustment of the mmap threshold stays off once a value was set, so this is close to, not
            exactly, a fresh process; freed memory kept so far stays until :func:`release_freed_memory`.
        mmap_threshold: bytes, at most :data:`MMAP_THRESHOLD_MAX` (32 MiB: glibc refuses more).
        trim_threshold: bytes of free heap top kept before glibc trims it; None (default): never trim
            (glibc's ``-1``; :func:`release_freed_memory` still hands memory back). At most 2 GiB - 1
            (mallopt takes an int).
        keep_large_blocks: also keep blocks larger than ``mmap_threshold`` (``M_MMAP_MAX`` 0: no
            block gets its own ``mmap``); False leaves them to ``mmap`` (returned to the OS on free).

    Returns:
        :class:`AllocatorStatus`; ``applied=False`` (with a note) where the C library is not glibc.

    Raises:
        InputError: a threshold out of range.
    """
    from vit_lens.core.errors import InputError, InputTypeError

    for what, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if v is None and what == "trim_threshold":
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputTypeError(f"{what} must be an int number of bytes, got {v!r}")
    if not isinstance(keep_large_blocks, bool):
        raise InputTypeError(f"keep_large_blocks must be True or False, got {keep_large_blocks!r}")
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise InputError(
            f"mmap_threshold must be in 1..{MMAP_THRESHOLD_MAX} bytes (glibc refuses larger values), got {mmap_threshold}"
        )
    if trim_threshold is not None and not 0 < trim_threshold < 2**31:
        raise InputError(
            f"trim_threshold must be in 1..{2**31 - 1} bytes (mallopt takes an int), or None to never trim; "
            f"got {trim_threshold}"
        )
    libc = _libc()
    if libc is None:
        return AllocatorStatus(False, f"not glibc ({sys.platform})", None, None,
                               "freed memory: the C library is not glibc; nothing to set (caches may page-fault "
                               "their memory in on every call)")
    version = libc.gnu_get_libc_version().decode()
    mmap_v = mmap_threshold if enable else _DEFAULT_THRESHOLD
    # -1: never trim (mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely")
    trim_c = (-1 if trim_threshold is None else trim_threshold) if enable else _DEFAULT_THRESHOLD
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    large = bool(enable and keep_large_blocks)
    max_c = 0 if large else _DEFAULT_MMAP_MAX
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, mmap_v) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_c) == 1
          and libc.mallopt(_M_MMAP_MAX, max_c) == 1)
    if not ok:
        return AllocatorStatus(False, f"glibc {version}", None, None,
                               f"freed memory: glibc {version} refused mallopt({mmap_v}, {trim_c}, {max_c}); "
                               "the settings may be partly applied: call keep_freed_memory(False)")
    _state["kept"] = bool(enable)
    if enable:
        trim_s = "never trim" if trim_c == -1 else f"trim threshold {trim_c / 2**20:.0f} MiB"
        big = ", larger blocks from the heap too" if large else ""
        note = (f"freed memory kept in the process (glibc {version} mallopt: mmap threshold "
                f"{mmap_v / 2**20:.0f} MiB, {trim_s}{big})")
    else:
        note = f"glibc {version} thresholds set back to their defaults (128 KiB; dynamic adjustment off)"
    return AllocatorStatus(True, f"glibc {version}", mmap_v, None if trim_c == -1 else trim_c, note, large)


def release_freed_memory() -> bool:
    """Hand the freed memory the process keeps back to the operating system (glibc ``malloc_trim(0)``).

    Returns:
        True when glibc released some memory; False when there was none to release or the C library
        is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc.malloc_trim(0) == 1
