"""``torchrun --nproc_per_node=2 -m vit_lens run ...`` on the CPU (gloo): exactly the rows of one
process (same set, same values); one rank killed mid-run (the test hook: SIGKILL after its first
chunk), then the same command again: complete, every row exactly once, nothing corrupt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_timm

TORCHRUN = Path(sys.executable).with_name("torchrun")
KEY = ["image", "layer", "group", "index", "condition", "measure"]

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"no torchrun beside {sys.executable}")


def _sorted(df):
    return df.sort_values(KEY, ignore_index=True, na_position="first")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    from vit_lens import HookedViT

    root = tmp_path_factory.mktemp("tr")
    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=10))
    m.data_config["input_size"] = (3, 32, 32)
    m.save(root / "tiny.safetensors")
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / "imgs" / str(c)).mkdir(parents=True)
        for j in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "imgs" / str(c) / f"{j}.png")
    (root / "imgs" / "1" / "z_broken.png").write_text("no image")
    return root, m


def _torchrun(root, out, extra_env=None):
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "vit_lens", "run", "patching",
           "--model", str(root / "tiny.safetensors"), "--data", str(root / "imgs"), "--out", str(out),
           "--chunk-size", "2", "--batch-size", "2", "--layers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VIT_LENS_DIST_BACKEND": "gloo",
           **(extra_env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)


def test_two_processes_give_the_rows_of_one_and_survive_a_dead_rank(setup):
    from vit_lens import results
    from vit_lens.runs import STOP_AFTER_ENV, run

    root, model = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        run("patching", model, str(root / "imgs"), root / "single", options=dict(layers=[1]), chunk_size=2,
            batch_size=2, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    single = _sorted(results.load(root / "single", complete=True))

    p = _torchrun(root, root / "two")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 processes" in p.stderr and "6 of 6 chunks done" in p.stderr and "images/s" in p.stderr
    two = _sorted(results.load(root / "two", complete=True))
    assert not two.duplicated(KEY).any()
    assert two.equals(single)  # the same set of rows, the same values, bit for bit
    f = results.failures(root / "two")
    assert f.path.str.endswith("z_broken.png").sum() == 1  # and any image paired with it as its corruption:
    assert f[~f.path.str.endswith("z_broken.png")].error.str.contains("corruption partner").all()
    assert f.equals(results.failures(root / "single"))

    # rank 1 dies (SIGKILL) right after its first chunk; torchrun stops the other rank
    out = root / "killed"
    p = _torchrun(root, out, {STOP_AFTER_ENV: "1@1"})
    assert p.returncode != 0
    done = sorted(f.name for f in (out / "shards").glob("chunk-*.parquet"))
    assert 1 <= len(done) < 6
    p = _torchrun(root, out)  # the same command finishes the chunks left
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{6 - len(done)} of 6 chunks" in p.stderr
    got = _sorted(results.load(out, complete=True))
    assert not got.duplicated(KEY).any() and got.equals(single)
    assert not list(out.rglob(".*.tmp"))
    shutil.rmtree(out)
