"""The notebooks: committed executed (every figure also a PNG, so GitHub and nbviewer show it, and no
ImageNet photo in any output), and re-executed end to end here with nbclient, offline, on the real
tiny checkpoint.

Execution goes through ``notebooks/execute.py`` (the script that writes the committed outputs): a
kernelspec in a temporary folder whose argv is *this* interpreter (``sys.executable``), so the
notebooks run with the same environment as the tests, whatever kernels the machine has. The notebooks
find ``../shared`` themselves (``$VIT_LENS_SHARED`` / ``$VIT_LENS_CHECKPOINTS``, set by conftest, or from
their own folder); they contain their own checks (``assert``), so a notebook whose analysis stops
making sense fails here, not only one that crashes.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import IMAGES, REAL_VIT, SHARED, WEIGHTS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_BYTES = 2_500_000
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"


def _executor():
    spec = importlib.util.spec_from_file_location("vit_lens_notebooks_execute", NOTEBOOK_DIR / "execute.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1, f"no notebooks found in {NOTEBOOK_DIR}"


# ------------------------------------------------------------------ what a drawn photo may be
@pytest.fixture(scope="module")
def sample_views():
    """Every built-in sample as the model sees it (timm's eval transform and the paper's resize), as
    uint8 [H, W, 3]: the only photos a committed figure may draw."""
    import timm
    import torch

    import vit_lens
    from vit_lens.preprocess import preprocess_images

    cfg = timm.data.resolve_model_data_config(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    views = []
    for name in vit_lens.SAMPLE_IMAGES:
        for mode in ("timm", "paper"):
            x = preprocess_images([vit_lens.sample_image(name)], cfg, mode=mode)[0] * std + mean
            views.append((f"{name} ({mode})", (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()))
    return views


def _decode(uri: str) -> np.ndarray:
    from PIL import Image

    m = re.match(r"data:image/(png|jpeg|jpg|webp);base64,(.*)", uri, re.S)
    assert m, f"an image in a figure is not a base64 data URI: {uri[:60]}..."
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(m.group(2)))).convert("RGB"))


def _is_sample(rgb: np.ndarray, views) -> str:
    """The sample view ``rgb`` is (most of its pixels equal, so an edited sample -- e.g. a grey box over
    the eyes -- still counts), or '' when it is none of them."""
    from PIL import Image

    for name, ref in views:
        if ref.shape != rgb.shape:
            ref = np.asarray(Image.fromarray(ref).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
        same = (np.abs(ref.astype(int) - rgb.astype(int)).max(-1) <= 12).mean()
        if same >= 0.5:
            return name
    return ""


def test_sample_check_tells_samples_from_imagenet_photos(sample_views):
    """The check above can fail: an ImageNet photo (as the model sees it) is none of the samples, a
    sample with a grey box over it still is one."""
    if not (IMAGES / "labels.csv").is_file():
        pytest.skip(f"labelled photos not found in {IMAGES}")
    name, view = sample_views[0]
    boxed = view.copy()
    boxed[60:120, 30:190] = 128
    assert _is_sample(boxed, sample_views) == name
    from PIL import Image

    for p in sorted((IMAGES / "imagenet").glob("*.JPEG"))[:5]:
        im = Image.open(p).convert("RGB").resize((224, 224))
        assert _is_sample(np.asarray(im), sample_views) == "", p.name


def _drawn_images(fig: dict) -> list:
    """Every raster image a plotly figure (as JSON) draws: Image traces and layout images."""
    out = [t["source"] for t in fig.get("data", []) if t.get("type") == "image" and t.get("source")]
    out += [im["source"] for im in fig.get("layout", {}).get("images", []) if isinstance(im.get("source"), str)]
    return out


def _check_outputs(name: str, cells: list, sample_views, *, need_png: bool) -> int:
    """No errors, no progress-bar warnings or widgets, every PNG belongs to a figure, every photo a
    figure draws is a built-in sample; with ``need_png`` every figure has its PNG. Returns the
    number of figures."""
    n_fig = 0
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        for o in cell.get("outputs", []):
            assert o.get("output_type") != "error", f"{name}: cell {i} failed: {o.get('ename')}: {o.get('evalue')}"
            text = "".join(o.get("text", "")) if isinstance(o.get("text"), list) else str(o.get("text", ""))
            assert "TqdmWarning" not in text and "IProgress not found" not in text, f"{name}: cell {i}: {text[:200]}"
            data = o.get("data", {})
            assert WIDGET not in data, f"{name}: cell {i} holds a widget (a progress bar?), which GitHub cannot show"
            if "image/png" in data or "image/jpeg" in data:
                assert PLOTLY in data, (f"{name}: cell {i} shows a raster image that is not a figure's PNG; "
                                        "draw photos through vit_lens.plot with the built-in samples only")
            if PLOTLY in data:
                n_fig += 1
                if need_png:
                    assert "image/png" in data, f"{name}: cell {i}: a figure without its PNG (GitHub shows nothing)"
                for uri in _drawn_images(data[PLOTLY]):
                    rgb = _decode(uri)
                    assert _is_sample(rgb, sample_views), (
                        f"{name}: cell {i} draws a photo that is not one of vit_lens's built-in samples "
                        "(ImageNet photos must never be stored in a notebook)")
    return n_fig


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook(path, sample_views):
    """Committed executed (top to bottom, every figure with its PNG), small, and free of ImageNet
    photos. (A notebook committed without any output -- not run yet -- has nothing to check:
    ``python notebooks/execute.py NOTEBOOK`` fills it.)"""
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB; keep notebooks small"
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    executed = [c for c in code if c.get("execution_count")]
    if not executed and not any(c.get("outputs") for c in code):
        return
    assert len(executed) == len(code), f"{path.name}: some cells were not run; run python notebooks/execute.py {path.name}"
    counts = [c["execution_count"] for c in code]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{path.name}: cells run out of order: {counts}"
    _check_outputs(path.name, nb["cells"], sample_views, need_png=True)
    for c in code:  # no temporary paths of the machine that executed it
        for o in c.get("outputs", []):
            text = "".join(o.get("text", [])) if isinstance(o.get("text"), list) else str(o.get("text", ""))
            assert "/tmp/" not in text, f"{path.name}: an output names a temporary path: {text[:120]}"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    return _executor().write_kernelspec(tmp_path_factory.mktemp("kernels"))


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_dir, tmp_path, sample_views):
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    if not (WEIGHTS / f"{REAL_VIT}.safetensors").is_file():
        pytest.skip(f"real ViT-Ti checkpoint not found in {WEIGHTS} (set VIT_LENS_CHECKPOINTS)")
    if not (IMAGES / "labels.csv").is_file():
        pytest.skip(f"labelled photos not found in {IMAGES} (set VIT_LENS_SHARED)")
    from vit_lens import plot

    env = dict(os.environ, VIT_LENS_CHECKPOINTS=str(WEIGHTS), VIT_LENS_SHARED=str(SHARED))
    nb, seconds = _executor().execute(path, kernel_dir=kernel_dir, out_dir=tmp_path, env=env)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "not every code cell ran"
    # where a browser is present, every figure cell produced an image
    n_fig = _check_outputs(path.name, nb.cells, sample_views, need_png=plot.static_export_problem() is None)
    print(f"{path.name}: {seconds:.1f} s, {n_fig} figures")
