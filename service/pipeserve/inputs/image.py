"""Encoded image bytes -> an upright RGB PIL image, as transformers' `load_image` makes it.

transformers.image_utils.load_image opens the file with PIL, applies the EXIF orientation
(`ImageOps.exif_transpose`) and converts with `image.convert("RGB")` (alpha is dropped, not
composited: the image-classification pipeline calls load_image before the image processor, so
the processor only ever sees RGB). We do the same so pixel values match bit for bit.

What we add is refusal before work: the pixel count is read from the header (PIL opens lazily)
and checked against `max_pixels` before a single pixel is decoded, so a 20000x20000 PNG of a
few kilobytes costs nothing. Every failure is a typed error: empty or corrupt bytes are
InvalidInput, bytes that are no image format we accept are UnsupportedFormat, too many pixels
is InputTooLarge.
"""
from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputTooLarge, InvalidInput, UnsupportedFormat

# The formats the service accepts, by PIL's names (GIF and TIFF: the first frame is used).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"

# Pillow's own decompression-bomb warning threshold (PIL.Image.MAX_IMAGE_PIXELS: 1024 * 1024 *
# 1024 // 4 // 3 = 89,478,485 pixels, about 256 MiB of RGB). A larger image is refused.
# Pillow itself refuses past 2 * PIL.Image.MAX_IMAGE_PIXELS inside Image.open whatever our
# limit is (we leave that global alone), so a limit above ~179M pixels has no effect.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

# File signatures: bytes that start like one of these but do not decode are corrupt or
# truncated (InvalidInput), anything else is not an image we accept (UnsupportedFormat).
_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("JPEG", (b"\xff\xd8\xff",)),
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
)


def sniff_format(data: bytes) -> str | None:
    """The accepted format whose signature `data` starts with, if any."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) >= 10 and data[:2] == b"BM" and data[6:10] == bytes(4):
        return "BMP"  # "BM", file size, then 4 reserved zero bytes (plain text rarely has NULs)
    for name, signatures in _SIGNATURES:
        if data.startswith(signatures):
            return name
    return None


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Opens `data` lazily (header only) and checks its size; no pixel is decoded yet."""
    if not data:
        raise InvalidInput("image is empty (0 bytes)", reason="EMPTY_INPUT")
    sniffed = sniff_format(data)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow refuses past 2 * MAX_IMAGE_PIXELS on its own, before our check can run.
        raise InputTooLarge(f"image is too large to decode (refused before decoding; our limit is "
                            f"{max_pixels:,} pixels): {exc}",
                            metadata={"max_pixels": max_pixels}) from None
    except UnidentifiedImageError:
        if sniffed:
            raise InvalidInput(f"image data looks like {sniffed} but its header cannot be read "
                               f"(corrupt or truncated, {len(data)} bytes)", reason="CORRUPT_IMAGE") from None
        raise UnsupportedFormat(f"data is not an image in a supported format ({FORMAT_NAMES}); "
                                f"it starts with {data[:8]!r}") from None
    except Exception as exc:  # PIL plugins raise many kinds on malformed headers
        raise InvalidInput(f"cannot read the {sniffed or 'image'} header: {type(exc).__name__}: {exc}",
                           reason="CORRUPT_IMAGE") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInput(f"image has no pixels ({width}x{height})", reason="CORRUPT_IMAGE")
    if width * height > max_pixels:
        image.close()
        raise InputTooLarge(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} "
            "(refused before decoding, as a decompression-bomb guard)",
            metadata={"width": width, "height": height, "max_pixels": max_pixels})
    return image


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> upright RGB image (first frame of animations), as load_image does."""
    image = open_image(data, max_pixels=max_pixels)
    fmt = image.format or "image"
    try:
        with image:
            upright = ImageOps.exif_transpose(image)
            rgb = upright.convert("RGB")
            rgb.load()
    except (InputTooLarge, InvalidInput):
        raise
    except Exception as exc:  # truncated streams raise OSError, bad chunks SyntaxError/ValueError...
        raise InvalidInput(f"{fmt} data is corrupt or truncated: {type(exc).__name__}: {exc}",
                           reason="CORRUPT_IMAGE") from None
    return rgb
