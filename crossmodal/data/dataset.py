"""Flickr30k rows in the dataset schema (docs/architecture.md, "Dataset schema"): loading (Hub id@revision or a local
folder), schema checks, bad-row checks, and the corpus, every split in artifact order.

Images stay encoded (``Image(decode=False)``) until a loader worker decodes them with :mod:`crossmodal.data.images`.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from crossmodal.config import DEFAULT_DATASET
from crossmodal.data.images import ImageDecodeError, decode_image, image_bytes
from crossmodal.data.shards import Keys

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


class SchemaError(ValueError):
    """The dataset does not have the Flickr30k schema; the message names the column and the flag that maps it."""


class DataUnavailableError(RuntimeError):
    """Neither a local folder nor a reachable Hub dataset goes by that name."""


class BadDataError(RuntimeError):
    """Too many rows are unusable (undecodable image or no caption) to trust a run on this dataset."""


@dataclass(frozen=True)
class DataSource:
    """Where the data comes from and how its columns map onto the schema (the CLI's data flags)."""

    dataset: str = DEFAULT_DATASET
    revision: str | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    val_split: str | None = None  # None: "val", else "validation"
    # --train-data: training pairs streamed from shards (crossmodal/data/stream.py); the dataset then supplies only
    # validation, test and the artifact's gallery, and may hold no train split.
    train_data: str | None = None
    train_num_samples: int | None = None
    keys: Keys = field(default_factory=Keys)

    def describe(self) -> str:
        return f"{self.dataset}@{self.revision}" if self.revision else self.dataset


@dataclass(frozen=True)
class RowReport:
    """How many rows each split had, and which were skipped and why (first few kept as examples)."""

    total: dict[str, int]
    bad: dict[str, int]
    examples: list[str] = field(default_factory=list)

    def bad_fraction(self, split: str) -> float:
        return self.bad[split] / max(self.total[split], 1)

    def summary(self) -> str:
        parts = [f"{split}: {self.bad[split]}/{self.total[split]} skipped" for split in self.total]
        return "; ".join(parts)


# --- loading -----------------------------------------------------------------------------------------------------


def load_splits(source: DataSource) -> datasets.DatasetDict:
    """Load ``source`` as a DatasetDict with exactly train/val/test and the schema's columns, images undecoded."""
    raw = _load_raw(source)
    raw = _rename_val_split(raw, source.val_split)
    required = SPLITS if source.train_data is None else ("val", "test")
    if not set(required) <= set(raw):
        raw = _split_by_column(raw, required)
    splits = datasets.DatasetDict({name: _normalise_columns(raw[name], name, source) for name in SPLITS if name in raw})
    if "train" not in splits:  # streamed training pairs: the gallery is validation and test
        splits["train"] = splits["test"].select([])
    return datasets.DatasetDict({name: splits[name] for name in SPLITS})


def _load_raw(source: DataSource) -> datasets.DatasetDict:
    path = Path(source.dataset)
    if path.exists():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        elif any(path.rglob("*.parquet")):
            loaded = datasets.load_dataset(str(path))  # split names inferred from file names (train*, val*, test*)
        else:
            raise SchemaError(f"{path} is neither a save_to_disk folder nor a folder of Parquet files")
    else:
        try:
            loaded = datasets.load_dataset(source.dataset, revision=source.revision)
        except (ConnectionError, FileNotFoundError) as error:
            raise DataUnavailableError(
                f"could not load {source.describe()!r}: no local folder has that name, and the Hub said: {error}. "
                "Check the id (and network), or pass a local save_to_disk or Parquet folder "
                "(`python -m crossmodal synthetic --out DIR` writes one)"
            ) from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _rename_val_split(raw: datasets.DatasetDict, val_split: str | None) -> datasets.DatasetDict:
    if val_split is not None:
        if val_split not in raw:
            raise SchemaError(f"--val-split {val_split!r} not found; the dataset has splits {sorted(raw)}")
        aliases = {val_split: "val"}
    else:
        aliases = {name: SPLIT_ALIASES[name] for name in raw if name in SPLIT_ALIASES and "val" not in raw}
    return datasets.DatasetDict({aliases.get(name, name): split for name, split in raw.items()})


def _split_by_column(raw: datasets.DatasetDict, required: tuple[str, ...] = SPLITS) -> datasets.DatasetDict:
    """One split holding every row with a ``split`` column (e.g. nlphuji/flickr30k's Parquet conversion)."""
    everything = datasets.concatenate_datasets(list(raw.values())) if len(raw) > 1 else next(iter(raw.values()))
    if "split" not in everything.column_names:
        raise SchemaError(
            f"the dataset has splits {sorted(raw)} and no 'split' column; it needs train/val/test splits "
            "(use --val-split NAME if validation is called otherwise) or a 'split' column with train/val/test values"
        )
    values = everything.unique("split")
    missing = [name for name in required if name not in values]
    if missing:
        raise SchemaError(f"the 'split' column has values {sorted(values)}; missing {missing}")
    return datasets.DatasetDict(
        {
            name: everything.filter(lambda value, name=name: value == name, input_columns="split")
            for name in SPLITS
            if name in values
        }
    )


def _normalise_columns(split: datasets.Dataset, name: str, source: DataSource) -> datasets.Dataset:
    columns = split.column_names
    for column, flag in ((source.image_column, "--image-column"), (source.caption_column, "--caption-column")):
        if column not in columns:
            raise SchemaError(
                f"split {name!r} has no column {column!r} (columns: {columns}); pass {flag} NAME to use another"
            )
    renames = {source.image_column: "image", source.caption_column: "caption"}
    split = split.rename_columns({old: new for old, new in renames.items() if old != new})
    image_feature = split.features["image"]
    if not isinstance(image_feature, datasets.Image):
        raise SchemaError(f"column {source.image_column!r} is {image_feature}, not a datasets Image")
    caption_feature = split.features["caption"]
    if not isinstance(caption_feature, datasets.List | datasets.Sequence | datasets.LargeList):
        raise SchemaError(
            f"column {source.caption_column!r} is {caption_feature}; the schema needs a list of captions per image "
            "(one row per image)"
        )
    split = split.cast_column("image", datasets.Image(decode=False))
    if "img_id" not in split.column_names:
        split = split.add_column("img_id", [f"{name}-{index}" for index in range(len(split))])
    if "filename" not in split.column_names:
        split = split.add_column("filename", list(split["img_id"]))
    if "split" in split.column_names:
        split = split.remove_columns("split")
    split = split.add_column("split", [name] * len(split))
    return split.select_columns(["image", "caption", "split", "img_id", "filename"])


# --- row checks --------------------------------------------------------------------------------------------------


def clean_captions(captions: list | None) -> list[str]:
    """Captions with surrounding whitespace removed; empty and non-string entries dropped."""
    return [text.strip() for text in captions or [] if isinstance(text, str) and text.strip()]


def _row_problem(image: dict | None, captions: list | None) -> str | None:
    if not clean_captions(captions):
        return "no non-empty caption"
    if image is None:
        return "no image"
    try:
        decode_image(image_bytes(image), draft_size=(64, 64))
    except (ImageDecodeError, OSError) as error:
        return str(error)
    return None


def check_rows(
    splits: datasets.DatasetDict, *, max_bad_fraction: float, workers: int | None = None
) -> tuple[datasets.DatasetDict, RowReport]:
    """Decode every image once and look at every caption list; drop bad rows, or refuse the dataset.

    Raises :class:`BadDataError` if more than ``max_bad_fraction`` of any split is bad: a handful of broken files is
    noise, a few percent means the wrong data or a broken download.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    kept, total, bad, examples = {}, {}, Counter(), []
    for name, split in splits.items():
        columns = split.select_columns(["image", "caption", "img_id"])
        with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
            problems = list(
                tqdm(
                    pool.map(lambda row: _row_problem(row["image"], row["caption"]), columns),
                    total=len(columns),
                    desc=f"Checking {name} images",
                    leave=False,
                )
            )
        good = [index for index, problem in enumerate(problems) if problem is None]
        total[name] = len(split)
        bad[name] = len(split) - len(good)
        for index, problem in enumerate(problems):
            if problem is not None and len(examples) < 10:
                examples.append(f"{name} row {index} (img_id {columns[index]['img_id']}): {problem}")
        kept[name] = split.select(good) if bad[name] else split
    report = RowReport(total=total, bad={name: bad[name] for name in total}, examples=examples)
    worst = max(report.total, key=report.bad_fraction)
    if report.bad_fraction(worst) > max_bad_fraction:
        raise BadDataError(
            f"{report.bad[worst]} of {report.total[worst]} rows of the {worst} split ({report.bad_fraction(worst):.1%})"
            f" are unusable, more than the {max_bad_fraction:.0%} tolerated. Examples:\n  " + "\n  ".join(examples)
        )
    return datasets.DatasetDict(kept), report


def caption_lists(rows: datasets.Dataset) -> list[list[str]]:
    """Each row's captions, cleaned (:func:`clean_captions`), in row order."""
    return [clean_captions(captions) for captions in rows["caption"]]


def caption_table(rows: datasets.Dataset, image_offset: int = 0) -> tuple[list[str], list[int]]:
    """Flatten the captions of ``rows``: every caption, and the row (plus ``image_offset``) of its image."""
    captions, image_index = [], []
    for row, captions_of_row in enumerate(caption_lists(rows)):
        for caption in captions_of_row:
            captions.append(caption)
            image_index.append(row + image_offset)
    return captions, image_index


def image_digests(rows: datasets.Dataset) -> list[str]:
    """The sha256 of each row's image bytes, in row order: what a locked image tower keys its features by, so rows of
    other tables holding the same picture find them (crossmodal/training/locked.py)."""
    return [hashlib.sha256(image_bytes(value)).hexdigest() for value in rows.select_columns(["image"])["image"]]


@dataclass(frozen=True)
class Corpus:
    """Every image and caption of the dataset in artifact order: the splits concatenated in ``SPLITS`` order.

    The test split comes last on purpose: training has already encoded it for its metrics, so the artifact's
    embeddings are the rest encoded afresh plus those (:func:`crossmodal.encoding.embed.encode_corpus`).
    """

    rows: datasets.Dataset  # one row per image (the dataset schema, images undecoded)
    captions: list[str]
    caption_image: list[int]  # row in ``rows`` of each caption

    @classmethod
    def from_splits(cls, splits: datasets.DatasetDict) -> Corpus:
        rows = datasets.concatenate_datasets([splits[name] for name in SPLITS])
        captions, caption_image = caption_table(rows)
        return cls(rows, captions, caption_image)
