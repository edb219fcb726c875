"""Decoding untrusted bytes: what is refused, with which message, and what is converted."""

import io

import pytest
from PIL import Image

from crossmodal.data.images import ImageDecodeError, decode_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"just some text pretending to be a jpeg", "not a supported image"),
        (encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:300], "corrupt or truncated"),
        (encode(Image.new("RGB", (8, 8), "red"), "PNG"), "at least 16 px"),
        (encode(Image.new("RGB", (64, 64), "red"), "BMP"), "not a supported image"),
    ],
    ids=["empty", "text", "truncated-jpeg", "too-small", "bmp-not-allowed"],
)
def test_bad_images_are_refused_with_a_clear_message(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (8000, 6000)), "PNG")  # 48 MP, a few kB on disk
    with pytest.raises(ImageDecodeError, match="megapixels"):
        decode_image(bomb)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = Image.new(mode, (32, 32))
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (32, 32)


def test_transparent_pixels_become_white():
    decoded = decode_image(encode(Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "PNG"))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert decode_image(encode(image, "JPEG", exif=exif)).size == (20, 40)
