"""Which samples of a shard corpus each reader takes in an epoch, and in what order (issue 36; docs/architecture.md,
"Streaming shards").

An epoch is the corpus read once: its shards in an order fixed by (seed, epoch), seen as one sequence of sample
positions, cut into ``slots`` equal ranges. A slot is the unit of reading: one loader worker of one process reads it
front to back, through its own shuffle buffer seeded by (seed, epoch, slot). Nothing here depends on how many
processes or workers there are: they only decide who reads which slot, so every sample is read at most once an
epoch, the global batch is the same union of slot chunks whatever the topology, and a slot's place in its stream
(how many items it has handed out) is all a checkpoint needs to continue it exactly.

Equal ranges keep every slot, and so every process, the same length even when shards are not: what is cut off to
make them equal is the remainder of the corpus over ``slots``, fewer than ``slots`` samples.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from crossmodal.data.shards import (
    DEFAULT_KEYS,
    REMOTE_PREFIX,
    BadSample,
    Keys,
    ShardError,
    ShardSample,
    expand_shards,
    open_shard,
    read_shard,
    split_member,
)

SHARD_ORDER, SLOT_BUFFER = 20, 21  # the seed streams of the shard order and of each slot's shuffle buffer


@dataclass(frozen=True)
class ShardCorpus:
    """The shards of ``--train-data`` and how many samples each holds."""

    spec: str
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    num_samples: int  # an epoch's samples: the corpus, or fewer with --train-num-samples

    @classmethod
    def open(cls, spec: str, num_samples: int | None = None) -> ShardCorpus:
        """Expand ``spec`` and count each shard's samples: from img2dataset's ``_stats.json`` beside it, a Parquet
        footer, or a local tar's headers. Nothing else is read before training."""
        shards = tuple(expand_shards(spec))
        known = [shard_size(shard) for shard in shards]
        unknown = known.count(None)
        if unknown and num_samples is None:
            first = shards[known.index(None)]
            raise ShardError(
                f"{unknown:,} shards, {first} first, have no _stats.json beside them: a remote tar's size is "
                "unknown until it is read; give the epoch's size with --train-num-samples"
            )
        if unknown:
            # open_clip's way: the shards of unknown size share what --train-num-samples leaves, evenly. A shard
            # holding more is read only as far as its share; one holding less leaves its slot short, and the
            # epoch ends when that slot runs dry (reported as dropped): never a sample twice.
            rest = max(num_samples - sum(count for count in known if count is not None), 0)
            share = -(-rest // unknown)
            known = [share if count is None else count for count in known]
        counts = tuple(known)
        total = sum(counts)
        if num_samples is not None and not 0 < num_samples <= total:
            raise ShardError(f"--train-num-samples {num_samples} must be between 1 and the {total:,} samples of {spec}")
        return cls(spec, shards, counts, total if num_samples is None else num_samples)

    def segments(self, seed: int, epoch: int, slots: int, slot: int) -> list[Segment]:
        """The slot's range of the epoch's sample positions, as (shard, first, end) pieces in reading order."""
        quota = self.num_samples // slots
        begin, end = slot * quota, (slot + 1) * quota
        pieces, position = [], 0
        for index in np.random.default_rng([seed, SHARD_ORDER, epoch]).permutation(len(self.shards)):
            count = self.counts[index]
            first, last = max(begin, position), min(end, position + count)
            if first < last:
                pieces.append(Segment(self.shards[index], first - position, last - position))
            position += count
            if position >= end:
                break
        return pieces

    def slot_quota(self, slots: int) -> int:
        return self.num_samples // slots


@dataclass(frozen=True)
class Segment:
    shard: str
    first: int  # sample positions [first, end) of the shard, in its stored order
    end: int


def shard_size(shard: str) -> int | None:
    """A shard's sample count, without reading its pictures; None for a remote tar without a stats file."""
    counted = stats_count(shard)
    if counted is not None:
        return counted
    if shard.endswith(".parquet"):
        with open_shard(shard) as stream:
            try:
                return pq.ParquetFile(stream).metadata.num_rows
            except (OSError, ValueError) as error:
                raise ShardError(f"shard {shard} is not a readable Parquet file: {error}") from error
    if shard.startswith(REMOTE_PREFIX):
        raise ShardError(
            f"{shard} has no _stats.json beside it: a remote tar's size cannot be known without reading it"
        )
    return _tar_keys(shard)


def stats_count(shard: str) -> int | None:
    """The samples img2dataset's ``NNNNN_stats.json`` beside a tar says it holds (``successes``), if any."""
    if not shard.endswith(".tar"):
        return None
    stats = shard[: -len(".tar")] + "_stats.json"
    if not stats.startswith(REMOTE_PREFIX) and not Path(stats).is_file():
        return None
    try:
        with open_shard(stats) as stream:
            return int(json.loads(stream.read())["successes"])
    except (ShardError, ValueError, KeyError, TypeError):
        return None


def _tar_keys(shard: str) -> int:
    """A local tar's samples, from its headers alone (tarfile seeks past each member's data)."""
    keys = set()
    try:
        with tarfile.open(shard, mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    keys.add(split_member(member.name)[0])
    except (tarfile.TarError, OSError) as error:
        raise ShardError(f"shard {shard} is not a readable tar: {error}") from error
    return len(keys)


def slot_items(segments: list[Segment], keys: Keys = DEFAULT_KEYS) -> Iterator[ShardSample | BadSample]:
    """The samples of a slot's pieces, in order; a shard cut short yields what it holds (its last one bad)."""
    for segment in segments:
        yield from islice(read_shard(segment.shard, keys), segment.first, segment.end)


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """webdataset's shuffle: hold ``size`` items, hand out a random one and put the next in its place; at the end,
    the rest in random order. ``size`` 1 (or less) keeps the order."""
    held: list = []
    for item in items:
        if len(held) < size:
            held.append(item)
            continue
        index = int(rng.integers(size))
        yield held[index]
        held[index] = item
    rng.shuffle(held)
    yield from held


def slot_stream(
    corpus: ShardCorpus, seed: int, epoch: int, slots: int, slot: int, buffer: int, keys: Keys = DEFAULT_KEYS
) -> Iterator[ShardSample | BadSample]:
    """What slot ``slot`` hands out in ``epoch``, in order: the same for every topology and every rerun."""
    rng = np.random.default_rng([seed, SLOT_BUFFER, epoch, slot])
    return shuffle_buffer(slot_items(corpus.segments(seed, epoch, slots, slot), keys), buffer, rng)


def caption_sample(corpus: ShardCorpus, limit: int, keys: Keys = DEFAULT_KEYS) -> list[str]:
    """The first ``limit`` captions of the corpus in its stored order: a bounded sample to fit a tokenizer on."""
    captions: list[str] = []
    for shard in corpus.shards:
        for item in read_shard(shard, keys):
            if isinstance(item, ShardSample):
                captions += item.captions
            if len(captions) >= limit:
                return captions[:limit]
    return captions
