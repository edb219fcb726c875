"""Image transforms and caption tokenisation shared by training, indexing and serving.

One definition of the eval preprocessing is what keeps the app's query embeddings comparable to the stored ones.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from crossmodal.config import ModelConfig


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


def tokenize(tokenizer, captions: list[str], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Pad to the longest caption in the batch and truncate at ``max_text_length`` word pieces."""
    encoded = tokenizer(captions, padding=True, truncation=True, max_length=config.max_text_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def image_batch(images: list[Image.Image], config: ModelConfig) -> torch.Tensor:
    """Eval-preprocess decoded images into one batch [B, 3, S, S]: the query path of search and the self-test."""
    transform = image_transform(config, train=False)
    return torch.stack([transform(image) for image in images])
