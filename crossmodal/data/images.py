"""Decoding untrusted image bytes: bounded, allow-listed, and normalised to RGB the same way everywhere.

Training rows, stored thumbnails and uploads all pass through :func:`decode_image`, so a picture means the same pixels
to the trainer and to the app.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

# Flickr photos are ~0.2 MP; 40 MP leaves room for any real photo while refusing decompression bombs before decoding.
MAX_PIXELS = 40_000_000
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF"})
MIN_SIDE = 16
# Pillow's own rule for draft-then-resize (Image.thumbnail's reducing_gap): decode at no less than twice the size the
# resize needs, so the DCT-scaled decode never shows in the output.
REDUCING_GAP = 2.0


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message says why in words a user understands."""


def decode_image(
    data: bytes, *, max_pixels: int = MAX_PIXELS, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode ``data`` into an RGB image, or raise :class:`ImageDecodeError`.

    ``draft_size`` lets a JPEG decode at a reduced scale (DCT scaling: 1/2, 1/4 or 1/8) while both sides stay at
    least that large: every byte is still checked, at a fraction of the cost. See :func:`draft_reduces`.
    """
    if not data:
        raise ImageDecodeError("the file is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between max_pixels and 2x max_pixels; we refuse at the limit itself.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"the image is {width}x{height} pixels; the limit is {max_pixels // 1_000_000} megapixels"
                )
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.seek(0)  # GIF and other animations: the first frame
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own check fires inside Image.open for images over its limit (~89 MP), before ours can run.
        raise ImageDecodeError(
            f"the image is too large to decode safely; the limit is {max_pixels // 1_000_000} megapixels"
        ) from error
    except Image.UnidentifiedImageError as error:
        raise ImageDecodeError(f"not a supported image (accepted: {', '.join(sorted(ALLOWED_FORMATS))})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"the image is corrupt or truncated ({error})") from error
    if min(image.size) < MIN_SIDE:
        raise ImageDecodeError(f"the image is {image.size[0]}x{image.size[1]}; at least {MIN_SIDE} px a side is needed")
    return to_rgb(ImageOps.exif_transpose(image))


def draft_reduces(width: int, height: int, draft_size: tuple[int, int]) -> bool:
    """Whether :func:`decode_image` with ``draft_size`` decodes a JPEG of this size below full scale (Pillow's rule:
    the largest scale that keeps both sides at least ``draft_size``)."""
    return min(width // draft_size[0], height // draft_size[1]) >= 2


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparency is composited on white, as a browser would show it."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping at 255 (which would turn most images white).
        return image.point(lambda value: value / 256).convert("L").convert("RGB")
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_bytes(value: dict) -> bytes:
    """The encoded bytes of an undecoded ``datasets.Image`` value (bytes inline, or a path on disk)."""
    if value.get("bytes"):
        return value["bytes"]
    if value.get("path"):
        return Path(value["path"]).read_bytes()
    return b""
