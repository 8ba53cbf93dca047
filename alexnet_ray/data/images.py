"""Turning one source file into the stored form: size x size RGB JPEG bytes.

Valid but odd images (CMYK, grayscale, palette or alpha, 16-bit, EXIF-rotated, PNG under a .JPEG
name) are converted; anything else raises BadImageError with a short reason for the manifest.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

JPEG_QUALITY = 90
# ILSVRC2012's largest photo is about 12 Mpx; past this we call it a decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class BadImageError(ValueError):
    """A file that cannot be turned into an RGB image; str(error) is the reason."""


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # 16-bit and 32-bit greyscale: PIL's convert() would clip, so rescale to 8 bits.
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        elif mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def _classify(error: Exception) -> str:
    text = str(error)
    if isinstance(error, Image.DecompressionBombError):
        return f"decompression bomb: {text}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if "truncated" in text.lower():
        return f"truncated: {text}"
    return f"unreadable: {type(error).__name__}: {text}"


def convert_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `data`, resize its short side to `size`, centre-crop to size x size; uint8 HxWx3."""
    if not data:
        raise BadImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(
                    f"decompression bomb: {width}x{height} pixels exceeds the limit of {max_pixels}"
                )
            if width < 1 or height < 1:
                raise BadImageError(f"unreadable: {width}x{height} image")
            short = min(width, height)
            if image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
                # Let libjpeg decode at a reduced scale when the photo is much larger than `size`.
                image.draft(image.mode, (-(-width * size // short), -(-height * size // short)))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise BadImageError(f"decompression bomb: {error}") from None
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImageError(_classify(error)) from None
    width, height = image.size
    short = min(width, height)
    left, top = (width - short) // 2, (height - short) // 2
    image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + short, top + short))
    return np.asarray(image, dtype=np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode stored JPEG bytes to uint8 HxWx3."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
