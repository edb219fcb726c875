"""Encoding whole splits: image and caption embeddings for evaluation and for the artifact folder.

Runs on every process; Accelerate shards the batches and ``gather_for_metrics`` reassembles them in order, dropping
the padding it added to even out the last batch.
"""

from __future__ import annotations

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from crossmodal.augment import collate_images, decode_batch
from crossmodal.config import ModelConfig
from crossmodal.data import EvalImages
from crossmodal.model import DualEncoder
from crossmodal.preprocess import tokenize


class CaptionBatcher:
    """Collate a list of captions into token tensors (a class, not a lambda, so loader workers can pickle it)."""

    def __init__(self, tokenizer, config: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, captions, self.config)


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
