"""The one timing helper of the benchmark scripts: interleaved repetitions, median, min/max, and
the paired ratio against a reference measured in the same run.

Every benchmark compares variants against a reference (timm's forward, a plain HookedViT forward,
a naive loop) on a machine shared with other processes. Load from those processes drifts over
seconds, so the variants are timed in turns -- repetition ``r`` runs every variant once, in an
order that changes with ``r`` -- and two ratios are reported (below).

The order within a repetition is balanced (:func:`round_order`, a Williams design): over ``n``
repetitions (``2n`` for an odd number of variants) every variant runs first equally often and
right after every other variant equally often, so a variant that leaves the machine in a state (a
heap trimmed after a dropped cache, cold caches) slows all of the others alike instead of always
the same one. A plain rotation keeps the cyclic order, so each variant would always follow the
same neighbour.

* ``ratio(name, ref)``: median time of ``name`` / median time of ``ref``;
* ``paired(name, ref)``: median over repetitions of (``name``'s time / ``ref``'s time in the same
  repetition), robust to load that changes between repetitions.

    from _timing import interleaved
    t = interleaved({"timm forward": lambda: ref(x), "hooked forward": lambda: model(x)}, reps=7, warmup=2)
    t.median("hooked forward"), t.ratio("hooked forward", "timm forward"), t.paired("hooked forward", "timm forward")

Scripts that time the steps of one pipeline (each step needing the previous one's output) record
them with :meth:`Timings.add` / :meth:`Timings.timed` and use the same statistics.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

Clock = Callable[[], float]


def sync(device: Any = None) -> None:
    """Wait for queued work on a CUDA ``device`` (no-op on the CPU), so a timer sees all of it."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timings:
    """Seconds per repetition of named variants, with the statistics the benchmarks report.

    ``times[name]`` is the list of per-repetition seconds, in repetition order (so that the
    ``i``-th entries of two variants come from the same repetition, for :meth:`paired`).
    """

    def __init__(self, names: Iterable[str] = (), clock: Clock = time.perf_counter):
        self.times: Dict[str, List[float]] = {n: [] for n in names}
        self.clock = clock

    # -------------------------------------------------------------------- recording
    def add(self, name: str, seconds: float) -> None:
        """Record one repetition of ``name``."""
        self.times.setdefault(name, []).append(float(seconds))

    def timed(self, name: Optional[str], fn: Callable[[], Any], device: Any = None) -> Tuple[Any, float]:
        """Run ``fn()`` once, record its time under ``name`` (unless None); returns (result, seconds)."""
        sync(device)
        t = self.clock()
        out = fn()
        sync(device)
        dt = self.clock() - t
        if name is not None:
            self.add(name, dt)
        return out, dt

    # -------------------------------------------------------------------- statistics
    def __getitem__(self, name: str) -> List[float]:
        return self.times[name]

    def __iter__(self):
        return iter(self.times)

    def items(self):
        return self.times.items()

    def _of(self, name: str) -> List[float]:
        ts = self.times.get(name)
        if not ts:
            raise KeyError(f"no timings recorded for {name!r}; recorded: {', '.join(self.times) or 'none'}")
        return ts

    def median(self, name: str) -> float:
        return statistics.median(self._of(name))

    def mean(self, name: str) -> float:
        return statistics.mean(self._of(name))

    def min(self, name: str) -> float:
        return min(self._of(name))

    def max(self, name: str) -> float:
        return max(self._of(name))

    def total(self, name: str) -> float:
        return sum(self._of(name))

    def count(self, name: str) -> int:
        return len(self.times.get(name, ()))

    def ratio(self, name: str, ref: str) -> float:
        """median(name) / median(ref)."""
        return self.median(name) / self.median(ref)

    def paired(self, name: str, ref: str) -> float:
        """Median over repetitions of name / ref timed in the same repetition."""
        a, b = self._of(name), self._of(ref)
        if len(a) != len(b):
            raise ValueError(f"paired ratio needs the same repetitions: {name!r} has {len(a)}, {ref!r} {len(b)}")
        return statistics.median(x / y for x, y in zip(a, b))

    def summary(self, ref: str) -> List[Dict[str, Any]]:
        """One dict per variant: name, median / min / max seconds, ratio and paired ratio vs ``ref``."""
        return [
            dict(name=n, median=self.median(n), min=self.min(n), max=self.max(n), ratio=self.ratio(n, ref),
                 paired=self.paired(n, ref) if self.count(n) == self.count(ref) else float("nan"), reps=self.count(n))
            for n in self.times if self.times[n]
        ]


def round_order(n: int, r: int, scheme: str = "balanced") -> List[int]:
    """The order of ``n`` variants (indices) in repetition ``r``.

    ``"balanced"``: a Williams design. Row 0 is ``0, 1, n-1, 2, n-2, ...``; row ``r`` adds ``r``
    (mod ``n``) to it; for odd ``n`` rows ``n..2n-1`` are rows ``0..n-1`` reversed. Over one period
    (``n`` rows, ``2n`` for odd ``n``) each variant is first equally often and each ordered pair
    ``(a, b)`` is adjacent (``a`` right before ``b``) equally often: once per period for even ``n``,
    twice for odd. ``"rotate"``: row ``r`` starts at variant ``r % n`` in the given cyclic order.
    ``"fixed"``: the given order every time.
    """
    if n < 0 or r < 0:
        raise ValueError(f"n and r must be >= 0, got n={n}, r={r}")
    if n == 0:
        return []
    if scheme == "fixed":
        return list(range(n))
    if scheme == "rotate":
        k = r % n
        return list(range(k, n)) + list(range(k))
    if scheme != "balanced":
        raise ValueError(f"unknown order scheme {scheme!r}; use 'balanced', 'rotate' or 'fixed'")
    base = [0]
    lo, hi = 1, n - 1
    while len(base) < n:
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    period = n if n % 2 == 0 else 2 * n
    k = r % period
    row = [(x + k % n) % n for x in base]
    return row[::-1] if k >= n else row


def interleaved(
    variants: Mapping[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    *,
    rotate: bool = True,
    device: Any = None,
    clock: Clock = time.perf_counter,
) -> Timings:
    """Time every variant ``reps`` times, in turns.

    Args:
        variants: name -> a zero-argument callable (its result is dropped before the next call).
        reps: timed repetitions of each variant.
        warmup: untimed rounds of every variant first.
        rotate: vary the order between repetitions, in the balanced order of :func:`round_order`
            (every variant first, and right after every other, equally often); ``False`` keeps the
            given order in every repetition.
        device: a CUDA device to synchronise around each call (``None``/CPU: no sync).
        clock: the timer (``time.perf_counter``; a fake one in tests).

    Returns:
        :class:`Timings` with ``reps`` entries per variant, in repetition order.
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    names = list(variants)
    t = Timings(names, clock=clock)
    for _ in range(max(0, warmup)):
        for fn in variants.values():
            fn()
    for r in range(reps):
        for i in round_order(len(names), r, "balanced" if rotate else "fixed"):
            name = names[i]
            out, _ = t.timed(name, variants[name], device)
            del out
    return t
