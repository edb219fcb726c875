"""The training pairs and their loader: the torch dataset of (image, caption) items, the epoch's order, the collation
of training batches and their last step on the device.

Every random choice of an epoch (its order, each image's caption and crop) is fixed by (run seed, epoch, row), so a
resumed run, any number of loader workers and any number of processes see the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from crossmodal.config import TrainConfig
from crossmodal.data.dataset import caption_lists
from crossmodal.data.images import image_bytes
from crossmodal.encoding.batches import collate_images
from crossmodal.model.device_decode import EncodedImage, decode_batch, decodes_on_device
from crossmodal.training.augment import TrainAugment


def epoch_generator(seed: int, epoch: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class TrainPairs(Dataset):
    """Item i of epoch e: image i, augmented, with one of its captions; both choices fixed by (seed, e, i).

    One caption per image per epoch means a batch never holds two captions of one image, so no true pair is ever
    used as a negative. With ``decode_on_device`` the item carries the JPEG bytes and the crop's seed instead of
    pixels (see :mod:`~crossmodal.model.device_decode`); images the device cannot decode like Pillow does are
    decoded here.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        augment: TrainAugment,
        seed: int,
        decode_on_device: bool = False,
        image_features: torch.Tensor | None = None,
    ) -> None:
        self.images = rows.select_columns(["image"])  # the other columns are never read: no need to copy them
        self.captions = caption_lists(rows)  # cleaned once here, not at every step
        self.augment = augment
        self.seed = seed
        self.decode_on_device = decode_on_device
        # A locked image tower's features of each row (crossmodal/training/locked.py): items carry them, not pixels.
        self.image_features = image_features
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | EncodedImage, str]:
        rng = epoch_generator(self.seed, self.epoch, index)
        captions = self.captions[index]
        caption = captions[rng.integers(len(captions))]
        if self.image_features is not None:
            return LockedFeatures(self.image_features[index]), caption
        data, crop_seed = image_bytes(self.images[index]["image"]), int(rng.integers(2**62))
        if self.decode_on_device and decodes_on_device(data):
            return EncodedImage(data, crop_seed), caption
        return self.augment.decode(data, crop_seed), caption


@dataclass(frozen=True)
class LockedFeatures:
    """A training item's precomputed image features, in place of its pixels (crossmodal/training/locked.py)."""

    values: torch.Tensor  # [F_img]


class EpochShuffle(Sampler[int]):
    """A permutation of the rows fixed by (seed, epoch): resuming mid-epoch replays the same order."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        return iter(epoch_generator(self.seed, self.epoch).permutation(self.num_rows).tolist())


class TrainBatcher:
    """Collate (image, caption) pairs: images as :func:`collate_images` does, captions with ``captions``: a
    :class:`CaptionBatcher` (tokens), or a locked tower's precomputed features (crossmodal/training/locked.py)."""

    def __init__(self, captions: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
        self.captions = captions

    def __call__(self, items: list[tuple[torch.Tensor | EncodedImage, str]]) -> dict[str, Any]:
        images, captions = zip(*items, strict=True)
        if isinstance(images[0], LockedFeatures):
            return {"image_features": torch.stack([image.values for image in images]), **self.captions(list(captions))}
        collated = collate_images(list(images))
        key = "images" if isinstance(collated, list) else "pixel_values"  # a list: still to be decoded on the device
        return {key: collated, **self.captions(list(captions))}


class WithCaptionNegatives:
    """A caption collator that also collates each caption's negatives (crossmodal/training/negatives.py): the
    positives as ``captions`` collates them, and each key again as ``negative_<key>`` [B, K, ...], collated in the
    same call (one padded length), with ``negative_mask`` [B, K] False where a caption has fewer than K. Every
    tensor's first dimension is the batch, so Accelerate's split of a global batch keeps them together."""

    def __init__(
        self, captions: Callable[[list[str]], dict[str, torch.Tensor]], negatives: Mapping[str, list[str]], count: int
    ) -> None:
        self.captions = captions
        self.negatives = negatives
        self.count = count

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.negatives.get(caption, [])[: self.count] for caption in captions]
        # A missing negative is filled with its own caption, which every collator can encode; the mask drops it.
        filled = [
            text
            for caption, row in zip(captions, rows, strict=True)
            for text in row + [caption] * (self.count - len(row))
        ]
        collated = self.captions(list(captions) + filled)
        size = len(captions)
        batch = {key: value[:size] for key, value in collated.items()}
        batch |= {f"negative_{key}": value[size:].unflatten(0, (size, self.count)) for key, value in collated.items()}
        batch["negative_mask"] = torch.tensor([[k < len(row) for k in range(self.count)] for row in rows])
        return batch


class DeviceBatch:
    """A loader batch, on the training device, made ready for the model.

    ``decode_on_device`` batches carry JPEG bytes: they are decoded and cropped here (nvjpeg on CUDA). channels_last
    is the layout cuDNN runs EfficientNet's convolutions fastest in; a channels_last input is enough for every
    convolution to follow it, and the weights stay contiguous for safetensors.
    """

    def __init__(self, augment: TrainAugment, device: torch.device, *, channels_last: bool) -> None:
        self.augment = augment
        self.device = device
        self.channels_last = channels_last

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # A streamed batch arrives on the CPU (training/streamed.py); a prepared loader's is already here.
        batch = {
            key: value.to(self.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
        }
        if "images" in batch:
            batch["pixel_values"] = decode_batch(batch.pop("images"), self.augment, self.device)
        if self.channels_last and "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
        return batch


def make_train_loader(
    dataset: TrainPairs,
    captions: Callable[[list[str]], dict[str, torch.Tensor]],
    train_config: TrainConfig,
    num_workers: int,
) -> DataLoader:
    """Global batches of ``dataset`` in the epoch's order (``set_epoch``), collated by :class:`TrainBatcher` with
    ``captions`` as its caption collator."""
    return DataLoader(
        dataset,
        batch_size=train_config.batch_size,
        sampler=EpochShuffle(len(dataset), train_config.seed),
        drop_last=True,  # every step sees a full global batch: the same number of negatives
        num_workers=num_workers,
        collate_fn=TrainBatcher(captions),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers must see each epoch's set_epoch
    )
