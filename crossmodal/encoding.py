"""Encoding and evaluating whole splits: the image and caption embeddings of training's validation and test,
of ``crossmodal.evaluate`` and of the artifact folder, and their Recall@K.

Runs on every process; Accelerate shards the batches and ``gather_for_metrics`` reassembles them in order, dropping
the padding it added to even out the last batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from crossmodal.augment import decode_batch
from crossmodal.batching import CaptionBatcher, EvalImages, collate_images
from crossmodal.data import Corpus, caption_table
from crossmodal.metrics import recall_at_k
from crossmodal.model import DualEncoder


@dataclass
class SplitEmbeddings:
    """The embeddings of one split: every image in row order, every caption in caption_table order."""

    images: torch.Tensor  # [N_images, D]
    texts: torch.Tensor  # [N_captions, D]
    caption_image: torch.Tensor  # [N_captions] row of each caption's image

    def recall(self) -> dict[str, float]:
        """Recall@K both ways over this split's images and captions (see :func:`crossmodal.metrics.recall_at_k`)."""
        return recall_at_k(self.images, self.texts, self.caption_image)


def _encode(accelerator: Accelerator, loader: DataLoader, encode, desc: str) -> torch.Tensor:
    loader = accelerator.prepare_data_loader(loader)
    chunks = []
    with torch.inference_mode(), accelerator.autocast():
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
            embeddings = encode(**batch) if isinstance(batch, dict) else encode(batch)
            chunks.append(accelerator.gather_for_metrics(embeddings.float()))
    return torch.cat(chunks).cpu()


def encode_images(
    accelerator: Accelerator,
    model: DualEncoder,
    rows: datasets.Dataset,
    batch_size: int,
    num_workers: int = 0,
    decode_on_device: bool = False,
) -> torch.Tensor:
    """[len(rows), D] L2-normalised image embeddings, in row order.

    ``decode_on_device``: loader workers pass JPEG bytes on and each batch is decoded on the accelerator's device
    (nvjpeg on CUDA), then given the same eval transform.
    """
    dataset = EvalImages(rows, model.config, decode_on_device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=torch.cuda.is_available(),
    )
    # channels_last is cuDNN's fastest layout for the convolutions; on CPU the default layout stays.
    layout = torch.channels_last if accelerator.device.type == "cuda" else torch.contiguous_format

    def encode(batch: torch.Tensor | list) -> torch.Tensor:
        if isinstance(batch, list):
            batch = decode_batch(batch, lambda image, seed: dataset.transform(image), accelerator.device)
        return model.encode_image(batch.contiguous(memory_format=layout))

    model.eval()
    return _encode(accelerator, loader, encode, "Encoding images")


def encode_captions(
    accelerator: Accelerator,
    model: DualEncoder,
    tokenizer,
    captions: list[str],
    batch_size: int,
    num_workers: int = 0,
) -> torch.Tensor:
    """[len(captions), D] L2-normalised caption embeddings, in order."""
    loader = DataLoader(
        captions,
        batch_size=batch_size,
        collate_fn=CaptionBatcher(tokenizer, model.config),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    model.eval()
    return _encode(accelerator, loader, model.encode_text, "Encoding captions")


def encode_split(
    accelerator: Accelerator, model: DualEncoder, tokenizer, rows: datasets.Dataset, batch_size: int
) -> SplitEmbeddings:
    """Embeddings of all images and captions of ``rows``."""
    captions, caption_image = caption_table(rows)
    images = encode_images(accelerator, model, rows, batch_size)
    texts = encode_captions(accelerator, model, tokenizer, captions, batch_size)
    return SplitEmbeddings(images, texts, torch.tensor(caption_image))


def evaluate_split(
    accelerator: Accelerator, model: DualEncoder, tokenizer, rows: datasets.Dataset, batch_size: int
) -> dict[str, float]:
    """Recall@K of ``model`` on ``rows`` (all their images and captions)."""
    return encode_split(accelerator, model, tokenizer, rows, batch_size).recall()


def encode_corpus(
    accelerator: Accelerator,
    model: DualEncoder,
    tokenizer,
    corpus: Corpus,
    test: SplitEmbeddings,
    batch_size: int,
    num_workers: int = 0,
    decode_on_device: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and caption of ``corpus`` for search, reusing ``test``, training's embeddings of the test split.

    The corpus ends with the test split (:class:`crossmodal.data.Corpus`): only the rows before it are encoded, so the
    stored test embeddings are exactly the ones the test metrics were computed on.
    """
    head_images, head_captions = len(corpus.rows) - len(test.images), len(corpus.captions) - len(test.texts)
    if set(corpus.rows.select(range(head_images, len(corpus.rows)))["split"]) != {"test"}:
        raise ValueError("the corpus must end with the test split whose embeddings it is given")
    head = corpus.rows.select(range(head_images))
    images = encode_images(accelerator, model, head, batch_size, num_workers, decode_on_device=decode_on_device)
    texts = encode_captions(accelerator, model, tokenizer, corpus.captions[:head_captions], batch_size)
    return torch.cat([images, test.images]), torch.cat([texts, test.texts])
