"""Streamed training pairs against map-style ones: the same corpus, the same decode and crop, three engines.

    python -m benchmarks.stream_throughput --pairs 3000 --workers 1

One corpus of generated Flickr-size pictures is written once as webdataset shards (img2dataset's layout) and once
as a dataset folder in the Flickr30k schema. Each engine hands out an epoch of global batches, decoded and cropped
by the preset's training augmentation in its loader workers, and the benchmark counts pairs a second:

map-style (the floor): the dataset folder through TrainPairs and its loader, as training without --train-data runs
project stream:        the shards through crossmodal/training/streamed.py, as --train-data runs
datasets streaming:    the shards through ``datasets.load_dataset("webdataset", streaming=True)``: its shuffle
                       buffer, its split of shards over loader workers, the same decode and crop

Rounds alternate the engines, so a machine busy with something else slows all alike; the median round counts.
Target: the project's stream >= 0.95 x map-style. Exit 1 if missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

from benchmarks.common import command_line, machine_line
from crossmodal.config import PRESETS
from crossmodal.data.dataset import DataSource, load_splits
from crossmodal.data.shards import ShardSample, read_shard
from crossmodal.data.stream import ShardCorpus
from crossmodal.synthetic.shards import write_webdataset
from crossmodal.training.augment import TrainAugment
from crossmodal.training.pairs import TrainPairs
from crossmodal.training.prepare import make_accelerator
from crossmodal.training.streamed import StreamedPairs, StreamLoader

TARGET = 0.95


def as_dataset_folder(shards: list[str], out: Path) -> Path:
    """The shards' pairs as a save_to_disk folder in the Flickr30k schema (val and test: a few of them again)."""
    rows = [sample for shard in shards for sample in read_shard(shard) if isinstance(sample, ShardSample)]
    table = {
        "image": [{"bytes": sample.image, "path": f"{sample.key}.jpg"} for sample in rows],
        "caption": [list(sample.captions) for sample in rows],
        "img_id": [sample.key for sample in rows],
        "filename": [f"{sample.key}.jpg" for sample in rows],
    }
    text = datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(decode=False), "caption": datasets.Sequence(text),
                                  "img_id": text, "filename": text})  # fmt: skip
    train = datasets.Dataset.from_dict(table, features=features)
    splits = datasets.DatasetDict({"train": train, "val": train.select(range(8)), "test": train.select(range(8))})
    splits.save_to_disk(str(out))
    return out


class Crop:
    """The training decode and crop of one ``datasets`` streaming row (picklable, for its loader workers)."""

    def __init__(self, augment: TrainAugment) -> None:
        self.augment = augment

    def __call__(self, row: dict) -> dict:
        return {"pixels": self.augment.decode(row["jpg"]["bytes"], 0), "caption": row["txt"]}


def keep(items):
    return items


def engines(folder: Path, shards: str, preset: str, batch_size: int, workers: int) -> dict[str, Callable[[], int]]:
    """Each engine as a function that hands out one epoch and returns the pairs it handed out."""
    augment = TrainAugment(PRESETS[preset].model)
    train_config = PRESETS[preset].train
    splits = load_splits(DataSource(str(folder)))
    accelerator = make_accelerator(train_config, folder.parent)
    corpus = ShardCorpus.open(shards)

    def map_style() -> int:
        pairs = TrainPairs(splits["train"], augment, seed=0)
        order = torch.utils.data.RandomSampler(pairs, generator=torch.Generator().manual_seed(0))
        loader = DataLoader(pairs, batch_size=batch_size, sampler=order, num_workers=workers, collate_fn=keep,
                            drop_last=True)  # fmt: skip
        return sum(len(batch) for batch in loader)

    def project_stream() -> int:
        slots = max(workers, 1)
        pairs = StreamedPairs(corpus, augment, seed=0, slots=slots, batch_size=batch_size, shuffle_buffer=1000,
                              process=0, processes=1)  # fmt: skip
        loader = StreamLoader(pairs, keep, accelerator, workers=workers, max_bad_fraction=0.01)
        return sum(len(batch) for batch in loader.epoch(0, 0))

    def datasets_stream() -> int:
        stream = datasets.load_dataset(
            "webdataset", data_files={"train": list(corpus.shards)}, split="train", streaming=True
        )
        stream = stream.cast_column("jpg", datasets.Image(decode=False)).shuffle(seed=0, buffer_size=1000)
        stream = stream.map(Crop(augment), remove_columns=["jpg", "txt", "json", "__key__", "__url__"])
        loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=keep, drop_last=True)
        return sum(len(batch) for batch in loader)

    return {"map-style": map_style, "project stream": project_stream, "datasets streaming": datasets_stream}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--size", default="500x375", help="picture width x height (Flickr30k's typical size)")
    parser.add_argument("--preset", default="flickr30k", help="whose training augmentation decodes and crops")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader workers of each engine")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    width, height = (int(value) for value in args.size.split("x"))
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="stream-throughput-"))
    started = time.perf_counter()
    tars = write_webdataset(root / "shards", args.pairs, args.shard_size, (width, height), seed=0)
    folder = as_dataset_folder([str(path) for path in tars], root / "dataset")
    print(command_line("benchmarks.stream_throughput", argv))
    print(machine_line(torch.device("cpu")))
    print(f"corpus: {args.pairs:,} pairs at {width}x{height} in {len(tars)} shards, written in "
          f"{time.perf_counter() - started:.0f} s; batch {args.batch_size}, {args.workers} loader workers")  # fmt: skip
    runs = engines(folder, str(root / "shards"), args.preset, args.batch_size, args.workers)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, epoch in runs.items():
            start = time.perf_counter()
            count = epoch()
            rates[name].append(count / (time.perf_counter() - start))
    floor = statistics.median(rates["map-style"])
    print("| engine | pairs/s (median) | rounds | × map-style |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        spread = ", ".join(f"{value:.0f}" for value in values)
        print(f"| {name} | {median:.0f} | {spread} | {median / floor:.2f} |")
    ratio = statistics.median(rates["project stream"]) / floor
    print(f"project stream / map-style: {ratio:.2f} (target >= {TARGET}): {'met' if ratio >= TARGET else 'MISSED'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
