"""Dataset runs (issue 15): ``vit_lens.runs.run`` / ``vit-lens run`` write tidy Parquet shards and a
manifest; the rows equal the library's own analyses on the same images (identify, the patching
sweep, dla, knockout); resume exactly once (an interrupted run and a ``kill -9`` mid-run both finish
with every row once); another configuration is refused; unreadable images are skipped and listed;
the data sources (folder, labels CSV, ``hf:``) give the same rows; ``vit-lens summarize`` on the 20
labelled photos reproduces the README's per-block identifiability table."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import IMAGES, REPO, make_timm

KEY = ["image", "layer", "group", "index", "condition", "measure"]


@pytest.fixture(scope="module")
def tiny():
    from vit_lens import HookedViT

    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=10))
    m.data_config["input_size"] = (3, 32, 32)  # timm's pretrained config says 224 for any img_size
    return m


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    p = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    tiny.save(p)
    return p


def _images(root, per_class=3, classes=(0, 1, 2), seed=0):
    """An ImageFolder tree root/<class index>/<i>.png of random images (various sizes)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            h, w = 36 + 4 * j, 48 - 2 * c
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / str(c) / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("imgs"))


def _sorted(df):
    return df.sort_values(KEY, ignore_index=True, na_position="first")


def _run(analysis, model, data, out, **kw):
    from vit_lens.runs import run

    kw.setdefault("progress", False)
    kw.setdefault("log", lambda m: None)
    return run(analysis, model, str(data), out, **kw)


def test_identifiability_rows_equal_identify(tiny, folder, tmp_path):
    """Every row is the per-image statistic of vit_lens.identify on the same images (an independent
    re-computation from its ranks), and the shards are a plain Parquet glob."""
    import pandas as pd

    from vit_lens import identify, results
    from vit_lens.data import from_image_folder

    rep = _run("identifiability", tiny, folder, tmp_path / "out", batch_size=4, chunk_size=5, preprocess="paper")
    assert rep.complete and rep.n_chunks == 2 and rep.n_images_run == 9
    df = results.load(tmp_path / "out")
    assert df.equals(pd.read_parquet(tmp_path / "out" / "shards").pipe(
        lambda d: d.assign(layer=d.layer.astype("Int64"), index=d["index"].astype("Int64"))))
    s = from_image_folder(folder, model=tiny)
    res, _ = identify(tiny, [str(p) for p in s.paths], torch.tensor(s.labels), preprocess="paper", progress=False)
    L = tiny.cfg.n_layers
    assert len(df) == 9 * L * 3 * 3  # images x layers x (CLS, image, readout) x (mean_r, top1_rate, has_top1)
    assert sorted(df.image.unique()) == list(range(9)) and (df.label == df.target).all()
    assert [str(p) for p in s.paths] == [df[df.image == i].path.iloc[0] for i in range(9)]
    r, top1 = res.r, res.rank == 0
    for (i, l, g, m), v in df.set_index(["image", "layer", "group", "measure"]).value.items():
        if g == "readout":
            rr = res.readout_rank[l, i]
            want = {"mean_r": 1 - float(rr) / tiny.cfg.n_classes, "top1_rate": float(rr == 0), "has_top1": float(rr == 0)}[m]
        else:
            sel = slice(0, 1) if g == "CLS" else slice(1, None)
            want = {"mean_r": float(r[l, i, sel].mean()), "top1_rate": float(top1[l, i, sel].float().mean()),
                    "has_top1": float(top1[l, i, sel].any())}[m]
        assert v == pytest.approx(want, abs=1e-6), (i, l, g, m)
    # the summary's per-block table is identify's own summary (pooled over the same images)
    t = results.summarize(tmp_path / "out")["per_block"]
    ref = res.summary().set_index(["layer", "tokens"])
    for l in range(L):
        assert t.loc[l, "CLS mean_r"] == pytest.approx(ref.loc[(l, "CLS"), "mean_r"], abs=1e-6)
        assert t.loc[l, "image top1_rate"] == pytest.approx(ref.loc[(l, "image"), "top1_rate"], abs=1e-6)
        assert t.loc[l, "image has_top1"] == pytest.approx(ref.loc[(l, "image"), "images_with_top1"], abs=1e-6)


def test_interrupted_run_resumes_exactly_once_and_refuses_another_config(tiny, folder, tmp_path, monkeypatch):
    from vit_lens import results
    from vit_lens.runs import ANALYSES, ConfigMismatchError

    ref = results.load(_run("identifiability", tiny, folder, tmp_path / "ref", batch_size=2, chunk_size=2).out)
    spec = ANALYSES["identifiability"]
    real, calls = spec.fn, []

    def dies_on_batch_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(spec, "fn", dies_on_batch_4)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run("identifiability", tiny, folder, out, batch_size=2, chunk_size=2)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["chunk-000000.parquet", "chunk-000001.parquet",
                                                                  "chunk-000002.parquet"]
    assert len(results.load(out)) == 6 * len(ref) // 9
    with pytest.raises(Exception, match="not done"):
        results.load(out, complete=True)
    rep = _run("identifiability", tiny, folder, out, batch_size=2, chunk_size=2)
    assert rep.complete and rep.n_images_run == 3 and len(calls) == 4 + 2  # only the two chunks left
    got = results.load(out, complete=True)
    assert not got.duplicated(KEY).any()
    assert _sorted(got).equals(_sorted(ref))
    # a rerun of a finished run does nothing
    assert _run("identifiability", tiny, folder, out, batch_size=2, chunk_size=2).n_images_run == 0
    # another configuration is refused, naming the difference
    with pytest.raises(ConfigMismatchError, match=r"options.mode: 'paper' there, 'dla' now.*another --out"):
        _run("identifiability", tiny, folder, out, batch_size=2, chunk_size=2, options=dict(mode="dla"))
    with pytest.raises(ConfigMismatchError, match="chunk_size: 2 there, 3 now"):
        _run("identifiability", tiny, folder, out, batch_size=2, chunk_size=3)
    from vit_lens.class_space import random_twin

    twin = random_twin(tiny, seed=1)
    with pytest.raises(ConfigMismatchError, match="weights_sha256"):
        _run("identifiability", twin, folder, out, batch_size=2, chunk_size=2)
    with pytest.raises(Exception, match="takes no option"):
        _run("identifiability", tiny, folder, tmp_path / "o2", options=dict(top_k=3))


def test_kill_9_mid_run_then_rerun_completes(tiny, tiny_file, folder, tmp_path):
    """A real SIGKILL right after the 2nd chunk's shard (the test hook), then the same command."""
    from vit_lens import results
    from vit_lens.runs import STOP_AFTER_ENV

    cmd = [sys.executable, "-m", "vit_lens", "run", "identifiability", "--model", str(tiny_file), "--data", str(folder),
           "--chunk-size", "2", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    killed = subprocess.run(cmd + ["--out", str(out)], env={**env, STOP_AFTER_ENV: "2"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert len(list((out / "shards").glob("chunk-*.parquet"))) == 2
    again = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "3 of 5 chunks (5 images) to do" in again.stderr and "5 of 5 chunks done" in again.stderr
    assert not list(out.rglob(".*.tmp"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    try:
        want = results.load(_run("identifiability", tiny, folder, tmp_path / "ref", batch_size=2, chunk_size=2).out)
    finally:
        torch.set_num_threads(threads)
    got = results.load(out, complete=True)
    assert not got.duplicated(KEY).any() and _sorted(got).equals(_sorted(want))


def test_unreadable_images_are_skipped_and_listed(tiny, folder, tmp_path):
    import shutil

    from vit_lens import results

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "1" / "9_broken.png").write_text("not a png")
    rep = _run("identifiability", tiny, bad, tmp_path / "out", chunk_size=4)
    assert rep.complete and rep.n_failed == 1
    f = results.failures(tmp_path / "out")
    assert list(f.columns) == ["image", "path", "error"] and f.path[0] == str((bad / "1" / "9_broken.png").resolve())
    assert "cannot read" in f.error[0]
    assert (tmp_path / "out" / "failures.csv").is_file()
    got = results.load(tmp_path / "out")
    assert f.image[0] not in set(got.image)
    ref = results.load(_run("identifiability", tiny, folder, tmp_path / "ref", chunk_size=4).out)
    # the good images' rows are those of the folder without the broken file (same values; ids shift past it)
    a = got.drop(columns=["image"]).sort_values(["path", "layer", "group", "measure"], ignore_index=True)
    b = ref.drop(columns=["image"]).assign(path=lambda d: d.path.str.replace(str(folder.resolve()), str(bad.resolve())))
    b = b.sort_values(["path", "layer", "group", "measure"], ignore_index=True)
    assert a.equals(b)


def test_sources_csv_flat_folder_and_hf_give_the_same_rows(tiny, folder, tmp_path):
    import datasets

    from vit_lens import results
    from vit_lens.data import from_image_folder

    s = from_image_folder(folder, model=tiny)
    ref = results.load(_run("identifiability", tiny, folder, tmp_path / "ref").out)
    # a labels CSV with paths relative to its folder
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class_index", "synset"])
        for p, l in zip(s.paths, s.labels):
            w.writerow([os.path.relpath(p, tmp_path), l, "n0"])
    got = results.load(_run("identifiability", tiny, csv_path, tmp_path / "csv").out)
    assert got.equals(ref)
    # a save_to_disk dataset (image + label columns), also as hf:PATH:split of a DatasetDict
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in s.paths], "label": s.labels}).cast_column(
        "image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict(validation=ds).save_to_disk(str(tmp_path / "hfdict"))
    for spec, name in ((f"hf:{tmp_path / 'hf'}", "hf1"), (f"hf:{tmp_path / 'hfdict'}:validation", "hf2")):
        h = results.load(_run("identifiability", tiny, spec, tmp_path / name).out)
        assert (h.path.str.fullmatch(r"hf:\d+")).all()
        assert h.drop(columns=["path"]).equals(ref.drop(columns=["path"]))
    with pytest.raises(Exception, match="no split 'test'"):
        _run("identifiability", tiny, f"hf:{tmp_path / 'hfdict'}:test", tmp_path / "hf3")
    # a flat folder is unlabelled: target 'label' is refused, 'pred' works
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in s.paths[:3]:
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    with pytest.raises(Exception, match="--target pred"):
        _run("identifiability", tiny, flat, tmp_path / "flat_out")
    d = results.load(_run("identifiability", tiny, flat, tmp_path / "flat_out", target="pred").out)
    assert (d.label == -1).all() and len(d.image.unique()) == 3
    with torch.no_grad():
        pred = tiny(tiny.preprocess(sorted(str(p) for p in flat.iterdir()))).argmax(-1)
    assert d.groupby("image").target.first().tolist() == pred.tolist()


def test_patching_rows_equal_the_sweep(tiny, folder, tmp_path, monkeypatch):
    from vit_lens import patching, results
    from vit_lens.data import from_image_folder
    from vit_lens.runs import corrupt_images
    from vit_lens.runs.engine import corruption_pairs
    from vit_lens.runs.sources import open_source

    out = tmp_path / "p"
    _run("patching", tiny, folder, out, options=dict(layers=[1], seed=3), chunk_size=5, batch_size=5)
    df = results.load(out)
    s = from_image_folder(folder, model=tiny)
    pairs = corruption_pairs(open_source(str(folder), tiny), 3)
    assert all(s.labels[j] != s.labels[i] for i, j in pairs.items())
    for i in (0, 7):
        clean = tiny.preprocess([str(s.paths[i])])
        other = tiny.preprocess([str(s.paths[pairs[i]])])
        res = patching.patch_positions_sweep(tiny, clean, corrupt_images(clean, "other", [i], 3, other),
                                             patching.logit_metric(s.labels[i]), layers=[1], progress=False)
        rows = df[(df.image == i) & (df.measure == "value")].sort_values("index")
        assert rows.index.size == tiny.cfg.n_ctx and (rows.layer == 1).all()
        assert np.allclose(rows.value.to_numpy(), res.values[0, :, 0].numpy(), atol=1e-5)
        base = df[(df.image == i) & (df.group == "baseline")].set_index("measure").value
        assert base["clean"] == pytest.approx(float(res.clean[0]), abs=1e-5)
    # noise is seeded by (seed, image id): the same in any batch
    a = corrupt_images(torch.zeros(3, 3, 8, 8), "noise", [4, 5, 6], 1)
    b = corrupt_images(torch.zeros(1, 3, 8, 8), "noise", [5], 1)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    # method= reaches the sweep, which refuses what it does not know
    seen = {}
    real = patching.patch_heads_sweep

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **{kk: v for kk, v in k.items() if kk != "method"})

    monkeypatch.setattr(patching, "patch_heads_sweep", spy)
    _run("patching", tiny, folder, tmp_path / "h", options=dict(sweep="heads", corruption="blur", method="exact"),
         limit=2)
    assert seen["method"] == "exact" and seen["hook"] == "attn.hook_z"
    h = results.load(tmp_path / "h")
    assert set(h[h.group == "head"]["index"]) == set(range(tiny.cfg.n_heads))


def test_dla_knockout_context_and_logit_lens_rows(tiny, folder, tmp_path):
    import pandas as pd

    from vit_lens import results
    from vit_lens.ablation import attention_knockout, context_comparison, grid_mask_from_box
    from vit_lens.class_space import identifiability, logit_lens
    from vit_lens.core import hook_names
    from vit_lens.data import from_image_folder

    s = from_image_folder(folder, model=tiny)
    x = tiny.preprocess([str(p) for p in s.paths[:3]])
    t = torch.tensor(s.labels[:3])
    # dla: the parts of every image sum to its logit (an exact identity), and the logit is the model's
    d = results.load(_run("dla", tiny, folder, tmp_path / "dla", limit=3).out)
    with torch.no_grad():
        logits = tiny(x)
    for i in range(3):
        di = d[d.image == i]
        assert di[di.measure == "dla"].value.sum() == pytest.approx(di[di.measure == "logit"].value.item(), abs=1e-4)
        assert di[di.measure == "logit"].value.item() == pytest.approx(float(logits[i, t[i]]), abs=1e-4)
    # knockout: the rows of a condition are identifiability under that knockout
    k = results.load(_run("knockout", tiny, folder, tmp_path / "ko", limit=3,
                          options=dict(edges=["self_only"], modes=["paper"])).out)
    assert set(k.condition) == {"none", "self_only:paper"}
    with torch.no_grad(), attention_knockout(tiny, "self_only", mode="paper"):
        _, cache = tiny.run_with_cache(x, names_filter=hook_names(tiny, "resid_post"))
    res = identifiability(tiny, cache, t)
    got = k[(k.condition == "self_only:paper") & (k.group == "image") & (k.measure == "mean_r")]
    for row in got.itertuples():
        assert row.value == pytest.approx(float(res.r[row.layer, row.image, 1:].mean()), abs=1e-6)
    tab = results.summarize(tmp_path / "ko")["last_block"]
    assert tab.loc["none", "delta image mean_r"] == 0
    # context-ablation with a box: the rows are context_comparison's
    c = results.load(_run("context-ablation", tiny, folder, tmp_path / "ctx", limit=3,
                          options=dict(box=(0, 0, 16, 16))).out)
    ref = context_comparison(tiny, x, t, grid_mask_from_box((0, 0, 16, 16), tiny), progress=False)
    ref = ref.melt(id_vars=["image", "tokens", "context", "layer"], value_vars=["identifiable_rate", "mean_r"])
    mine = c[c.measure != "n_tokens"].rename(columns={"group": "tokens", "condition": "context", "measure": "variable"})
    m = pd.merge(ref, mine, on=["image", "tokens", "context", "layer", "variable"], how="outer")
    assert len(m) == len(ref) and np.allclose(m.value_x, m.value_y, atol=1e-6)
    # logit-lens: the top-k of the [CLS] projection
    ll = results.load(_run("logit-lens", tiny, folder, tmp_path / "ll", limit=3, options=dict(top_k=2)).out)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(x, names_filter=hook_names(tiny, "resid_post"))
        top = logit_lens(tiny, cache, positions=[0])[:, :, 0].topk(2, dim=-1)
    cls = ll[ll.measure == "class"].sort_values(["layer", "image", "index"])
    assert cls.value.astype(int).tolist() == top.indices.reshape(-1).tolist()


def test_cli_run_and_summarize(tiny_file, folder, tmp_path, capsys):
    from vit_lens.cli import main

    out = tmp_path / "out"
    assert main(["run", "identifiability", "--model", str(tiny_file), "--data", str(folder), "--out", str(out),
                 "--no-progress", "--chunk-size", "4"]) == 0
    assert "3 of 3 chunks done" in capsys.readouterr().err
    assert main(["summarize", str(out)]) == 0
    text = capsys.readouterr().out
    assert "identifiability: per_block (mean over 9 images)" in text and "image has_top1" in text
    assert (out / "figures" / "identifiability.html").is_file()
    # options that do not apply, unknown analyses, missing data: one line, status 2
    for argv, msg in ((["run", "identifiability", "--top-k", "3"], "--top-k does not apply to identifiability"),
                      (["run", "nope"], "unknown analysis 'nope'"),
                      (["run", "dla", "--data", str(tmp_path / "missing")], "no file or folder")):
        full = argv + ["--model", str(tiny_file), "--out", str(tmp_path / "o")]
        if "--data" not in argv:
            full += ["--data", str(folder)]
        assert main(full) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert main(["run", "identifiability", "--model", str(tiny_file), "--data", str(folder), "--out", str(out),
                 "--no-progress", "--chunk-size", "4", "--mode", "dla"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main(["summarize", str(tmp_path / "nothing")]) == 2


README_ROW = re.compile(r"^\| (\d+) \| ([\d.]+) \| (\d+)% \| ([\d.]+) \| ([\d.]+)% \| (\d+)% \|", re.M)


def test_summary_of_the_20_photos_reproduces_the_readme_table(real_vit, tmp_path):
    """``--preprocess paper`` on the 20 labelled photos: the summary equals vit_lens.identify's own
    summary (the independent computation) and, at the printed precision, the README's table."""
    from vit_lens import identify, results
    from vit_lens.data import from_labels_csv

    out = tmp_path / "out"
    _run("identifiability", real_vit, IMAGES / "labels.csv", out, preprocess="paper", batch_size=20)
    t = results.summarize(out)["per_block"]
    s = from_labels_csv(IMAGES / "labels.csv")
    res, _ = identify(real_vit, [str(p) for p in s.paths], torch.tensor(s.labels), preprocess="paper", progress=False)
    ref = res.summary().set_index(["layer", "tokens"])
    cols = {"CLS mean_r": ("CLS", "mean_r"), "CLS top1_rate": ("CLS", "top1_rate"), "image mean_r": ("image", "mean_r"),
            "image top1_rate": ("image", "top1_rate"), "image has_top1": ("image", "images_with_top1")}
    for l in range(real_vit.cfg.n_layers):
        for c, (g, m) in cols.items():
            assert t.loc[l, c] == pytest.approx(ref.loc[(l, g), m], abs=1e-6), (l, c)
    rows = README_ROW.findall((REPO / "README.md").read_text().split("Class identifiability per block")[1])
    assert len(rows) == real_vit.cfg.n_layers
    for layer, cls_r, cls_t, img_r, img_t, any_t in rows:
        l = int(layer)
        assert f"{t.loc[l, 'CLS mean_r']:.3f}" == cls_r and f"{100 * t.loc[l, 'CLS top1_rate']:.0f}" == cls_t
        assert f"{t.loc[l, 'image mean_r']:.3f}" == img_r and f"{100 * t.loc[l, 'image top1_rate']:.1f}" == img_t
        assert f"{100 * t.loc[l, 'image has_top1']:.0f}" == any_t


def test_context_ablation_from_segmentation_pngs(tiny, folder, tmp_path):
    """ImageNet-S style PNGs parallel to the images (class id = R + 256 G; 0 and 1000 are no object):
    the rows are context_comparison's with the masks built from them directly."""
    import pandas as pd
    from PIL import Image

    from vit_lens import results
    from vit_lens.ablation import context_comparison, grid_mask_from_segmentation
    from vit_lens.data import from_image_folder

    s = from_image_folder(folder, model=tiny)
    seg_root = tmp_path / "seg"
    masks = []
    for k, p in enumerate(s.paths[:3]):
        w, h = Image.open(p).size
        a = np.zeros((h, w, 3), dtype=np.uint8)
        a[:, : w // 2] = (44, 1, 0)  # class id 44 + 256 = 300 on the left half
        a[: h // 4, w // 2 :] = (232, 3, 0)  # id 1000 (ignored) at the top right
        (seg_root / p.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(seg_root / p.parent.name / (p.stem + ".png"))
        ids = torch.from_numpy(a[..., 0].astype(np.int64) + 256 * a[..., 1].astype(np.int64))
        masks.append(grid_mask_from_segmentation(ids == 300, tiny))
    with pytest.raises(Exception, match="--preprocess paper"):
        _run("context-ablation", tiny, folder, tmp_path / "c0", limit=3, options=dict(segmentations=str(seg_root)))
    c = results.load(_run("context-ablation", tiny, folder, tmp_path / "c", limit=3, preprocess="paper",
                          options=dict(segmentations=str(seg_root))).out)
    x = tiny.preprocess([str(p) for p in s.paths[:3]], mode="paper")
    ref = context_comparison(tiny, x, torch.tensor(s.labels[:3]), torch.stack(masks), progress=False)
    ref = ref.melt(id_vars=["image", "tokens", "context", "layer"], value_vars=["identifiable_rate", "mean_r"])
    mine = c[c.measure != "n_tokens"].rename(columns={"group": "tokens", "condition": "context", "measure": "variable"})
    m = pd.merge(ref, mine, on=["image", "tokens", "context", "layer", "variable"], how="outer")
    assert len(m) == len(ref) > 0 and np.allclose(m.value_x, m.value_y, atol=1e-6)


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tiny, folder, tmp_path, monkeypatch):
    """One run per --out folder: a live process' lock refuses a second run (naming what to do); the lock of a
    process that is gone is taken over; the lock is released after a run, also one that raised."""
    import socket

    from vit_lens.runs import ANALYSES, RunLockedError

    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".lock"
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{live.pid} {host}\n")
        with pytest.raises(RunLockedError, match=rf"another run \(process {live.pid}\) is writing to .*another --out"):
            _run("identifiability", tiny, folder, out, batch_size=4, chunk_size=4)
        assert not (out / "shards").exists() and lock.read_text() == f"{live.pid} {host}\n"
    finally:
        live.kill()
        live.wait()
    lock.write_text(f"{live.pid} {host}\n")  # now a dead process' lock
    rep = _run("identifiability", tiny, folder, out, batch_size=4, chunk_size=4)
    assert rep.complete and not lock.exists() and not list(out.glob(".*.tmp"))
    lock.write_text(f"{live.pid} some-other-host\n")  # cannot tell whether it lives: refused, naming the file
    with pytest.raises(RunLockedError, match=r"host 'some-other-host'.*delete .*\.lock"):
        _run("identifiability", tiny, folder, out, batch_size=4, chunk_size=4)
    lock.unlink()

    spec = ANALYSES["identifiability"]

    def fails(*a, **k):
        assert (tmp_path / "o2" / ".lock").read_text() == f"{os.getpid()} {host}\n"  # held while the run works
        raise RuntimeError("analysis failed")

    monkeypatch.setattr(spec, "fn", fails)
    with pytest.raises(RuntimeError, match="analysis failed"):
        _run("identifiability", tiny, folder, tmp_path / "o2", batch_size=4, chunk_size=4)
    assert not (tmp_path / "o2" / ".lock").exists()


def test_a_run_inside_a_run_on_the_same_folder_is_refused(tiny, folder, tmp_path, monkeypatch):
    from vit_lens.runs import ANALYSES, RunLockedError

    spec = ANALYSES["identifiability"]
    real = spec.fn
    seen = []

    def nested(*a, **k):
        if not seen:
            seen.append(1)
            with pytest.raises(RunLockedError, match="this process is already running a run into"):
                _run("identifiability", tiny, folder, tmp_path / "out", batch_size=4, chunk_size=4)
        return real(*a, **k)

    monkeypatch.setattr(spec, "fn", nested)
    assert _run("identifiability", tiny, folder, tmp_path / "out", batch_size=4, chunk_size=4).complete and seen
