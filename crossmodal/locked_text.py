"""A locked text tower (LiT, Zhai et al. 2022): the pretrained tower is not trained, so what it knows of words the
training captions never use is kept, and each training caption's features are computed once instead of at every
step. Only what follows the tower (the adapter, the text projection) and the image side learn; search still runs the
whole tower on the query.

docs/architecture.md, "The demo locks its text tower", says why the demo preset locks.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import torch
from accelerate import Accelerator

from crossmodal.batching import CaptionBatcher
from crossmodal.config import TrainConfig
from crossmodal.data import caption_table
from crossmodal.encoding import encode_captions
from crossmodal.model import DualEncoder


def lock_text_tower(model: DualEncoder) -> None:
    """Freeze the text tower's weights (the optimizer then never sees them) and keep it in eval mode."""
    model.text_tower.requires_grad_(False)
    model.text_tower_locked = True


class LockedCaptionBatcher:
    """Collate captions into their precomputed features (``text_features``), looked up by the caption's text.

    While the tower stays locked the same object also serves :func:`crossmodal.encoding.encode_captions`
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
    here once for the training and validation captions, which the model then keeps as ``known_text_features``."""
    if not train.lock_text_tower:
        return CaptionBatcher(tokenizer, model.config)
    captions = [caption for split in ("train", "val") for caption in caption_table(splits[split])[0]]
    known = LockedCaptionBatcher.for_captions(accelerator, model, tokenizer, captions, train.eval_batch_size)
    model.known_text_features = known
    return known
