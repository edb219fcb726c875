"""The eval image preprocessing shared by training-time evaluation, indexing and serving.

One definition of the eval preprocessing is what keeps the app's query embeddings comparable to the stored ones.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from crossmodal.config import ModelConfig
from crossmodal.data.images import REDUCING_GAP, decode_image


def eval_transform(config: ModelConfig) -> v2.Compose:
    """PIL RGB image -> normalised float tensor [3, S, S]: resize the short side, centre crop, as the image tower was
    pretrained. (The training crop is crossmodal/training/augment.py's.)"""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(config.resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(config.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.image_mean), std=list(config.image_std)),
        ]
    )


def eval_draft_size(config: ModelConfig) -> tuple[int, int]:
    """The least size an eval JPEG may decode at: twice the eval resize, so the reduced-scale decode never shows.

    For the default 256 px resize a Flickr photo (500x375) always decodes whole; a 12 MP phone photo decodes at 1/4
    scale, about 3x faster to decode and resize, and its pixels after the eval transform move by under 1/255 on average.
    """
    side = math.ceil(REDUCING_GAP * config.resize_size)
    return side, side


def decode_for_eval(data: bytes, config: ModelConfig) -> Image.Image:
    """Untrusted image bytes -> the RGB image the eval transform takes: the one decode of indexing and of queries, so
    a stored picture searched for finds its own stored embedding. Raises ``ImageDecodeError``."""
    return decode_image(data, draft_size=eval_draft_size(config))


def image_batch(images: list[Image.Image], config: ModelConfig) -> torch.Tensor:
    """Eval-preprocess decoded images into one batch [B, 3, S, S]: the query path of search and the self-test."""
    transform = eval_transform(config)
    return torch.stack([transform(image) for image in images])
