"""The stored thumbnails: how they are made, and reading them by row while the rest of the app starts.

At Flickr30k scale the thumbnail column of images.parquet is ~550 MB. It is read one row group at a time on a
background thread (pyarrow releases the GIL), so loading the model and building the UI go on meanwhile; whoever asks
for a thumbnail first waits for the read to finish. The row groups are kept as Arrow arrays, so no byte is copied
after the read.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def thumbnail_jpeg(image: Image.Image, size: int) -> bytes:
    """The JPEG a result shows, longest side ``size``; the same for training's pictures and for your own.
    ``image`` is left as it is."""
    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85, optimize=True)
    return buffer.getvalue()


class Thumbnails:
    """``thumbnails[row]`` is the JPEG bytes of images.parquet row ``row``."""

    def __init__(self, parquet: Path, column: str = "thumbnail") -> None:
        self._groups: list[pa.Array] = []
        self._starts = np.zeros(1, dtype=np.int64)  # first row of each group, then the row count
        self._error: BaseException | None = None
        self._loaded = threading.Thread(target=self._read, args=(Path(parquet), column), name="thumbnails", daemon=True)
        self._loaded.start()

    def _read(self, parquet: Path, column: str) -> None:
        try:
            table = pq.ParquetFile(parquet)
            # One row group at a time (the writer keeps them small): iter_batches reads far ahead and held ~0.6 GB.
            for group in range(table.metadata.num_row_groups):
                values = table.read_row_group(group, columns=[column], use_threads=False).column(0).combine_chunks()
                if values.null_count:
                    raise ValueError(f"{column}: {values.null_count} empty values")
                self._groups.append(values)
            self._starts = np.cumsum([0, *(len(values) for values in self._groups)], dtype=np.int64)
        except BaseException as error:  # handed to the first caller, who reports it
            self._error = error

    def wait(self) -> Thumbnails:
        """Block until every thumbnail is read; raise what went wrong reading them, if anything."""
        self._loaded.join()
        if self._error is not None:
            raise self._error
        return self

    def __len__(self) -> int:
        self.wait()
        return int(self._starts[-1])

    def __getitem__(self, row: int) -> bytes:
        if not 0 <= row < len(self):
            raise IndexError(f"thumbnail {row} out of range (0..{len(self) - 1})")
        group = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._groups[group][row - int(self._starts[group])].as_py()
