"""Plotly figures for vit_lens results.

Every function takes plain tensors / sequences / pandas objects and *returns* a
:class:`plotly.graph_objects.Figure`; nothing is shown or written as a side effect (call
``fig.show()`` in a notebook, or :func:`save_html` to write a standalone file that works offline).

plotly is imported inside the functions, so ``import vit_lens`` (and even ``import vit_lens.plot``)
stays cheap.

Generic figures:

- :func:`layer_lines` -- one line per series over layers (identifiability, change rate, ...).
- :func:`token_heatmap` -- a per-patch quantity on the token grid, upsampled and overlaid on the image.
- :func:`grid_heatmap` -- a 2-D grid (layer x head, layer x position, ...).
- :func:`topk_table` -- the top-k classes per row (e.g. per layer) as a table figure.
- :func:`bars` -- grouped bar charts (knockout / context-ablation comparisons).
- :func:`save_html` -- write any figure as one self-contained HTML file (plotly.js inlined, or
  from the CDN).

Static pictures (PNG / SVG / PDF) go through plotly's own export, kaleido, with a Chrome / Chromium
found on the machine (:func:`find_browser`; none: a ``MissingFileError`` saying how to install one):
:func:`save_image`, :func:`to_image`, :func:`static_export_problem`; :func:`notebook_renderer` makes
``fig.show()`` store a PNG beside the interactive figure. :func:`identify_report` and
:func:`save_report` build the page ``vit-lens identify --out`` writes.

Every figure has an explicit size, a title wrapped to it below the toolbar's band, axis and colour-bar
titles; signed values get a diverging scale centred on 0.
"""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
from vit_lens.core.errors import InputError, InputTypeError, OutOfRangeError

if TYPE_CHECKING:  # pragma: no cover  (annotations only: no import cycle at run time)
    from vit_lens.config import HookedViTConfig
    from vit_lens.model import HookedViT

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go
    from torch import Tensor

    from vit_lens.attribution import DLAResult, Memories
    from vit_lens.class_space import IdentifiabilityResult
    from vit_lens.patching import PatchingResult

ArrayLike = Union["Tensor", np.ndarray, Sequence[float]]

__all__ = [
    "bars",
    "context_figure",
    "dla_figure",
    "grid_heatmap",
    "identifiability_lines",
    "identifiability_map",
    "identify_report",
    "layer_lines",
    "memory_table",
    "patching_figure",
    "position_labels",
    "find_browser",
    "notebook_renderer",
    "save_html",
    "save_image",
    "save_report",
    "static_export_problem",
    "to_image",
    "token_heatmap",
    "topk_table",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _go():
    import plotly.graph_objects as go

    return go


def _as_array(x: Any, name: str) -> np.ndarray:
    """Tensor / array / nested sequence / pandas object -> float64 numpy array (a copy)."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().to("cpu")
        if x.is_complex():
            raise InputTypeError(f"{name}: complex tensors cannot be plotted")
        x = x.double().numpy()
    elif hasattr(x, "to_numpy"):  # pandas Series / DataFrame
        x = x.to_numpy()
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputTypeError(
            f"{name} must be numbers (a tensor, numpy array or sequence of floats), got {type(x).__name__}: {e}"
        ) from None
    return arr


def _fmt(v: float, fmt: str = ".4g") -> str:
    return "nan" if v != v else format(v, fmt)


def _check_labels(labels: Optional[Sequence[Any]], n: int, what: str) -> list:
    if labels is None:
        return list(range(n))
    labels = list(labels)
    if len(labels) != n:
        raise InputError(f"{what} has {len(labels)} entries but the data has {n}; give one label per entry")
    return labels


def _text_grid(hover_text: Any, shape: Tuple[int, ...], what: str = "hover_text") -> np.ndarray:
    """hover_text of the same shape as the values (nested lists, arrays, or flat of equal size)."""
    arr = np.array(hover_text, dtype=object)
    if arr.shape == shape:
        return arr
    if arr.size == int(np.prod(shape)):
        return arr.reshape(shape)
    raise InputError(f"{what} has shape {arr.shape} but the values have shape {shape}; give one string per value")


# Layout: every figure gets an explicit size, so titles can be wrapped to fit and tables sized to
# show every row; the top band of ``_MODEBAR_PX`` is kept free for plotly's toolbar (in HTML it
# appears in the top right corner on hover, where a long one-line title used to run under it).
_TITLE_FONT = 15
_FONT = 12
_CHAR_EM = 0.56  # average glyph width of plotly's default font, in font sizes (conservative)
_MODEBAR_PX = 40
_LINE_PX = 20  # a title / annotation line at _TITLE_FONT


def _wrap(text: Any, max_chars: int) -> list:
    """Word-wrap ``text`` into lines of at most ``max_chars`` characters (existing ``<br>`` kept;
    a single word longer than a line stays whole)."""
    out: list = []
    for para in str(text).split("<br>"):
        line = ""
        for word in para.split(" "):
            if line and len(line) + 1 + len(word) > max_chars:
                out.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        out.append(line)
    return out


def _chars(px: float, font: float = _FONT) -> int:
    """How many characters of ``font`` px fit in ``px`` pixels."""
    return max(8, int(px / (font * _CHAR_EM)))


def _set_title(fig: "go.Figure", title: str, width: int, *, extra_top: int = 0) -> int:
    """Wrap ``title`` to the figure's width, put it below the toolbar band and make room for it.

    Returns the top margin (px) it set."""
    lines = _wrap(title, _chars(width - 30, _TITLE_FONT)) if title else []
    top = _MODEBAR_PX + _LINE_PX * len(lines) + 14 + extra_top
    fig.update_layout(
        title=dict(text="<br>".join(lines), x=0, xref="container", xanchor="left", y=1, yref="container",
                   yanchor="top", pad=dict(t=_MODEBAR_PX, l=12), font=dict(size=_TITLE_FONT)),
        margin=dict(t=top),
    )
    return top


def _colorbar(title: str, length_px: float) -> dict:
    """A colour bar whose title runs along its right side, wrapped to the bar's length."""
    return dict(title=dict(text="<br>".join(_wrap(title, _chars(max(length_px, 120)))), side="right"))


def _scale_for(arr: np.ndarray, colorscale: Optional[str], zmid: Optional[float], zmin: Optional[float],
               zmax: Optional[float]) -> Tuple[str, Optional[float], Optional[float], Optional[float]]:
    """Colour scale and limits: signed data (values on both sides of 0, or an explicit ``zmid``) get a
    diverging scale centred on ``zmid`` (default 0) with symmetric limits; other data Viridis."""
    finite = arr[np.isfinite(arr)]
    signed = zmid is not None or (
        colorscale is None and zmin is None and zmax is None and finite.size and finite.min() < 0 < finite.max()
    )
    if not signed:
        return colorscale or "Viridis", None, zmin, zmax
    mid = 0.0 if zmid is None else float(zmid)
    if zmin is not None or zmax is not None:  # explicit limits: widen them to be symmetric about mid
        lo = float(zmin) if zmin is not None else (float(finite.min()) if finite.size else mid)
        hi = float(zmax) if zmax is not None else (float(finite.max()) if finite.size else mid)
        m = max(abs(lo - mid), abs(hi - mid)) or 1.0
        zmin, zmax = mid - m, mid + m
    return colorscale or "RdBu_r", mid, zmin, zmax


def _legend_below_title(fig: "go.Figure", names: Sequence[str], width: int) -> int:
    """Long series names: a horizontal legend between the title and the plot (it would take half the
    width on the right). Returns the extra top margin needed."""
    longest = max((len(str(n)) for n in names), default=0)
    if len(names) <= 1 or longest <= 18:
        return 0
    entry = int((longest + 4) * _FONT * _CHAR_EM)            # text; plotly adds ~40 px for the symbol
    per_row = max(1, int((width - 130) // (entry + 40)))      # the legend is as wide as the plot area
    n_rows = math.ceil(len(names) / per_row)
    fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0, xanchor="left",
                                  entrywidth=entry, entrywidthmode="pixels"))
    return 20 * n_rows + 10


def position_labels(cfg: Union[HookedViTConfig, HookedViT], grid_size: Optional[Tuple[int, int]] = None) -> list:
    """Readable labels for every sequence position: prefix token names, then ``"r,c"`` per patch.

    Args:
        cfg: a :class:`~vit_lens.HookedViTConfig` or a :class:`~vit_lens.HookedViT`.
        grid_size: (rows, cols) of the patch grid if not the model's native one.

    Returns:
        list of ``cfg.n_prefix_tokens + rows * cols`` strings, e.g. ``["CLS", "0,0", "0,1", ...]``.
    """
    config: Any = getattr(cfg, "cfg", cfg)
    rows, cols = grid_size or config.grid_size
    return list(config.prefix_token_names) + [f"{r},{c}" for r in range(rows) for c in range(cols)]


# ---------------------------------------------------------------------------------------------
# lines over layers
# ---------------------------------------------------------------------------------------------
def layer_lines(
    series: Mapping[str, ArrayLike],
    *,
    x_labels: Optional[Sequence[Any]] = None,
    title: str = "",
    yaxis_title: str = "",
    xaxis_title: str = "layer",
    errors: Optional[Mapping[str, ArrayLike]] = None,
    dashed: Sequence[str] = (),
    hover_text: Optional[Mapping[str, Sequence[str]]] = None,
    yrange: Optional[Tuple[float, float]] = None,
    log_y: bool = False,
    hline: Optional[float] = None,
    hline_label: str = "",
    width: int = 760,
    height: int = 420,
) -> "go.Figure":
    """One line per named series over layers.

    Args:
        series: name -> values. Each value is 1-D ``[n_layers]`` (plotted as is) or 2-D
            ``[n_samples, n_layers]`` (plotted as the mean over samples with +-1 std error bars).
            All series must have the same number of layers.
        x_labels: one label per layer (default ``0 .. n_layers - 1``), e.g. ``["embed", 0, 1, ...]``.
        title, yaxis_title, xaxis_title: figure texts.
        errors: name -> ``[n_layers]`` symmetric error bars for some series (overrides the std
            of a 2-D series).
        dashed: names of series drawn with dashed lines (e.g. a random-weights baseline).
        hover_text: name -> ``[n_layers]`` extra hover lines (e.g. the top class name per layer).
        yrange: fixed y-axis range, e.g. ``(0, 1)`` for fractions.
        log_y: a logarithmic y axis. Every value must then be positive (a 0 would not be drawn at
            all: plot ``rank + 1`` instead of a 0-based rank, for example).
        hline, hline_label: a dotted horizontal reference line (e.g. the chance level) and its label.
        width, height: figure size in pixels (the plot area; the title and a legend of long names
            add their own height).

    Returns:
        a plotly Figure with one ``Scatter`` trace per series, in the order given.
    """
    go = _go()
    if not isinstance(series, Mapping) or not series:
        raise InputTypeError(
            "series must be a non-empty mapping name -> values, e.g. {'[CLS]': cls_values, 'image tokens': img_values}"
        )
    errors = dict(errors or {})
    hover_text = dict(hover_text or {})
    unknown = (set(errors) | set(hover_text) | set(dashed)) - set(series)
    if unknown:
        raise InputError(f"errors/hover_text/dashed name series that are not in `series`: {sorted(map(str, unknown))}")
    fig = go.Figure()
    n_layers = None
    for name, values in series.items():
        arr = _as_array(values, f"series[{name!r}]")
        err = None
        if arr.ndim == 2:
            err = arr.std(axis=0) if arr.shape[0] > 1 else None
            arr = arr.mean(axis=0)
        elif arr.ndim != 1:
            raise InputError(
                f"series[{name!r}] must be [n_layers] or [n_samples, n_layers], got shape {arr.shape}"
            )
        if n_layers is None:
            n_layers = arr.shape[0]
            x = _check_labels(x_labels, n_layers, "x_labels")
        elif arr.shape[0] != n_layers:
            raise InputError(
                f"series[{name!r}] has {arr.shape[0]} layers but the first series has {n_layers}; "
                "all series must cover the same layers"
            )
        if name in errors:
            err = _as_array(errors[name], f"errors[{name!r}]")
            if err.shape != arr.shape:
                raise InputError(f"errors[{name!r}] has shape {err.shape}, expected {arr.shape}")
        if log_y and (arr[np.isfinite(arr)] <= 0).any():
            raise InputError(
                f"series[{name!r}] has values <= 0, which a log axis cannot draw (they would silently "
                "disappear); shift them (e.g. rank + 1, so that 1 = top) or use log_y=False"
            )
        text = [f"{name}<br>{xaxis_title or 'x'} {xl}: {_fmt(v)}" for xl, v in zip(x, arr)]
        if err is not None:
            text = [t + f" ± {_fmt(e, '.3g')}" for t, e in zip(text, err)]
        if name in hover_text:
            more = list(hover_text[name])
            if len(more) != n_layers:
                raise InputError(f"hover_text[{name!r}] has {len(more)} entries, expected {n_layers}")
            text = [f"{t}<br>{e}" for t, e in zip(text, more)]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=arr,
                name=str(name),
                mode="lines+markers",
                line=dict(dash="dash" if name in dashed else "solid"),
                error_y=dict(type="data", array=err, visible=True) if err is not None else None,
                text=text,
                hovertemplate="%{text}<extra></extra>",
            )
        )
    fig.update_layout(
        xaxis_title=xaxis_title, yaxis_title=yaxis_title, hovermode="closest", template="plotly_white",
        width=int(width), margin=dict(l=70, r=20, b=60),
    )
    extra = _legend_below_title(fig, [str(n) for n in series], int(width))
    top = _set_title(fig, title, int(width), extra_top=extra)
    fig.update_layout(height=int(height) + top - 60 + (0 if extra else 0))
    if x_labels is not None and any(isinstance(v, str) for v in x):
        fig.update_xaxes(type="category")
    if log_y:
        fig.update_yaxes(type="log")
    if yrange is not None:
        fig.update_yaxes(range=[math.log10(v) for v in yrange] if log_y else list(yrange))
    if hline is not None:
        fig.add_hline(y=float(hline), line_dash="dot", line_color="#666",
                      annotation_text=hline_label, annotation_position="top right")
    return fig


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _image_to_uint8(
    image: Any, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> np.ndarray:
    """PIL image / uint8 array or tensor (HWC or CHW) / float tensor [3, H, W] -> uint8 [H, W, 3]."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if hasattr(image, "detach"):
        image = image.detach().to("cpu")
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        image = image.numpy() if not image.is_floating_point() else image.double().numpy()
    if not isinstance(image, np.ndarray):
        raise InputTypeError(
            f"image must be a PIL image, a uint8 array [H, W, 3], or a normalised tensor [3, H, W]; "
            f"got {type(image).__name__}"
        )
    arr = image
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3:
        raise InputError(f"image must be [H, W, C] or [C, H, W], got shape {arr.shape}")
    channels_first = arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3)
    if channels_first:
        arr = np.transpose(arr, (1, 2, 0))
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise InputError(f"image must have 1 or 3 channels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    arr = arr.astype(np.float64)
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise InputError("give both mean and std to undo the normalisation (e.g. model.data_config['mean'/'std'])")
        arr = arr * np.asarray(std, dtype=np.float64) + np.asarray(mean, dtype=np.float64)
    elif arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise InputError(
            "the image is a float array outside [0, 1], so it looks normalised; pass mean= and std= to undo "
            "the normalisation, e.g. token_heatmap(v, images[0], mean=model.data_config['mean'], "
            "std=model.data_config['std'])"
        )
    return np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)


def _png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _token_grid(values: Any, grid_size: Optional[Tuple[int, int]]) -> np.ndarray:
    arr = _as_array(values, "values")
    if arr.ndim == 2:
        if grid_size is not None and tuple(grid_size) != arr.shape:
            raise InputError(f"values have shape {arr.shape} but grid_size={tuple(grid_size)}")
        return arr
    if arr.ndim != 1:
        raise InputError(
            f"values must be one number per patch, [n_patches] or [rows, cols]; got shape {arr.shape}. "
            "For a batch, plot one image at a time (values[i])."
        )
    n = arr.shape[0]
    if grid_size is not None:
        rows, cols = grid_size
        if rows * cols != n:
            raise InputError(
                f"values have {n} entries but grid_size={tuple(grid_size)} has {rows * cols} patches; "
                "drop the prefix tokens first (values[model.cfg.n_prefix_tokens:])"
            )
        return arr.reshape(rows, cols)
    side = math.isqrt(n)
    if side * side != n:
        hint = ""
        for k in (1, 2, 5):  # common prefix counts: [CLS]; [CLS]+dist; [CLS]+4 registers
            if n > k and math.isqrt(n - k) ** 2 == n - k:
                hint = f" (it looks like {k} prefix token(s) are included: use values[{k}:])"
                break
        raise InputError(
            f"values have {n} entries, which is not a square grid{hint}; pass grid_size=(rows, cols) "
            "or a [rows, cols] tensor, and only patch tokens (values[model.cfg.n_prefix_tokens:])"
        )
    return arr.reshape(side, side)


def token_heatmap(
    values: ArrayLike,
    image: Any = None,
    *,
    grid_size: Optional[Tuple[int, int]] = None,
    opacity: float = 0.5,
    title: str = "",
    hover_text: Optional[Sequence[Any]] = None,
    colorscale: Optional[str] = None,
    zmid: Optional[float] = None,
    zmin: Optional[float] = None,
    zmax: Optional[float] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    colorbar_title: str = "value",
    width: int = 560,
) -> "go.Figure":
    """A per-patch quantity on the token grid, upsampled to the image and overlaid on it.

    Each patch's value fills exactly its patch of the image (nearest-neighbour upsampling: no
    smoothing that would invent structure). Works for any grid and image size.

    Args:
        values: one value per patch token, ``[n_patches]`` (row-major, prefix tokens already
            dropped) or ``[rows, cols]``.
        image: the image the model saw: a PIL image, a uint8 array ``[H, W, 3]`` / ``[3, H, W]``,
            or a float tensor ``[3, H, W]`` / ``[1, 3, H, W]`` normalised with ``mean``/``std``
            (e.g. ``model.preprocess(img)[0]`` with ``mean=model.data_config["mean"]``,
            ``std=model.data_config["std"]``); float images in [0, 1] need no mean/std.
            ``None`` draws the grid alone.
        grid_size: ``(rows, cols)`` for a flat ``values`` that is not a square grid.
        opacity: heatmap opacity over the image (1 hides the image).
        title: figure title.
        hover_text: one extra hover string per patch (``[n_patches]`` or ``[rows, cols]``), e.g.
            the top class name of each patch token.
        colorscale: plotly colour scale (default: the diverging ``"RdBu_r"`` centred on ``zmid``
            when ``zmid`` is set or the values have both signs, else ``"Viridis"``).
        zmid, zmin, zmax: colour-scale midpoint / limits (signed values are centred on 0 by
            default, with symmetric limits).
        mean, std: the normalisation to undo for a normalised float image.
        colorbar_title: label of the colour bar (what the values are).
        width: figure width in pixels (the height follows from the image's aspect ratio).

    Returns:
        a Figure whose last trace is a ``Heatmap`` with ``z`` = the ``[rows, cols]`` values (row 0
        at the top), preceded by an ``Image`` trace when ``image`` is given.
    """
    go = _go()
    grid = _token_grid(values, grid_size)
    rows, cols = grid.shape
    if not 0.0 <= float(opacity) <= 1.0:
        raise InputError(f"opacity must be in [0, 1], got {opacity}")
    texts = np.empty((rows, cols), dtype=object)
    extra = _text_grid(hover_text, (rows, cols)) if hover_text is not None else None
    for r in range(rows):
        for c in range(cols):
            t = f"patch {r * cols + c} (row {r}, col {c})<br>value: {_fmt(grid[r, c])}"
            if extra is not None:
                t += f"<br>{extra[r, c]}"
            texts[r, c] = t
    fig = go.Figure()
    if image is not None:
        rgb = _image_to_uint8(image, mean, std)
        H, W = rgb.shape[:2]
        fig.add_trace(go.Image(source=_png_data_uri(rgb), hoverinfo="skip", name="image"))
        # go.Image puts pixel centres at 0..W-1, so the image spans [-0.5, W - 0.5].
        dx, dy = W / cols, H / rows
        x0, y0 = -0.5 + dx / 2, -0.5 + dy / 2
    else:
        H, W = rows, cols
        dx = dy = 1.0
        x0 = y0 = 0.0
    colorscale, zmid, zmin, zmax = _scale_for(grid, colorscale, zmid, zmin, zmax)
    plot_w = int(width) - 20 - 90                       # margins and colour bar
    plot_h = plot_w * H / W
    fig.add_trace(
        go.Heatmap(
            z=grid,
            x0=x0,
            dx=dx,
            y0=y0,
            dy=dy,
            opacity=float(opacity) if image is not None else 1.0,
            colorscale=colorscale,
            zmid=zmid,
            zmin=zmin,
            zmax=zmax,
            text=texts,
            hovertemplate="%{text}<extra></extra>",
            colorbar=_colorbar(colorbar_title, plot_h),
            name="values",
        )
    )
    lo_x, hi_x = (-0.5, W - 0.5) if image is not None else (-0.5, cols - 0.5)
    lo_y, hi_y = (-0.5, H - 0.5) if image is not None else (-0.5, rows - 0.5)
    fig.update_xaxes(range=[lo_x, hi_x], showgrid=False, zeroline=False, showticklabels=False, constrain="domain")
    fig.update_yaxes(
        range=[hi_y, lo_y], showgrid=False, zeroline=False, showticklabels=False, scaleanchor="x", constrain="domain"
    )
    fig.update_layout(template="plotly_white", width=int(width), margin=dict(l=10, r=10, b=30))
    top = _set_title(fig, title, int(width))
    fig.update_layout(height=int(top + plot_h + 30))
    return fig


# ---------------------------------------------------------------------------------------------
# 2-D grids
# ---------------------------------------------------------------------------------------------
def grid_heatmap(
    values: ArrayLike,
    *,
    x_labels: Optional[Sequence[Any]] = None,
    y_labels: Optional[Sequence[Any]] = None,
    title: str = "",
    hover_text: Optional[Sequence[Any]] = None,
    zmid: Optional[float] = None,
    colorscale: Optional[str] = None,
    xaxis_title: str = "",
    yaxis_title: str = "",
    zmin: Optional[float] = None,
    zmax: Optional[float] = None,
    colorbar_title: str = "value",
    width: Optional[int] = None,
    height: Optional[int] = None,
) -> "go.Figure":
    """A 2-D grid such as layer x head or layer x position.

    Args:
        values: ``[rows, cols]``, e.g. ``[n_layers, n_heads]``; row 0 is drawn at the top.
        x_labels: one label per column (default ``0 .. cols - 1``); e.g. ``position_labels(model)``.
        y_labels: one label per row (default ``0 .. rows - 1``).
        title, xaxis_title, yaxis_title, colorbar_title: figure texts.
        hover_text: one extra hover string per cell (``[rows, cols]``), e.g. the class a head
            writes most.
        zmid: colour-scale midpoint (``0`` for signed quantities such as logit attributions).
        colorscale: plotly colour scale (default: the diverging ``"RdBu_r"`` centred on ``zmid``
            when ``zmid`` is set or the values have both signs, else ``"Viridis"``).
        zmin, zmax: colour-scale limits (widened to be symmetric about the midpoint for signed data).
        width, height: figure size in pixels (default: from the number of columns and rows).

    Returns:
        a Figure with one ``Heatmap`` trace whose ``z`` is ``values``.
    """
    go = _go()
    arr = _as_array(values, "values")
    if arr.ndim != 2:
        raise InputError(
            f"values must be a 2-D grid [rows, cols] (e.g. [n_layers, n_heads]), got shape {arr.shape}; "
            "average or select over the other axes first"
        )
    rows, cols = arr.shape
    xl = [str(v) for v in _check_labels(x_labels, cols, "x_labels")]
    yl = [str(v) for v in _check_labels(y_labels, rows, "y_labels")]
    if len(set(xl)) != len(xl) or len(set(yl)) != len(yl):
        raise InputError("x_labels and y_labels must be unique (plotly merges equal category labels)")
    extra = _text_grid(hover_text, (rows, cols)) if hover_text is not None else None
    xt, yt = xaxis_title or "x", yaxis_title or "y"
    texts = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            t = f"{yt} {yl[r]}, {xt} {xl[c]}<br>value: {_fmt(arr[r, c])}"
            if extra is not None:
                t += f"<br>{extra[r, c]}"
            texts[r, c] = t
    colorscale, zmid, zmin, zmax = _scale_for(arr, colorscale, zmid, zmin, zmax)
    longest_x = max((len(v) for v in xl), default=1)
    width = int(width) if width is not None else int(min(1100, max(620, 200 + cols * max(18, 7 * longest_x))))
    plot_h = int(height) - 160 if height is not None else int(min(760, max(260, 26 * rows)))
    fig = go.Figure(
        go.Heatmap(
            z=arr,
            x=xl,
            y=yl,
            zmid=zmid,
            zmin=zmin,
            zmax=zmax,
            colorscale=colorscale,
            text=texts,
            hovertemplate="%{text}<extra></extra>",
            colorbar=_colorbar(colorbar_title, plot_h),
        )
    )
    # category ticks: plotly thins crowded ones itself; long labels are kept horizontal when they fit
    fig.update_xaxes(type="category", title=xaxis_title, automargin=True,
                     tickangle=0 if cols * 7 * longest_x < width - 200 else -90)
    fig.update_yaxes(type="category", title=yaxis_title, autorange="reversed", automargin=True)
    fig.update_layout(template="plotly_white", width=width, margin=dict(l=70, r=20, b=60))
    top = _set_title(fig, title, width)
    bottom = 60 + (7 * min(longest_x, 12) if cols * 7 * longest_x >= width - 200 else 0)
    fig.update_layout(height=int(height) if height is not None else top + plot_h + bottom, margin=dict(b=bottom))
    return fig


# ---------------------------------------------------------------------------------------------
# top-k classes
# ---------------------------------------------------------------------------------------------
def topk_table(
    scores: Any,
    *,
    k: int = 5,
    class_names: Optional[Sequence[str]] = None,
    row_labels: Optional[Sequence[Any]] = None,
    title: str = "",
    highlight: Optional[int] = None,
    value_format: str = ".2f",
    row_header: str = "layer",
) -> "go.Figure":
    """The top-k classes of each row (e.g. each layer's projection onto class space) as a table.

    Args:
        scores: either ``[rows, n_classes]`` scores (logits, probabilities, ...), from which the
            top ``k`` are taken, or a ``(values, indices)`` pair of ``[rows, k]`` tensors such as
            the result of ``torch.topk(scores, k)``. A 1-D ``[n_classes]`` is one row.
        k: how many classes per row (ignored for a ``(values, indices)`` pair).
        class_names: names indexed by class (e.g. ``model.class_names``); default ``"class i"``.
        row_labels: one label per row (default ``0 .. rows - 1``).
        title: figure title.
        highlight: a class index (e.g. the true label) whose cells are shaded.
        value_format: format spec for the scores shown beside the names.
        row_header: header of the label column.

    Returns:
        a Figure with one ``Table`` trace: the label column, then one column per rank with
        cells ``"<class name> (<score>)"``.
    """
    go = _go()
    if isinstance(scores, tuple) and len(scores) == 2:
        vals, idx = _as_array(scores[0], "values"), np.array(_as_array(scores[1], "indices"), dtype=np.int64)
        if vals.ndim == 1:
            vals, idx = vals[None], idx[None]
        if vals.shape != idx.shape or vals.ndim != 2:
            raise InputError(f"(values, indices) must both be [rows, k]; got {vals.shape} and {idx.shape}")
        n_classes = None
    else:
        arr = _as_array(scores, "scores")
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise InputError(f"scores must be [rows, n_classes] (e.g. [n_layers, n_classes]), got shape {arr.shape}")
        n_classes = arr.shape[1]
        if not 1 <= k <= n_classes:
            raise InputError(f"k must be in 1..{n_classes} (the number of classes), got {k}")
        idx = np.argsort(-arr, axis=1, kind="stable")[:, :k]
        vals = np.take_along_axis(arr, idx, axis=1)
    rows, kk = idx.shape
    if class_names is not None:
        class_names = list(class_names)
        if n_classes is not None and len(class_names) != n_classes:
            raise InputError(f"{len(class_names)} class_names for {n_classes} classes")
        if idx.size and idx.max() >= len(class_names):
            raise InputError(f"class index {idx.max()} is out of range for {len(class_names)} class_names")
    name = (lambda i: class_names[i]) if class_names is not None else (lambda i: f"class {i}")
    labels = [str(v) for v in _check_labels(row_labels, rows, "row_labels")]
    columns = [labels]
    fills = [["white"] * rows]
    for j in range(kk):
        columns.append([f"{name(int(idx[r, j]))} ({_fmt(vals[r, j], value_format)})" for r in range(rows)])
        fills.append(["#fde7a9" if highlight is not None and int(idx[r, j]) == highlight else "white" for r in range(rows)])
    header = [row_header] + [f"top {j + 1}" for j in range(kk)]
    # Column widths from the text; plotly wraps long cells itself, so the rows' heights are estimated
    # from a word wrap at a conservative glyph width: the figure is tall enough to show every row.
    px = _FONT * _CHAR_EM
    def width_for(texts: Sequence[str], lo: int, hi: int) -> int:
        longest = max((len(w) for t in texts for w in str(t).split(" ")), default=4)
        total = max((len(str(t)) for t in texts), default=4)
        return int(min(hi, max(lo, px * max(longest, min(total, 28)) + 18)))
    widths = [width_for(labels + [row_header], 60, 190)] + [width_for(c, 150, 220) for c in columns[1:]]
    wrapped = [[_wrap(t, _chars(w - 16)) for t in col] for col, w in zip(columns, widths)]
    head_lines = max(len(_wrap(h, _chars(w - 16))) for h, w in zip(header, widths))
    row_lines = [max(len(col[r]) for col in wrapped) for r in range(rows)]
    row_px = [20 if n == 1 else 16 * n + 14 for n in row_lines]
    head_px = 24 if head_lines == 1 else 16 * head_lines + 14
    fig_w = sum(widths) + 20
    fig = go.Figure(
        go.Table(
            header=dict(values=header, fill_color="#e8eef7", align="left", height=24, font=dict(size=_FONT)),
            cells=dict(values=columns, fill_color=fills, align="left", height=20, font=dict(size=_FONT)),
            columnwidth=widths,
        )
    )
    fig.update_layout(width=fig_w, margin=dict(l=10, r=10, b=10))
    top = _set_title(fig, title, fig_w)
    fig.update_layout(height=top + head_px + sum(row_px) + 10 + 8)
    return fig


# ---------------------------------------------------------------------------------------------
# bars
# ---------------------------------------------------------------------------------------------
def bars(
    values: Any,
    *,
    labels: Optional[Sequence[Any]] = None,
    errors: Optional[Mapping[str, ArrayLike]] = None,
    title: str = "",
    yaxis_title: str = "",
    xaxis_title: str = "",
    hover_text: Optional[Mapping[str, Sequence[str]]] = None,
    baseline: Optional[float] = None,
    baseline_label: str = "baseline",
    horizontal: bool = False,
    width: int = 760,
) -> "go.Figure":
    """Grouped bars, e.g. accuracy or target-class probability under different knockouts.

    Args:
        values: a mapping series name -> ``[n_bars]`` values, a single ``[n_bars]`` sequence /
            tensor, or a pandas DataFrame (index = bar labels, one series per column).
        labels: one label per bar position (default: the DataFrame index, else ``0 .. n_bars - 1``).
        errors: series name -> ``[n_bars]`` symmetric error bars.
        title, yaxis_title, xaxis_title: figure texts.
        hover_text: series name -> ``[n_bars]`` extra hover lines (e.g. class names).
        baseline: draw a horizontal reference line at this value (e.g. the clean accuracy).
        baseline_label: its annotation.
        horizontal: draw horizontal bars (long labels).
        width: figure width in pixels (the height follows from the number of bars).

    Returns:
        a Figure with one ``Bar`` trace per series.
    """
    go = _go()
    if hasattr(values, "columns") and hasattr(values, "index"):  # DataFrame
        if labels is None:
            labels = [str(v) for v in values.index]
        series = {str(c): values[c].to_numpy() for c in values.columns}
    elif isinstance(values, Mapping):
        series = dict(values)
    else:
        series = {"": values}
    if not series:
        raise InputError("values is empty")
    errors = dict(errors or {})
    hover_text = dict(hover_text or {})
    unknown = (set(errors) | set(hover_text)) - set(series)
    if unknown:
        raise InputError(f"errors/hover_text name series that are not in `values`: {sorted(map(str, unknown))}")
    fig = go.Figure()
    n = None
    for name, v in series.items():
        arr = _as_array(v, f"values[{name!r}]" if name else "values")
        if arr.ndim != 1:
            raise InputError(f"each series must be 1-D [n_bars], got shape {arr.shape} for {name!r}")
        if n is None:
            n = arr.shape[0]
            cats = [str(c) for c in _check_labels(labels, n, "labels")]
        elif arr.shape[0] != n:
            raise InputError(f"series {name!r} has {arr.shape[0]} bars, the first has {n}")
        err = None
        if name in errors:
            err = _as_array(errors[name], f"errors[{name!r}]")
            if err.shape != arr.shape:
                raise InputError(f"errors[{name!r}] has shape {err.shape}, expected {arr.shape}")
        text = [(f"{name}<br>" if name else "") + f"{c}: {_fmt(x)}" for c, x in zip(cats, arr)]
        if name in hover_text:
            more = list(hover_text[name])
            if len(more) != n:
                raise InputError(f"hover_text[{name!r}] has {len(more)} entries, expected {n}")
            text = [f"{t}<br>{e}" for t, e in zip(text, more)]
        kw = dict(x=arr, y=cats, orientation="h") if horizontal else dict(x=cats, y=arr)
        err_kw = dict(type="data", array=err, visible=True) if err is not None else None
        fig.add_trace(
            go.Bar(
                **kw,
                name=str(name),
                hovertext=text,
                hoverinfo="text",
                **({"error_x": err_kw} if horizontal else {"error_y": err_kw}),
            )
        )
    if baseline is not None:
        if horizontal:
            fig.add_vline(x=float(baseline), line_dash="dot", annotation_text=baseline_label)
        else:
            fig.add_hline(y=float(baseline), line_dash="dot", annotation_text=baseline_label)
    fig.update_layout(
        barmode="group", template="plotly_white", showlegend=len(series) > 1,
        xaxis_title=yaxis_title if horizontal else xaxis_title,
        yaxis_title=xaxis_title if horizontal else yaxis_title,
        width=int(width), margin=dict(l=70, r=20, b=60),
    )
    extra = _legend_below_title(fig, [str(n) for n in series], int(width)) if len(series) > 1 else 0
    if len(series) > 1 and not extra:
        fig.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0, xanchor="left"))
        extra = 28
    top = _set_title(fig, title, int(width), extra_top=extra)
    if horizontal:
        fig.update_yaxes(type="category", autorange="reversed", automargin=True)
        plot_h = max(240, cast(int, n) * (18 * len(series) + 14))  # n: the bars of the first series
    else:
        fig.update_xaxes(type="category", automargin=True)
        plot_h = 340
    fig.update_layout(height=top + plot_h + 70)
    return fig


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def _plotlyjs_option(plotlyjs: str) -> Union[bool, str]:
    if plotlyjs not in ("inline", "cdn"):
        raise InputError(f"plotlyjs must be 'inline' (the file works offline) or 'cdn' (a small file that loads "
                         f"plotly.js from the internet), got {plotlyjs!r}")
    return True if plotlyjs == "inline" else "cdn"


def save_html(fig: "go.Figure", path: Union[str, os.PathLike], *, plotlyjs: str = "inline") -> Path:
    """Write ``fig`` as one standalone HTML file.

    Args:
        fig: a plotly Figure (any function of this module returns one).
        path: the file to write (``.html`` is appended if there is no suffix); parent folders
            are created.
        plotlyjs: ``"inline"`` (default: plotly.js, about 4.7 MB, is written into the file, which
            then opens offline) or ``"cdn"`` (a small file that loads plotly.js from the internet).

    Returns:
        the absolute path written.
    """
    if not hasattr(fig, "write_html"):
        raise InputTypeError(f"save_html expects a plotly Figure, got {type(fig).__name__}")
    include = _plotlyjs_option(plotlyjs)
    path = Path(path).expanduser()
    if not path.suffix:
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=include, full_html=True, config=dict(displaylogo=False))
    return path.resolve()


# Static export (PNG / SVG / PDF) is plotly's own, through kaleido, which drives a Chromium-based
# browser found on the machine (Debian / Ubuntu: `apt-get install chromium`). One headless browser
# is started on first use and kept for the process (later figures take a fraction of a second).
_BROWSER_CANDIDATES = (
    "/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium", "/usr/lib/chromium-browser/chromium-browser",
    "/snap/bin/chromium", "/usr/bin/google-chrome", "/usr/bin/google-chrome-stable", "/opt/google/chrome/chrome",
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
)
_INSTALL_BROWSER = (
    "install a Chromium-based browser: `sudo apt-get install chromium` (Debian / Ubuntu), "
    "`brew install --cask chromium` (macOS), or `plotly_get_chrome` (downloads one for plotly); "
    "or point BROWSER_PATH at an existing Chrome / Chromium"
)
_export_state: dict = {}


def find_browser() -> Optional[str]:
    """The Chrome / Chromium executable static export will use, or ``None`` when there is none.

    Looks where kaleido looks (``BROWSER_PATH``, the ``PATH``, the usual install folders, a
    browser downloaded by ``plotly_get_chrome``), then in the folders Debian, Ubuntu (snap) and
    macOS install Chromium to; a browser found only there is handed to kaleido via ``BROWSER_PATH``
    (in this process only), so no variable needs to be set by hand.
    """
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if Path(env).is_file() else None
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
    except Exception:  # pragma: no cover  (choreographer missing or changed: fall back to the list)
        found = None
    if found:
        return str(found)
    for cand in _BROWSER_CANDIDATES:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            os.environ["BROWSER_PATH"] = cand
            return cand
    return None


def static_export_problem() -> Optional[str]:
    """Why static export (:func:`save_image`, :func:`to_image`) cannot run here, or ``None`` when it can."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return ("static export needs plotly's kaleido: pip install 'vit_lens[static]' (or pip install 'kaleido>=1'), "
                "and a Chromium-based browser")
    if find_browser() is None:
        return f"static export needs a Chrome / Chromium browser and none was found: {_INSTALL_BROWSER}"
    return None


def _check_static_export() -> None:
    from vit_lens.core.errors import MissingFileError

    problem = static_export_problem()
    if problem is not None:
        raise MissingFileError(problem)


def to_image(fig: "go.Figure", *, format: str = "png", scale: float = 1.0, width: Optional[int] = None,
             height: Optional[int] = None) -> bytes:
    """``fig`` drawn by plotly's static export (kaleido + a headless Chromium): the bytes of a
    ``"png"``, ``"svg"``, ``"pdf"``, ``"jpeg"`` or ``"webp"`` file.

    Args:
        fig: a plotly Figure.
        format: the file format.
        scale: pixel density (2 gives a sharp PNG on high-resolution screens).
        width, height: size in layout pixels (default: the figure's own; vit_lens figures set theirs).

    Raises:
        MissingFileError: kaleido or a browser is missing; the message says how to install them.
    """
    if not hasattr(fig, "to_dict"):
        raise InputTypeError(f"expected a plotly Figure, got {type(fig).__name__}")
    fmt = {"jpg": "jpeg"}.get(format.lower().lstrip("."), format.lower().lstrip("."))
    if fmt not in ("png", "svg", "pdf", "jpeg", "webp"):
        raise InputError(f"format must be one of png, svg, pdf, jpeg, webp; got {format!r}")
    _check_static_export()
    import warnings

    import kaleido
    import plotly.io as pio

    if not _export_state.get("server"):
        kaleido.start_sync_server(silence_warnings=True)   # one browser for the whole process
        _export_state["server"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "kopts ignored when using a server": plotly's defaults only
        try:
            return pio.to_image(fig, format=fmt, scale=scale, width=width, height=height)
        except Exception as e:
            from vit_lens.core.errors import VitLensError

            raise VitLensError(f"static export failed in the browser ({type(e).__name__}: {e}); check that "
                               f"{find_browser()} starts (`{find_browser()} --headless --version`), or "
                               f"{_INSTALL_BROWSER}") from e


def save_image(fig: "go.Figure", path: Union[str, os.PathLike], *, scale: float = 2.0,
               width: Optional[int] = None, height: Optional[int] = None) -> Path:
    """Write ``fig`` as a static picture; the format follows the suffix (``.png``, ``.svg``,
    ``.pdf``, ``.jpg``, ``.webp``; none: ``.png``). Parent folders are created.

    Uses plotly's own static export (kaleido with the Chrome / Chromium found on the machine,
    see :func:`find_browser`). Where there is none, raises
    :class:`~vit_lens.core.errors.MissingFileError` saying how to install one.

    Returns:
        the absolute path written.
    """
    path = Path(path).expanduser()
    if not path.suffix:
        path = path.with_suffix(".png")
    data = to_image(fig, format=path.suffix, scale=scale if path.suffix.lower() not in (".svg", ".pdf") else 1.0,
                    width=width, height=height)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.resolve()


def _compact_png_renderer():
    """plotly's PNG renderer, with the PNG reduced to at most 256 colours (lossless for line charts
    and tables; photos under a heat map keep their look at a fifth of the size), so that a notebook
    holding many figures stays small."""
    from plotly.io.base_renderers import MimetypeRenderer

    class CompactPng(MimetypeRenderer):
        def to_mimebundle(self, fig_dict):
            from PIL import Image

            go = _go()
            raw = to_image(go.Figure(fig_dict), format="png", scale=1)
            im = Image.open(io.BytesIO(raw)).convert("RGB")
            q = im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
            buf = io.BytesIO()
            q.save(buf, format="PNG", optimize=True)
            data = min(raw, buf.getvalue(), key=len)
            return {"image/png": base64.b64encode(data).decode("ascii")}

    return CompactPng()


def notebook_renderer(*, png: bool = True) -> str:
    """Set plotly's notebook renderer so that every ``fig.show()`` also stores a PNG of the figure.

    With ``png=True`` and static export available, figures are shown as the interactive plotly output
    plus a PNG (at most 256 colours, to keep notebooks small):
    interactive in JupyterLab / VS Code, and a static PNG in the saved notebook that GitHub and
    nbviewer display. Without a browser it falls back to the interactive output alone and says why
    (one line). Returns the renderer set.
    """
    import plotly.io as pio

    problem = static_export_problem() if png else None
    if png and problem is None:
        pio.renderers["vit_lens_png"] = _compact_png_renderer()
        name = "plotly_mimetype+vit_lens_png"
        if not _export_state.get("server"):
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)
            _export_state["server"] = True
        import warnings

        # plotly passes its (empty) defaults to the server, which warns on every figure
        warnings.filterwarnings("ignore", message="The kopts argument is ignored")
    else:
        name = "plotly_mimetype"
        if problem is not None:
            print(f"vit_lens.plot: figures are interactive only (no PNG copies): {problem}")
    pio.renderers.default = name
    return name


# ---------------------------------------------------------------------------------------------
# figures for analysis results (thin wrappers over the generic figures above)
# ---------------------------------------------------------------------------------------------
def _require(obj: Any, attrs: Sequence[str], what: str) -> None:
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        raise InputTypeError(f"expected {what}, got {type(obj).__name__} (it lacks {', '.join(missing)})")


def _identifiability_groups(result: Any) -> list:
    """(label, positions) pairs: every prefix token by name, then all image tokens."""
    names = list(result.prefix_token_names)
    groups: List[Tuple[str, Any]] = [(f"[{n}]", [i]) for i, n in enumerate(names)]
    if result.rank.shape[2] > result.n_prefix_tokens:
        groups.append(("image tokens", "image"))
    return groups


def identifiability_lines(
    result: "IdentifiabilityResult",
    random: Optional["IdentifiabilityResult"] = None,
    *,
    metric: str = "top1_rate",
    title: Optional[str] = None,
    labels: Tuple[str, str] = ("model", "random twin"),
    chance: bool = True,
) -> "go.Figure":
    """Class identifiability per layer: each prefix token ([CLS], ...) vs the image tokens,
    the model vs a random twin (dashed).

    Args:
        result: :func:`vit_lens.class_space.identifiability` / ``identify`` of the model.
        random: the same measured on a random-weights twin
            (:func:`vit_lens.class_space.random_twin`), drawn dashed.
        metric: ``"top1_rate"`` (share of tokens whose target class is top-1, pooled over images)
            or ``"mean_r"`` (mean identifiability ``1 - rank / n_classes``).
        title: figure title (a default names the metric and the hook).
        labels: legend prefixes for the model and the twin.
        chance: draw the chance level as a dotted line: ``0.5`` for ``mean_r`` (the mean of ``r``
            when the target's rank is uniformly random), ``1 / n_classes`` for ``top1_rate``.

    Returns:
        a :func:`layer_lines` figure, y in [0, 1], one line per token group and model; the hover
        text of each point also gives the other metric.
    """
    if metric not in ("top1_rate", "mean_r"):
        raise InputError(f"metric must be 'top1_rate' or 'mean_r', got {metric!r}")
    series, hover, dashed = {}, {}, []
    x_labels = None
    for res, label in ((result, labels[0]), (random, labels[1])):
        if res is None:
            continue
        _require(res, ("rank", "layers", "n_classes", "prefix_token_names", "n_prefix_tokens", "hook"),
                 "an IdentifiabilityResult (vit_lens.class_space.identifiability)")
        if x_labels is None:
            x_labels = list(res.layers)
        elif list(res.layers) != x_labels:
            raise InputError(f"result and random cover different layers: {x_labels} vs {list(res.layers)}")
        rank = res.rank  # [layer, batch, pos]
        for group, pos in _identifiability_groups(res):
            sel = rank[:, :, pos] if pos != "image" else rank[:, :, res.n_prefix_tokens:]
            rate = (sel == 0).double().mean(dim=(1, 2))
            mean_r = (1.0 - sel.double() / res.n_classes).mean(dim=(1, 2))
            name = f"{label}: {group}"
            series[name] = rate if metric == "top1_rate" else mean_r
            hover[name] = [f"top-1 rate {a:.3f}, mean r {b:.3f}, {sel.shape[1]} images"
                           for a, b in zip(rate.tolist(), mean_r.tolist())]
            if res is random:
                dashed.append(name)
    what = "share of tokens whose target class is top-1" if metric == "top1_rate" else "mean class identifiability r"
    level = (0.5 if metric == "mean_r" else 1.0 / result.n_classes) if chance else None
    fig = layer_lines(
        series,
        x_labels=x_labels,
        dashed=dashed,
        hover_text=hover,
        yrange=(0, 1.02),
        title=title if title is not None else f"Class identifiability per block ({result.hook})",
        yaxis_title=what,
        xaxis_title="block",
        hline=level,
        hline_label=("chance: 0.5" if metric == "mean_r" else f"chance: 1/{result.n_classes}") if chance else "",
    )
    # one colour per token group, the same for the model and its twin (which is dashed)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
    groups: list = []
    for tr in fig.data:
        g = str(tr.name).split(": ", 1)[-1]
        if g not in groups:
            groups.append(g)
        tr.line.color = palette[groups.index(g) % len(palette)]
    return fig


def identifiability_map(
    result: "IdentifiabilityResult",
    image: Any = None,
    *,
    layer: int = -1,
    index: int = 0,
    class_names: Optional[Sequence[str]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    opacity: float = 0.5,
    grid_size: Optional[Tuple[int, int]] = None,
    title: Optional[str] = None,
    zmin: Optional[float] = None,
) -> "go.Figure":
    """Class identifiability ``r = 1 - rank / n_classes`` of every image token of one image at one
    layer, over the image (1 = the target class is the token's top-1 class).

    Args:
        result: an :class:`~vit_lens.class_space.IdentifiabilityResult`.
        image: the image the model saw (see :func:`token_heatmap`), or the whole normalised batch
            ``[batch, 3, H, W]`` the result was measured on (then ``image[index]`` is drawn); give
            ``mean``/``std`` from ``model.data_config`` for normalised tensors.
        layer: position along ``result.layers`` (``-1``: the last one measured).
        index: which image of the batch.
        class_names: e.g. ``model.class_names``, to name the target class in the title and hover.
        mean, std, opacity, grid_size, title: as in :func:`token_heatmap`.
        zmin: bottom of the colour scale (the top is 1). Default: the smallest value shown, as
            most tokens of a trained model rank the target high (``r`` close to 1); ``0`` gives
            the full range.

    Returns:
        a :func:`token_heatmap` figure; hover gives each token's rank of the target class.
    """
    _require(result, ("rank", "layers", "n_classes", "n_prefix_tokens", "target"),
             "an IdentifiabilityResult (vit_lens.class_space.identifiability)")
    L, B, _ = result.rank.shape
    if not -L <= layer < L:
        raise OutOfRangeError(f"layer {layer} out of range: the result has {L} layers ({list(result.layers)})")
    if not -B <= index < B:
        raise OutOfRangeError(f"index {index} out of range for a batch of {B} images")
    if hasattr(image, "ndim") and image.ndim == 4 and image.shape[0] == B and B > 1:
        image = image[index]
    rank = result.rank[layer, index, result.n_prefix_tokens:]
    r = 1.0 - rank.double() / result.n_classes
    t = int(result.target[index])
    name = class_names[t] if class_names is not None else f"class {t}"
    block = result.layers[layer]
    hover = [f"rank of {name}: {k}" + (" (top-1)" if k == 0 else "") for k in rank.tolist()]
    return token_heatmap(
        r, image, grid_size=grid_size, opacity=opacity, hover_text=hover,
        zmin=float(r.min()) if zmin is None else float(zmin), zmax=1.0,
        colorscale="Viridis", mean=mean, std=std, colorbar_title="identifiability r = 1 - rank / n_classes",
        title=title if title is not None else f"Identifiability of '{name}' after block {block} ({result.hook})",
    )


def identify_report(
    result: "IdentifiabilityResult",
    random: Optional["IdentifiabilityResult"] = None,
    *,
    image: Any = None,
    lens: Any = None,
    lens_label: str = "[CLS]",
    index: int = 0,
    class_names: Optional[Sequence[str]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    k: int = 5,
    image_name: str = "",
) -> list:
    """The figures of one identifiability report (what ``vit-lens identify --out report.html`` writes).

    Args:
        result: :func:`vit_lens.class_space.identify` of the model on the images.
        random: the same for a random-weights twin (drawn dashed), or ``None``.
        image: the image ``index`` the model saw, for the token map (see :func:`token_heatmap`),
            or the normalised batch; ``None`` leaves the map out.
        lens: ``[n_blocks, n_classes]`` class scores of one token per block for image ``index``
            (e.g. ``class_space.logit_lens(model, cache, positions=0)[:, 0, 0]``), for the top-k
            table; ``None`` leaves the table out.
        lens_label: which token ``lens`` reads (named in the table's title).
        index: which image the map and the table show.
        class_names: e.g. ``model.class_names``.
        mean, std: the normalisation to undo for a normalised ``image``.
        k: classes per block in the table.
        image_name: the image's name for the titles (e.g. its file name).

    Returns:
        a list of figures: mean identifiability ``r`` per block (chance 0.5), the share of tokens
        whose target class is top-1 per block (chance ``1 / n_classes``), the last block's
        identifiability of every image token over the image, and the top-``k`` classes per block.
    """
    n_img = int(result.rank.shape[1])
    names = class_names if class_names is not None else None
    tgt = sorted({(names[int(t)] if names is not None else f"class {int(t)}") for t in result.target})
    on = f"{n_img} image{'s' * (n_img != 1)}; target: {', '.join(tgt[:3])}{' ...' if len(tgt) > 3 else ''}"
    figs = [
        identifiability_lines(result, random, metric="mean_r",
                              title=f"Mean class identifiability r = 1 - rank / n_classes per block ({on})"),
        identifiability_lines(result, random, metric="top1_rate",
                              title=f"Share of tokens whose target class is top-1, per block ({on})"),
    ]
    which = f" of {image_name}" if image_name else (f" of image {index + 1}" if n_img > 1 else "")
    t = int(result.target[index])
    tname = names[t] if names is not None else f"class {t}"
    if image is not None:
        figs.append(identifiability_map(
            result, image, index=index, class_names=names, mean=mean, std=std,
            title=f"Identifiability of '{tname}' in every image token{which}, after block {result.layers[-1]} "
                  "(1 = the target class is the token's top-1 class)"))
    if lens is not None:
        arr = _as_array(lens, "lens")
        if arr.ndim != 2 or arr.shape[0] != len(result.layers):
            raise InputError(f"lens must be [n_blocks={len(result.layers)}, n_classes], got shape {arr.shape}")
        figs.append(topk_table(arr, k=k, class_names=names, highlight=t,
                               row_labels=[f"block {l}" for l in result.layers],
                               title=f"Top-{k} classes of the {lens_label} token{which} after each block "
                                     f"('{tname}' shaded)"))
    return figs


def save_report(
    figures: Sequence["go.Figure"],
    path: Union[str, os.PathLike],
    *,
    title: str = "",
    notes: Sequence[str] = (),
    plotlyjs: str = "inline",
) -> Path:
    """Write several figures as one report: an HTML page (``.html``), or one static picture of
    the same figures stacked top to bottom (``.png``, through :func:`to_image`).

    Args:
        figures: plotly figures, in order.
        path: ``report.html`` or ``report.png``.
        title: the page's heading.
        notes: lines of text under the heading (e.g. the model and the preprocessing).
        plotlyjs: for HTML, ``"inline"`` (default; the page works offline) or ``"cdn"``.

    Returns:
        the absolute path written.
    """
    import html as _html

    figures = list(figures)
    if not figures or not all(hasattr(f, "to_html") for f in figures):
        raise InputTypeError("figures must be a non-empty list of plotly Figures")
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise InputError(f"a report is written as .html or .png, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        from PIL import Image

        go = _go()
        parts = []
        if title or notes:
            width = max(int(f.layout.width or 700) for f in figures)
            lines = [f"<b>{_html.escape(title)}</b>"] if title else []
            for n in notes:
                lines += _wrap(_html.escape(n), _chars(width - 40))
            head = go.Figure()
            head.add_annotation(text="<br>".join(lines), x=0, y=1, xref="paper", yref="paper", xanchor="left",
                                yanchor="top", showarrow=False, align="left", font=dict(size=14))
            head.update_xaxes(visible=False)
            head.update_yaxes(visible=False)
            head.update_layout(width=width, height=30 + 20 * len(lines), margin=dict(l=12, r=12, t=10, b=10),
                               template="plotly_white")
            parts.append(head)
        ims = [Image.open(io.BytesIO(to_image(f, format="png", scale=1))).convert("RGB") for f in parts + figures]
        canvas = Image.new("RGB", (max(i.width for i in ims), sum(i.height for i in ims)), "white")
        y = 0
        for im in ims:
            canvas.paste(im, (0, y))
            y += im.height
        canvas.save(path, format="PNG", optimize=True)
        return path.resolve()
    include = _plotlyjs_option(plotlyjs)
    body = [f"<h1>{_html.escape(title)}</h1>" if title else ""]
    body += [f"<p>{_html.escape(n)}</p>" for n in notes]
    for i, f in enumerate(figures):
        body.append(f.to_html(full_html=False, include_plotlyjs=include if i == 0 else False,
                              config=dict(displaylogo=False)))
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + _html.escape(title or "vit_lens report")
            + "</title><style>body{font-family:sans-serif;margin:16px;max-width:1200px} h1{font-size:20px}"
              " p{margin:4px 0;color:#333} .plotly-graph-div{margin:12px 0}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path.resolve()


def _class_by_name(name: str, names: Optional[Sequence[str]]) -> int:
    """Index of a class given its full name or one of its comma-separated synonyms ("tabby cat")."""
    if names is None:
        raise InputError(f"no class names are known, so {name!r} cannot be resolved; give a class index")
    key = name.strip().lower()
    exact = [i for i, n in enumerate(names) if n.lower() == key]
    if exact:
        return exact[0]
    syn = [i for i, n in enumerate(names) if key in (p.strip().lower() for p in n.split(","))]
    if len(syn) == 1:
        return syn[0]
    close = [names[i] for i in syn] or [n for n in names if key in n.lower()][:3]
    raise InputError(f"class name {name!r} is " + ("ambiguous" if syn else "unknown")
                     + (f" (candidates: {close})" if close else "") + "; give a class index instead")


def memory_table(
    memories: "Memories",
    target: Union[int, str],
    *,
    k: int = 5,
    title: Optional[str] = None,
) -> "go.Figure":
    """For each layer, the value vector ("memory") that most promotes ``target``, and its top-k classes.

    Args:
        memories: :func:`vit_lens.attribution.memories` (MLP: one value vector per neuron;
            attention: per head and head dimension).
        target: a class index, or a class name found in ``memories.class_names``.
        k: classes shown per value vector.
        title: figure title.

    Returns:
        a :func:`topk_table` figure: one row per layer, labelled with the value vector and its
        score for the target; cells holding the target are shaded.
    """
    _require(memories, ("scores", "kind", "layers", "class_names"), "Memories (vit_lens.attribution.memories)")
    import torch

    scores = memories.scores.detach().double().cpu()
    n_classes = scores.shape[-1]
    names = memories.class_names
    if isinstance(target, str):
        target = _class_by_name(target, names)
    target = int(target)
    if not 0 <= target < n_classes:
        raise OutOfRangeError(f"target {target} out of range for {n_classes} classes")
    flat = scores.reshape(scores.shape[0], -1, n_classes)          # [layer, n_values, C]
    best = flat[:, :, target].argmax(dim=1)                        # [layer]
    rows = flat[torch.arange(flat.shape[0]), best]                 # [layer, C]
    vals, idx = rows.topk(min(k, n_classes), dim=-1)
    labels: List[str] = []
    for layer, b in zip(memories.layers, best.tolist()):
        if memories.kind == "attn":
            d_head = scores.shape[2]
            what = f"head {b // d_head} dim {b % d_head}"
        else:
            what = f"neuron {b}"
        labels.append(f"block {layer} · {what} ({float(flat[len(labels), b, target]):.3f})")
    tname = names[target] if names is not None else f"class {target}"
    return topk_table(
        (vals, idx), class_names=names, row_labels=labels, highlight=target, row_header="value vector (score)",
        title=title if title is not None else
        f"{memories.kind.upper()} memories that most promote '{tname}' ({memories.metric} score): their top-{k} classes",
    )


def dla_figure(
    result: "DLAResult",
    *,
    index: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    include_rest: bool = True,
    title: Optional[str] = None,
) -> "go.Figure":
    """A direct-logit-attribution result as bars (one axis) or a grid (two axes, e.g. layer x head).

    Args:
        result: :func:`vit_lens.attribution.dla` (``by="component"`` gives bars; ``"layer"``,
            ``"head"``, ``"neuron"``, ``"position"`` give a [layer, ...] grid).
        index: which image; ``None`` averages over the batch.
        class_names: e.g. ``model.class_names``, to name the target (and baseline) class.
        include_rest: for one-axis results, add the ``rest`` parts and the ``constant`` as bars,
            so that the bars sum to the logit.
        title: figure title (default names the target class and the image).

    Returns:
        a :func:`bars` or :func:`grid_heatmap` (``zmid=0``) figure of the attributions.
    """
    _require(result, ("values", "dims", "coords", "rest", "constant", "logit", "target"),
             "a DLAResult (vit_lens.attribution.dla)")
    values = result.values.detach().double().cpu()
    B = values.shape[-1]
    if index is not None and not -B <= index < B:
        raise OutOfRangeError(f"index {index} out of range for a batch of {B} images")
    pick = (lambda v: v[..., index]) if index is not None else (lambda v: v.mean(-1))
    v = pick(values)
    tgt = result.target.cpu()
    baseline = getattr(result, "baseline", None)

    def cname(i: int) -> str:
        return class_names[i] if class_names is not None else f"class {i}"

    if index is not None:
        what = f"'{cname(int(tgt[index]))}'"
        if baseline is not None:
            what += f" - '{cname(int(baseline.cpu()[index]))}'"
        which = f"image {index}"
    else:
        same = bool((tgt == tgt[0]).all())
        what = f"'{cname(int(tgt[0]))}'" if same else "each image's target"
        if baseline is not None:
            what += " minus the baseline"
        which = f"mean over {B} images" if B > 1 else "1 image"
    head = title if title is not None else f"Direct logit attribution to {what} ({which})"
    labels_of = lambda d, n: [str(c) for c in result.coords[d]] if d in result.coords else [str(i) for i in range(n)]  # noqa: E731
    hover_line = f"target: {what}"
    if v.ndim == 1:
        labels = labels_of(result.dims[0], v.shape[0])
        vals = list(v.tolist())
        if include_rest:
            for name, r in result.rest.items():
                labels.append(name)
                vals.append(float(pick(r.detach().double().cpu())))
            labels.append("constant")
            vals.append(float(pick(result.constant.detach().double().cpu())))
        fig = bars(vals, labels=labels, title=head, yaxis_title="logit contribution",
                   xaxis_title=result.dims[0], hover_text={"": [hover_line] * len(vals)})
        fig.add_annotation(text=f"logit: {float(pick(result.logit.detach().double().cpu())):.3f}",
                           xref="paper", yref="paper", x=1, y=1.08, showarrow=False)
        return fig
    if v.ndim == 2:
        d0, d1 = result.dims
        return grid_heatmap(
            v, y_labels=labels_of(d0, v.shape[0]), x_labels=labels_of(d1, v.shape[1]), zmid=0,
            title=head, yaxis_title=d0, xaxis_title=d1, colorbar_title="direct logit contribution",
            hover_text=[[hover_line] * v.shape[1] for _ in range(v.shape[0])],
        )
    raise InputError(
        f"a DLAResult with axes {result.dims} has more than two axes; sum one first, e.g. "
        "dataclasses.replace(result, values=result.values.sum(1), dims=('layer', 'pos'))"
    )


def patching_figure(
    result: "PatchingResult",
    image: Any = None,
    *,
    layer: Optional[int] = None,
    component: Optional[str] = None,
    index: Optional[int] = None,
    normalized: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    opacity: float = 0.6,
    title: Optional[str] = None,
) -> "go.Figure":
    """An activation-patching sweep as a figure.

    * ``("layer", "pos")`` sweeps: a layer x position grid, or -- with ``layer`` given, or an
      ``image`` -- that layer's patch tokens over the image (:func:`token_heatmap`);
    * ``("layer", "head")`` sweeps: a layer x head grid;
    * ``("component", "layer", "pos")`` sweeps (:func:`vit_lens.patching.patch_block_every`): pick
      one ``component`` (e.g. ``"attn_out"``), then as above;
    * one remaining axis: bars.

    Args:
        result: a :class:`vit_lens.patching.PatchingResult`.
        image: the image the runs were patched on (the corrupted one) for a token-grid view;
            a normalised batch ``[batch, 3, H, W]`` is indexed with ``index`` (or its first image).
        layer: block index (as in ``result.coords["layer"]``) for the token-grid view; default the
            last swept layer when an image is given.
        component: for component sweeps, which component.
        index: which image of the batch; ``None`` averages over images (NaN-aware).
        normalized: show ``(value - corrupted) / (clean - corrupted)`` (0 = corrupted, 1 = clean)
            instead of the raw metric.
        mean, std, opacity: as in :func:`token_heatmap`.
        title: figure title.

    Returns:
        a :func:`grid_heatmap`, :func:`token_heatmap` or :func:`bars` figure.
    """
    import torch

    _require(result, ("values", "dims", "coords", "clean", "corrupted", "normalized"),
             "a PatchingResult (vit_lens.patching)")
    dims = list(result.dims)
    if dims[-1] != "batch":
        raise InputError(f"expected the batch axis last, got dims {result.dims}")
    if normalized:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = result.normalized()
    else:
        v = result.values
    v = v.detach().double().cpu()
    B = v.shape[-1]
    if index is not None:
        if not -B <= index < B:
            raise OutOfRangeError(f"index {index} out of range for a batch of {B} images")
        v = v[..., index]
    else:
        v = torch.nanmean(v, dim=-1)
    dims = dims[:-1]
    coords = result.coords
    if "component" in dims:
        comps = list(coords["component"])
        if component is None:
            raise InputError(f"this sweep patched several components {comps}; choose one with component=")
        if component not in comps:
            raise InputError(f"component {component!r} not in {comps}")
        i = dims.index("component")
        v = v.select(i, comps.index(component))
        dims.pop(i)
    elif component is not None:
        raise InputError(f"component= is for component sweeps; this result has dims {result.dims}")
    hook = getattr(result, "hook", "") or ""
    if component is not None:
        hook = f"{component} ({hook})" if hook else component
    # in titles a hook template names the hook of every block: "blocks.{l}.attn.hook_z" -> "attn.hook_z"
    shown = hook.replace("blocks.{l}.", "") if "{l}" in hook else hook
    what = "normalised metric (0 = corrupted, 1 = clean)" if normalized else f"metric {getattr(result, 'metric', '')}"
    which = f"image {index}" if index is not None else (f"mean over {B} images" if B > 1 else "1 image")
    head = title if title is not None else f"Patching {shown} of each block: {what}, {which}"
    cbar = "patching effect (0 = corrupted, 1 = clean)" if normalized else f"metric {getattr(result, 'metric', '')}"
    labels = {d: [str(c) for c in coords.get(d, range(v.shape[k]))] for k, d in enumerate(dims)}
    finite = v[torch.isfinite(v)]
    # normalised values are signed (below 0: worse than corrupted): a diverging scale centred on 0 that
    # spans at least -1 .. 1, so 1 (clean) is always the same red
    m = max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
    zlim = (-m, m) if normalized else (None, None)
    if len(dims) == 1:
        return bars(v, labels=labels[dims[0]], title=head, xaxis_title=dims[0], yaxis_title=what)
    if len(dims) != 2:
        raise InputError(f"cannot draw a sweep with axes {tuple(dims)}; select or average some first")
    if dims == ["layer", "pos"] and (layer is not None or image is not None):
        layers = list(coords["layer"])
        layer = layers[-1] if layer is None else layer
        if layer not in layers:
            raise InputError(f"layer {layer} was not swept; swept layers: {layers}")
        row = v[layers.index(layer)]                                       # [pos]
        rows, cols = result.grid_size
        n_pre = result.n_prefix_tokens
        pos = torch.as_tensor(result.positions).long()
        grid = torch.full((rows * cols,), float("nan"), dtype=torch.float64)
        keep = pos >= n_pre
        grid[pos[keep] - n_pre] = row[keep]
        prefix = [f"{coords['pos'][j]}: {_fmt(float(row[j]))}" for j in torch.nonzero(~keep).reshape(-1).tolist()]
        if hasattr(image, "ndim") and image.ndim == 4:
            image = image[index if index is not None else 0]
        fig = token_heatmap(
            grid.reshape(rows, cols), image, opacity=opacity, mean=mean, std=std, colorbar_title=cbar,
            zmid=0.0, zmin=zlim[0], zmax=zlim[1],
            title=(title if title is not None else
                   f"Patching {hook.replace('{l}', str(layer))}: {what}, {which}") if "{l}" in hook
            else f"{head}, block {layer}",
        )
        if prefix:
            fig.add_annotation(text="; ".join(prefix), xref="paper", yref="paper", x=0, y=-0.04, showarrow=False)
        return fig
    d0, d1 = dims
    return grid_heatmap(
        v, y_labels=labels[d0], x_labels=labels[d1], title=head, yaxis_title=d0, xaxis_title=d1,
        zmin=zlim[0], zmax=zlim[1], zmid=0.0, colorbar_title=cbar,
    )


def context_figure(
    frame: Any,
    *,
    value: str = "identifiable_rate",
    layer: Optional[int] = None,
    title: Optional[str] = None,
) -> "go.Figure":
    """The context-ablation comparison (:func:`vit_lens.ablation.context_comparison`) as a figure.

    Args:
        frame: the tidy table it returns (columns ``image``, ``tokens``, ``context``, ``layer`` and
            ``value``).
        value: which column to show (e.g. ``"identifiable_rate"``, the share of tokens whose
            target class is top-1, or ``"mean_r"``), averaged over images.
        layer: ``None`` draws one line per (tokens, context) condition over layers ("without"
            dashed); a block index draws grouped bars for that block.
        title: figure title.

    Returns:
        a :func:`layer_lines` or :func:`bars` figure.
    """
    need = {"tokens", "context", "layer", value}
    cols = set(getattr(frame, "columns", []))
    if not need <= cols:
        raise InputError(f"frame must have columns {sorted(need)} (from context_comparison); it has {sorted(cols)}")
    mean = frame.groupby(["tokens", "context", "layer"], sort=True)[value].mean()
    n_img = frame["image"].nunique() if "image" in cols else None
    suffix = f" (mean over {n_img} images)" if n_img and n_img > 1 else ""
    axis = {"identifiable_rate": "share of tokens whose target class is top-1",
            "mean_r": "mean class identifiability r"}.get(value, value)
    label = {"class": "class-labelled tokens", "context": "context tokens"}
    other = {"class": "context", "context": "class-labelled tokens"}
    if layer is None:
        series, dashed = {}, []
        for (tokens, ctx), s in mean.groupby(level=[0, 1], sort=True):
            name = f"{label.get(tokens, tokens)}, {ctx} {other.get(tokens, 'the rest')}"
            series[name] = s.droplevel([0, 1]).sort_index().to_numpy()
            if ctx == "without":
                dashed.append(name)
            x = list(s.droplevel([0, 1]).sort_index().index)
        return layer_lines(series, x_labels=x, dashed=dashed, xaxis_title="block", yaxis_title=axis,
                           title=title if title is not None else f"Context ablation: {value} per block{suffix}")
    layers = sorted(frame["layer"].unique())
    if layer not in layers:
        raise InputError(f"layer {layer} not in the table; it has {layers}")
    at = mean.xs(layer, level="layer").unstack("context")          # rows: tokens, columns: with/without
    at.index = [label.get(t, t) for t in at.index]
    at.columns = [f"{c} the rest" for c in at.columns]
    return bars(at, yaxis_title=axis, xaxis_title="tokens",
                title=title if title is not None else f"Context ablation after block {layer}: {value}{suffix}")


# ======================================================================================

# edges (issue 14 part B): attribution vs exact per edge, faithfulness curves
# =============================================================================================
def _receiver_kind(receiver: str) -> str:
    if receiver == "logits":
        return "readout"
    if receiver.startswith("m"):
        return "MLP input"
    return f"head {receiver[-2]} input"


def edge_scatter(estimate: Any, exact: Any, *, title: Optional[str] = None) -> "go.Figure":
    """Estimated vs exact effect of patching each edge, one point per edge common to both
    (effects averaged over the batch), coloured by receiver kind, with the diagonal ``y = x``.

    Args:
        estimate: an :class:`vit_lens.edges.EdgeResult` (e.g. from ``edge_attribution``).
        exact: an :class:`vit_lens.edges.EdgeResult` from ``patch_edges`` (any subset of the edges).
        title: figure title.
    """
    for r, what in ((estimate, "estimate"), (exact, "exact")):
        _require(r, ("edges", "scores"), f"{what} (an EdgeResult)")
    est = {str(e): float(v) for e, v in zip(estimate.edges, estimate.scores().tolist())}
    pts = [(str(e), e.receiver, est[str(e)], float(v)) for e, v in zip(exact.edges, exact.scores().tolist()) if str(e) in est]
    if not pts:
        raise InputError("estimate and exact have no edge in common; patch some of the estimate's edges with patch_edges")
    go = _go()
    fig = go.Figure()
    kinds = sorted({_receiver_kind(p[1]) for p in pts})
    for kind in kinds:
        sel = [p for p in pts if _receiver_kind(p[1]) == kind]
        fig.add_trace(go.Scatter(x=[p[3] for p in sel], y=[p[2] for p in sel], mode="markers", name=kind,
                                 text=[p[0] for p in sel], hovertemplate="%{text}<br>exact %{x:.4g}<br>estimate %{y:.4g}"))
    lo = min(min(p[2], p[3]) for p in pts)
    hi = max(max(p[2], p[3]) for p in pts)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dot", color="gray")))
    method = getattr(estimate, "method", "estimate")
    width = 620
    fig.update_layout(template="plotly_white", width=width, xaxis_title="exact effect of patching the edge",
                      yaxis_title=f"{method} estimate", margin=dict(l=80, r=20, b=60))
    extra = _legend_below_title(fig, kinds + ["y = x"], width)
    top = _set_title(fig, title if title is not None else f"Edge effects: {method} vs exact ({len(pts)} edges)",
                     width, extra_top=extra)
    fig.update_layout(height=top + 480)
    return fig


def faithfulness_figure(frames: Mapping[str, Any], *, title: Optional[str] = None) -> "go.Figure":
    """Share of the clean-corrupted gap recovered against the number of edges kept, one line per
    ranking (the mean over images, from :func:`vit_lens.edges.faithfulness_curve` tables).

    Args:
        frames: ranking name -> the table ``faithfulness_curve`` returns (columns ``k``, ``recovered``).
        title: figure title.
    """
    if not isinstance(frames, Mapping) or not frames:
        raise InputTypeError("frames must be a dict: ranking name -> the table faithfulness_curve returns")
    go = _go()
    fig = go.Figure()
    for name, df in frames.items():
        cols = set(getattr(df, "columns", []))
        if not {"k", "recovered"} <= cols:
            raise InputError(f"frames[{name!r}] must have columns 'k' and 'recovered' (from faithfulness_curve); it has {sorted(cols)}")
        curve = df.groupby("k").recovered.mean().sort_index()
        fig.add_trace(go.Scatter(x=list(curve.index), y=curve.to_numpy(), mode="lines+markers", name=str(name)))
    width = 620
    fig.update_layout(template="plotly_white", width=width, xaxis_title="edges kept (log scale)",
                      yaxis_title="share of the gap recovered", xaxis_type="log", margin=dict(l=80, r=20, b=60))
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray", annotation_text="clean")
    fig.add_hline(y=0.0, line_dash="dot", line_color="gray", annotation_text="corrupted")
    extra = _legend_below_title(fig, [str(n) for n in frames], width)
    top = _set_title(fig, title if title is not None else "Faithfulness: top-k edges kept, the rest corrupted",
                     width, extra_top=extra)
    fig.update_layout(height=top + 440)
    return fig


__all__ += ["edge_scatter", "faithfulness_figure"]


# =============================================================================================
# attribution patching (issue 14 part A): estimate vs exact per cell
# =============================================================================================
def attribution_comparison_figure(
    exact: "PatchingResult",
    estimate: "PatchingResult",
    *,
    index: Optional[int] = None,
    normalized: bool = True,
    component: Optional[str] = None,
    title: Optional[str] = None,
) -> "go.Figure":
    """Attribution patching against exact patching, per cell: a scatter (estimate vs exact, with the
    line y = x) beside the two grids side by side on one colour scale.

    Args:
        exact: the exact sweep (``method="exact"``), a :class:`vit_lens.patching.PatchingResult`.
        estimate: the same sweep with ``method="attribution"`` / ``"attribution_qk"``.
        index: which image of the batch; ``None`` averages over images (NaN-aware).
        normalized: compare ``(value - corrupted) / (clean - corrupted)`` (else the raw metric).
        component: for ``("component", "layer", "pos")`` sweeps, which component.
        title: figure title.

    Returns:
        a plotly figure with three panels: scatter, exact grid, estimate grid.
    """
    import warnings

    from plotly.subplots import make_subplots

    go = _go()
    for r, what in ((exact, "exact"), (estimate, "estimate")):
        _require(r, ("values", "dims", "coords", "clean", "corrupted", "normalized"), f"{what}: a PatchingResult")
    if tuple(exact.dims) != tuple(estimate.dims) or tuple(exact.values.shape) != tuple(estimate.values.shape):
        raise InputError(f"exact and estimate must come from the same sweep: {exact.dims} {tuple(exact.values.shape)} "
                         f"vs {estimate.dims} {tuple(estimate.values.shape)}")
    dims = list(exact.dims)
    if dims[-1] != "batch":
        raise InputError(f"expected the batch axis last, got dims {exact.dims}")

    def arr(r: Any) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = (r.normalized() if normalized else r.values).detach().cpu().double().numpy()
        if index is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.nanmean(v, axis=-1)
        n = v.shape[-1]
        if not -n <= index < n:
            raise OutOfRangeError(f"index {index} out of range for a batch of {n}")
        return v[..., index]

    a, b = arr(exact), arr(estimate)
    axes = dims[:-1]
    if len(axes) == 3:
        if component is None or "component" not in exact.coords or component not in exact.coords["component"]:
            raise InputError(f"a {tuple(axes)} sweep: pass component= one of {exact.coords.get('component')}")
        i = list(exact.coords["component"]).index(component)
        a, b, axes = a[i], b[i], axes[1:]
    elif component is not None:
        raise InputError("component= is only for ('component', 'layer', 'pos') sweeps")
    if len(axes) == 1:
        a, b, axes = a[None], b[None], ["", axes[0]]
    if len(axes) != 2:
        raise InputError(f"cannot lay out a sweep with axes {tuple(dims)}")
    rows = [str(x) for x in exact.coords.get(axes[0], [""])]
    cols = [str(x) for x in exact.coords.get(axes[1], range(a.shape[1]))]
    method = getattr(estimate, "method", "estimate")
    what = "normalised" if normalized else "metric"
    fig = make_subplots(rows=1, cols=3, column_widths=[0.3, 0.35, 0.35], horizontal_spacing=0.08,
                        subplot_titles=(f"per cell ({what})", "exact", method))
    fa, fb = a.reshape(-1), b.reshape(-1)
    ok = np.isfinite(fa) & np.isfinite(fb)
    labels = [f"{axes[0]} {r}, {axes[1]} {c}" for r in rows for c in cols]
    fig.add_trace(go.Scatter(x=fa[ok], y=fb[ok], mode="markers", marker=dict(size=5, opacity=0.6),
                             text=[t for t, k in zip(labels, ok) if k], name="cells",
                             hovertemplate="%{text}<br>exact %{x:.4g}<br>" + method + " %{y:.4g}<extra></extra>"),
                  row=1, col=1)
    lo = float(np.nanmin(np.concatenate([fa[ok], fb[ok]]))) if ok.any() else 0.0
    hi = float(np.nanmax(np.concatenate([fa[ok], fb[ok]]))) if ok.any() else 1.0
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="gray"),
                             name="y = x", hoverinfo="skip"), row=1, col=1)
    m = max(abs(lo), abs(hi)) or 1.0
    for j, v in ((2, a), (3, b)):
        fig.add_trace(go.Heatmap(z=v, x=cols, y=rows, zmin=-m, zmax=m, colorscale="RdBu", reversescale=True,
                                 showscale=j == 3, colorbar=dict(title=what),
                                 hovertemplate=f"{axes[0]} %{{y}}<br>{axes[1]} %{{x}}<br>%{{z:.4g}}<extra></extra>"),
                      row=1, col=j)
        fig.update_xaxes(title_text=axes[1], row=1, col=j)
        fig.update_yaxes(title_text=axes[0], row=1, col=j, autorange="reversed")
    fig.update_xaxes(title_text="exact", row=1, col=1)
    fig.update_yaxes(title_text=method, row=1, col=1)
    hook = str(getattr(exact, "hook", "") or "")
    shown = hook.replace("blocks.{l}.", "") if "{l}" in hook else hook  # a template names every block's hook
    width = 1300
    fig.update_layout(template="plotly_white", showlegend=False, width=width, margin=dict(l=80, r=30, b=70))
    top = _set_title(fig, title or f"{method} vs exact patching of {shown}: {exact.metric}", width, extra_top=24)
    fig.update_layout(height=top + 430)
    return fig


__all__ += ["attribution_comparison_figure"]
