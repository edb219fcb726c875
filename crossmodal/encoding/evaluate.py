"""Recall@K of an artifact folder, printed as JSON.

    python -m crossmodal evaluate --artifacts runs/tiny/artifacts                      # from the stored embeddings
    python -m crossmodal evaluate --artifacts DIR --dataset ID_OR_PATH --split test    # re-encode a dataset split

The first form re-scores the shipped embeddings (a check of the folder); the second runs the model on the data, so
it also catches drift between the stored embeddings and the model that is served.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from crossmodal.artifacts.contract import ArtifactError, LoadedArtifacts, load_verified
from crossmodal.data.dataset import BadDataError, DataSource, DataUnavailableError, SchemaError, check_rows, load_splits
from crossmodal.encoding.embed import SplitEmbeddings, evaluate_split


def metrics_from_embeddings(artifacts: LoadedArtifacts, split: str) -> dict[str, float]:
    """Recall@K over the stored embeddings of ``split``'s images and their captions."""
    image_split = artifacts.images.column("split").to_pylist()
    caption_image = torch.tensor(artifacts.captions.column("image_index").to_pylist())
    rows = torch.tensor([index for index, name in enumerate(image_split) if name == split], dtype=torch.long)
    if rows.numel() == 0:
        raise ArtifactError(f"{artifacts.folder / 'images.parquet'}: no images in split {split!r}")
    in_split = torch.isin(caption_image, rows)
    new_index = torch.full((len(image_split),), -1, dtype=torch.long)
    new_index[rows] = torch.arange(rows.numel())
    texts = artifacts.text_embeddings[in_split]
    return SplitEmbeddings(artifacts.image_embeddings[rows], texts, new_index[caption_image[in_split]]).recall()


def metrics_from_dataset(
    artifacts: LoadedArtifacts, source: DataSource, split: str, batch_size: int
) -> dict[str, float]:
    """Recall@K of the artifact's model on ``split`` of a dataset, encoded afresh."""
    accelerator = Accelerator()
    model = artifacts.model.to(accelerator.device)
    splits, _ = check_rows(load_splits(source), max_bad_fraction=0.01)
    return evaluate_split(accelerator, model, artifacts.tokenizer, splits[split], batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossmodal evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifacts", type=Path, required=True, help="an artifact folder written by training")
    parser.add_argument("--dataset", default=None, help="Hub id or local folder; omit to use the stored embeddings")
    parser.add_argument("--dataset-revision", default=None)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        artifacts = load_verified(args.artifacts)
        if args.dataset is None:
            metrics = metrics_from_embeddings(artifacts, args.split)
        else:
            source = DataSource(args.dataset, args.dataset_revision)
            metrics = metrics_from_dataset(artifacts, source, args.split, args.batch_size)
    except (ArtifactError, SchemaError, BadDataError, DataUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0
