"""The resumable patching-sweep driver ``benchmarks/patching_sweep.py`` (a thin driver over
``vit-lens run patching``) on hostile folders: a corrupt image (skipped, listed in failures.csv, the
rest unchanged, retried by the next run), Ctrl-C (one line, exit 130, resumable), a config mismatch
and a missing folder (one line, exit 2), temp files left by a killed run (removed), and the tidy
Parquet shards (equal to the patching sweep's own result; issue 15 replaced the per-image torch
pickles and ``sweep.parquet`` by the shards of ``vit-lens run``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, load_script, make_timm

SCRIPT = REPO / "benchmarks" / "patching_sweep.py"


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT, "patching_sweep_driver")


@pytest.fixture(scope="module")
def vit():
    from vit_lens import HookedViT

    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=10))
    m.data_config["input_size"] = (3, 32, 32)  # timm's pretrained config says 224 for any img_size
    return m


def _images(folder, names, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / n)
    return folder


KW = dict(progress=False, corruption="blur")
KEYS = ["image", "layer", "group", "index", "measure"]


def _by_path(df):
    return {p: d for p, d in df.groupby("path")}


def test_corrupt_image_is_skipped_listed_and_retried(tmp_path, script, vit, capsys):
    import pandas as pd

    from vit_lens import patching, results
    from vit_lens.runs import corrupt_images

    good = _images(tmp_path / "good", ["a.png", "b.jpg"])
    bad = _images(tmp_path / "bad", ["a.png", "b.jpg"])
    (bad / "broken.jpg").write_text("this is text, not a JPEG")
    script.run_sweep(vit, good, tmp_path / "ref", **KW)
    ref = results.load(tmp_path / "ref")

    out = tmp_path / "out"
    files = script.find_images(bad)
    assert len(files) == 3  # the .jpg suffix lets it in; reading it fails
    m = script.run_sweep(vit, bad, out, **KW)
    assert m.n_done == 3 and m.n_failed == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err and "Traceback" not in err
    fails = pd.read_csv(out / "failures.csv")
    assert list(fails.columns) == ["image", "path", "error"] and len(fails) == 1
    assert fails.path[0] == str((bad / "broken.jpg").resolve()) and "cannot identify image" in fails.error[0]
    got = results.load(out)
    assert sorted(Path(p).name for p in got.path.unique()) == sorted(Path(p).name for p in ref.path.unique())
    g, r = _by_path(got), _by_path(ref)
    for p in r:  # the good images' results are those of a folder without the bad one
        mine = g[p.replace(str(good.resolve()), str(bad.resolve()))]
        assert np.array_equal(mine.value.to_numpy(), r[p].value.to_numpy())

    # the tidy table: what pandas reads is the sweep's own result, cell by cell
    df = pd.read_parquet(out / "shards")
    L, P = len(vit.blocks), vit.cfg.n_ctx
    assert len(df[df.measure == "value"]) == 2 * L * P
    assert list(df.columns) == ["image", "path", "label", "target", "layer", "group", "index", "condition", "measure",
                                "value"]
    for path, sub in df.groupby("path"):
        clean = vit.preprocess([path])
        target = int(vit(clean).argmax(-1)[0])
        res = patching.patch_positions_sweep(vit, clean, corrupt_images(clean, "blur", [0]), patching.logit_metric(target),
                                             progress=False)
        assert (sub.target == target).all()
        v = sub[sub.measure == "value"].pivot(index="layer", columns="index", values="value")
        assert np.allclose(v.to_numpy(), res.values[..., 0].numpy(), atol=1e-5)
        base = sub[sub.group == "baseline"].set_index("measure").value
        assert base["clean"] == pytest.approx(float(res.clean[0]), abs=1e-5)

    # fixed on disk: the next run processes it and the failures file goes away
    _images(bad, ["broken.jpg"], seed=5)
    m = script.run_sweep(vit, bad, out, **KW)
    assert m.n_done == 3 and m.n_failed == 0 and not (out / "failures.csv").exists()
    d = results.load(out)
    assert len(d[d.measure == "value"]) == 3 * L * P and not d.duplicated(["image", "layer", "index", "measure"]).any()


@pytest.fixture
def as_cli(monkeypatch, vit):
    """``main()`` with the model loader replaced by the tiny random model."""
    from vit_lens import HookedViT

    monkeypatch.setattr(HookedViT, "from_pretrained", classmethod(lambda cls, *a, **k: vit))


def test_ctrl_c_one_line_exit_130_and_resume(tmp_path, script, vit, as_cli, monkeypatch, capsys):
    import vit_lens.patching as P
    from vit_lens import results

    folder = _images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    ref_out = tmp_path / "ref"
    assert script.main([str(folder), "--out", str(ref_out)]) == 0
    ref = results.load(ref_out)

    real = P.patch_positions_sweep
    calls = []

    def interrupt_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(P, "patch_positions_sweep", interrupt_on_second)
    out = tmp_path / "out"
    capsys.readouterr()
    assert script.main([str(folder), "--out", str(out)]) == 130
    err = capsys.readouterr().err  # progress bars, then the one line
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        "patching_sweep: interrupted after 1 of 3 images; rerun the same command to resume"
    assert results.load(out).image.nunique() == 1 and not list((out / "shards").glob(".*.tmp"))

    assert script.main([str(folder), "--out", str(out)]) == 0  # the same command resumes
    assert len(calls) == 2 + 2  # the two images left, each once
    got = results.load(out)
    assert got.sort_values(KEYS, ignore_index=True).equals(ref.sort_values(KEYS, ignore_index=True))
    assert "3 of 3 images done" in capsys.readouterr().out


def test_config_mismatch_and_missing_folder_are_one_line(tmp_path, script, as_cli, capsys):
    folder = _images(tmp_path / "imgs", ["a.png"])
    out = tmp_path / "out"
    assert script.main([str(folder), "--out", str(out), "--layers", "1"]) == 0
    capsys.readouterr()
    assert script.main([str(folder), "--out", str(out), "--layers", "1", "--corruption", "noise"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "another configuration" in err and "corruption: 'blur' there, 'noise' now" in err
    assert "another --out folder" in err
    for missing in (tmp_path / "nope", folder / "a.png"):
        assert script.main([str(missing), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(missing) in err and "folder of images" in err
    (tmp_path / "empty").mkdir()
    assert script.main([str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no images" in capsys.readouterr().err


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # just exited (reaped): no process has it for now


def test_temp_files_of_killed_runs_are_removed(tmp_path, script, vit):
    from vit_lens.runs.engine import shard_dir

    folder = _images(tmp_path / "imgs", ["a.png"])
    out = tmp_path / "out"
    shards = shard_dir(out)
    shards.mkdir(parents=True)
    # a real kill -9 in the middle of an atomic write
    code = ("import time, os; from pathlib import Path; from vit_lens.runs import engine; "
            "orig = os.fsync; os.fsync = lambda fd: (time.sleep(120), orig(fd)); "
            f"engine._atomic_write(Path({str(shards / 'x.parquet')!r}), b'partial')")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    t0 = time.time()
    while not list(shards.glob(".x.parquet.*.tmp")) and time.time() - t0 < 120:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    killed = list(shards.glob(".x.parquet.*.tmp"))
    assert len(killed) == 1 and not (shards / "x.parquet").exists()
    old_style = shards / ".y.parquet.k2j4_x.tmp"  # another naming, no pid
    old_style.write_bytes(b"old")
    dead = out / f".manifest.json.{_dead_pid()}.0123abcd.tmp"
    dead.write_bytes(b"{")
    live = shards / f".z.parquet.{os.getppid()}.0123abcd.tmp"  # a live process's: a concurrent writer
    live.write_bytes(b"busy")
    script.run_sweep(vit, folder, out, **KW)
    assert not killed[0].exists() and not old_style.exists() and not dead.exists()
    assert live.exists()
    assert [p.name for p in shards.iterdir() if not p.name.startswith(".")] == ["chunk-000000.parquet"]


def test_runs_from_the_benchmarks_folder():
    out = subprocess.run([sys.executable, "patching_sweep.py", "--help"], cwd=REPO / "benchmarks",
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "--out" in out.stdout and "--traceback" in out.stdout


def test_sigint_to_a_running_sweep(tmp_path):
    """A real Ctrl-C (SIGINT) to the command: exit 130, the one line, no traceback; a rerun finishes."""
    import signal

    folder = _images(tmp_path / "imgs", [f"{i}.png" for i in range(6)])
    out = tmp_path / "out"
    code = f"""
import importlib.util, sys, time
import vit_lens.patching as P
from vit_lens import HookedViT
sys.path.insert(0, {str(REPO / 'tests')!r})
from conftest import make_timm
m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=10))
m.data_config["input_size"] = (3, 32, 32)
HookedViT.from_pretrained = classmethod(lambda cls, *a, **k: m)
real = P.patch_positions_sweep
def slow(*a, **k):
    time.sleep(1.0)
    return real(*a, **k)
P.patch_positions_sweep = slow
spec = importlib.util.spec_from_file_location("s", {str(SCRIPT)!r})
s = importlib.util.module_from_spec(spec); spec.loader.exec_module(s)
sys.exit(s.main(sys.argv[1:]))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list((out / "shards").glob("*.parquet")) and time.time() - t0 < 120:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    n = len(list((out / "shards").glob("*.parquet")))
    assert 1 <= n < 6
    assert last == f"patching_sweep: interrupted after {n} of 6 images; rerun the same command to resume"
    rerun = subprocess.run([sys.executable, "-c", code, str(folder), "--out", str(out)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "6 of 6 images done" in rerun.stdout
