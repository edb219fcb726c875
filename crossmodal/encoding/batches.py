"""Batches for encoding many inputs with the towers: every image of a split through the eval transform, captions into
token tensors, and how many loader workers and threads a process may use for it.

Shared by training's validation, the artifact's embeddings, ``python -m crossmodal evaluate`` and indexing your own
pictures, so each encodes exactly as search preprocesses a query.
"""

from __future__ import annotations

import os

import datasets
import torch
from torch.utils.data import Dataset

from crossmodal.config import ModelConfig
from crossmodal.data.images import image_bytes
from crossmodal.model.device_decode import EncodedImage, decodes_on_device
from crossmodal.model.dual_encoder import tokenize
from crossmodal.model.preprocess import decode_for_eval, eval_draft_size, eval_transform


class EvalImages(Dataset):
    """Every image of ``rows`` once, eval-preprocessed as search queries are, in row order.

    With ``decode_on_device``, JPEGs the device decodes to Pillow's pixels stay encoded (see :func:`decodes_on_device`).
    """

    def __init__(self, rows: datasets.Dataset, config: ModelConfig, decode_on_device: bool = False) -> None:
        self.images = rows.select_columns(["image"])
        self.config = config
        self.transform = eval_transform(config)
        self.decode_on_device = decode_on_device

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor | EncodedImage:
        data = image_bytes(self.images[index]["image"])
        if self.decode_on_device and decodes_on_device(data, eval_draft_size(self.config)):
            return EncodedImage(data)
        return self.transform(decode_for_eval(data, self.config))


def collate_images(items: list[torch.Tensor | EncodedImage]) -> torch.Tensor | list[torch.Tensor | EncodedImage]:
    """Stack decoded images; a batch holding images left for the device stays a list (see :class:`DeviceBatch`)."""
    if any(isinstance(item, EncodedImage) for item in items):
        return list(items)
    return torch.stack(items)


class CaptionBatcher:
    """Collate a list of captions into the text tower's token tensors."""

    def __init__(self, tokenizer, config: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, captions, self.config)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(configured: int | None, num_processes: int) -> int:
    """Loader workers per process: as configured, or every core this process's share has but one (it drives the
    model), since decode + augment is the CPU-heavy part of a step."""
    if configured is not None:
        return configured
    return max(usable_cores() // num_processes - 1, 0)
