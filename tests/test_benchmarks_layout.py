"""Layout of benchmarks/ and experiments/ (issue 11 item 5): the timing scripts share one timing
helper (benchmarks/_timing.py), whose statistics are checked against a fake clock; the paper
reproductions live in experiments/ and still start; every script path the README names exists."""

from __future__ import annotations

import contextlib
import io
import os
import re
import statistics

import pytest
import torch

from conftest import REPO, load_script

BENCH = REPO / "benchmarks"
TIMING_SCRIPTS = ("bench_forward.py", "bench_patching.py", "bench_knockout.py", "bench_identifiability.py")


def _load(path, name=None):
    return load_script(path, name or f"_layout_{path.stem}")


@pytest.fixture(scope="module")
def timing():
    return _load(BENCH / "_timing.py", "_timing_under_test")


class FakeClock:
    """Each call to a variant advances the clock by that variant's next scripted duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, {k: list(v) for k, v in durations.items()}, []

    def __call__(self):
        return self.now

    def variant(self, name):
        def run():
            self.calls.append(name)
            self.now += self.durations[name].pop(0)

        return run


def test_interleaved_rotates_skips_warmup_and_computes_the_statistics(timing):
    # warm-up durations first (one per variant), then three repetitions
    d = {"ref": [9.0, 1.0, 2.0, 4.0], "a": [9.0, 2.0, 2.0, 2.0], "b": [9.0, 3.0, 1.0, 8.0]}
    clock = FakeClock(d)
    t = timing.interleaved({k: clock.variant(k) for k in d}, reps=3, warmup=1, clock=clock)
    # warm-up in the given order, then repetition r starts at variant r
    assert clock.calls == ["ref", "a", "b", "ref", "a", "b", "a", "b", "ref", "b", "ref", "a"]
    reps = {k: v[1:] for k, v in d.items()}  # the warm-up is not recorded
    assert {k: t[k] for k in t} == reps
    for k, ts in reps.items():
        assert t.median(k) == statistics.median(ts) and t.min(k) == min(ts) and t.max(k) == max(ts)
        assert t.ratio(k, "ref") == pytest.approx(statistics.median(ts) / statistics.median(reps["ref"]))
        assert t.paired(k, "ref") == pytest.approx(statistics.median([x / y for x, y in zip(ts, reps["ref"])]))
    # the paired ratio differs from the ratio of medians when load drifts between repetitions
    assert t.paired("b", "ref") == pytest.approx(2.0) and t.ratio("b", "ref") == pytest.approx(1.5)
    rows = {r["name"]: r for r in t.summary("ref")}
    assert rows["a"]["median"] == 2.0 and rows["a"]["reps"] == 3 and rows["ref"]["ratio"] == 1.0
    # without rotation every repetition keeps the order
    clock = FakeClock({"x": [1, 1], "y": [1, 1]})
    timing.interleaved({k: clock.variant(k) for k in ("x", "y")}, reps=2, warmup=0, rotate=False, clock=clock)
    assert clock.calls == ["x", "y", "x", "y"]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8])
def test_balanced_order_puts_every_variant_after_every_other_equally_often(timing, n):
    """The default order (a Williams design): counted over one period, each variant runs first
    equally often and each ordered pair is adjacent equally often -- unlike a rotation, where a
    variant always follows the same neighbour."""
    period = n if n % 2 == 0 else 2 * n
    rows = [timing.round_order(n, r) for r in range(period)]
    assert all(sorted(row) == list(range(n)) for row in rows)
    assert [timing.round_order(n, r + period) for r in range(period)] == rows  # periodic
    first = [row[0] for row in rows]
    assert all(first.count(v) == period // n for v in range(n))
    pairs = {}
    for row in rows:
        for a, b in zip(row, row[1:]):
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
    if n > 1:
        assert set(pairs) == {(a, b) for a in range(n) for b in range(n) if a != b}
        assert set(pairs.values()) == {1 if n % 2 == 0 else 2}
    if n > 2:  # a rotation always puts the same neighbour before each variant
        rot = [timing.round_order(n, r, "rotate") for r in range(n)]
        assert {(row[i - 1], row[i]) for row in rot for i in range(1, n)} == {(v, (v + 1) % n) for v in range(n)}
    with pytest.raises(ValueError, match="order scheme"):
        timing.round_order(3, 0, "random")


def test_interleaved_uses_the_balanced_order(timing):
    d = {k: [1.0] * 5 for k in "wxyz"}
    clock = FakeClock(d)
    timing.interleaved({k: clock.variant(k) for k in d}, reps=4, warmup=1, clock=clock)
    rounds = [clock.calls[i:i + 4] for i in range(4, 20, 4)]
    assert rounds == [["w", "x", "z", "y"], ["x", "y", "w", "z"], ["y", "z", "x", "w"], ["z", "w", "y", "x"]]


def test_timings_records_pipeline_steps_and_refuses_bad_input(timing):
    clock = FakeClock({"s": [0.5, 0.25]})
    t = timing.Timings(["s"], clock=clock)
    out, dt = t.timed("s", clock.variant("s"))
    assert dt == 0.5 and t["s"] == [0.5]
    _, dt = t.timed(None, clock.variant("s"))  # untimed (a warm-up step)
    assert dt == 0.25 and t["s"] == [0.5]
    t.add("s", 1.5)
    assert t.total("s") == 2.0 and t.mean("s") == 1.0 and t.count("s") == 2
    with pytest.raises(KeyError, match="no timings recorded for 'nope'"):
        t.median("nope")
    t.add("other", 1.0)
    with pytest.raises(ValueError, match="same repetitions"):
        t.paired("s", "other")
    with pytest.raises(ValueError, match="reps"):
        timing.interleaved({"x": lambda: None}, reps=0)


@pytest.mark.parametrize("name", TIMING_SCRIPTS)
def test_timing_scripts_use_the_one_helper(name):
    src = (BENCH / name).read_text()
    assert re.search(r"^from _timing import ", src, re.M), f"{name} does not use benchmarks/_timing.py"
    # the copies of the timing logic are gone: no own clock reads or medians
    assert "perf_counter" not in src and "statistics." not in src and "cuda.synchronize" not in src


def _main_output(name, argv):
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            code = _load(BENCH / name).main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, buf.getvalue()


def test_bench_forward_rows_and_columns():
    """Other scripts read the row names; the column layout stays."""
    code, out = _main_output("bench_forward.py", ["--model", "test_vit", "--batch", "1", "--reps", "2", "--warmup", "0",
                                                      "--no-peers"])  # the peer columns: bench_forward itself
    assert code in (0, 1)  # 1 = a target missed (tiny models are overhead-bound)
    lines = out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("variant"))
    assert lines[head].split() == ["variant", "median", "ms", "min", "ms", "ratio", "paired", "target"]
    rows = [l for l in lines[head + 1:head + 4]]
    assert [r[:16].strip() for r in rows] == ["timm forward", "hooked forward", "run_with_cache"]
    assert rows[0].split()[-2:] == ["1.00x", "1.00x"]  # timm against itself
    assert "max |logit diff| vs timm 0.00e+00" in out
    # the kept-memory rows come from their own process (the allocator setting is process-wide), on glibc
    import vit_lens.perf

    if vit_lens.perf.glibc_version() is not None:
        table = lines[head + 1:next(i for i, l in enumerate(lines) if l.startswith("ratio ="))]
        kept = [l[:16].strip() for l in table if l.startswith("kept: ")]
        assert kept == ["kept: timm", "kept: cache", "kept: resid"], out
        assert not vit_lens.perf.freed_memory_kept()  # this process's allocator is left alone


def test_bench_knockout_and_identifiability_start():
    code, out = _main_output("bench_knockout.py", ["--model", "test_vit", "--batch", "1", "--reps", "1",
                                                  "--warmup", "0", "--threads", "1"])
    assert code == 0 and "| HookedViT forward |" in out and "| 1.00x |" in out and "target: knockout" in out
    code, out = _main_output("bench_identifiability.py", ["--model", "test_vit", "--batch", "2", "--reps", "1",
                                                         "--warmup", "0"])
    lines = out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("variant"))
    rows = lines[head + 1:head + 5]
    assert [r[:18].strip() for r in rows] == ["timm forward", "cached forward", "identifiability", "total"]
    assert rows[0].split()[-1] == "1.00" and "identifiability (cached forward + analysis) / timm forward" in out


def test_experiments_moved_and_start():
    for name in ("knockout_paper.py", "perturbation_eval.py"):
        assert (REPO / "experiments" / name).is_file() and not (BENCH / name).exists()
        mod = _load(REPO / "experiments" / name)
        with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
            mod.main(["--help"])
        assert e.value.code == 0
        # their default data paths still point at ../shared beside the repository
        if "VIT_LENS_SHARED" not in os.environ:
            assert mod.SHARED.resolve() == (REPO.parent / "shared").resolve()
    assert (BENCH / "patching_sweep.py").is_file()  # the sweep driver stays in benchmarks/


def test_readme_names_only_existing_scripts():
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"((?:benchmarks|experiments|docs)/[\w./-]+\.py)", readme))
    assert {"benchmarks/patching_sweep.py", "experiments/knockout_paper.py", "experiments/perturbation_eval.py"} <= named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"README names scripts that do not exist: {missing}"
