"""Every figure function of vit_lens.plot drawn to PNG by plotly's own static export (kaleido with
the machine's Chromium), with its title and axis titles set; the layout rules that make figures
readable (diverging scales for signed data, tables that show every row, titles below the toolbar);
static export's refusal without a browser; the ``vit-lens identify`` report (.html and .png).

The rendering tests are skipped, saying why, where kaleido or a browser is missing
(``.ci/run`` installs Chromium where it can).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from test_plot import CLASSES, _context_frame, _dla_result, _ident_result, _patching_result
from vit_lens import plot as P

NOT_FIGURES = {"position_labels", "save_html", "save_image", "to_image", "find_browser", "static_export_problem",
               "notebook_renderer", "save_report", "identify_report"}


def _problem():
    return P.static_export_problem()


needs_browser = pytest.mark.skipif(_problem() is not None, reason=f"no static export here: {_problem()}")


def _figures() -> dict:
    """One figure per figure function (and per distinct view of the analysis figures), on small inputs."""
    g = torch.Generator().manual_seed(0)
    rank = torch.randint(0, 10, (3, 2, 1 + 16), generator=g)
    ident = _ident_result(rank, target=[2, 7])
    twin = _ident_result(torch.randint(0, 10, (3, 2, 17), generator=g), target=[2, 7])
    image = torch.rand(3, 32, 32, generator=g)
    lines = P.layer_lines({"a long series name for the legend": torch.rand(4, generator=g),
                           "another long series name": torch.rand(4, generator=g)},
                          title="Lines", yaxis_title="value", xaxis_title="layer")
    v = torch.arange(20, dtype=torch.float32).reshape(2, 5, 2) / 10 - 0.5
    sweep = _patching_result(v, ("layer", "pos", "batch"), {"layer": [3, 7], "pos": ["CLS", "0,0", "0,1", "1,0", "1,1"],
                             "batch": [0, 1]}, clean=torch.tensor([2.0, 2.0]), corrupted=torch.tensor([0.0, 0.0]),
                             positions=torch.arange(5), n_prefix_tokens=1, grid_size=(2, 2), prefix_token_names=["CLS"])
    heads = _patching_result(torch.tensor([[-6.0, 0.5], [1.0, 2.0], [3.0, -1.0]])[..., None], ("layer", "head", "batch"),
                             {"layer": [0, 1, 2], "head": [0, 1], "batch": [0]},
                             clean=torch.tensor([1.0]), corrupted=torch.tensor([-1.0]))
    from vit_lens.attribution import Memories

    names = ["tabby, tabby cat", "tiger cat", "espresso", "cup"]
    mem = Memories(scores=torch.rand(2, 3, 4, generator=g), kind="mlp", metric="cosine", layers=[4, 5], class_names=names)
    figs = {
        "layer_lines": lines,
        "token_heatmap": P.token_heatmap(torch.randn(16, generator=g), image, title="Token map",
                                         colorbar_title="value"),
        "grid_heatmap": P.grid_heatmap(torch.randn(3, 4, generator=g), title="Grid", xaxis_title="head",
                                       yaxis_title="layer", colorbar_title="logit"),
        "topk_table": P.topk_table(torch.randn(12, 12, generator=g), class_names=CLASSES, title="Top-k",
                                   row_labels=[f"block {i}" for i in range(12)]),
        "bars": P.bars({"clean": [0.9, 0.5], "knockout": [0.3, 0.1]}, labels=["a", "b"], title="Bars",
                       xaxis_title="condition", yaxis_title="accuracy"),
        "identifiability_lines": P.identifiability_lines(ident, twin),
        "identifiability_map": P.identifiability_map(ident, image, class_names=[f"c{i}" for i in range(10)]),
        "dla_figure": P.dla_figure(_dla_result(torch.randn(3, 2, 2, generator=g), ("layer", "head"))),
        "dla_figure_bars": P.dla_figure(_dla_result(torch.randn(3, 2, generator=g), ("component",),
                                                    {"component": ["embed_x", "0_attn_out", "0_mlp_out"]}), index=0),
        "patching_figure": P.patching_figure(sweep),
        "patching_figure_map": P.patching_figure(sweep, torch.rand(2, 3, 16, 16, generator=g), layer=7, index=0),
        "patching_figure_heads": P.patching_figure(heads),
        "context_figure": P.context_figure(_context_frame()),
        "context_figure_bars": P.context_figure(_context_frame(), layer=2),
        "memory_table": P.memory_table(mem, "tabby cat", k=3),
    }
    from vit_lens.edges import Edge, EdgeResult

    edges = [Edge("input", "a0.h0<q>"), Edge("a0.h0", "m0"), Edge("m0", "logits")]
    est = EdgeResult(edges, torch.tensor([[0.2], [0.5], [-0.1]]), clean=torch.tensor([1.0]),
                     corrupted=torch.tensor([0.0]), method="attribution")
    ex = EdgeResult(edges, torch.tensor([[0.25], [0.4], [0.1]]), clean=torch.tensor([1.0]), corrupted=torch.tensor([0.0]))
    figs["edge_scatter"] = P.edge_scatter(est, ex)
    import dataclasses

    heads_est = dataclasses.replace(heads, values=heads.values * 0.8 + 0.1, method="attribution_qk")
    figs["attribution_comparison_figure"] = P.attribution_comparison_figure(heads, heads_est)
    figs["faithfulness_figure"] = P.faithfulness_figure(
        {"attribution": pd.DataFrame({"k": [1, 10, 100], "recovered": [0.05, 0.3, 0.9]}),
         "exact ranking": pd.DataFrame({"k": [1, 10, 100], "recovered": [0.1, 0.4, 0.95]})})
    for i, f in enumerate(P.identify_report(ident, twin, image=image, lens=torch.randn(3, 10, generator=g),
                                            class_names=[f"c{i}" for i in range(10)])):
        figs[f"identify_report_{i}"] = f
    return figs


@pytest.fixture(scope="module")
def figures():
    return _figures()


def test_every_figure_function_is_covered(figures):
    functions = {n for n in P.__all__ if n not in NOT_FIGURES}
    covered = set(figures) | {n.rsplit("_", 1)[0] for n in figures}   # "dla_figure_bars" covers dla_figure
    missing = functions - covered
    assert not missing, f"add a figure of {sorted(missing)} to _figures() in tests/test_figures_render.py"


def _kinds(fig) -> set:
    return {t.type for t in fig.data}


def test_titles_axis_titles_and_colorbars_are_set(figures):
    for name, fig in figures.items():
        assert fig.layout.title.text, f"{name}: no title"
        # the title sits below the band where plotly's toolbar appears in HTML, and fits the width
        assert fig.layout.title.yref == "container" and fig.layout.title.pad.t >= 30, name
        assert fig.layout.width and fig.layout.height, f"{name}: no explicit size"
        for line in fig.layout.title.text.split("<br>"):
            assert len(line) * 15 * 0.5 <= fig.layout.width, f"{name}: title line too long for {fig.layout.width} px: {line}"
        kinds = _kinds(fig)
        if kinds & {"scatter", "bar"} or ("heatmap" in kinds and "image" not in kinds and fig.layout.xaxis.showticklabels is not False):
            assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text, f"{name}: an axis has no title"
        for t in fig.data:
            if t.type == "heatmap":
                assert t.colorbar.title.text, f"{name}: a colour bar without a title"


def test_signed_values_get_a_diverging_zero_centred_scale(figures):
    for name in ("token_heatmap", "grid_heatmap", "dla_figure", "patching_figure", "patching_figure_heads"):
        hm = [t for t in figures[name].data if t.type == "heatmap"][0]
        z = np.asarray(hm.z, dtype=float)
        assert np.nanmin(z) < 0 < np.nanmax(z), name        # the inputs are signed
        assert hm.zmid == 0, name
        scale = [c[1] for c in hm.colorscale]
        assert scale[0] != scale[-1] and scale[0] != "#440154", name      # not Viridis (which starts #440154)
        assert scale[len(scale) // 2] in ("rgb(247,247,247)", "#f7f7f7"), name  # white in the middle
        if hm.zmin is not None:
            assert hm.zmin == -hm.zmax and hm.zmin <= np.nanmin(z) and hm.zmax >= np.nanmax(z), name
    # patching: values far below 0 (worse than corrupted) are inside the scale, and 1 stays inside too
    hm = figures["patching_figure_heads"].data[0]
    z = np.asarray(hm.z, dtype=float)
    assert hm.zmax >= max(1.0, np.abs(z).max())
    # unsigned data keeps a sequential scale
    hm = P.grid_heatmap(torch.rand(2, 2)).data[0]
    assert hm.zmid is None and hm.colorscale[0][1] == "#440154"


def test_log_axis_refuses_values_it_cannot_draw():
    with pytest.raises(ValueError, match="rank \\+ 1"):
        P.layer_lines({"rank": [5, 0, 1]}, log_y=True)
    fig = P.layer_lines({"rank + 1": [5, 1, 2]}, log_y=True, yrange=(1, 10))
    assert fig.layout.yaxis.type == "log" and list(fig.layout.yaxis.range) == [0.0, 1.0]


def test_identifiability_lines_draw_the_chance_level():
    res = _ident_result(torch.zeros(2, 1, 5, dtype=torch.long))
    ys = [s.y0 for s in P.identifiability_lines(res, metric="mean_r").layout.shapes]
    assert ys == [0.5]
    ys = [s.y0 for s in P.identifiability_lines(res, metric="top1_rate").layout.shapes]
    assert ys == [pytest.approx(1 / res.n_classes)]
    assert not P.identifiability_lines(res, chance=False).layout.shapes


def test_static_export_without_a_browser_says_how_to_install_one(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "find_browser", lambda: None)
    pytest.importorskip("kaleido")
    problem = P.static_export_problem()
    assert "apt-get install chromium" in problem and "BROWSER_PATH" in problem
    from vit_lens.core.errors import MissingFileError

    with pytest.raises(MissingFileError, match="apt-get install chromium"):
        P.save_image(P.bars([1, 2], title="t"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_save_html_plotlyjs_inline_or_cdn(tmp_path):
    fig = P.bars([1, 2], title="t")
    inline = P.save_html(fig, tmp_path / "a.html").read_text()
    cdn = P.save_html(fig, tmp_path / "b.html", plotlyjs="cdn").read_text()
    assert len(inline) > 1_000_000 and not re.search(r"<script[^>]*\ssrc=", inline)
    assert len(cdn) < 100_000 and 'src="https://cdn.plot.ly' in cdn
    with pytest.raises(ValueError, match="inline"):
        P.save_html(fig, tmp_path / "c.html", plotlyjs="web")


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


@needs_browser
def test_every_figure_renders_to_png(figures, tmp_path):
    for name, fig in figures.items():
        px = _png(P.to_image(fig, format="png", scale=1))
        assert px.shape == (fig.layout.height, fig.layout.width), name
        assert (px < 200).mean() > 0.002, f"{name}: the picture is blank"
    out = P.save_image(figures["bars"], tmp_path / "fig")          # no suffix: PNG, scale 2
    assert out.suffix == ".png" and Image.open(out).size == (2 * figures["bars"].layout.width,
                                                              2 * figures["bars"].layout.height)
    assert P.save_image(figures["bars"], tmp_path / "fig.svg").read_text().lstrip().startswith("<svg")


@needs_browser
def test_tables_show_every_row():
    """Long class names wrap; the figure is still tall enough for the last row (nothing drawn on the
    bottom edge), for 12 rows of long names as for 3 short ones."""
    long_names = [f"worm fence, snake fence, snake-rail fence, Virginia fence {i}" for i in range(12)]
    for names, rows in ((long_names, 12), (CLASSES, 3)):
        scores = torch.randn(rows, len(names), generator=torch.Generator().manual_seed(rows))
        fig = P.topk_table(scores, class_names=names, title="t", row_labels=[f"block {i}" for i in range(rows)])
        px = _png(P.to_image(fig, format="png", scale=1))
        inked = np.nonzero((px < 200).any(axis=1))[0]
        assert inked.max() < px.shape[0] - 6, f"the table reaches the bottom edge: rows are cut off ({rows} rows)"
        assert px.shape[0] - inked.max() < 160, "far too much empty space under the table"


# ------------------------------------------------------------------ vit-lens identify --out
@pytest.mark.real
def test_identify_report_html_and_png(tmp_path, capsys):
    from conftest import REAL_VIT, WEIGHTS
    from vit_lens import cli

    ckpt = str(WEIGHTS / f"{REAL_VIT}.safetensors")
    if not (WEIGHTS / f"{REAL_VIT}.safetensors").is_file():   # the command loads it itself
        pytest.skip(f"real ViT-Ti checkpoint not found in {WEIGHTS} (set VIT_LENS_CHECKPOINTS)")
    out = tmp_path / "report.html"
    assert cli.main(["identify", "--checkpoint", ckpt, "--out", str(out), "--plotlyjs", "cdn"]) == 0
    html = out.read_text().replace("\\u002f", "/")          # plotly's JSON escapes "/"
    assert out.stat().st_size < 1_000_000 and 'src="https://cdn.plot.ly' in html
    for what in ("Mean class identifiability r", "Share of tokens whose target class is top-1", "chance: 0.5",
                 "chance: 1/1000", "model: [CLS]", "model: image tokens", "in every image token", "Top-5 classes",
                 "data:image/png;base64"):
        assert what in html, what
    assert "random twin" not in html
    capsys.readouterr()
    if _problem() is not None:
        assert cli.main(["identify", "--checkpoint", ckpt, "--out", str(tmp_path / "r.png")]) == 2
        assert "apt-get install chromium" in capsys.readouterr().err
        return
    png = tmp_path / "report.png"
    assert cli.main(["identify", "--checkpoint", ckpt, "--out", str(png), "--top-k", "3"]) == 0
    im = Image.open(png)
    assert im.format == "PNG" and im.size[1] > 1500            # four figures stacked
    assert cli.main(["identify", "--out", str(tmp_path / "r.pdf")]) == 2
    assert ".html" in capsys.readouterr().err


def test_notebook_renderer_png_when_it_can_interactive_only_when_not(monkeypatch, capsys):
    import plotly.io as pio

    before = pio.renderers.default
    try:
        monkeypatch.setattr(P, "static_export_problem", lambda: "no browser here: install one")
        assert P.notebook_renderer() == "plotly_mimetype"
        assert "no browser here" in capsys.readouterr().out
        assert P.notebook_renderer(png=False) == "plotly_mimetype"
        monkeypatch.undo()
        if _problem() is None:
            assert P.notebook_renderer() == "plotly_mimetype+vit_lens_png"
            bundle = pio.renderers._build_mime_bundle(P.bars([1, 2], title="t").to_dict())
            assert set(bundle) == {"application/vnd.plotly.v1+json", "image/png"}
            png = Image.open(io.BytesIO(__import__("base64").b64decode(bundle["image/png"])))
            assert png.format == "PNG" and png.size == (760, P.bars([1, 2], title="t").layout.height)
    finally:
        pio.renderers.default = before
