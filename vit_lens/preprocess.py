"""Images (PIL, paths, uint8 arrays/tensors) -> normalised batches, with the model's timm config
(or, for models converted from Hugging Face, the model's ``transformers`` image processor)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, List, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from vit_lens.core.errors import InputError, InputTypeError, MissingFileError


class SmallImageWarning(UserWarning):
    """An image much smaller than the model's input, so preprocessing upscales it a lot."""


#: warn when an image's short side is below this fraction of the model's input short side
SMALL_IMAGE_FRACTION = 0.5


def _describe(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return f"image {i} ({type(item).__name__})"


def warn_if_small(image: Image.Image, input_size: Any, name: str = "image", *, stacklevel: int = 2) -> float:
    """Warn (:class:`SmallImageWarning`) when ``image``'s short side is under half the model's input.

    Args:
        image: a PIL image (its ``size`` is ``(W, H)``).
        input_size: the model's ``(C, H, W)`` input size (``data_config["input_size"]``).
        name: how to name the image in the message (a path, or ``"image 3"``).

    Returns:
        The upscaling factor: input short side / image short side.
    """
    target = min(int(s) for s in tuple(input_size)[-2:])
    short = max(1, min(image.size))
    factor = target / short
    if short < SMALL_IMAGE_FRACTION * target:
        warnings.warn(
            f"{name} is {image.size[0]}x{image.size[1]} pixels, so it is upscaled about {factor:.0f}x to the "
            f"model's {target}-pixel input; results on such an image mostly reflect the interpolation "
            "(use an image at least half the input size)",
            SmallImageWarning,
            stacklevel=stacklevel + 1,
        )
    return factor


def load_image(item: Any) -> Image.Image:
    """One image as an RGB PIL image. Accepts a PIL image, a path, or a uint8 array/tensor
    ([H, W, C] or [C, H, W]; grayscale [H, W] too)."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise MissingFileError(f"no image file at {str(path)!r}; check the path")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            raise InputError(f"cannot read {str(path)!r} as an image ({e}); pass image files (jpg, png, ...)") from e
    if isinstance(item, Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise InputTypeError(
                f"arrays must be uint8 images (0..255), got dtype {item.dtype}; a float tensor that is "
                "already normalised can be passed to the model directly."
            )
        if item.ndim == 3 and item.shape[0] in (1, 3, 4) and item.shape[-1] not in (1, 3, 4):
            item = np.transpose(item, (1, 2, 0))  # [C, H, W] -> [H, W, C]
        if item.ndim == 3 and item.shape[-1] == 1:
            item = item[..., 0]
        if item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[-1] not in (3, 4)):
            raise InputError(
                f"expected an image [H, W, C] or [C, H, W] with 1, 3 or 4 channels, got an array of shape {item.shape}"
            )
        return Image.fromarray(item).convert("RGB")
    raise InputTypeError(
        f"cannot read an image from {type(item).__name__}; pass PIL images, file paths, or uint8 arrays/tensors"
    )


def image_list(images: Any) -> List[Any]:
    """One image or many as a list of single images (a list/tuple, a uint8 batch [B, C, H, W] or one image)."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    return [images]


class HFProcessorTransform:
    """A Hugging Face ``transformers`` image processor as a transform: PIL image -> [C, H, W] float32,
    exactly the processor's ``pixel_values``.

    ``transforms`` lists two steps, as a timm ``Compose`` does: the resize/crop alone (PIL -> PIL,
    for showing the image the model sees) and the rest (``HFToTensorNormalize``).
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self.transforms = [_HFResizeCrop(processor), HFToTensorNormalize(processor)]

    def __call__(self, image: Image.Image) -> Tensor:
        out = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return torch.as_tensor(out, dtype=torch.float32)


class _HFResizeCrop:
    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> Image.Image:
        out = self.processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
        arr = torch.as_tensor(out).float().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(arr)


class HFToTensorNormalize:
    """The processor's rescale and normalisation (after :class:`_HFResizeCrop`'s resize and crop)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> Tensor:
        out = self.processor(images=[image], do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"][0]
        return torch.as_tensor(out, dtype=torch.float32)


def build_transform(data_config: dict, mode: Literal["timm", "paper"] = "timm"):
    """The eval transform for a timm data config.

    ``"timm"``: the model's own eval transform: timm's (resize, center crop by ``crop_pct``, normalise),
    or, for a model converted from Hugging Face (``data_config["hf_image_processor"]``), that
    ``transformers`` image processor itself (:class:`HFProcessorTransform`).
    ``"paper"``: resize straight to the input size (no crop), as the seed paper does, then normalise.
    """
    from timm.data import create_transform

    if mode == "timm":
        if data_config.get("hf_image_processor"):
            from vit_lens.loading.sources.hf import image_processor_from_config

            return HFProcessorTransform(image_processor_from_config(data_config["hf_image_processor"]))
        return create_transform(**_timm_keys(data_config), is_training=False)
    if mode == "paper":
        cfg = _timm_keys(data_config)
        cfg["crop_pct"] = 1.0
        cfg["crop_mode"] = "squash"  # resize to exactly input_size, no crop
        return create_transform(**cfg, is_training=False)
    raise InputError(f"mode must be 'timm' or 'paper', got {mode!r}")


def _timm_keys(data_config: dict) -> dict:
    """The data config without the keys timm's ``create_transform`` does not take (``hf_image_processor``)."""
    return {k: v for k, v in data_config.items() if k != "hf_image_processor"}


def preprocess_images(images: Any, data_config: dict, mode: Literal["timm", "paper"] = "timm") -> Tensor:
    """Images -> [batch, chans, height, width] float32 tensor normalised with the model's mean/std.

    An image whose short side is under half the model's input short side (e.g. 10x10 for a 224
    input) is still processed, with a :class:`SmallImageWarning` naming it and the upscaling factor.
    """
    items = image_list(images)
    if not items:
        raise InputError("no images given")
    chans = int(data_config.get("input_size", (3,))[0])
    if chans not in (1, 3):
        raise InputError(
            f"preprocess reads RGB or grayscale images, but this model takes {chans}-channel input; "
            f"pass a normalised float tensor [batch, {chans}, height, width] to the model directly."
        )
    transform = build_transform(data_config, mode)
    pil_mode = "L" if chans == 1 else "RGB"
    input_size = data_config.get("input_size", (chans, 224, 224))
    out = []
    for i, x in enumerate(items):
        im = load_image(x)
        warn_if_small(im, input_size, _describe(x, i), stacklevel=2)
        out.append(transform(im.convert(pil_mode)))
    return torch.stack(out)
