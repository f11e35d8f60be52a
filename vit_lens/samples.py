"""Built-in sample images, so examples and first analyses run without any image files of your own.

Three small photographs ship with the package (256 px on the short side; credits in
``vit_lens/data/samples/CREDITS.txt``)::

    import vit_lens
    img = vit_lens.sample_image("chelsea")            # a PIL image of a tabby cat
    batch = model.preprocess([vit_lens.sample_image(n) for n in vit_lens.SAMPLE_IMAGES])
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Dict

from PIL import Image
from vit_lens.core.errors import InputTypeError, UnknownNameError

_DIR = Path(__file__).resolve().parent / "data" / "samples"

#: name -> what the photo shows (and the ImageNet-1k class a classifier should see in it)
SAMPLE_IMAGES: Dict[str, str] = {
    "chelsea": "a tabby cat (ImageNet class 281 'tabby, tabby cat'; ViT-Ti and DeiT-Ti rank 285 'Egyptian cat' "
    "first, tabby in their top 3); scikit-image sample data, CC0",
    "coffee": "a cup of espresso (ImageNet class 967 'espresso'); scikit-image sample data, CC0",
    "grace_hopper": "Grace Hopper in uniform (ImageNet class 652 'military uniform'); U.S. Navy photo, public domain",
}

_FILES = {name: f"{name}.jpg" for name in SAMPLE_IMAGES}


def sample_image_path(name: str) -> Path:
    """Path of a built-in sample image (one of :data:`SAMPLE_IMAGES`)."""
    if not isinstance(name, str):
        raise InputTypeError(f"sample image name must be a string, one of {list(SAMPLE_IMAGES)}; got {name!r}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = {"chelsea.jpg": "chelsea", "coffee.jpg": "coffee", "grace_hopper.jpg": "grace_hopper"}.get(key, key)
    if key not in _FILES:
        close = difflib.get_close_matches(key, list(_FILES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"no sample image {name!r}.{hint} Available: {list(SAMPLE_IMAGES)}")
    path = _DIR / _FILES[key]
    if not path.is_file():  # a broken install (package data not included)
        raise FileNotFoundError(f"sample image {path} is missing; reinstall vit_lens (pip install -e .)")
    return path


def sample_image(name: str) -> Image.Image:
    """A built-in sample image as an RGB PIL image (fully loaded; the file is closed).

    Args:
        name: one of :data:`SAMPLE_IMAGES`: ``"chelsea"`` (tabby cat), ``"coffee"`` (espresso),
            ``"grace_hopper"`` (military uniform).
    """
    with Image.open(sample_image_path(name)) as im:
        return im.convert("RGB")
