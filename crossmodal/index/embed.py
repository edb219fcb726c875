"""Embedding a folder's pictures as a stream (docs/architecture.md, "Indexing your own pictures").

Loader workers read each file once (size-capped), hash it, decode it with the serving decoder
(``preprocess.decode_for_eval``), make its thumbnail and its eval tensor; the process that holds the model embeds each
batch and writes it at once to a chunk file in the work folder. Nothing grows with the number of pictures but the
list of paths: pictures are dropped as soon as their batch is written.

The chunk files are Arrow IPC files, written aside and renamed into place, so a chunk is there whole or not at all.
They are also the checkpoint: a run stopped by Ctrl-C, SIGTERM or a crash leaves its chunks, and the next run reads
them and embeds only what is not in one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from crossmodal.artifacts.thumbnails import thumbnail_jpeg
from crossmodal.config import ModelConfig
from crossmodal.data.images import ImageDecodeError
from crossmodal.index.scan import FileEntry
from crossmodal.model.dual_encoder import DualEncoder
from crossmodal.model.preprocess import decode_for_eval, eval_transform

# Far above any photo the decoder accepts (40 MP), so only videos, archives and disk images are refused unread.
MAX_FILE_BYTES = 128 * 1024 * 1024
CHUNK_SUFFIX = ".arrow"


def chunk_schema(dim: int) -> pa.Schema:
    """One row per file looked at: indexed (embedding and thumbnail), the same bytes as a known picture (sha256 only,
    the embedding is that picture's), or refused (reason)."""
    return pa.schema(
        [
            ("path", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("sha256", pa.string()),
            ("reason", pa.string()),
            ("thumbnail", pa.binary()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


def read_picture(path: Path, root: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the stat of exactly what was read; OSError or ImageDecodeError says why not."""
    real = path.resolve()
    if real != root and root not in real.parents:  # swapped for a link that leads out since the walk
        raise ImageDecodeError("a symbolic link to a file outside the folder")
    with open(real, "rb") as handle:
        info = os.fstat(handle.fileno())
        if info.st_size > MAX_FILE_BYTES:
            raise ImageDecodeError(f"the file is {info.st_size / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES >> 20} MB")
        return handle.read(MAX_FILE_BYTES + 1), info


class PictureFiles(Dataset):
    """Item i: the i-th file, read, hashed and decoded in a loader worker. Never raises for a bad file: it comes
    back with its reason, and the run goes on."""

    def __init__(
        self, root: Path, entries: list[FileEntry], config: ModelConfig, known: frozenset[str], thumbnail_size: int
    ) -> None:
        self.root, self.entries, self.config = Path(root).resolve(), entries, config
        self.known = known  # sha256 of pictures already embedded: the same bytes are not embedded twice
        self.thumbnail_size = thumbnail_size
        self.transform = eval_transform(config)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        item: dict[str, Any] = {"path": entry.path, "size": entry.size, "mtime_ns": entry.mtime_ns}
        try:
            data, info = read_picture(self.root / entry.path, self.root)
            item.update(size=info.st_size, mtime_ns=info.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())
            if item["sha256"] in self.known:
                return item
            image = decode_for_eval(data, self.config)
            item.update(pixels=self.transform(image), thumbnail=thumbnail_jpeg(image, self.thumbnail_size))
        except ImageDecodeError as error:
            item["reason"] = str(error)
        except OSError as error:
            item["reason"] = f"cannot be read ({error.strerror or error})"
        return item


def collate_pictures(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch's decoded pictures stacked for the tower; every item's record kept, in order."""
    decoded = [item for item in items if "pixels" in item]
    pixels = torch.stack([item.pop("pixels") for item in decoded]) if decoded else None
    return {"items": items, "pixels": pixels}


@dataclass
class ChunkWriter:
    """Writes one chunk file per batch into ``folder``, named so that processes and runs never collide."""

    folder: Path
    dim: int
    rank: int
    run: str  # the same in every process of one run: the chunks a run wrote are found by it
    count: int = 0

    def write(self, items: list[dict[str, Any]], embeddings: torch.Tensor | None) -> None:
        rows = iter(embeddings.numpy() if embeddings is not None else ())
        vectors = [next(rows).tolist() if "thumbnail" in item else None for item in items]
        table = pa.table(
            {
                "path": [item["path"] for item in items],
                "size": [item["size"] for item in items],
                "mtime_ns": [item["mtime_ns"] for item in items],
                "sha256": [item.get("sha256") for item in items],
                "reason": [item.get("reason") for item in items],
                "thumbnail": [item.get("thumbnail") for item in items],
                "embedding": vectors,
            },
            schema=chunk_schema(self.dim),
        )
        name = f"chunk-{self.run}-{self.rank:03d}-{self.count:06d}{CHUNK_SUFFIX}"
        partial = self.folder / f"{name}.partial"
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(partial, self.folder / name)
        self.count += 1


def embed_pictures(
    accelerator: Accelerator,
    model: DualEncoder,
    root: Path,
    entries: list[FileEntry],
    known: frozenset[str],
    writer: ChunkWriter,
    *,
    batch_size: int,
    num_workers: int,
    thumbnail_size: int,
) -> int:
    """Embed this process's share of ``entries`` (split like Accelerate splits any list) into chunk files; returns how
    many pictures this process embedded."""
    with accelerator.split_between_processes(entries) as mine:
        if not mine:
            return 0
        dataset = PictureFiles(root, mine, model.config, known, thumbnail_size)
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_pictures,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
        )  # fmt: skip
        embedded = 0
        model.eval()
        bar = tqdm(total=len(dataset), desc="Embedding pictures", unit="file", disable=not accelerator.is_main_process)
        with bar, torch.inference_mode(), accelerator.autocast():
            for batch in loader:
                embeddings = None
                if batch["pixels"] is not None:
                    embeddings = model.encode_image(batch["pixels"].to(accelerator.device)).float().cpu()
                    embedded += len(embeddings)
                writer.write(batch["items"], embeddings)
                bar.update(len(batch["items"]))
    return embedded


def read_chunks(folder: Path) -> list[tuple[str, pa.Table]]:
    """Every complete chunk in ``folder`` by file name, memory-mapped (thumbnails are read from disk when used)."""
    tables = []
    for path in sorted(folder.glob(f"chunk-*{CHUNK_SUFFIX}")):
        try:
            # Not closed here: the table's buffers point into the map, which lives as long as they do.
            tables.append((path.name, pa.ipc.open_file(pa.memory_map(str(path))).read_all()))
        except (OSError, pa.ArrowInvalid):  # a chunk damaged by a crash mid-rename: its pictures are embedded again
            continue
    return tables
