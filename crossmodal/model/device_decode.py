"""Decoding on the device: loader workers pass a batch's JPEG bytes on, and the training or encoding process decodes
them on its accelerator (nvjpeg on CUDA, libjpeg-turbo on CPU), which frees the CPU cores a GPU run would otherwise
need (docs/architecture.md, "Decoding on the device").

Only JPEGs that decode there to the pixels Pillow gives are left encoded (:func:`decodes_on_device`); a training
crop (crossmodal/training/augment.py) or the eval transform (crossmodal/model/preprocess.py) is then applied to each
decoded image, so both paths give the same pixels.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from crossmodal.data.images import draft_reduces


@dataclass(frozen=True)
class EncodedImage:
    """An image left for the device to decode, with the seed of its crop (training) or 0 (evaluation)."""

    data: bytes
    seed: int = 0


def decodes_on_device(data: bytes, draft_size: tuple[int, int] | None = None) -> bool:
    """Baseline RGB or greyscale JPEG without an EXIF rotation: what nvjpeg decodes to the pixels Pillow gives.

    Anything else (PNG, CMYK, progressive, rotated photos) is decoded by the worker, so both paths agree on every row;
    with ``draft_size``, so is a JPEG large enough for Pillow to decode it at a reduced scale (nvjpeg has no such
    scaling, and the pixels would differ).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return (
                image.format == "JPEG"
                and image.mode in ("RGB", "L")
                and image.getexif().get(0x0112, 1) == 1  # orientation: nvjpeg does not apply it
                and not image.info.get("progressive", False)
                and not (draft_size is not None and draft_reduces(*image.size, draft_size))
            )
    except (OSError, SyntaxError, ValueError):
        return False


def decode_batch(
    items: list[EncodedImage | torch.Tensor],
    transform: Callable[[torch.Tensor, int], torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """The device path: decode a batch's JPEGs in one call on ``device``, ``transform(uint8 image, seed)`` each, stack.

    Items a worker already decoded and transformed (tensors) are only moved. On CUDA the decode is nvjpeg's batched
    decode; on CPU it is libjpeg-turbo, which gives Pillow's pixels.
    """
    from torchvision.io import ImageReadMode, decode_jpeg  # deprecated for TorchCodec, still the documented nvjpeg path

    encoded = [index for index, item in enumerate(items) if isinstance(item, EncodedImage)]
    pixels = list(items)
    if encoded:
        data = [torch.frombuffer(bytearray(items[index].data), dtype=torch.uint8) for index in encoded]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the deprecation notice
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        for index, image in zip(encoded, decoded, strict=True):
            pixels[index] = transform(image, items[index].seed)
    return torch.stack([image.to(device, non_blocking=True) for image in pixels])
