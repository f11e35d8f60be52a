"""Image-folder datasets: image paths with class labels, from a labels CSV or an ImageFolder layout.

Three layouts are understood (see :func:`load_image_set`):

* a labels CSV (``path,class_index[,synset,class_name]``, paths relative to the CSV's folder), like
  ``../shared/images/labels.csv``, or a folder containing ``labels.csv``;
* an ImageFolder tree ``root/<class>/<image>`` (class folders named by WordNet id such as
  ``n02123045``, by class index, or by class name; resolved against a model's classes when one is given);
* a flat folder of images (unlabelled).

An :class:`ImageSet` is just paths and labels; ``ImageSet.load(model)`` turns it into a normalised
batch with the model's own preprocessing. :func:`augmented_views` makes seeded random crops/flips,
for experiments that need more than one view per image.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from vit_lens.core.errors import InputError, UnknownNameError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "from_labels_csv",
    "from_image_folder",
    "from_folder",
    "load_image_set",
    "augmented_views",
]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


@dataclass
class ImageSet:
    """Image files with optional class labels (indices into the model's classes).

    Attributes:
        paths: absolute image paths.
        labels: one class index per image, or None for an unlabelled set.
        label_names: one human-readable class name per image (optional).
        root: the folder the set was read from (informational).
    """

    paths: List[Path]
    labels: Optional[List[int]] = None
    label_names: Optional[List[str]] = None
    root: Optional[Path] = None

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        if self.labels is not None:
            self.labels = [int(l) for l in self.labels]
            if len(self.labels) != len(self.paths):
                raise InputError(f"{len(self.labels)} labels for {len(self.paths)} images")
        if self.label_names is not None and len(self.label_names) != len(self.paths):
            raise InputError(f"{len(self.label_names)} label names for {len(self.paths)} images")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[Path, Optional[int]]:
        return self.paths[i], (None if self.labels is None else self.labels[i])

    def __repr__(self) -> str:
        kind = "unlabelled" if self.labels is None else f"{len(set(self.labels))} classes"
        return f"ImageSet({len(self)} images, {kind}, root={str(self.root) if self.root else None!r})"

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def label_tensor(self) -> Int[Tensor, "n"]:
        """Labels as a long tensor (raises for an unlabelled set)."""
        if self.labels is None:
            raise InputError("this ImageSet has no labels (it was read from a folder without a labels CSV or class folders)")
        return torch.tensor(self.labels, dtype=torch.long)

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        """The images at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return ImageSet([self.paths[i] for i in idx], pick(self.labels), pick(self.label_names), self.root)

    def split(self, test_fraction: float = 0.5, *, seed: int = 0, stratify: bool = True) -> Tuple["ImageSet", "ImageSet"]:
        """A seeded train/test split.

        With ``stratify`` (labelled sets), each class with at least two images puts at least one
        image on each side; a class with a single image stays in the training part (it cannot be
        both trained and tested on) -- check ``len(test)``.
        """
        if not 0.0 < test_fraction < 1.0:
            raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
        rng = random.Random(seed)
        if stratify and self.labels is not None:
            by_class: Dict[int, List[int]] = {}
            for i, l in enumerate(self.labels):
                by_class.setdefault(l, []).append(i)
            train, test = [], []
            for c in sorted(by_class):
                ids = by_class[c][:]
                rng.shuffle(ids)
                k = int(round(len(ids) * test_fraction))
                k = min(max(k, 1), len(ids) - 1) if len(ids) >= 2 else 0
                test += ids[:k]
                train += ids[k:]
        else:
            ids = list(range(len(self)))
            rng.shuffle(ids)
            k = min(max(int(round(len(ids) * test_fraction)), 1), max(len(ids) - 1, 1))
            test, train = ids[:k], ids[k:]
        return self.subset(sorted(train)), self.subset(sorted(test))

    def load(self, model, *, mode: str = "timm", batch_size: int = 64) -> Float[Tensor, "n chans height width"]:
        """All images as one normalised batch, preprocessed by ``model.preprocess(mode=mode)``."""
        if not len(self):
            raise InputError("the ImageSet is empty")
        parts = [model.preprocess([str(p) for p in self.paths[i : i + batch_size]], mode=mode)
                 for i in range(0, len(self), batch_size)]
        return torch.cat(parts)

    def batches(
        self, model, *, batch_size: int = 32, mode: str = "timm", progress: bool = True
    ) -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
        """Yield ``(images [b, C, H, W], labels [b] or None)`` batches, preprocessed for ``model``."""
        from vit_lens.core import progress_bar

        starts = range(0, len(self), batch_size)
        for i in progress_bar(starts, progress=progress, desc="images"):
            chunk = self.subset(range(i, min(i + batch_size, len(self))))
            x = model.preprocess([str(p) for p in chunk.paths], mode=mode)
            yield x, (chunk.label_tensor().to(x.device) if chunk.has_labels else None)


def from_labels_csv(
    csv_path: Union[str, os.PathLike],
    root: Optional[Union[str, os.PathLike]] = None,
    *,
    path_column: str = "path",
    label_column: str = "class_index",
    name_column: str = "class_name",
) -> ImageSet:
    """Read a labels CSV: one row per image with its path and integer class index.

    Args:
        csv_path: the CSV file (header row required).
        root: folder the paths are relative to (default: the CSV's folder).
        path_column, label_column, name_column: column names (``name_column`` is optional in the file).
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"no labels CSV at {str(csv_path)!r}")
    root = Path(root).expanduser() if root is not None else csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for c in (path_column, label_column):
            if c not in cols:
                raise InputError(
                    f"{csv_path.name} has columns {cols}; expected a {c!r} column "
                    f"(pass path_column=/label_column= to name yours)"
                )
        rows = list(reader)
    if not rows:
        raise InputError(f"{csv_path} has no rows")
    paths, labels, names, missing = [], [], [], []
    for i, r in enumerate(rows):
        p = Path(r[path_column])
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            missing.append(str(p))
        try:
            labels.append(int(r[label_column]))
        except ValueError:
            raise InputError(f"row {i + 2} of {csv_path.name}: {label_column}={r[label_column]!r} is not an integer class index") from None
        paths.append(p)
        names.append(r.get(name_column) or str(labels[-1]))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {csv_path.name} are missing, e.g. {missing[:3]}")
    return ImageSet(paths, labels, names, root)


def _resolve_class_folder(name: str, model) -> int:
    synsets = getattr(model, "class_synsets", None) or []
    if name in synsets:
        return synsets.index(name)
    if name.isdigit():
        return model.class_index(int(name))
    return model.class_index(name.replace("_", " "))


def from_image_folder(
    root: Union[str, os.PathLike],
    *,
    model=None,
    class_to_index: Optional[Mapping[str, int]] = None,
) -> ImageSet:
    """Read an ImageFolder tree ``root/<class folder>/<image>``.

    Class folders become labels by, in order: ``class_to_index`` if given; else, with a ``model``,
    the folder name as a WordNet id in ``model.class_synsets``, a class index, or a class name
    (``"tabby_cat"`` works); else sorted folder names numbered 0, 1, ... (torchvision's convention --
    these indices are not the model's classes).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {str(root)!r}")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    folders = [d for d in folders if any(_is_image(p) for p in d.iterdir())]
    if not folders:
        raise InputError(f"{root} has no class folders with images (expected root/<class>/<image>)")
    if class_to_index is not None:
        unknown = [d.name for d in folders if d.name not in class_to_index]
        if unknown:
            raise UnknownNameError(f"class_to_index has no entry for folder(s) {unknown[:5]}")
        mapping = {d.name: int(class_to_index[d.name]) for d in folders}
    elif model is not None:
        mapping, bad = {}, []
        for d in folders:
            try:
                mapping[d.name] = _resolve_class_folder(d.name, model)
            except (KeyError, IndexError):
                bad.append(d.name)
        if bad:
            raise UnknownNameError(
                f"cannot match class folder(s) {bad[:5]} to {model.cfg.model_name}'s classes; name folders by "
                "WordNet id (n02123045), class index or class name, or pass class_to_index={folder: index}"
            )
    else:
        mapping = {d.name: i for i, d in enumerate(folders)}
    paths, labels, names = [], [], []
    for d in folders:
        for p in sorted(d.iterdir()):
            if _is_image(p):
                paths.append(p.resolve())
                labels.append(mapping[d.name])
                names.append(d.name)
    return ImageSet(paths, labels, names, root)


def from_folder(root: Union[str, os.PathLike]) -> ImageSet:
    """All images directly inside ``root`` (sorted by name), unlabelled."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {str(root)!r}")
    paths = sorted(p.resolve() for p in root.iterdir() if _is_image(p))
    if not paths:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    nested = sorted(str(q.relative_to(root)) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                    for q in d.rglob("*") if _is_image(q))
    if nested:  # reading the top level only would drop these without a word
        shown = ", ".join(nested[:3]) + (f" and {len(nested) - 3} more" if len(nested) > 3 else "")
        raise InputError(f"{root} holds images directly and in subfolders ({shown}): a flat folder would read "
                         "only the first, an ImageFolder tree only the second; move them into one layout, or "
                         "list every image in a labels CSV (path,class_index)")
    return ImageSet(paths, None, None, root)


def load_image_set(path: Union[str, os.PathLike], *, model=None, **kwargs: Any) -> ImageSet:
    """Read a dataset from a labels CSV, a folder holding ``labels.csv``, an ImageFolder tree, or a
    flat folder of images (unlabelled), whichever ``path`` is. ``model`` resolves ImageFolder class
    names; other keywords go to :func:`from_labels_csv` / :func:`from_image_folder`."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(f"{path} is a file but not a .csv labels file")
        return from_labels_csv(path, **kwargs)
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder at {str(path)!r}")
    if (path / "labels.csv").is_file():
        return from_labels_csv(path / "labels.csv", **kwargs)
    if any(_is_image(p) for p in path.iterdir()):
        return from_folder(path)
    return from_image_folder(path, model=model, **kwargs)


def augmented_views(
    images: Sequence[Any],
    n_views: int,
    *,
    seed: int = 0,
    scale: Tuple[float, float] = (0.35, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> List[Any]:
    """Seeded random-resized-crop (+ horizontal flip) views of each image, as PIL images.

    Returns ``n_views`` views per image, image-major (``views[i * n_views + j]`` is view ``j`` of
    image ``i``). Crops cover a ``scale`` fraction of the area with aspect ratio in ``ratio``.
    Feed them to ``model.preprocess`` (which resizes them to the model's input size).
    """
    from PIL import Image

    from vit_lens.preprocess import load_image

    if n_views < 1:
        raise InputError(f"n_views must be >= 1, got {n_views}")
    g = torch.Generator().manual_seed(int(seed))
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    out = []
    for item in images:
        img = load_image(item if not isinstance(item, Path) else str(item))
        W, H = img.size
        for _ in range(n_views):
            for _attempt in range(20):
                area = u(*scale) * W * H
                log_r = u(float(torch.log(torch.tensor(ratio[0]))), float(torch.log(torch.tensor(ratio[1]))))
                ar = float(torch.exp(torch.tensor(log_r)))
                w, h = int(round((area * ar) ** 0.5)), int(round((area / ar) ** 0.5))
                if 0 < w <= W and 0 < h <= H:
                    break
            else:
                w, h = W, H
            x0 = int(u(0, W - w + 1)) if W > w else 0
            y0 = int(u(0, H - h + 1)) if H > h else 0
            view = img.crop((x0, y0, x0 + w, y0 + h))
            if flip and float(torch.rand((), generator=g)) < 0.5:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(view)
    return out
