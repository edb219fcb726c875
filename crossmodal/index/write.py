"""Writing an index of your own pictures as an artifact folder, and swapping it into place (docs/architecture.md,
"Indexing your own pictures").

The folder keeps the artifact contract, so ``load_verified``, the app and ``push_to_hub.py`` take it unchanged: the
model's weights, config, tokenizer, captions and caption embeddings are copied from the model's own folder; the
pictures' embeddings and ``images.parquet`` are new. It is assembled in a hidden sibling folder and exchanged with
the previous index in one ``renameat2(RENAME_EXCHANGE)``, so a reader sees the old index or the new one, never
neither and never half of one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file
from tqdm.auto import tqdm

from crossmodal.artifacts.contract import (
    FOLDER_IMAGE_COLUMNS,
    FORMAT_VERSION,
    INDEX_DTYPE,
    INDEX_REPORT,
    INDEX_SPLIT,
    NO_IMAGE,
    THUMBNAIL_ROW_GROUP,
    LoadedArtifacts,
)
from crossmodal.artifacts.export import describe_files, describe_tensors, golden_record, library_versions
from crossmodal.index.plan import Located, Sources
from crossmodal.index.scan import Skipped

COPIED_FROM_MODEL = ("config.json", "model.safetensors", "text_embeddings.safetensors", "metrics.json")
_DUPLICATE_SCORES = 1 << 24  # scores computed at a time (64 MB of float32), whatever the number of pictures


def duplicate_groups(embeddings: torch.Tensor, threshold: float | None) -> list[int]:
    """For each row, the first row of its near-duplicate group: the connected components of the graph whose edges
    join rows at cosine >= ``threshold``. Components do not depend on the order rows are visited in, so an index
    updated in place groups exactly as one built from scratch. None: no grouping (each row its own)."""
    parent = list(range(len(embeddings)))

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    if threshold is None or len(embeddings) < 2:
        return parent
    matrix = embeddings.float()
    block = max(1, _DUPLICATE_SCORES // len(matrix))  # rows compared with all others at a time
    for start in range(0, len(matrix), block):
        scores = matrix[start : start + block] @ matrix.T
        rows, columns = torch.nonzero(scores >= threshold, as_tuple=True)
        for row, column in zip((rows + start).tolist(), columns.tolist(), strict=True):
            first, second = root(row), root(column)
            if first != second:
                parent[max(first, second)] = min(first, second)  # the group's first row stays its root
    return [root(row) for row in range(len(parent))]


def image_schema() -> pa.Schema:
    types = [pa.string(), pa.string(), pa.string(), pa.binary(), pa.int64(), pa.int64(), pa.string(), pa.int32()]
    return pa.schema(list(zip(FOLDER_IMAGE_COLUMNS, types, strict=True)))


def write_image_table(path: Path, pictures: list[Located], groups: list[int], sources: Sources) -> None:
    """images.parquet, one row group at a time: the thumbnails are read from their sources as they are written."""
    compression = {name: "snappy" for name in FOLDER_IMAGE_COLUMNS} | {"thumbnail": "none"}  # JPEG: stored as is
    with pq.ParquetWriter(path, image_schema(), compression=compression, use_dictionary=["split"]) as writer:
        for start in tqdm(range(0, len(pictures), THUMBNAIL_ROW_GROUP), desc="Writing the index", leave=False):
            part = pictures[start : start + THUMBNAIL_ROW_GROUP]
            paths = [picture.path for picture in part]
            columns = [
                paths,
                paths,
                [INDEX_SPLIT] * len(part),
                [sources.thumbnail(picture.source) for picture in part],
                [picture.size for picture in part],
                [picture.mtime_ns for picture in part],
                [picture.sha256 for picture in part],
                groups[start : start + len(part)],
            ]
            writer.write_table(pa.table(columns, schema=image_schema()), row_group_size=THUMBNAIL_ROW_GROUP)


class _Thumbnails:
    """The index's thumbnails by row, read from their sources on demand (for the golden record)."""

    def __init__(self, pictures: list[Located], sources: Sources) -> None:
        self.pictures, self.sources = pictures, sources

    def __len__(self) -> int:
        return len(self.pictures)

    def __getitem__(self, row: int) -> bytes:
        return self.sources.thumbnail(self.pictures[row].source)


def model_card(model: LoadedArtifacts, folder_name: str, pictures: int, threshold: float | None) -> str:
    """The model's card, with what this index holds added."""
    card = ModelCard.load(model.folder / "README.md")
    duplicates = (
        f"Near-duplicate pictures (cosine >= {threshold:g}) are shown as one result." if threshold is not None else ""
    )
    card.text += (
        f"\n## This index\n\n{pictures:,} pictures from `{folder_name}`, indexed with `python -m crossmodal index` on "
        f"{datetime.now(UTC):%Y-%m-%d}. The Recall@K above is the model's, on its own test split: these pictures "
        f"have no captions, so it says nothing about how well they are found. {duplicates}\n"
    )
    return str(card)


def write_index(
    staging: Path,
    *,
    model: LoadedArtifacts,
    model_sha256: str,
    model_source: str,
    folder_name: str,
    pictures: list[Located],
    skipped: list[Skipped],
    sources: Sources,
    duplicate_threshold: float | None,
) -> dict[str, Any]:
    """Write the whole index into ``staging`` (created here); returns its manifest."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in COPIED_FROM_MODEL:
        shutil.copy2(model.folder / name, staging / name)
    for name in ("tokenizer", "plots"):
        if (model.folder / name).is_dir():
            shutil.copytree(model.folder / name, staging / name)
    # The model's captions answer image -> text; none of them describes a picture of this index (image_index -1).
    captions = model.captions.set_column(1, "image_index", pa.array([NO_IMAGE] * model.captions.num_rows, pa.int32()))
    pq.write_table(captions, staging / "captions.parquet")

    embeddings = torch.stack([sources.embedding(picture.source) for picture in pictures]).to(INDEX_DTYPE)
    save_file({"embeddings": embeddings.contiguous()}, staging / "image_embeddings.safetensors")
    groups = duplicate_groups(embeddings, duplicate_threshold)
    write_image_table(staging / "images.parquet", pictures, groups, sources)
    (staging / "README.md").write_text(model_card(model, folder_name, len(pictures), duplicate_threshold))
    report = {"folder": folder_name, "skipped": [vars(item) for item in skipped]}
    (staging / INDEX_REPORT).write_text(json.dumps(report, indent=1))

    golden = golden_record(model.model, _Thumbnails(pictures, sources), embeddings)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": describe_files(staging),
        "tensors": describe_tensors(staging),
        "counts": {
            "images": len(pictures),
            "captions": model.captions.num_rows,
            "images_per_split": {INDEX_SPLIT: len(pictures)},
            "parameters": sum(p.numel() for p in model.model.parameters()),
        },
        "dataset": model.manifest.get("dataset"),  # what the model was trained on
        "golden": golden,
        "versions": library_versions(),
        "index": {
            "folder": folder_name,
            "pictures": len(pictures),
            "skipped": len(skipped),
            "duplicate_threshold": duplicate_threshold,
            "duplicate_groups": len({group for row, group in enumerate(groups) if group != row}),
            "model": model_source,
            "model_sha256": model_sha256,
        },
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(name, use_errno=True), "renameat2", None) if name else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    # Non-zero on a filesystem without it, say: the caller falls back to two renames.
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def previous_name(target: Path) -> Path:
    """Where the fallback swap parks the previous index for the instant between its two renames."""
    return target.with_name(f".{target.name}.previous")


def replace_folder(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``, atomically where the system allows; the previous folder is then deleted."""
    if not target.exists():
        staging.rename(target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)  # now the previous index
    else:
        parked = previous_name(target)
        shutil.rmtree(parked, ignore_errors=True)
        target.rename(parked)  # a crash right here leaves it parked; recover_folder puts it back
        staging.rename(target)
        shutil.rmtree(parked)


def recover_folder(target: Path) -> None:
    """Undo a fallback swap cut between its two renames."""
    parked = previous_name(target)
    if parked.is_dir() and not target.exists():
        parked.rename(target)
