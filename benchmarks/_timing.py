"""The one timing helper of the benchmark scripts: interleaved repetitions, median, min/max, and
the paired ratio against a reference measured in the same run.

Every benchmark compares variants against a reference (timm's forward, a plain HookedViT forward,
a naive loop) on a machine shared with other processes. Load from those processes drifts over
seconds, so the variants are timed in turns -- repetition ``r`` runs every variant once, in an
order rotated by ``r`` so that no variant always runs first -- and two ratios are reported:

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
        rotate: repetition ``r`` starts at variant ``r % n`` (no variant always runs first);
            ``False`` keeps the given order in every repetition.
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
        k = r % len(names) if rotate and names else 0
        for name in names[k:] + names[:k]:
            out, _ = t.timed(name, variants[name], device)
            del out
    return t
