"""Locked towers: a pretrained tower is not trained, and its features of every training input are computed once, before
the first step, instead of at every step of every epoch. Only what follows the tower (its head) learns.

A locked text tower (LiT, Zhai et al. 2022) keeps what it knows of words the training captions never use; search still
runs the whole tower on the query. docs/architecture.md, "The demo locks its text tower", says why the demo locks it.

A locked image tower (docs/architecture.md, "The demo locks both towers"): on 2 CPU cores EfficientNet-Lite0 embeds
~22 pictures a second at 224 px, so its forward passes alone at every step of a 60-epoch demo would take 45 minutes
where the cached features take under one, and fine-tuning it on a thousand generated pictures scored lower
(docs/benchmarks.md). The cost is augmentation: a cached picture is always seen through the eval transform, as search
sees it. Its features are keyed by the sha256 of the picture's bytes, so validation, the test split and the
artifact's corpus, whose rows come from other tables, find them too (:func:`crossmodal.encoding.embed.encode_images`).

:meth:`DualEncoder.lock` freezes what the recipe locks, before the optimizer is built; :func:`locked_inputs` then
computes the features, once, and gives the training loader what it collates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
from accelerate import Accelerator

from crossmodal.config import TrainConfig
from crossmodal.data.dataset import caption_table, image_digests
from crossmodal.encoding.batches import CaptionBatcher
from crossmodal.encoding.embed import encode_captions, encode_images
from crossmodal.model.dual_encoder import DualEncoder
from crossmodal.training.negatives import negatives_of
from crossmodal.training.pairs import WithCaptionNegatives


class LockedCaptionBatcher:
    """Collate captions into their precomputed features (``text_features``), looked up by the caption's text.

    While the tower stays locked the same object also serves :func:`crossmodal.encoding.embed.encode_captions`
    (``model.known_text_features``): validation and the artifact's captions are projected, not encoded again.
    """

    def __init__(self, captions: list[str], features: torch.Tensor) -> None:
        self.row_of = {caption: row for row, caption in enumerate(captions)}
        # On the CPU, where loader workers collate (DeviceBatch moves the batch); a clone, since inference-mode
        # tensors cannot enter autograd.
        self.features = features.cpu().clone()

    @classmethod
    def for_captions(
        cls, accelerator: Accelerator, model: DualEncoder, tokenizer, captions: list[str], batch_size: int
    ) -> LockedCaptionBatcher:
        """Features of every distinct caption of ``captions``, computed once, each process encoding its share
        (Accelerate gathers them, so every process holds them all)."""
        distinct = sorted(set(captions))
        features = encode_captions(accelerator, model, tokenizer, distinct, batch_size, pooled=True)
        return cls(distinct, features)

    def holds(self, captions: list[str]) -> bool:
        return all(caption in self.row_of for caption in captions)

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"text_features": self.features[[self.row_of[caption] for caption in captions]]}


def train_captions(
    model: DualEncoder, tokenizer, splits: datasets.DatasetDict, train: TrainConfig, accelerator: Accelerator
) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """The training loader's caption collator: tokens, or with ``lock_text_tower`` each caption's features, computed
    here once for the training and validation captions (and the training captions' negatives), which the model then
    keeps as ``known_text_features``. With ``caption_negatives`` each training caption's negatives come along
    (:class:`~crossmodal.training.pairs.WithCaptionNegatives`)."""
    training = caption_table(splits["train"])[0]
    negatives = negatives_of(training, train.caption_negatives, train.seed) if train.caption_negatives else {}
    if not train.lock_text_tower:
        collate = CaptionBatcher(tokenizer, model.config)
    else:
        captions = [*training, *caption_table(splits["val"])[0]]
        captions += [negative for row in negatives.values() for negative in row]
        collate = LockedCaptionBatcher.for_captions(accelerator, model, tokenizer, captions, train.eval_batch_size)
        model.known_text_features = collate
    return WithCaptionNegatives(collate, negatives, train.caption_negatives) if negatives else collate


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


@dataclass(frozen=True)
class LockedInputs:
    """What the training loader takes from the locked towers."""

    image_features: torch.Tensor | None  # [N_train, F_img] the training rows' features, with a locked image tower
    captions: Callable[[list[str]], dict[str, torch.Tensor]]  # the caption collator: tokens, or locked features


def locked_inputs(
    accelerator: Accelerator, model: DualEncoder, tokenizer, splits: datasets.DatasetDict, train: TrainConfig
) -> LockedInputs:
    """A locked tower's features of every input it will be asked for, computed here once (each process its share),
    kept by the model for validation and the artifact, and handed to the training loader."""
    image_features = (
        train_image_features(model, splits, train.eval_batch_size, accelerator) if train.lock_image_tower else None
    )
    return LockedInputs(image_features, train_captions(model, tokenizer, splits, train, accelerator))
