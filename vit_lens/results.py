"""Results of dataset runs (``vit-lens run``): read them, aggregate them, draw them.

A run's folder holds ``manifest.json`` and one Parquet shard per chunk in ``shards/`` (tidy long
form: ``image, path, label, target, layer, group, index, condition, measure, value``). Besides
:func:`load`, the shards are a plain Parquet glob: ``pandas.read_parquet("OUT/shards")`` or DuckDB's
``SELECT * FROM 'OUT/shards/*.parquet'``.

* :func:`load` -- every row as one DataFrame (the shards of the run's own configuration only).
* :func:`manifest`, :func:`failures` -- the run's configuration and its unreadable images.
* :func:`summarize` -- the paper-style aggregate tables of a run, by analysis (means over images).
* :func:`figures` -- their plotly figures; :func:`write_figures` writes them as HTML files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from vit_lens.core.errors import InputError, MissingFileError

__all__ = ["load", "manifest", "failures", "summarize", "figures", "write_figures", "format_tables"]


def manifest(out: os.PathLike) -> Dict[str, Any]:
    """The run's ``manifest.json``."""
    p = Path(out).expanduser() / "manifest.json"
    if not p.is_file():
        raise MissingFileError(f"no run in {str(out)!r} (no manifest.json); give the --out folder of a 'vit-lens run'")
    return json.loads(p.read_text())


def load(out: os.PathLike, *, complete: bool = False) -> Any:
    """Every row of a run as one :class:`pandas.DataFrame` (columns in the order of
    :data:`vit_lens.runs.ROW_COLUMNS`; ``layer`` and ``index`` nullable integers).

    Args:
        out: the run's output folder.
        complete: refuse a run whose chunks are not all done (default: return the rows done so far).

    Raises:
        MissingFileError: no run there. InputError: a shard of another configuration is in the
        folder (never mixed in), or ``complete`` and chunks are missing.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    out = Path(out).expanduser()
    m = manifest(out)
    want = m["config_hash"]
    tables, missing = [], []
    for c in m["chunks"]:
        f = out / c["shard"]
        if not f.is_file():
            missing.append(c["index"])
            continue
        t = pq.read_table(f)
        got = (t.schema.metadata or {}).get(b"config_hash", b"").decode()
        if got != want:
            raise InputError(f"{f} was written by a run of another configuration ({got[:12]} vs {want[:12]}); "
                             "remove it and rerun to recompute that chunk")
        tables.append(t.to_pandas())
    if complete and missing:
        raise InputError(f"{len(missing)} of {len(m['chunks'])} chunks of {out} are not done (e.g. {missing[:5]}); "
                         "rerun the same 'vit-lens run' command to finish them")
    cols = list(m.get("columns") or [])
    if not tables:
        return pd.DataFrame({c: [] for c in cols})
    df = pd.concat(tables, ignore_index=True)
    for c in ("layer", "index"):
        if c in df:
            df[c] = df[c].astype("Int64")
    return df


def failures(out: os.PathLike) -> Any:
    """The images a run could not read: DataFrame ``image, path, error`` (empty when none), from
    the done shards' metadata."""
    import pandas as pd

    from vit_lens.runs.engine import shard_failures

    rows: List[Dict[str, Any]] = []
    for f in sorted((Path(out).expanduser() / "shards").glob("chunk-*.parquet")):
        rows += shard_failures(f)
    return pd.DataFrame(rows, columns=["image", "path", "error"]).sort_values("image", ignore_index=True)


# ------------------------------------------------------------------------------- aggregates
def _per_layer(df: Any, groups: List[str], measures: List[str]) -> Any:
    """Mean over images of each (layer, group, measure), as a wide table indexed by layer."""
    sub = df[df["group"].isin(groups) & df["measure"].isin(measures)]
    t = sub.groupby(["layer", "group", "measure"], sort=True)["value"].mean().unstack(["group", "measure"])
    t.columns = [f"{g} {m}" for g, m in t.columns]
    order = [f"{g} {m}" for g in groups for m in measures if f"{g} {m}" in t.columns]
    t = t[order]
    t.index = t.index.astype(int)
    return t


def _identifiability_table(df: Any) -> Any:
    groups = [g for g in df["group"].unique() if g not in ("image", "readout")] + ["image"]
    t = _per_layer(df, groups, ["mean_r", "top1_rate", "has_top1"])
    drop = [c for c in t.columns if c.endswith("has_top1") and not c.startswith("image")]
    return t.drop(columns=drop)


def _last_layer(df: Any) -> Any:
    return df[df["layer"] == df["layer"].max()]


def _knockout_table(df: Any) -> Any:
    last = _last_layer(df)
    t = last.groupby(["condition", "group", "measure"], sort=False)["value"].mean().unstack(["group", "measure"])
    t.columns = [f"{g} {m}" for g, m in t.columns]
    keep = [c for c in ("image top1_rate", "image mean_r", "image has_top1", "CLS top1_rate", "CLS mean_r") if c in t]
    t = t[keep]
    if "none" in t.index:
        for c in keep:
            t[f"delta {c}"] = t[c] - t.loc["none", c]
    t.index.name = "knockout"
    t.attrs["layer"] = int(last["layer"].max())
    return t


def _context_table(df: Any) -> Any:
    last = _last_layer(df)
    t = last[last["measure"].isin(["identifiable_rate", "mean_r"])].groupby(
        ["group", "condition", "measure"])["value"].mean().unstack("measure").unstack("condition")
    t.columns = [f"{m} {c}" for m, c in t.columns]
    for m in ("identifiable_rate", "mean_r"):
        if f"{m} with" in t and f"{m} without" in t:
            t[f"delta {m}"] = t[f"{m} without"] - t[f"{m} with"]
    t.index.name = "tokens"
    t.attrs["layer"] = int(last["layer"].max())
    return t


def _patching_table(df: Any) -> Any:
    sub = df[(df["measure"] == "normalized") & df["group"].isin(["pos", "head"])]
    t = sub.groupby(["layer", "index"])["value"].mean().unstack("index")
    t.index = t.index.astype(int)
    t.columns = t.columns.astype(int)
    return t


def summarize(out: os.PathLike) -> Dict[str, Any]:
    """The aggregate tables of a run (means over images), by analysis:

    * ``identifiability``: ``{"per_block": DataFrame}`` indexed by layer: ``<group> mean_r`` (mean
      r), ``<group> top1_rate`` (share of tokens whose top-1 class is the target) for [CLS] (and
      other prefix tokens) and the image tokens, and ``image has_top1`` (share of images with at
      least one identifiable image token): the paper's per-block table.
    * ``knockout``: ``{"last_block": ...}`` per condition (``none``, ``<edges>:<mode>``) at the
      last block, with ``delta`` columns against ``none``; ``{"per_block": ...}``.
    * ``context-ablation``: ``{"last_block": ...}`` per token set, with and without the other set
      and their ``delta`` (without - with).
    * ``patching``: ``{"normalized": ...}`` layer x position (or head) mean normalised effect.
    * ``logit-lens``: ``{"per_block": ...}`` share of images whose target is the [CLS] top-1 and the
      mean target rank.
    * ``dla``: ``{"components": ...}`` mean attribution per component.

    Every table also carries ``attrs["n_images"]``.
    """
    import pandas as pd

    m = manifest(out)
    df = load(out)
    a = m["analysis"]
    n_img = int(df["image"].nunique()) if len(df) else 0
    if not len(df):
        raise InputError(f"{out} has no rows yet (no chunk done); run 'vit-lens run' first")
    tables: Dict[str, Any] = {}
    if a == "identifiability":
        tables["per_block"] = _identifiability_table(df)
    elif a == "knockout":
        tables["last_block"] = _knockout_table(df)
        per = df.groupby(["condition", "layer", "group", "measure"])["value"].mean().unstack(["group", "measure"])
        per.columns = [f"{g} {mm}" for g, mm in per.columns]
        tables["per_block"] = per
    elif a == "context-ablation":
        tables["last_block"] = _context_table(df)
    elif a == "patching":
        tables["normalized"] = _patching_table(df)
    elif a == "logit-lens":
        tr = df[df["measure"] == "target_rank"]
        g = tr.groupby("layer")["value"]
        t = pd.DataFrame({"target top-1 share": g.apply(lambda v: float((v == 0).mean())), "mean target rank": g.mean()})
        t.index = t.index.astype(int)
        tables["per_block"] = t
    elif a == "dla":
        sub = df[df["measure"] == "dla"]
        t = sub.groupby("group", sort=False)["value"].agg(["mean", "std"]).rename(columns={"mean": "mean dla", "std": "std"})
        tables["components"] = t
    else:  # a registered analysis without a summary: means per layer, group, condition and measure
        keys = [c for c in ("layer", "group", "index", "condition", "measure") if df[c].notna().any()]
        tables["means"] = df.groupby(keys, dropna=False)["value"].mean().to_frame("mean")
    for t in tables.values():
        t.attrs["n_images"] = n_img
        t.attrs["analysis"] = a
    return tables


def format_tables(tables: Dict[str, Any], *, max_rows: int = 60) -> str:
    """The tables of :func:`summarize` as text (rates as percentages, r to 3 decimals)."""
    import pandas as pd

    parts = []
    for name, t in tables.items():
        shown = t.copy()
        for c in shown.columns:
            col = str(c)
            if any(k in col for k in ("top1_rate", "has_top1", "identifiable_rate", "share")) and "delta" not in col:
                shown[c] = shown[c].map(lambda v: f"{100 * v:.1f}%")
            elif pd.api.types.is_float_dtype(shown[c]):
                shown[c] = shown[c].map(lambda v: f"{v:.3f}")
        layer = f", block {t.attrs['layer']}" if "layer" in t.attrs else ""
        head = f"{t.attrs.get('analysis', '')}: {name}{layer} (mean over {t.attrs.get('n_images', '?')} images)"
        parts.append(head + "\n" + shown.to_string(max_rows=max_rows, max_cols=24))
    return "\n\n".join(parts)


def figures(out: os.PathLike, tables: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Plotly figures of :func:`summarize`'s tables: name -> Figure."""
    from vit_lens import plot

    tables = summarize(out) if tables is None else tables
    a = next(iter(tables.values())).attrs.get("analysis")
    figs: Dict[str, Any] = {}
    if a == "identifiability":
        t = tables["per_block"]
        figs["identifiability"] = plot.layer_lines(
            {c: t[c].to_numpy() for c in t.columns if "top1_rate" in c or "has_top1" in c or "mean_r" in c},
            x_labels=list(t.index), title=f"class identifiability per block ({t.attrs['n_images']} images)",
            yaxis_title="mean r / share", yrange=(0, 1))
    elif a == "knockout":
        t = tables["last_block"]
        cols = [c for c in t.columns if not c.startswith("delta")]
        figs["knockout"] = plot.bars({c: t[c].to_numpy() for c in cols}, labels=list(t.index),
                                     title=f"attention knockout, block {t.attrs['layer']} ({t.attrs['n_images']} images)")
    elif a == "context-ablation":
        t = tables["last_block"]
        cols = [c for c in t.columns if not c.startswith("delta")]
        figs["context"] = plot.bars({c: t[c].to_numpy() for c in cols}, labels=list(t.index),
                                    title=f"context ablation, block {t.attrs['layer']} ({t.attrs['n_images']} images)")
    elif a == "patching":
        t = tables["normalized"]
        figs["patching"] = plot.grid_heatmap(t.to_numpy(), x_labels=list(t.columns), y_labels=list(t.index), zmid=0,
                                             title=f"mean normalised patching effect ({t.attrs['n_images']} images)",
                                             xaxis_title="position / head", yaxis_title="layer")
    elif a == "logit-lens":
        t = tables["per_block"]
        figs["logit_lens"] = plot.layer_lines({"target top-1 share": t["target top-1 share"].to_numpy()},
                                              x_labels=list(t.index), title="[CLS] logit lens", yrange=(0, 1))
    elif a == "dla":
        t = tables["components"]
        figs["dla"] = plot.bars({"mean dla": t["mean dla"].to_numpy()}, labels=list(t.index),
                                title="direct logit attribution of the target")
    return figs


def write_figures(out: os.PathLike, tables: Optional[Dict[str, Any]] = None,
                  folder: Optional[os.PathLike] = None) -> List[Path]:
    """Write :func:`figures` as standalone HTML files to ``folder`` (default ``OUT/figures``)."""
    from vit_lens import plot

    dest = Path(folder) if folder is not None else Path(out).expanduser() / "figures"
    return [plot.save_html(f, dest / f"{name}.html") for name, f in figures(out, tables).items()]
