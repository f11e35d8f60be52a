"""The benchmark scripts' shared flags and set-up (benchmarks/_common.py, issue 17 item 4): every script
keeps its flags, every flag the GPU suite passes exists, a CUDA device that is not there is refused with
a message that says what to do, and bench_patching / bench_attribution run in bfloat16 with the naive
loop in bfloat16 as their reference."""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest
import torch

from conftest import REPO, load_script

BENCH = REPO / "benchmarks"

#: the flags of each script (before the helper, plus --dtype for the two patching benchmarks)
FLAGS = {
    "bench_patching.py": {"--model", "--naive-runs", "--memory-mb", "--threads", "--seed", "--device", "--layers",
                          "--dtype"},
    "bench_attribution.py": {"--models", "--reps", "--naive-runs", "--exact-layers", "--threads", "--device", "--dtype"},
    "bench_knockout.py": {"--model", "--batch", "--reps", "--warmup", "--threads"},
    "bench_edges.py": {"--model", "--pairs", "--sample", "--ig", "--threads", "--device", "--ks", "--save"},
    "bench_identifiability.py": {"--model", "--batch", "--reps", "--warmup", "--threads", "--mode"},
    "bench_memory.py": {"--model", "--batch", "--device", "--variants"},
    "bench_run.py": {"--model", "--batch", "--images", "--workers", "--reps", "--warmup", "--threads", "--preprocess",
                     "--device", "--dtype"},
    "patching_sweep.py": {"--out", "--model", "--checkpoint", "--hook", "--corruption", "--layers", "--preprocess",
                          "--memory-mb", "--chunk-size", "--limit", "--threads", "--traceback"},
    "categorical_updates_real.py": {"--models"},
}


@pytest.fixture(scope="module")
def common():
    return load_script(BENCH / "_common.py", "_common_under_test")


def _help(name: str) -> str:
    buf = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(buf):
        load_script(BENCH / name, f"_help_{name[:-3]}").main(["--help"])
    assert e.value.code == 0
    return buf.getvalue()


def _flags(help_text: str) -> set:
    return set(re.findall(r"^\s+(--[a-z][\w-]*)", help_text, re.M)) - {"--help"}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_script_keeps_its_flags(name):
    assert _flags(_help(name)) == FLAGS[name]


def test_every_flag_the_gpu_suite_passes_exists():
    suite = load_script(BENCH / "gpu_suite.py", "_gpu_suite_flags")
    helps = {}
    for quick in (False, True):
        for short, title, cmd in suite.steps("python", "cuda", quick):
            if short == "tests":
                continue
            script = next(c for c in cmd if c.endswith(".py")).rsplit("/", 1)[-1]
            if script not in helps:
                helps[script] = _flags(_help(script))
            passed = {c for c in cmd if c.startswith("--")}
            assert passed <= helps[script], (short, passed - helps[script])
            assert suite.DTYPES[short] in title or short in ("tests", "memory"), (short, title)
            if "--dtype" in cmd:  # the table's dtype column says what the step runs in
                assert cmd[cmd.index("--dtype") + 1] == suite.DTYPES[short], short
    assert set(suite.LIMITS) == set(suite.DTYPES) and sum(suite.LIMITS.values()) == suite.BUDGET_S
    assert {"patching16", "attribution16"} <= set(suite.LIMITS)


def test_flags_are_added_with_each_scripts_defaults(common):
    p = argparse.ArgumentParser()
    common.add_common_args(p, device="cuda", threads=None, seed=3, dtype="bfloat16")
    a = p.parse_args([])
    assert (a.device, a.threads, a.seed, a.dtype) == ("cuda", None, 3, "bfloat16")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        p.parse_args(["--dtype", "float64"])  # not one of the offered precisions
    p = argparse.ArgumentParser()
    common.add_common_args(p, device=False, threads=2)  # False: no such flag
    assert vars(p.parse_args([])) == {"threads": 2}
    with pytest.raises(ValueError, match="not one of"):
        common.add_common_args(argparse.ArgumentParser(), dtype="float64")


def test_setup_sets_threads_and_seed_and_returns_device_and_dtype(common):
    threads = torch.get_num_threads()
    p = argparse.ArgumentParser()
    common.add_common_args(p, device="cpu", threads=2, seed=0, dtype="float32")
    try:
        device, dtype = common.setup(p.parse_args(["--threads", "1", "--seed", "7", "--dtype", "float16"]), p)
        assert torch.get_num_threads() == 1
        drawn = torch.rand(3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(drawn, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert device == torch.device("cpu") and dtype is torch.float16
    # a script without the flags: the CPU in float32, torch's threads untouched
    assert common.setup(argparse.Namespace()) == (torch.device("cpu"), torch.float32)
    assert torch.get_num_threads() == threads


def test_setup_refuses_a_cuda_device_that_is_not_there(common, monkeypatch, capsys):
    from vit_lens.core.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = argparse.ArgumentParser(prog="bench_x.py")
    common.add_common_args(p, device="cpu")
    with pytest.raises(InputError, match=r"sees no CUDA device here; run with --device cpu"):
        common.setup(p.parse_args(["--device", "cuda"]))
    with pytest.raises(SystemExit) as e:  # with the parser: its usage line and exit status 2, no traceback
        common.setup(p.parse_args(["--device", "cuda:0"]), p)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: bench_x.py") and "--device cuda:0" in err and "run with --device cpu" in err
    with pytest.raises(InputError, match="not a device torch knows.*use cpu or cuda"):
        common.setup(p.parse_args(["--device", "gpu"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"only 1 CUDA device here \(cuda:0..cuda:0\)"):
        common.check_device("cuda:1")


def test_the_tolerance_admits_a_rounding_step_and_little_more(common):
    for dtype, bits in ((torch.bfloat16, 7), (torch.float16, 10)):
        for scale in (0.3, 2.17, 14.25):
            tol = common.tolerance(dtype, scale)
            x = torch.tensor(scale).to(dtype)
            step = 2.0 ** (torch.floor(torch.log2(x.float())).item() - bits)  # the dtype's spacing at |x|
            assert float(x) + step - float(x) == pytest.approx(step)
            assert 2 * step <= tol <= 8 * step  # a few rounding steps, not a blanket allowance
            assert tol < 0.05 * scale


def test_photo_pair_follows_the_requested_device_and_dtype(common):
    from conftest import make_timm

    from vit_lens import HookedViT

    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=5))
    clean, corrupted, names = common.photo_pair(m, "cpu", torch.bfloat16)
    assert clean.dtype == corrupted.dtype == torch.bfloat16 and clean.shape == (1, 3, *m.cfg.image_size)
    assert not torch.equal(clean, corrupted)
    if names is not None:  # the sample photos: the model's own preprocessing, then the cast
        path = common.SHARED / "images" / "photos" / names[0]
        assert torch.equal(clean, m.preprocess([str(path)]).to(torch.bfloat16))


def _run(name, argv):
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            code = load_script(BENCH / name, f"_run_{name[:-3]}").main(argv)
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return buf.getvalue()


def _numbers(line: str):
    return [float(x) for x in re.findall(r"\d+\.\d+e[-+]\d+", line)]


def test_bench_patching_in_bfloat16_against_the_naive_loop_in_bfloat16():
    """Rows and columns stay (gpu_suite reads them); the dtype is in the header; the batched sweep in
    bfloat16 agrees with the naive bfloat16 loop within the tolerance; the deviation from float32 is
    printed, and the suite's table cell shows it."""
    out = _run("bench_patching.py", ["--model", "test_vit", "--naive-runs", "3", "--layers", "0",
                                     "--dtype", "bfloat16", "--threads", "1"])
    lines = out.splitlines()
    assert lines[0].endswith("; dtype bfloat16")
    rows = [l.split(" | ")[0].lstrip("| ") for l in lines if l.startswith("| ") and "---" not in l]
    assert rows == ["variant", "naive run_with_hooks loop (extrapolated)", "batched patch_positions_sweep",
                    "batched, full patched layer (no K/V reuse)"]
    target = next(l for l in lines if l.startswith("target >= 4.0x"))
    diff, tol = _numbers(target)[:2]
    assert diff <= tol, target
    dev = next(l for l in lines if l.startswith("deviation from float32"))
    assert 0 < _numbers(dev)[0] < 0.1  # bfloat16 moves the values, by rounding only
    suite = load_script(BENCH / "gpu_suite.py", "_gpu_suite_pick")
    cell = suite.summary("patching16", 0, out)
    assert "deviation from float32" in cell and "target >= 4.0x" in cell and "batched patch_positions_sweep" in cell


def test_bench_attribution_in_bfloat16():
    out = _run("bench_attribution.py", ["--models", "test_vit", "--reps", "1", "--naive-runs", "6",
                                        "--exact-layers", "2", "--dtype", "bfloat16", "--threads", "1"])
    lines = out.splitlines()
    assert "; dtype bfloat16" in out and any(l.startswith("| attribution (method='attribution') |") for l in lines)
    naive = next(l for l in lines if l.startswith("naive runs vs the exact sweep"))
    assert " naive runs in layers [0, 5]" in naive and "NOT within" not in naive, naive  # some fall in them (seeded)
    dev = next(l for l in lines if l.startswith("deviation from float32"))
    assert all(0 < x < 0.1 for x in _numbers(dev)[:2]), dev
    assert any(l.startswith("agreement with the exact values") for l in lines)
