"""Training pairs streamed from shards (``--train-data``; docs/architecture.md, "Streaming shards").

The epoch's slots (crossmodal/data/stream.py) are dealt to readers, one reader per loader worker of each process:
slot ``s`` goes to reader ``s % readers``. For every global batch each slot gives ``batch_size / slots`` good pairs;
a worker hands over its slots' share as one :class:`SlotChunk`, and the process puts its workers' chunks together
into its part of the global batch. No process reads another's shards and none dispatches batches to the others.

Every choice about a pair (its caption, its crop) is fixed by (seed, epoch, slot, its place in the slot), and a
checkpoint records how many items each slot has handed out: a resumed run, on any number of processes and workers
that divides the slots, takes exactly the batches the uninterrupted run would have.

A sample that cannot become a pair is skipped and counted by reason; an epoch ends for every process together
when a slot runs dry (a slot with bad samples runs dry first), and what the other slots still held is reported as
dropped. Past ``max_bad_row_fraction`` the run stops with the counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from crossmodal.data.dataset import BadDataError
from crossmodal.data.images import ImageDecodeError
from crossmodal.data.shards import DEFAULT_KEYS, BadSample, Keys, ShardSample
from crossmodal.data.stream import ShardCorpus, slot_stream
from crossmodal.training.augment import TrainAugment

PAIR_CHOICES = 22  # the seed stream of each pair's caption and crop
MIN_READ_FOR_BAD_CHECK = 200  # a process's first bad samples say little about the corpus's share of them


@dataclass
class SlotChunk:
    """One worker's share of one global batch: its slots' pairs, their places after them, what was skipped."""

    pairs: list[tuple[torch.Tensor, str]]
    consumed: dict[int, int]  # slot -> items it has handed out this epoch, these included
    keys: list[str] = field(default_factory=list)  # each pair's sample key
    bad: Counter = field(default_factory=Counter)  # reason -> samples skipped while filling this chunk
    exhausted: bool = False  # a slot ran dry before the chunk was full: the epoch ends here


class StreamedPairs(IterableDataset):
    """The chunks one process's loader workers hand over in an epoch, from :meth:`start` on."""

    def __init__(
        self,
        corpus: ShardCorpus,
        augment: TrainAugment,
        *,
        seed: int,
        slots: int,
        batch_size: int,
        shuffle_buffer: int,
        process: int,
        processes: int,
        keys: Keys = DEFAULT_KEYS,
    ) -> None:
        self.corpus, self.augment, self.keys = corpus, augment, keys
        self.seed, self.slots, self.chunk, self.buffer = seed, slots, batch_size // slots, shuffle_buffer
        self.process, self.processes = process, processes
        self.batches_per_epoch = corpus.slot_quota(slots) // self.chunk
        self.epoch, self.first_batch, self.consumed = 0, 0, [0] * slots

    def start(self, epoch: int, first_batch: int = 0, consumed: list[int] | None = None) -> None:
        """Where the next iteration begins: ``epoch``'s batch ``first_batch``, each slot past ``consumed`` items."""
        self.epoch, self.first_batch = epoch, first_batch
        self.consumed = list(consumed) if consumed is not None else [0] * self.slots

    def my_slots(self) -> list[int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = worker * self.processes + self.process, workers * self.processes
        return [slot for slot in range(self.slots) if slot % readers == reader]

    def __iter__(self) -> Iterator[SlotChunk]:
        mine = self.my_slots()
        streams = {
            slot: islice(
                slot_stream(self.corpus, self.seed, self.epoch, self.slots, slot, self.buffer, self.keys),
                self.consumed[slot],  # a resumed slot replays its first items unread: no picture is decoded
                None,
            )
            for slot in mine
        }
        consumed = {slot: self.consumed[slot] for slot in mine}
        for _ in range(self.first_batch, self.batches_per_epoch):
            chunk = SlotChunk([], consumed)
            for slot in mine:
                if not self._fill(chunk, slot, streams[slot]):
                    chunk.exhausted = True
            chunk.consumed = dict(consumed)
            yield chunk
            if chunk.exhausted:
                return

    def _fill(self, chunk: SlotChunk, slot: int, stream: Iterator) -> bool:
        """Add ``self.chunk`` good pairs of ``slot`` to ``chunk``; False when the slot runs dry first."""
        wanted = len(chunk.pairs) + self.chunk
        while len(chunk.pairs) < wanted:
            item = next(stream, None)
            if item is None:
                return False
            place = chunk.consumed[slot]
            chunk.consumed[slot] = place + 1
            pair = self.pair(item, slot, place)
            if isinstance(pair, BadSample):
                chunk.bad[pair.reason] += 1
            else:
                chunk.pairs.append(pair)
                chunk.keys.append(item.key)
        return True

    def pair(self, item: ShardSample | BadSample, slot: int, place: int) -> tuple[torch.Tensor, str] | BadSample:
        """The training pair of a slot's item: one of its captions and its picture decoded and cropped, both
        chosen by (seed, epoch, slot, place)."""
        if isinstance(item, BadSample):
            return item
        rng = np.random.default_rng([self.seed, PAIR_CHOICES, self.epoch, slot, place])
        caption = item.captions[int(rng.integers(len(item.captions)))]
        try:
            pixels = self.augment.decode(item.image, int(rng.integers(2**62)))
        except (ImageDecodeError, OSError, ValueError) as error:
            return BadSample(item.key, "bad image", str(error))
        return pixels, caption


def _chunk_as_is(chunk: SlotChunk) -> SlotChunk:
    return chunk


class StreamLoader:
    """A process's part of each global batch, put together from its workers' chunks in worker order; the stream's
    place and its skipped samples, for the checkpoint and the metrics."""

    def __init__(
        self,
        pairs: StreamedPairs,
        collate: Callable[[list[tuple[torch.Tensor, str]]], dict[str, Any]],
        accelerator: Accelerator,
        *,
        workers: int,
        max_bad_fraction: float,
    ) -> None:
        self.pairs, self.collate, self.accelerator = pairs, collate, accelerator
        self.workers, self.max_bad_fraction = max(workers, 1), max_bad_fraction
        self.loader = DataLoader(
            pairs, batch_size=None, num_workers=workers, collate_fn=_chunk_as_is, persistent_workers=False
        )
        self.consumed = [0] * pairs.slots  # this process's slots' places, as of the last batch handed out
        self.bad: Counter = Counter()  # this process's skipped samples, over the run since it started
        self.read = 0  # this process's items read since it started
        self.epoch_bad: Counter = Counter()  # this process's skipped samples in the current epoch
        self.restored: dict[str, Any] = {}  # what the checkpoint resumed from said of the processes before
        self.batch_keys: list[str] = []  # the sample keys of the batch last handed out, in its order

    def __len__(self) -> int:
        return self.pairs.batches_per_epoch

    def epoch(self, epoch: int, batches_done: int) -> Iterator[dict[str, Any]]:
        """``epoch``'s batches from ``batches_done`` on (the places restored when resuming mid-epoch)."""
        consumed = self.consumed if batches_done else None
        self.pairs.start(epoch, batches_done, consumed)
        self.consumed = list(consumed) if consumed is not None else [0] * self.pairs.slots
        self.epoch_bad = Counter()
        chunks = iter(self.loader)
        for _ in range(batches_done, len(self)):
            group = [next(chunks, None) for _ in range(self.workers)]
            present = [chunk for chunk in group if chunk is not None]
            for chunk in present:
                self._account(chunk)
            exhausted = len(present) < len(group) or any(chunk.exhausted for chunk in present)
            too_bad = self.read >= MIN_READ_FOR_BAD_CHECK and sum(self.bad.values()) > self.max_bad_fraction * self.read
            flags = torch.tensor([float(exhausted), float(too_bad)], device=self.accelerator.device)
            exhausted, too_bad = (bool(value) for value in self.accelerator.reduce(flags, "max").tolist())
            if too_bad:
                raise BadDataError(
                    f"streamed training data: {self.describe_bad()}; more than {self.max_bad_fraction:.1%} of "
                    "samples are bad (max_bad_row_fraction)"
                )
            if exhausted:
                break
            self.batch_keys = [key for chunk in present for key in chunk.keys]
            yield self.collate([pair for chunk in present for pair in chunk.pairs])
        del chunks  # its workers stop with it

    def _account(self, chunk: SlotChunk) -> None:
        for slot, place in chunk.consumed.items():
            self.read += place - self.consumed[slot]
            self.consumed[slot] = place
        self.bad.update(chunk.bad)
        self.epoch_bad.update(chunk.bad)

    def position(self) -> dict[str, Any]:
        """Every slot's place and the run's skipped samples, gathered from every process (call it on all)."""
        mine = [(slot, place) for slot, place in enumerate(self.consumed) if place and slot in self._my_slots()]
        places = [0] * self.pairs.slots
        for slot, place in gather_object(mine):
            places[slot] = place
        bad: Counter = Counter(self.restored.get("bad", {}))
        for counts in gather_object([dict(self.bad)]):
            bad.update(counts)
        return {"slots": self.pairs.slots, "consumed": places, "bad": dict(bad)}

    def epoch_summary(self, batches: int) -> dict[str, Any]:
        """What the epoch did with its samples, over every process (call it on all, at the epoch's end): pairs
        trained on, bad samples skipped by reason, and the rest, left unread or unused to keep the processes equal.
        (When resumed mid-epoch, the bad samples before the checkpoint are counted in the run's total only.)"""
        bad: Counter = Counter()
        for counts in gather_object([dict(self.epoch_bad)]):
            bad.update(counts)
        used = batches * self.pairs.chunk * self.pairs.slots
        dropped = self.pairs.corpus.num_samples - used - sum(bad.values())
        return {"pairs": used, "bad": dict(bad), "dropped": dropped}

    def _my_slots(self) -> set[int]:
        readers = self.workers * self.pairs.processes
        return {slot for slot in range(self.pairs.slots) if slot % readers in self._my_readers()}

    def _my_readers(self) -> set[int]:
        return {worker * self.pairs.processes + self.pairs.process for worker in range(self.workers)}

    def restore(self, saved: dict[str, Any]) -> None:
        """The places a checkpoint recorded (``position()``), on this run's slots."""
        if saved["slots"] != self.pairs.slots:
            raise ValueError(f"the checkpoint's stream has {saved['slots']} slots; this run has {self.pairs.slots}")
        self.consumed, self.restored = list(saved["consumed"]), saved

    def describe_bad(self) -> str:
        counts = ", ".join(f"{reason} {count:,}" for reason, count in sorted(self.bad.items())) or "none"
        return f"{sum(self.bad.values()):,} bad samples skipped in {self.read:,} read on this process ({counts})"
