"""preprocessor_config.json semantics of transformers' PIL image processors (ViTImageProcessor
and relatives): resize -> center crop -> rescale -> normalize, channels first, float32.

Ports transformers.image_processing_backends.PilBackend._preprocess and the numpy helpers it
calls in transformers/image_transforms.py (resize, center_crop, rescale, normalize), operation
for operation, so that pixel values are identical: resizing is PIL's on the uint8 image with the
config's `resample` filter, rescaling is done in float64 then cast to float32, normalizing in
float32. (The torchvision backend, used by transformers when torchvision is installed, resizes
with torch and differs in the last bits; the PIL backend is the reference here.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ModelLoadFailed

# transformers.image_utils.IMAGENET_STANDARD_MEAN / _STD: ViTImageProcessor's defaults.
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# PIL resampling codes as preprocessor_config.json stores them (PILImageResampling values).
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _size_dict(size: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """Ports image_processing_utils.get_size_dict: int / [h, w] / dict -> a size dict."""
    if size is None:
        return {}
    if isinstance(size, dict):
        return {k: int(v) for k, v in size.items() if v is not None}
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ModelLoadFailed(f"preprocessor {name} {size!r} must have 2 elements", reason="BAD_PREPROCESSOR")
        return {"height": int(size[0]), "width": int(size[1])}
    if default_to_square:
        return {"height": int(size), "width": int(size)}
    return {"shortest_edge": int(size)}


@dataclass(frozen=True)
class ImageProcessor:
    """The fields of preprocessor_config.json that shape pixel_values (defaults: ViT's)."""

    do_resize: bool = True
    size: dict[str, int] | None = None
    resample: int = 2  # PILImageResampling.BILINEAR
    do_center_crop: bool = False
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ImageProcessor":
        """A preprocessor_config.json; missing or null fields take ViTImageProcessor's defaults."""
        def get(key: str, default: Any) -> Any:
            value = config.get(key)
            return default if value is None else value

        square = bool(get("default_to_square", True))
        size = _size_dict(get("size", {"height": 224, "width": 224}), square, "size")
        crop = _size_dict(config.get("crop_size"), True, "crop_size") or None
        mean, std = get("image_mean", IMAGENET_STANDARD_MEAN), get("image_std", IMAGENET_STANDARD_STD)
        processor = cls(
            do_resize=bool(get("do_resize", True)),
            size=size,
            resample=int(get("resample", 2)),
            do_center_crop=bool(get("do_center_crop", False)),
            crop_size=crop,
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            image_mean=tuple(mean) if isinstance(mean, (list, tuple)) else (float(mean),) * 3,
            image_std=tuple(std) if isinstance(std, (list, tuple)) else (float(std),) * 3,
        )
        processor.validate()
        return processor

    def validate(self) -> None:
        if self.resample not in RESAMPLE_NAMES:
            raise ModelLoadFailed(f"preprocessor resample={self.resample} is not a PIL filter code "
                                  f"{RESAMPLE_NAMES}", reason="BAD_PREPROCESSOR")
        keys = set(self.size or {})
        if self.do_resize and not ({"height", "width"} <= keys or "shortest_edge" in keys):
            raise ModelLoadFailed(f"preprocessor size {self.size} is not supported: use height+width or "
                                  "shortest_edge (+ longest_edge)", reason="BAD_PREPROCESSOR")
        if self.do_center_crop and not (self.crop_size and {"height", "width"} <= set(self.crop_size)):
            raise ModelLoadFailed(f"preprocessor crop_size {self.crop_size} needs height and width",
                                  reason="BAD_PREPROCESSOR")
        if self.do_normalize and (len(self.image_mean) != 3 or len(self.image_std) != 3):
            raise ModelLoadFailed("preprocessor image_mean/image_std need 3 values (RGB)", reason="BAD_PREPROCESSOR")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) that resizing gives an image of this size; ports PilBackend.resize's choice."""
        size = self.size or {}
        if "shortest_edge" in size and "longest_edge" in size:
            return _size_with_aspect_ratio(height, width, size["shortest_edge"], size["longest_edge"])
        if "shortest_edge" in size:
            return _shortest_edge_size(height, width, size["shortest_edge"])
        return size["height"], size["width"]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB image -> pixel values (3, H, W) float32."""
        if self.do_resize:
            height, width = self.output_size(image.height, image.width)
            # image_transforms.resize: PIL resize of the uint8 image, (width, height) order.
            image = image.resize((width, height), resample=self.resample)
        pixels = np.moveaxis(np.asarray(image), -1, 0)  # (H, W, 3) uint8 -> (3, H, W)
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:
            # image_transforms.rescale: upcast to float64, multiply, cast to float32.
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            # image_transforms.normalize: float32 arithmetic, channels first via the transpose.
            if not np.issubdtype(pixels.dtype, np.floating):
                pixels = pixels.astype(np.float32)
            mean = np.array(self.image_mean, dtype=pixels.dtype)
            std = np.array(self.image_std, dtype=pixels.dtype)
            pixels = ((pixels.T - mean) / std).T
        return np.ascontiguousarray(pixels, dtype=np.float32)


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Ports image_transforms.get_resize_output_image_size(default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def _size_with_aspect_ratio(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """Ports image_transforms.get_size_with_aspect_ratio (shortest_edge capped by longest_edge)."""
    raw_size = None
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * size > max_size:
        raw_size = max_size * lo / hi
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return (int(raw_size * height / width) if raw_size is not None else int(size * height / width)), size
    return size, (int(raw_size * width / height) if raw_size is not None else int(size * width / height))


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Ports image_transforms.center_crop on (C, H, W): crop, zero-padding an image too small."""
    height, width = pixels.shape[-2:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    bottom, right = top + crop_height, left + crop_width
    if top >= 0 and bottom <= height and left >= 0 and right <= width:
        return pixels[..., top:bottom, left:right]
    new_h, new_w = max(crop_height, height), max(crop_width, width)
    padded = np.zeros_like(pixels, shape=pixels.shape[:-2] + (new_h, new_w))
    top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)  # ceil
    padded[..., top_pad:top_pad + height, left_pad:left_pad + width] = pixels
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return padded[..., max(0, top):min(new_h, bottom), max(0, left):min(new_w, right)]
