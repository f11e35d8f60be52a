"""Data sources of a dataset run: what ``--data SRC`` names, as a list of items, and a torch
``Dataset`` that reads and preprocesses them with the model's own transform.

``SRC`` is one of:

* a folder: an ImageFolder tree ``root/<class>/<image>`` (class folders named by WordNet id, class
  index or class name, resolved against the model's classes) or a flat folder of images
  (unlabelled); a folder holding ``labels.csv`` is read as that CSV;
* a labels CSV ``path,class_index,...`` (paths relative to the CSV's folder; the format of
  ``../shared/images/labels.csv``);
* ``hf:PATH[:split]``: a Hugging Face ``datasets`` dataset available locally, either a
  ``save_to_disk`` folder or a dataset name in the local hub cache (read offline). Its first
  ``Image`` column holds the images and an integer ``label`` column (if any) the class indices.

Every source gives items in a fixed order (sorted paths, CSV order, dataset order), so an item's
index is its stable image id across runs and processes. Unreadable images are not fatal: the
dataset returns them as failures, and the run lists them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from vit_lens.core.errors import InputError, MissingFileError

__all__ = ["DataSource", "open_source", "ImageItems"]


@dataclass
class DataSource:
    """The items of a data source.

    Attributes:
        spec: what the user gave (``--data``).
        kind: ``"csv"``, ``"image_folder"``, ``"folder"`` or ``"hf"``.
        paths: one string per item: a file path, or ``hf:<index>`` for dataset rows.
        labels: one class index per item (``-1`` where unknown), or None for an unlabelled source.
        root: the folder paths are relative to (for a parallel folder of segmentations).
        hf: the ``datasets.Dataset`` (``kind == "hf"``), and its image column.
    """

    spec: str
    kind: str
    paths: List[str]
    labels: Optional[List[int]]
    root: Optional[Path] = None
    hf: Any = None
    hf_image_column: Optional[str] = None
    description: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies the items (for the run's configuration hash): kind, count, and a hash of
        every path and label in order."""
        import hashlib

        h = hashlib.sha256()
        for i, p in enumerate(self.paths):
            h.update(f"{p}\t{-1 if self.labels is None else self.labels[i]}\n".encode())
        return dict(kind=self.kind, spec=self.spec, n_items=len(self.paths), items_sha256=h.hexdigest(),
                    **self.description)

    def limited(self, limit: Optional[int]) -> "DataSource":
        """The first ``limit`` items (all with None)."""
        if limit is None:
            return self
        if int(limit) < 1:
            raise InputError(f"--limit must be >= 1, got {limit}")
        n = int(limit)
        return DataSource(self.spec, self.kind, self.paths[:n], None if self.labels is None else self.labels[:n],
                          self.root, self.hf, self.hf_image_column, dict(self.description))


def _hf_source(spec: str) -> DataSource:
    rest = spec[3:]
    path, split = rest, None
    if ":" in rest and not Path(rest).exists():
        path, split = rest.rsplit(":", 1)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency of the runs extra
        raise InputError("hf: sources need the 'datasets' package (pip install datasets)") from None
    p = Path(path).expanduser()
    if p.exists():
        ds = datasets.load_from_disk(str(p))
        where = str(p.resolve())
    else:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as e:
            raise MissingFileError(
                f"--data {spec}: no save_to_disk folder at {path!r} and no dataset {path!r} in the local Hugging Face "
                f"cache ({type(e).__name__}: {e}); give a folder written by Dataset.save_to_disk or a cached dataset"
            ) from None
        where = path
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None:
            if len(splits) != 1:
                raise InputError(f"--data {spec}: the dataset has the splits {splits}; name one as hf:{path}:SPLIT")
            split = splits[0]
        if split not in ds:
            raise InputError(f"--data {spec}: no split {split!r}; the dataset has {splits}")
        ds = ds[split]
    img_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not img_cols:
        raise InputError(f"--data {spec}: the dataset has no Image column (columns: {list(ds.features)})")
    labels = None
    if "label" in ds.features:
        labels = [int(v) if v is not None else -1 for v in ds["label"]]
    return DataSource(spec, "hf", [f"hf:{i}" for i in range(len(ds))], labels, None, ds, img_cols[0],
                      dict(hf_path=where, hf_split=split, hf_fingerprint=getattr(ds, "_fingerprint", None)))


def open_source(spec: str, model: Any = None) -> DataSource:
    """Read ``--data SRC`` (see the module docs). ``model`` resolves ImageFolder class folders."""
    from vit_lens import data as vdata

    spec = str(spec)
    if spec.startswith("hf:"):
        return _hf_source(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise MissingFileError(f"--data: no file or folder at {spec!r}; give a folder of images, a labels CSV or hf:PATH")
    if p.is_file() and p.suffix.lower() != ".csv":
        raise InputError(f"--data: {spec} is a file but not a labels CSV (.csv); give a folder, a CSV or hf:PATH")
    try:
        if p.is_file() or (p / "labels.csv").is_file():
            csv_path = p if p.is_file() else p / "labels.csv"
            s = vdata.from_labels_csv(csv_path)
            kind, root = "csv", csv_path.parent.resolve()
        elif any(q.is_file() and q.suffix.lower() in vdata.IMAGE_EXTENSIONS and not q.name.startswith(".")
                 for q in p.iterdir()):
            s = vdata.from_folder(p)
            kind, root = "folder", p.resolve()
        else:
            s = vdata.from_image_folder(p, model=model)
            kind, root = "image_folder", p.resolve()
    except FileNotFoundError as e:
        raise MissingFileError(f"--data {spec}: {e}") from None
    return DataSource(spec, kind, [str(Path(q).resolve()) for q in s.paths], s.labels, root,
                      description=dict(path=str(p.resolve())))


class ImageItems(torch.utils.data.Dataset):
    """The items of a :class:`DataSource`, read and preprocessed one at a time (for a ``DataLoader``).

    ``dataset[i]`` is ``(i, image [C, H, W] or None, error message or None, extras)`` where
    ``extras`` holds, when asked for, the partner image (``pairs``) and the segmentation mask
    (``segmentations``); a failure in either is the item's failure.
    """

    def __init__(self, source: DataSource, data_config: dict, mode: str = "timm", *,
                 pairs: Optional[Dict[int, int]] = None, segmentation_root: Optional[Path] = None,
                 dtype: torch.dtype = torch.float32):
        self.source = source
        self.data_config = dict(data_config)
        self.mode = mode
        self.pairs = pairs
        self.segmentation_root = segmentation_root
        self.dtype = dtype
        from vit_lens.preprocess import build_transform

        self._transform = build_transform(self.data_config, mode)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, i: int) -> Tensor:
        from vit_lens.preprocess import load_image

        src = self.source
        if src.hf is not None:
            im = src.hf[int(i)][src.hf_image_column]
            if im is None:
                raise InputError(f"row {i} of {src.spec} has no image")
            im = load_image(im)
        else:
            im = load_image(src.paths[i])
        chans = int(self.data_config.get("input_size", (3,))[0])
        return self._transform(im.convert("L" if chans == 1 else "RGB")).to(self.dtype)

    def segmentation_path(self, i: int) -> Path:
        """The segmentation PNG parallel to image ``i``: the same relative path under the
        segmentation folder, with the suffix ``.png``."""
        src = self.source
        assert self.segmentation_root is not None and src.root is not None
        rel = Path(src.paths[i]).resolve().relative_to(src.root)
        return (self.segmentation_root / rel).with_suffix(".png")

    def __getitem__(self, i: int) -> Tuple[int, Optional[Tensor], Optional[str], Dict[str, Any]]:
        extras: Dict[str, Any] = {}
        try:
            x = self._image(i)
            if self.pairs is not None:
                j = self.pairs[int(i)]
                try:
                    extras["pair"] = self._image(j)
                except Exception as e:
                    raise InputError(f"its corruption partner {self.source.paths[j]} is unreadable ({e})") from e
            if self.segmentation_root is not None:
                seg = self.segmentation_path(i)
                if not seg.is_file():
                    raise MissingFileError(f"no segmentation at {seg}")
                import numpy as np
                from PIL import Image

                with Image.open(seg) as im:
                    a = np.asarray(im.convert("RGB")).astype(np.int64)
                extras["segmentation"] = torch.from_numpy(a[..., 0] + 256 * a[..., 1])
        except Exception as e:  # unreadable / corrupt image: reported, never fatal
            return int(i), None, " ".join(f"{type(e).__name__}: {e}".split()), {}
        return int(i), x, None, extras


def collate(items: Sequence[Tuple[int, Optional[Tensor], Optional[str], Dict[str, Any]]]) -> Dict[str, Any]:
    """A DataLoader batch: the readable items stacked, the failures listed."""
    ok = [it for it in items if it[1] is not None]
    out: Dict[str, Any] = dict(
        ids=[it[0] for it in ok],
        images=torch.stack([it[1] for it in ok]) if ok else None,  # type: ignore[misc]
        failures=[(it[0], it[2]) for it in items if it[1] is None],
    )
    for key in ("pair", "segmentation"):
        if ok and key in ok[0][3]:
            vals = [it[3][key] for it in ok]
            out[key] = torch.stack(vals) if key == "pair" else vals
    return out
