"""Training pairs read from shards as they stream (issue 36; docs/architecture.md, "Streaming shards"): webdataset
tars (img2dataset's layout: ``KEY.jpg`` + ``KEY.txt`` / ``KEY.json``) and Parquet files (the Flickr30k schema, or
img2dataset's ``jpg`` + ``caption`` columns), local or on the Hub (``hf://``).

A shard is read front to back once, one sample at a time: nothing is held beyond the sample being assembled, and
nothing is read before it is needed. What cannot become a pair is yielded as a :class:`BadSample` with its reason,
for the caller to count and skip; a shard that is missing is a :class:`ShardError` naming it.

Here is only the reading; which process and loader worker reads which shard, the shuffle and the position a
checkpoint records build on it.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pyarrow.parquet as pq

from crossmodal.data.images import ImageDecodeError, decode_image, image_bytes

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
REMOTE_PREFIX = "hf://"
BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


class ShardError(RuntimeError):
    """A shard that is missing or unreadable as a whole; the message names it."""


@dataclass(frozen=True)
class ShardSample:
    """One picture and its captions (a webdataset sample has one; a Flickr30k-schema row, five)."""

    key: str
    image: bytes
    captions: tuple[str, ...]


@dataclass(frozen=True)
class BadSample:
    """A sample that cannot become a training pair: ``reason`` is one of a few fixed words, to count by."""

    key: str
    reason: str  # "no image", "no caption", "empty caption", "truncated shard", "bad image", "bad metadata"
    detail: str = ""


@dataclass(frozen=True)
class Keys:
    """Which members or columns hold the picture and the caption (the ``--image-key``/``--caption-key`` flags)."""

    image: tuple[str, ...] = IMAGE_EXTENSIONS
    text: str = "txt"
    caption: str = "caption"  # the caption's key in KEY.json (when there is no KEY.txt), or its Parquet column


DEFAULT_KEYS = Keys()


# ---------------------------------------------------------------- which shards


def _expand_braces(spec: str) -> list[str]:
    """``a/{00000..00003}.tar`` and ``{a,b}.tar`` as open_clip and webdataset write them (zero padding kept)."""
    if match := BRACE_RANGE.search(spec):
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        return [
            expanded
            for number in range(int(first), int(last) + 1)
            for expanded in _expand_braces(f"{spec[: match.start()]}{number:0{width}d}{spec[match.end() :]}")
        ]
    if match := BRACE_LIST.search(spec):
        return [
            expanded
            for option in match.group(1).split(",")
            for expanded in _expand_braces(spec[: match.start()] + option + spec[match.end() :])
        ]
    return [spec]


def _is_shard(path: str) -> bool:
    return path.endswith((".tar", ".parquet"))


def expand_shards(spec: str) -> list[str]:
    """Every shard ``spec`` names, in order: ``::``-separated parts, each a brace pattern, a glob or a folder (its
    ``.tar`` and ``.parquet`` files); local shards must all exist (checked here, before training starts), remote
    ones are checked when first opened."""
    shards: list[str] = []
    for part in filter(None, spec.split("::")):
        for pattern in _expand_braces(part):
            if pattern.startswith(REMOTE_PREFIX):
                shards += _remote_shards(pattern)
            elif Path(pattern).is_dir():
                # img2dataset's NNNNN.parquet beside NNNNN.tar is the shard's metadata, not more pictures.
                files = sorted(str(path) for path in Path(pattern).rglob("*") if _is_shard(path.name))
                tars = [path for path in files if path.endswith(".tar")]
                found = tars or files
                if not found:
                    raise ShardError(f"no .tar or .parquet shards in the folder {pattern}")
                shards += found
            elif glob.has_magic(pattern):
                found = sorted(path for path in glob.glob(pattern, recursive=True) if _is_shard(path))
                if not found:
                    raise ShardError(f"no shards match {pattern}")
                shards += found
            elif not Path(pattern).is_file():
                raise ShardError(f"shard {pattern} does not exist")
            else:
                shards.append(pattern)
    if not shards:
        raise ShardError(f"--train-data {spec!r} names no shards")
    return shards


def _remote_shards(pattern: str) -> list[str]:
    """A Hub path: globbed through huggingface_hub's file system when it has wildcards, else kept as it is."""
    if not glob.has_magic(pattern):
        return [pattern]
    from huggingface_hub import HfFileSystem  # only a remote spec needs it

    found = sorted(REMOTE_PREFIX + path for path in HfFileSystem().glob(pattern) if _is_shard(path))
    if not found:
        raise ShardError(f"no shards match {pattern}")
    return found


def open_shard(shard: str) -> BinaryIO:
    """The shard's bytes as a stream; a missing or unreadable one is a :class:`ShardError` naming it."""
    try:
        if shard.startswith(REMOTE_PREFIX):
            from huggingface_hub import HfFileSystem

            return HfFileSystem().open(shard, "rb")
        return open(shard, "rb")
    except (OSError, ValueError) as error:  # FileNotFoundError, permissions, a Hub path that is not there
        raise ShardError(f"cannot open shard {shard}: {error}") from error


# ---------------------------------------------------------------- samples


def read_shard(shard: str, keys: Keys = Keys()) -> Iterator[ShardSample | BadSample]:
    """Every sample of one shard, in stored order."""
    with open_shard(shard) as stream:
        yield from (read_parquet if shard.endswith(".parquet") else read_tar)(stream, shard, keys)


def split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: a member's key is its path up to the first dot of its file name; the rest, its field."""
    path = PurePosixPath(name)
    stem, _, field = path.name.partition(".")
    return str(path.with_name(stem)), field.lower()


class _CountingReader:
    """A stream that counts the bytes read through it: how a quietly cut tar is told from a whole one."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.consumed = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.consumed += len(data)
        return data


def read_tar(stream: BinaryIO, shard: str, keys: Keys = Keys()) -> Iterator[ShardSample | BadSample]:
    """The samples of a webdataset tar, read as a stream (a sample's members are consecutive, as webdataset and
    img2dataset write them). A truncated tar ends the shard with one "truncated shard" sample."""
    key, fields, counting = None, {}, _CountingReader(stream)
    try:
        with tarfile.open(fileobj=counting, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, field = split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield _assemble(key, fields, keys)
                    key, fields = member_key, {}
                fields[field] = archive.extractfile(member).read()  # a cut member raises ReadError here
            # tarfile ends quietly where a header is cut short or missing: a whole tar is whole 512-byte blocks
            # and ends in zero blocks past its last member.
            if counting.consumed % tarfile.BLOCKSIZE or counting.consumed <= archive.offset:
                raise tarfile.ReadError("the tar ends without its end-of-archive blocks")
    except (tarfile.TarError, EOFError, OSError) as error:
        # The sample being read may have lost members: it is bad, not a shorter good one.
        yield BadSample(key or shard, "truncated shard", f"{shard}: {error}")
        return
    if key is not None:
        yield _assemble(key, fields, keys)


def _assemble(key: str, fields: dict[str, bytes], keys: Keys) -> ShardSample | BadSample:
    image = next((fields[field] for field in keys.image if field in fields), None)
    if image is None:
        return BadSample(key, "no image", f"none of {', '.join(keys.image)}")
    if keys.text in fields:
        caption = fields[keys.text].decode("utf-8", errors="replace")
    elif "json" in fields:
        try:
            caption = json.loads(fields["json"]).get(keys.caption)
        except (ValueError, AttributeError) as error:
            return BadSample(key, "bad metadata", str(error))
        if not isinstance(caption, str):
            return BadSample(key, "no caption", f"no {keys.text} and no {keys.caption!r} in its json")
    else:
        return BadSample(key, "no caption", f"no {keys.text} and no json")
    return _with_captions(key, image, [caption])


def _with_captions(key: str, image: bytes, captions: list) -> ShardSample | BadSample:
    kept = tuple(" ".join(caption.split()) for caption in captions if isinstance(caption, str) and caption.strip())
    return ShardSample(key, image, kept) if kept else BadSample(key, "empty caption")


def read_parquet(stream: BinaryIO, shard: str, keys: Keys = Keys()) -> Iterator[ShardSample | BadSample]:
    """The rows of a Parquet shard, a batch of rows at a time: the Flickr30k schema (``image`` {bytes, path},
    ``caption`` a list) or img2dataset's (``jpg`` bytes, ``caption`` a string, ``key``)."""
    try:
        table = pq.ParquetFile(stream)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ShardError(f"shard {shard} is not a readable Parquet file: {error}") from error
    names = set(table.schema_arrow.names)
    image_column = next((name for name in ("image", *keys.image) if name in names), None)
    if image_column is None or keys.caption not in names:
        raise ShardError(f"shard {shard} has no image column ({', '.join(('image', *keys.image))}) or no "
                         f"{keys.caption!r} column")  # fmt: skip
    columns = [image_column, keys.caption] + [name for name in ("key", "img_id") if name in names]
    row = 0
    for batch in table.iter_batches(batch_size=256, columns=columns):
        for values in batch.to_pylist():
            key = str(values.get("key") or values.get("img_id") or f"{Path(shard).name}/{row}")
            row += 1
            image = values[image_column]
            data = image_bytes(image) if isinstance(image, dict) else image
            if not data:
                yield BadSample(key, "no image")
                continue
            captions = values[keys.caption]
            yield _with_captions(key, data, captions if isinstance(captions, list) else [captions])


def image_problem(sample: ShardSample) -> BadSample | None:
    """Whether the picture decodes as training will decode it (bounded, allow-listed: crossmodal/data/images.py)."""
    try:
        decode_image(sample.image, draft_size=(64, 64))
    except (ImageDecodeError, OSError) as error:
        return BadSample(sample.key, "bad image", str(error))
    return None
