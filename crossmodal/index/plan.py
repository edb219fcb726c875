"""What an index run must embed, and where every picture's embedding and thumbnail come from (docs/architecture.md,
"Indexing your own pictures").

Three sources can already hold a picture:
- the previous index in the output folder (verified, and made with the same model weights): a file whose path,
  size and modification time match one of its rows is unchanged and keeps that row;
- chunk files left in the work folder by earlier runs that were stopped before they finished;
- any of those by content: a renamed or copied file has the sha256 of a row already embedded, and gets that row's
  embedding without a second pass through the tower (the loader worker still reads and hashes it).
``--verify`` trusts no size and modification time: every file is read and hashed, and only rows whose sha256 still
matches are kept.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from crossmodal.artifacts.contract import INDEX_REPORT, ArtifactError, verify_files
from crossmodal.index.scan import FileEntry, Skipped

Key = tuple[str, int, int]  # path, size, mtime_ns


def key_of(entry: FileEntry | Skipped) -> Key:
    return entry.path, entry.size, entry.mtime_ns


class RowGroupCache:
    """``cache[row]`` reads one column of a Parquet file a row group at a time, keeping the last few: reading the
    rows in order touches each group once, and memory stays at a few groups whatever the file's length."""

    def __init__(self, path: Path, column: str, keep: int = 4) -> None:
        self.file = pq.ParquetFile(path)
        self.column, self.keep = column, keep
        sizes = [self.file.metadata.row_group(group).num_rows for group in range(self.file.metadata.num_row_groups)]
        self.starts = list(itertools.accumulate(sizes, initial=0))  # first row of each group, then the row count
        self.groups: OrderedDict[int, pa.Array] = OrderedDict()

    def __getitem__(self, row: int) -> Any:
        group = bisect.bisect_right(self.starts, row) - 1
        if group not in self.groups:
            self.groups[group] = self.file.read_row_group(group, columns=[self.column]).column(0).combine_chunks()
            if len(self.groups) > self.keep:
                self.groups.popitem(last=False)
        self.groups.move_to_end(group)
        return self.groups[group][row - self.starts[group]].as_py()


@dataclass
class PreviousIndex:
    """The index already in the output folder, verified file by file."""

    folder: Path
    manifest: dict[str, Any]
    rows: dict[Key, int]  # (path, size, mtime_ns) -> row
    sha256: list[str]
    embeddings: torch.Tensor  # [N, D] as stored
    thumbnails: RowGroupCache
    skipped: dict[Key, str]  # the files its report lists, with their reasons

    @classmethod
    def open(cls, folder: Path, model_sha256: str) -> PreviousIndex | None:
        """The previous index if it can be reused: intact, and made by the same weights; None otherwise (it is then
        rebuilt from scratch, and replaced)."""
        try:
            manifest = verify_files(folder)
        except ArtifactError:
            return None
        if manifest.get("index", {}).get("model_sha256") != model_sha256:
            return None
        columns = ["filename", "size", "mtime_ns", "sha256"]
        table = pq.read_table(folder / "images.parquet", columns=columns).to_pydict()
        keys = zip(table["filename"], table["size"], table["mtime_ns"], strict=True)
        rows = {key: row for row, key in enumerate(keys)}
        embeddings = load_file(folder / "image_embeddings.safetensors")["embeddings"]
        skipped = {}
        try:
            report = json.loads((folder / INDEX_REPORT).read_text())
            skipped = {(item["path"], item["size"], item["mtime_ns"]): item["reason"] for item in report["skipped"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no usable report: those files are looked at again
        thumbnails = RowGroupCache(folder / "images.parquet", "thumbnail")
        return cls(folder, manifest, rows, table["sha256"], embeddings, thumbnails, skipped)


@dataclass(frozen=True)
class Located:
    """Where one picture's embedding and thumbnail are: ``("old", row)`` or ``("chunk", table, row)``."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    source: tuple


@dataclass
class Resolution:
    pictures: list[Located] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    to_embed: list[FileEntry] = field(default_factory=list)


class Sources:
    """The previous index and the chunk files, looked up by file key and by content."""

    def __init__(self, previous: PreviousIndex | None, chunks: list[pa.Table], *, verify: bool) -> None:
        self.previous, self.chunks = previous, chunks
        self.old_rows = {} if previous is None or verify else previous.rows
        self.old_skipped = {} if previous is None or verify else previous.skipped
        self.by_key: dict[Key, tuple[int, int]] = {}  # chunk rows: (table, row)
        self.by_sha: dict[str, tuple] = {}  # content -> a source that holds its embedding
        if previous is not None:
            for row, digest in enumerate(previous.sha256):
                self.by_sha.setdefault(digest, ("old", row))
        self._vectors: dict[int, np.ndarray] = {}
        for number, table in enumerate(chunks):
            columns = table.select(["path", "size", "mtime_ns", "sha256"]).to_pydict()
            embedded = pc.is_valid(table.column("embedding")).to_pylist()
            for row, (path, size, mtime, digest) in enumerate(zip(*columns.values(), strict=True)):
                self.by_key[(path, size, mtime)] = (number, row)
                if embedded[row]:
                    self.by_sha.setdefault(digest, ("chunk", number, row))

    def known(self) -> frozenset[str]:
        """Contents whose embedding is already held: a file with one of these is hashed, not embedded."""
        return frozenset(self.by_sha)

    def _chunk_record(self, number: int, row: int, entry: FileEntry) -> Located | Skipped | None:
        table = self.chunks[number]
        digest, reason = table.column("sha256")[row].as_py(), table.column("reason")[row].as_py()
        size, mtime = table.column("size")[row].as_py(), table.column("mtime_ns")[row].as_py()
        if reason is not None:
            return Skipped(entry.path, size, mtime, reason)
        if table.column("embedding")[row].is_valid:
            return Located(entry.path, size, mtime, digest, ("chunk", number, row))
        if digest in self.by_sha:  # same bytes as a picture embedded elsewhere
            return Located(entry.path, size, mtime, digest, self.by_sha[digest])
        return None

    def resolve(self, entries: list[FileEntry], this_run: dict[str, tuple[int, int]] | None = None) -> Resolution:
        """Each entry found in a source, refused as before, or left to embed. ``this_run``: path -> chunk row written
        by the run now ending (its size and time are those of the bytes it read, which win)."""
        resolution = Resolution()
        for entry in entries:
            record = None
            if this_run is not None and entry.path in this_run:
                record = self._chunk_record(*this_run[entry.path], entry)
            elif key_of(entry) in self.old_rows:
                row = self.old_rows[key_of(entry)]
                record = Located(entry.path, entry.size, entry.mtime_ns, self.previous.sha256[row], ("old", row))
            elif key_of(entry) in self.by_key:
                record = self._chunk_record(*self.by_key[key_of(entry)], entry)
            elif key_of(entry) in self.old_skipped:
                record = Skipped(entry.path, entry.size, entry.mtime_ns, self.old_skipped[key_of(entry)])
            if isinstance(record, Located):
                resolution.pictures.append(record)
            elif isinstance(record, Skipped):
                resolution.skipped.append(record)
            else:
                resolution.to_embed.append(entry)
        return resolution

    def embedding(self, source: tuple) -> torch.Tensor:
        if source[0] == "old":
            return self.previous.embeddings[source[1]].float()
        _, number, row = source
        if number not in self._vectors:  # the chunk's embeddings as one array (rows without one hold NaN, never read)
            column = self.chunks[number].column("embedding").combine_chunks()
            dim = column.type.list_size
            self._vectors[number] = column.values.to_numpy(zero_copy_only=False).reshape(len(column), dim)
        return torch.from_numpy(self._vectors[number][row].copy())

    def thumbnail(self, source: tuple) -> bytes:
        if source[0] == "old":
            return self.previous.thumbnails[source[1]]
        _, number, row = source
        return self.chunks[number].column("thumbnail")[row].as_py()
