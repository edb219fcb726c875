"""The folder path of ``benchmarks.index_throughput``: indexing a folder of your own pictures, as a user runs it.

    python -m benchmarks.index_throughput --folder 10000 --preset demo --mixed-precision no
    python -m benchmarks.index_throughput --folder 10000 --preset flickr30k --mixed-precision no

real:  `python -m crossmodal index` in a fresh process on a folder of N distinct 500x375 photo-like JPEGs in nested
       folders, timed from launch to exit: start-up, the walk, loader workers reading, hashing, decoding and making
       thumbnails, the tower, the chunk files, the index written and swapped in
floor: the bare image tower (model.encode_image) on a sample of the same pictures already decoded, preprocessed and
       batched, same batch size and threads, under inference_mode
rerun: the same command again with nothing changed, against the first run's time
Pictures per second are compared (the floor on a sample: N preprocessed pictures would not fit in memory). The model
is the preset's architecture with random weights, written as an artifact folder by training's own writer
(benchmarks/flickr_scale.py): speed does not depend on the weights.
Targets: real >= 0.8 x floor on 2 cores, at the demo's tower and at Flickr30k's; rerun < 5% of the first run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import FLICKR_SIZE, Target, command_line, machine_line, seconds
from benchmarks.flickr_scale import PhotoMaker, build
from crossmodal.artifacts.contract import load_verified
from crossmodal.index.cli import DEFAULT_BATCH_SIZE
from crossmodal.model.dual_encoder import DualEncoder
from crossmodal.model.preprocess import decode_for_eval, image_batch

PER_FOLDER = 250  # pictures per sub-folder, as a camera's folders hold them
FLOOR_SAMPLE = 256
RERUN_TARGET = 0.05
TARGET_RATIO = 0.8


def write_pictures(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` distinct photo-like JPEGs of Flickr's size in nested folders."""
    photos = PhotoMaker(seed)
    paths = []
    for number in tqdm(range(count), desc="Writing pictures", leave=False):
        path = folder / f"{2026 - number // 2500}" / f"roll_{number // PER_FOLDER:03d}" / f"IMG_{number:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photos.jpeg(FLICKR_SIZE))
        paths.append(path)
    return paths


def floor_seconds(model: DualEncoder, paths: list[Path], batch_size: int) -> float:
    """Seconds the bare tower takes on ``paths``, decoded and preprocessed beforehand."""
    images = [decode_for_eval(path.read_bytes(), model.config) for path in paths]
    starts = range(0, len(images), batch_size)
    batches = [image_batch(images[start : start + batch_size], model.config) for start in starts]

    def run() -> None:
        with torch.inference_mode():
            for pixels in batches:
                model.encode_image(pixels)

    run()  # warm-up: allocator, kernels
    return seconds(run)


def run_index(model_folder: Path, pictures: Path, output: Path, batch_size: int, num_workers: int | None) -> float:
    command = [sys.executable, "-m", "crossmodal", "index", "--artifacts", str(model_folder), "--images", str(pictures),
               "--output-dir", str(output), "--batch-size", str(batch_size)]  # fmt: skip
    if num_workers is not None:
        command += ["--num-workers", str(num_workers)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def peak_child_memory() -> float:
    """The largest resident set of any child process so far, in MB (Linux reports it in kB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(args: argparse.Namespace, argv: list[str] | None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="crossmodal-index-folder-"))
    model_folder = build(workdir / "model", num_images=64, preset_name=args.preset)
    paths = write_pictures(workdir / "pictures", args.folder)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    sample = paths[:: max(1, len(paths) // FLOOR_SAMPLE)][:FLOOR_SAMPLE]

    model = load_verified(model_folder).model.eval()
    floors = [floor_seconds(model, sample, batch_size)]
    first = run_index(model_folder, workdir / "pictures", workdir / "index", batch_size, args.num_workers)
    memory = peak_child_memory()  # the indexing process and its loader workers: the only children so far
    floors.append(floor_seconds(model, sample, batch_size))
    rerun = run_index(model_folder, workdir / "pictures", workdir / "index", batch_size, args.num_workers)

    floor_rate = len(sample) / statistics.median(floors)
    real_rate = len(paths) / first
    config = model.config
    print(machine_line(torch.device("cpu")))
    print(f"command: {command_line('benchmarks.index_throughput', argv)}")
    print(
        f"preset {args.preset} ({config.image_tower} at {config.image_size} px), batch {batch_size}, a folder of "
        f"{len(paths):,} JPEGs {FLICKR_SIZE[0]}x{FLICKR_SIZE[1]} in {len(paths) // PER_FOLDER + 1} sub-folders; "
        f"floor on {len(sample)} of them, before and after"
    )
    print(f"{'measure':<28} {'seconds':>9} {'pictures/s':>11}")
    print(f"{'floor (bare image tower)':<28} {statistics.median(floors):>9.2f} {floor_rate:>11.1f}")
    print(f"{'python -m crossmodal index':<28} {first:>9.2f} {real_rate:>11.1f}")
    print(f"{'rerun, nothing changed':<28} {rerun:>9.2f} {'':>11}")
    print(f"peak memory of one indexing process: {memory:,.0f} MB")
    targets = [
        Target("rerun / first run:", rerun / first, RERUN_TARGET, at_least=False),
        Target("ratio real / floor: pictures", real_rate / floor_rate, args.target_ratio),
    ]
    for target in targets:
        print(target.describe())
    return 0 if all(target.met for target in targets) else 1
