"""A locked image tower: the pretrained ImageNet tower is not trained, and each picture's pooled features are computed
once, before the first step, instead of at every step of every epoch. Only the image head (and the text side) learn.

Why (docs/architecture.md, "The demo locks both towers"): on 2 CPU cores EfficientNet-Lite0 embeds ~22 pictures a
second at 224 px, so its forward passes alone at every step of a 60-epoch demo would take 45 minutes where the cached
features take under one, and fine-tuning it on a thousand generated pictures scored lower (docs/benchmarks.md).
The cost is augmentation: a cached picture is always seen through the eval transform, as search sees it.

Features are keyed by the sha256 of the picture's bytes, so validation, the test split and the artifact's corpus,
whose rows come from other tables, find them too (:func:`crossmodal.encoding.encode_images`).
"""

from __future__ import annotations

import hashlib

import datasets
import torch
from accelerate import Accelerator

from crossmodal.images import image_bytes
from crossmodal.model import DualEncoder


def lock_image_tower(model: DualEncoder) -> None:
    """Freeze the image tower's weights (the optimizer then never sees them) and keep it in eval mode."""
    model.image_tower.requires_grad_(False)
    model.image_tower_locked = True


def image_digests(rows: datasets.Dataset) -> list[str]:
    return [hashlib.sha256(image_bytes(value)).hexdigest() for value in rows.select_columns(["image"])["image"]]


class KnownImageFeatures:
    """The locked tower's pooled features of every picture it has seen, looked up by the sha256 of its bytes."""

    def __init__(self, digests: list[str], features: torch.Tensor) -> None:
        self.row_of = {digest: row for row, digest in enumerate(digests)}
        self.features = features.cpu().clone()  # inference-mode tensors cannot enter autograd

    @classmethod
    def for_splits(
        cls, accelerator: Accelerator, model: DualEncoder, splits: datasets.DatasetDict, batch_size: int
    ) -> KnownImageFeatures:
        """Every picture of every split, encoded once through the eval transform, each process its share."""
        from crossmodal.encoding import encode_images  # encoding looks these features up: imported late

        rows = datasets.concatenate_datasets([splits[name].select_columns(["image"]) for name in splits])
        digests = image_digests(rows)
        features = encode_images(accelerator, model, rows, batch_size, pooled=True)
        return cls(digests, features)

    def rows(self, digests: list[str]) -> list[int] | None:
        """Each digest's row, or None when one of them was never seen."""
        found = [self.row_of.get(digest) for digest in digests]
        return None if any(row is None for row in found) else found  # type: ignore[return-value]

    def of_rows(self, rows: datasets.Dataset) -> torch.Tensor:
        """[len(rows), F_img]: the features of ``rows``, which must all have been seen."""
        found = self.rows(image_digests(rows))
        if found is None:
            raise KeyError("a picture the locked tower never encoded")
        return self.features[found]


def train_image_features(
    model: DualEncoder, splits: datasets.DatasetDict, batch_size: int, accelerator: Accelerator
) -> torch.Tensor:
    """The training rows' features, in row order, from features computed here once for every split, which the model
    then keeps as ``known_image_features``."""
    known = KnownImageFeatures.for_splits(accelerator, model, splits, batch_size)
    model.known_image_features = known
    return known.of_rows(splits["train"])
