"""Encoding and evaluating whole splits: the image and caption embeddings of training's validation and test,
of ``python -m crossmodal evaluate`` and of the artifact folder, and their Recall@K.

Runs on every process; Accelerate shards the batches and ``gather_for_metrics`` reassembles them in order, dropping
the padding it added to even out the last batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from crossmodal.data.dataset import Corpus, caption_table, image_digests
from crossmodal.encoding.batches import CaptionBatcher, EvalImages, collate_images, usable_cores
from crossmodal.encoding.metrics import recall_at_k
from crossmodal.model.device_decode import decode_batch
from crossmodal.model.dual_encoder import DualEncoder


@dataclass
class SplitEmbeddings:
    """The embeddings of one split: every image in row order, every caption in caption_table order."""

    images: torch.Tensor  # [N_images, D]
    texts: torch.Tensor  # [N_captions, D]
    caption_image: torch.Tensor  # [N_captions] row of each caption's image

    def recall(self) -> dict[str, float]:
        """Recall@K both ways over this split's images and captions (:func:`~.metrics.recall_at_k`)."""
        return recall_at_k(self.images, self.texts, self.caption_image)


def _encode(accelerator: Accelerator, loader: DataLoader, encode, desc: str) -> torch.Tensor:
    loader = accelerator.prepare_data_loader(loader)
    chunks = []
    with torch.inference_mode(), accelerator.autocast():
        for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
            embeddings = encode(**batch) if isinstance(batch, dict) else encode(batch)
            chunks.append(accelerator.gather_for_metrics(embeddings.float()))
    return torch.cat(chunks).cpu()


@contextmanager
def all_cores(accelerator: Accelerator) -> Iterator[None]:
    """On CPU, this process's share of the cores for a caption pass: `accelerate launch` sets OMP_NUM_THREADS=1
    (which leaves the cores to the loader workers while training), but a caption pass runs no workers, and a
    pretrained text tower encodes twice as fast on two threads as on one."""
    before = torch.get_num_threads()
    if accelerator.device.type == "cpu":
        torch.set_num_threads(max(usable_cores() // accelerator.num_processes, 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_images(
    accelerator: Accelerator,
    model: DualEncoder,
    rows: datasets.Dataset,
    batch_size: int,
    num_workers: int = 0,
    decode_on_device: bool = False,
    *,
    pooled: bool = False,
) -> torch.Tensor:
    """[len(rows), D] L2-normalised image embeddings, in row order; ``pooled``: the image tower's [len, F_img]
    pooled features before the head instead (a locked tower's, crossmodal/training/locked.py).

    ``decode_on_device``: loader workers pass JPEG bytes on and each batch is decoded on the accelerator's device
    (nvjpeg on CUDA), then given the same eval transform.
    """
    known = model.known_image_features
    if not pooled and known is not None:
        found = known.rows(image_digests(rows))
        if found is not None:
            return project_rows(model, model.project_image, known.features, found, batch_size)
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
        batch = batch.contiguous(memory_format=layout)
        return model.image_features(batch) if pooled else model.encode_image(batch)

    model.eval()
    with all_cores(accelerator):
        return _encode(accelerator, loader, encode, "Image features" if pooled else "Encoding images")


def encode_captions(
    accelerator: Accelerator,
    model: DualEncoder,
    tokenizer,
    captions: list[str],
    batch_size: int,
    num_workers: int = 0,
    *,
    pooled: bool = False,
) -> torch.Tensor:
    """[len(captions), D] L2-normalised caption embeddings, in order; ``pooled``: the text tower's [len, H] sentence
    features before the projection instead (a locked tower's, crossmodal/training/locked.py).

    Batches are formed from captions sorted by length, so one long caption does not pad a whole batch (a pretrained
    tower's cost grows with the padded length); the result is put back in the given order.
    """
    known = model.known_text_features
    if not pooled and known is not None and known.holds(captions):
        rows = [known.row_of[caption] for caption in captions]
        return project_rows(model, model.project_text, known.features, rows, batch_size)
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    loader = DataLoader(
        [captions[i] for i in order],
        batch_size=batch_size,
        collate_fn=CaptionBatcher(tokenizer, model.config),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    model.eval()
    encode = model.text_features if pooled else model.encode_text
    with all_cores(accelerator):
        encoded = _encode(accelerator, loader, encode, "Caption features" if pooled else "Encoding captions")
    in_order = torch.empty_like(encoded)
    in_order[torch.tensor(order, dtype=torch.long)] = encoded
    return in_order


@torch.inference_mode()
def project_rows(model: DualEncoder, project, features: torch.Tensor, rows: list[int], batch_size: int) -> torch.Tensor:
    """A locked tower's embeddings of inputs whose features it already holds: ``project`` (the head) alone, on those
    ``rows`` of ``features`` (every process computes all of them, as gathering would have given it)."""
    model.eval()
    device = model.logit_scale.device
    chunks = [
        project(features[rows[start : start + batch_size]].to(device)).float().cpu()
        for start in range(0, len(rows), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim)


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

    The corpus ends with the test split (:class:`~crossmodal.data.dataset.Corpus`): only the rows before it are
    encoded, so the stored test embeddings are exactly the ones the test metrics were computed on.
    """
    head_images, head_captions = len(corpus.rows) - len(test.images), len(corpus.captions) - len(test.texts)
    if set(corpus.rows.select(range(head_images, len(corpus.rows)))["split"]) != {"test"}:
        raise ValueError("the corpus must end with the test split whose embeddings it is given")
    head = corpus.rows.select(range(head_images))
    images = encode_images(accelerator, model, head, batch_size, num_workers, decode_on_device=decode_on_device)
    texts = encode_captions(accelerator, model, tokenizer, corpus.captions[:head_captions], batch_size)
    return torch.cat([images, test.images]), torch.cat([texts, test.texts])
