"""Writing the artifact folder (docs/architecture.md, "Artifact folder"), once, at the end of training.

The folder is assembled in a temporary sibling folder and renamed into place, so a reader never sees half of one.
Kept apart from crossmodal/artifacts/contract.py (reading and verifying) so the app never imports what only writing
needs: datasets, matplotlib and the model card.
"""

from __future__ import annotations

import json
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from tqdm.auto import tqdm

from crossmodal.artifacts.contract import (
    FORMAT_VERSION,
    HEATMAP_PAIRS,
    INDEX_DTYPE,
    THUMBNAIL_ROW_GROUP,
    UNLISTED_FILES,
    ArtifactError,
    encode_thumbnails,
    golden_rows,
)
from crossmodal.artifacts.integrity import sha256_of
from crossmodal.artifacts.model_card import render_model_card
from crossmodal.artifacts.plots import plot_similarity, plot_training
from crossmodal.artifacts.thumbnails import thumbnail_jpeg
from crossmodal.config import TrainConfig
from crossmodal.data.dataset import Corpus
from crossmodal.data.images import decode_image, image_bytes
from crossmodal.model.dual_encoder import DualEncoder

# --- writing -----------------------------------------------------------------------------------------------------


def _thumbnail(value: dict, size: int) -> bytes:
    return thumbnail_jpeg(decode_image(image_bytes(value)), size)


def _write_tables(corpus: Corpus, folder: Path, thumbnail_size: int) -> list[bytes]:
    images = corpus.rows.select_columns(["image"])
    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding and encoding
        thumbnails = list(
            tqdm(
                pool.map(lambda row: _thumbnail(row["image"], thumbnail_size), images),
                total=len(images),
                desc="Thumbnails",
                leave=False,
            )
        )
    image_table = pa.table(
        {
            "image_id": pa.array(corpus.rows["img_id"], pa.string()),
            "filename": pa.array(corpus.rows["filename"], pa.string()),
            "split": pa.array(corpus.rows["split"], pa.string()),
            "thumbnail": pa.array(thumbnails, pa.binary()),
        }
    )
    # Small row groups let a reader stream the thumbnails (artifacts/thumbnails.py) without holding the whole column;
    # JPEG bytes do not compress, so that column is stored as is and reads back as a plain copy.
    pq.write_table(
        image_table,
        folder / "images.parquet",
        row_group_size=THUMBNAIL_ROW_GROUP,
        compression={"image_id": "snappy", "filename": "snappy", "split": "snappy", "thumbnail": "none"},
        use_dictionary=["split"],
    )
    caption_table_ = pa.table(
        {"caption": pa.array(corpus.captions, pa.string()), "image_index": pa.array(corpus.caption_image, pa.int32())}
    )
    pq.write_table(caption_table_, folder / "captions.parquet")
    return thumbnails


def _write_plots(folder: Path, history, loss_log, corpus: Corpus, image_emb: torch.Tensor, text_emb: torch.Tensor):
    plots = folder / "plots"
    plots.mkdir()
    plot_training(history, loss_log, plots / "training_curves.png")
    test_rows = [index for index, split in enumerate(corpus.rows["split"]) if split == "test"][:HEATMAP_PAIRS]
    first_caption = {}
    for caption_index, image_index in enumerate(corpus.caption_image):
        first_caption.setdefault(image_index, caption_index)
    caption_rows = [first_caption[row] for row in test_rows]
    similarity = text_emb[caption_rows] @ image_emb[test_rows].T  # [n captions, n images]
    pictures = [decode_image(image_bytes(corpus.rows[row]["image"])) for row in test_rows]
    plot_similarity(similarity, pictures, [corpus.captions[i] for i in caption_rows], plots / "test_similarity.png")


def golden_record(model: DualEncoder, thumbnails, image_embeddings: torch.Tensor) -> dict[str, Any]:
    """What the self-test re-derives at load: thumbnail embeddings, and how close each is to its indexed embedding.

    ``thumbnails[row]`` is row's JPEG bytes (a list, or anything indexable with a length). Thumbnails are smaller
    than the originals, so the second number is below 1 and recorded rather than assumed.
    """
    rows = golden_rows(len(thumbnails))
    embeddings = encode_thumbnails(model, [thumbnails[row] for row in rows])
    return {
        "image_rows": rows,
        "thumbnail_embeddings": embeddings.tolist(),
        "cosine_to_index": (embeddings * image_embeddings[rows].float()).sum(dim=1).tolist(),
    }


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file list: every file of the folder but the manifest itself (and the local report of an
    index, which is not published), with its sha256 and size."""
    return {
        path.relative_to(folder).as_posix(): {"sha256": sha256_of(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() not in UNLISTED_FILES
    }


def describe_tensors(folder: Path) -> dict[str, dict[str, list[int]]]:
    tensors = {}
    for name in ("image_embeddings.safetensors", "text_embeddings.safetensors"):
        with safe_open(folder / name, framework="pt") as handle:
            tensors[name] = {"embeddings": list(handle.get_slice("embeddings").get_shape())}
    return tensors


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "torchvision", "transformers", "safetensors", "datasets")},
    }


def _manifest(
    folder: Path, corpus: Corpus, dataset: dict[str, str | None], model: DualEncoder, golden: dict[str, Any]
) -> dict[str, Any]:
    splits = corpus.rows["split"]
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": describe_files(folder),
        "tensors": describe_tensors(folder),
        "counts": {
            "images": len(corpus.rows),
            "captions": len(corpus.captions),
            "images_per_split": {name: splits.count(name) for name in ("train", "val", "test")},
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "dataset": dataset,
        "golden": golden,
        "versions": library_versions(),
    }


def write_artifacts(
    folder: Path,
    *,
    model: DualEncoder,
    tokenizer,
    train_config: TrainConfig,
    corpus: Corpus,
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    metrics: dict[str, dict[str, float]],
    history: list[dict[str, Any]],
    loss_log: list[tuple[int, float]],
    dataset: dict[str, str | None],
) -> Path:
    """Write the whole folder next to ``folder``, then swap it into place; returns ``folder``."""
    if image_embeddings.shape[0] != len(corpus.rows) or text_embeddings.shape[0] != len(corpus.captions):
        raise ArtifactError(
            f"embeddings {tuple(image_embeddings.shape)} / {tuple(text_embeddings.shape)} do not match "
            f"{len(corpus.rows)} images / {len(corpus.captions)} captions"
        )
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = {"format_version": FORMAT_VERSION, "model": asdict(model.config), "training": asdict(train_config)}
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(staging / "tokenizer")
    stored_images = image_embeddings.to(INDEX_DTYPE).contiguous()
    save_file({"embeddings": stored_images}, staging / "image_embeddings.safetensors")
    save_file({"embeddings": text_embeddings.to(INDEX_DTYPE).contiguous()}, staging / "text_embeddings.safetensors")
    thumbnails = _write_tables(corpus, staging, train_config.thumbnail_size)
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_plots(staging, history, loss_log, corpus, image_embeddings, text_embeddings)
    (staging / "README.md").write_text(render_model_card(model.config, train_config, metrics, dataset))
    golden = golden_record(model, thumbnails, stored_images)  # what the loader will compare against
    manifest = _manifest(staging, corpus, dataset, model, golden)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
