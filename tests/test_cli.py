"""Tests for the ``vit-lens`` command (vit_lens.cli)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REAL_VIT, REPO, WEIGHTS
from vit_lens import cli


def _run(*args, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "vit_lens.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_help_lists_identify(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["identify", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--label", "--out", "--checkpoint"):
        assert flag in out
    assert cli.main([]) == 2  # no command: help and a non-zero status
    assert "identify" in capsys.readouterr().out


def test_unknown_model_clear_message_no_traceback(tmp_path):
    out = _run("identify", "--model", "vit_no_such_model_224", "--out", str(tmp_path / "f.html"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "vit_no_such_model_224" in out.stderr and "unknown model" in out.stderr
    assert not (tmp_path / "f.html").exists()


def test_missing_image_and_checkpoint_clear_messages(tmp_path, capsys):
    assert cli.main(["identify", str(tmp_path / "nope.jpg")]) == 2
    err = capsys.readouterr().err
    assert "no image file" in err and "nope.jpg" in err
    assert cli.main(["identify", "--checkpoint", str(tmp_path / "w.safetensors")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert cli.main(["identify", "--model", "resnet50"]) == 2
    assert "not supported" in capsys.readouterr().err


def _parse_table(stdout: str):
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith("layer"))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for l in lines[start + 2:]:
        if not l.strip() or not l.strip()[0].isdigit():
            break
        rows.append(re.split(r"\s{2,}", l.strip()))
    return header, rows


@pytest.mark.real
def test_identify_real_images_table_and_html(tmp_path, capsys, labelled_images, real_vit):
    rows = [r for r in labelled_images if "photos" in r["path"]]
    paths = [r["path"] for r in rows]
    out = tmp_path / "fig.html"
    code = cli.main(["identify", *paths, "--model", "vit_tiny_patch16_224", "--label", "military uniform",
                     "--checkpoint", str(WEIGHTS / f"{REAL_VIT}.safetensors"), "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "military uniform" in stdout and stdout.count("target (--label)") == len(paths)
    header, table = _parse_table(stdout)
    assert header == ["layer", "CLS r", "CLS top-1", "image r", "image top-1", "images w/ top-1 token"]
    assert len(table) == real_vit.cfg.n_layers
    # the printed numbers are the library's (computed here on the same images with the same target)
    from vit_lens import class_space as cs

    x = real_vit.preprocess(paths)  # the default preprocessing: the model's own timm transform
    _, cache = real_vit.run_with_cache(x, names_filter=cs.hook_names(real_vit, "resid_post"))
    res = cs.identifiability(real_vit, cache, "military uniform")
    for l, row in enumerate(table):
        assert int(row[0]) == l
        assert float(row[1]) == pytest.approx(float(res.mean_r("cls")[l]), abs=6e-4)
        assert float(row[3]) == pytest.approx(float(res.mean_r("image")[l]), abs=6e-4)
        assert float(row[4].rstrip("%")) == pytest.approx(100 * float(res.rate("image")[l]), abs=0.06)
    html = out.read_text()
    assert "plotly" in html.lower() and "model: image tokens" in html and "model: [CLS]" in html
    # the real grace_hopper photo: the model's top-1 is the label, which the final [CLS] identifies
    gh = paths.index(next(p for p in paths if "grace_hopper" in p))
    logits = real_vit(x[gh:gh + 1])
    assert real_vit.class_names[int(logits.argmax())] == "military uniform"
    assert int(res.rank[-1, gh, 0]) == 0


@pytest.mark.real
def test_identify_default_sample_image(tmp_path, capsys):
    """No image: the built-in sample (a tabby cat) on the default model, from $VIT_LENS_CHECKPOINTS."""
    if not (WEIGHTS / f"{REAL_VIT}.safetensors").exists():
        pytest.skip("real ViT-Ti checkpoint not found")
    out = tmp_path / "sample.html"
    assert cli.main(["identify", "--out", str(out), "--top-k", "3", "--baseline"]) == 0
    stdout = capsys.readouterr().out
    assert "chelsea" in stdout and "cat" in stdout
    assert "top-1 prediction" in stdout
    header, table = _parse_table(stdout)
    assert len(table) == 12
    assert header[-3:] == ["random: CLS r", "random: image r", "random: image top-1"]
    assert "random twin" in out.read_text()
    # the target is the prediction, so the last block's [CLS] has r = 1 and is top-1
    assert table[-1][1] == "1.000" and table[-1][2] == "100%"
    assert out.is_file() and out.stat().st_size > 10_000


@pytest.mark.real
def test_unknown_label_suggests(capsys):
    if not (WEIGHTS / f"{REAL_VIT}.safetensors").exists():
        pytest.skip("real ViT-Ti checkpoint not found")
    assert cli.main(["identify", "--label", "tabby kat", "--out", "-"]) == 2
    err = capsys.readouterr().err
    assert "tabby kat" in err and "tabby cat" in err


# ------------------------------------------------------------------ new-user reports (issue 12)
def _tiny_model():
    """A random 2-block ViT on 32x32 inputs with 10 classes (its data config says 32 too)."""
    from conftest import make_timm
    from vit_lens import HookedViT

    m = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=10))
    m.data_config["input_size"] = (3, 32, 32)  # timm's pretrained config says 224 for any img_size
    return m


@pytest.fixture
def tiny(monkeypatch):
    """The CLI with its model loader replaced by a tiny random model (records how often it was called)."""
    m = _tiny_model()
    calls = []

    def load(name, checkpoint, device):
        calls.append(name)
        return m

    monkeypatch.setattr(cli, "_load_model", load)
    return m, calls


def _write_images(folder, names, size=(40, 48), seed=0):
    from PIL import Image
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / n)
    return [folder / n for n in names]


def test_traceback_accepted_before_and_after_the_subcommand(tmp_path, capsys):
    missing = str(tmp_path / "nope.jpg")
    assert cli.main(["identify", missing]) == 2  # without it: one line, no traceback
    assert "Traceback" not in capsys.readouterr().err
    for argv in (["--traceback", "identify", missing], ["identify", missing, "--traceback"],
                 ["identify", "--traceback", missing]):
        with pytest.raises(cli.UsageError, match="no image file"):
            cli.main(argv)
    # through the console entry point too (argparse used to refuse it after the subcommand)
    out = _run("identify", missing, "--traceback")
    assert out.returncode != 0 and "Traceback" in out.stderr and "unrecognized arguments" not in out.stderr


def test_version(capsys):
    import tomllib

    import vit_lens

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"vit-lens {vit_lens.__version__}"
    # and that is the package's declared version
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("version")
    if declared is not None:
        assert declared == vit_lens.__version__


def test_folder_argument(tmp_path, capsys, tiny):
    files = _write_images(tmp_path / "imgs", ["b.png", "a.jpg", "sub/c.png"])
    (tmp_path / "imgs" / "notes.md").write_text("not an image, and not an image suffix: ignored")
    assert cli.main(["identify", str(tmp_path / "imgs"), "--out", "-"]) == 0
    cap = capsys.readouterr()
    assert "3 images found" in cap.err
    listed = [l.split("] ", 1)[1] for l in cap.out.splitlines() if l.startswith("[")]
    assert listed == [str(p) for p in sorted(files)]  # all images inside, sorted
    assert "3 images)" in cap.out
    # a folder plus a file
    assert cli.main(["identify", str(tmp_path / "imgs" / "sub"), str(files[0]), "--out", "-"]) == 0
    assert "1 image found" in capsys.readouterr().err
    # an empty folder is an error, before any model is loaded
    (tmp_path / "empty").mkdir()
    n = len(tiny[1])
    assert cli.main(["identify", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no image files" in err and "empty" in err and len(tiny[1]) == n


def test_every_input_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the model must not be loaded when an input is bad")

    monkeypatch.setattr(cli, "_load_model", never)
    good = _write_images(tmp_path, ["ok.png"])[0]
    (tmp_path / "text.jpg").write_text("this is text, not a JPEG")
    (tmp_path / "notes.txt").write_text("hello")
    argv = ["identify", str(good), str(tmp_path / "text.jpg"), str(tmp_path / "notes.txt"), str(tmp_path / "gone.png")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "3 inputs cannot be used" in err  # all reported at once
    for bad in ("text.jpg", "notes.txt", "gone.png"):
        assert bad in err
    assert "ok.png" not in err and "Traceback" not in err
    # a folder holding a corrupt .jpg: reported the same way
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "bad.jpg").write_text("text")
    assert cli.main(["identify", str(tmp_path / "f")]) == 2
    assert "bad.jpg" in capsys.readouterr().err


def _target_lines(stdout):
    return [l.strip() for l in stdout.splitlines() if l.strip().startswith("target (")]


def test_labels_csv(tmp_path, capsys, tiny):
    model, _ = tiny
    folder = tmp_path / "data"
    files = _write_images(folder, ["x/one.png", "two.png", "three.png"])
    classes = [3, 7, 0]
    csv_path = folder / "labels.csv"
    csv_path.write_text("path,class_index,synset,class_name\n" +
                        "".join(f"{p.relative_to(folder)},{c},n0,some name\n" for p, c in zip(files, classes)))
    # no IMAGE: the CSV's images, in its order, each with its own target
    assert cli.main(["identify", "--labels", str(csv_path), "--out", "-"]) == 0
    out = capsys.readouterr().out
    lines = _target_lines(out)
    assert len(lines) == 3
    for line, c in zip(lines, classes):
        assert line.startswith("target (--labels)") and f"(class {c}), rank" in line
    # the printed table is the library's on these targets
    from vit_lens import class_space as cs

    res, _ = cs.identify(model, [str(p) for p in files], torch.tensor(classes), preprocess="timm", progress=False)
    header, table = _parse_table(out)
    for l, row in enumerate(table):
        assert float(row[1]) == pytest.approx(float(res.mean_r("cls")[l]), abs=6e-4)
        assert float(row[3]) == pytest.approx(float(res.mean_r("image")[l]), abs=6e-4)
    # images given: a subset, matched through their path (any spelling of it)
    sub = folder / "x" / ".." / "two.png"
    assert cli.main(["identify", str(sub), str(files[0]), "--labels", str(csv_path), "--out", "-"]) == 0
    assert [l.split("(class ")[1].split(")")[0] for l in _target_lines(capsys.readouterr().out)] == ["7", "3"]
    # an image not in the CSV: a clear error naming it
    extra = _write_images(tmp_path, ["extra.png"])[0]
    assert cli.main(["identify", str(files[1]), str(extra), "--labels", str(csv_path)]) == 2
    err = capsys.readouterr().err
    assert "not listed in" in err and "extra.png" in err and "two.png" not in err
    # --label and --labels together
    assert cli.main(["identify", "--label", "3", "--labels", str(csv_path)]) == 2
    assert "not both" in capsys.readouterr().err
    # a class index the model does not have
    csv2 = folder / "bad.csv"
    csv2.write_text(f"path,class_index\ntwo.png,10\n")
    assert cli.main(["identify", "--labels", str(csv2)]) == 2
    assert "out of range" in capsys.readouterr().err
    # a CSV without the columns, and a missing CSV
    csv3 = folder / "cols.csv"
    csv3.write_text("file,label\ntwo.png,1\n")
    assert cli.main(["identify", "--labels", str(csv3)]) == 2
    assert "path,class_index" in capsys.readouterr().err
    assert cli.main(["identify", "--labels", str(folder / "none.csv")]) == 2
    assert "no CSV file" in capsys.readouterr().err
    # a CSV listing an image that is not there: reported before the model loads
    csv4 = folder / "gone.csv"
    csv4.write_text("path,class_index\ngone.png,1\n")
    assert cli.main(["identify", "--labels", str(csv4)]) == 2
    assert "gone.png" in capsys.readouterr().err


def test_small_image_warning_is_one_line(tmp_path, capsys, tiny):
    small = _write_images(tmp_path, ["small.png"], size=(5, 6))[0]  # the tiny model's input is 32: 6.4x
    big = _write_images(tmp_path, ["big.png"], size=(16, 40))[0]  # short side 16 = half of 32: no warning
    assert cli.main(["identify", str(small), str(big), "--out", "-"]) == 0
    err = capsys.readouterr().err
    warn = [l for l in err.splitlines() if "warning" in l]
    assert len(warn) == 1 and warn[0].startswith("vit-lens: warning: ")
    assert "small.png" in warn[0] and "6x" in warn[0] and "big.png" not in err


def test_preprocess_default_is_timm_and_paper_is_explicit(tmp_path, capsys, tiny):
    model, _ = tiny
    args = cli.build_parser().parse_args(["identify"])
    assert args.preprocess == "timm"
    img = _write_images(tmp_path, ["wide.png"], size=(40, 90))[0]  # not square: crop and squash differ
    from vit_lens import class_space as cs

    for flag, mode in ((), "timm"), (("--preprocess", "paper"), "paper"):
        assert cli.main(["identify", str(img), "--out", "-", *flag]) == 0
        out = capsys.readouterr().out
        assert f"preprocessing: {mode}" in out
        res, _ = cs.identify(model, model.preprocess([str(img)], mode=mode), progress=False)
        _, table = _parse_table(out)
        assert [float(r[3]) for r in table] == pytest.approx([float(v) for v in res.mean_r("image")], abs=6e-4)


def test_make_figures_help_writes_nothing(tmp_path):
    docs = REPO / "docs"
    before = {p.name: p.stat().st_mtime_ns for p in docs.iterdir()}
    out = subprocess.run([sys.executable, str(docs / "make_figures.py"), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "identifiability" in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in docs.iterdir()} == before
