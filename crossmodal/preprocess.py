"""Image transforms and caption tokenisation shared by training, indexing and serving.

One definition of the eval preprocessing is what keeps the app's query embeddings comparable to the stored ones.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from crossmodal.config import ModelConfig
from crossmodal.images import REDUCING_GAP, decode_image


def image_transform(config: ModelConfig, *, train: bool) -> v2.Compose:
    """PIL RGB image -> normalised float tensor [3, S, S].

    Train: a mild random resized crop (scale 0.8-1) and no flip, since captions say "left" and "right".
    Eval: resize the short side, centre crop, as the image tower was pretrained.
    """
    if train:
        geometry = [
            v2.RandomResizedCrop(
                config.image_size, scale=(0.8, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        ]
    else:
        geometry = [
            v2.Resize(config.resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(config.image_size),
        ]
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
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


def tokenize(tokenizer, captions: list[str], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Pad to the longest caption in the batch and truncate at ``max_text_length`` word pieces."""
    encoded = tokenizer(captions, padding=True, truncation=True, max_length=config.max_text_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def image_batch(images: list[Image.Image], config: ModelConfig) -> torch.Tensor:
    """Eval-preprocess decoded images into one batch [B, 3, S, S]: the query path of search and the self-test."""
    transform = image_transform(config, train=False)
    return torch.stack([transform(image) for image in images])
