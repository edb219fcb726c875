"""Wall time and peak memory of the offline demo run, against the floor of its training steps, in one run.

    python -m benchmarks.tiny_end_to_end

run:   `accelerate launch train_accelerate.py --preset tiny` on the generated dataset (1000/100/100 images), as
       scripts/demo.sh runs it, with accelerate's defaults spelt out so that no local `accelerate config` changes it:
       data checks, the preset's epochs with validation, test, embeddings, artifacts.
floor: the same number of optimizer steps of the tiny model on batches already in memory (bare compute).
The ratio says how much the data path, evaluation, start-up and artifact writing add on top of the arithmetic.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.train_throughput import (  # the same floor as the throughput benchmark
    batches_on_device,
    build_bench,
    floor_seconds,
)
from crossmodal.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="crossmodal-tiny-"))
    preset = PRESETS["tiny"].train
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crossmodal", "synthetic", "--out", workdir / "data"], check=True, cwd=ROOT)
    generated = time.perf_counter()
    subprocess.run(
        [
            *launch,
            "train_accelerate.py",
            "--preset",
            "tiny",
            "--dataset",
            workdir / "data",
            "--output-dir",
            workdir / "run",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    finished = time.perf_counter()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest child: the trainer

    steps = preset.epochs * (1000 // preset.batch_size)
    bench = build_bench("tiny", preset.batch_size, batches=5, num_workers=0, mixed_precision="no")
    ready = batches_on_device(bench, 5)
    step_seconds = statistics.median(floor_seconds(bench, ready, steps=5, warmup=1) for _ in range(4))
    floor = steps * step_seconds

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'measure':<34} {'seconds':>8}")
    print(f"{'generate dataset':<34} {generated - started:>8.1f}")
    print(f"{'train + evaluate + write artifacts':<34} {finished - generated:>8.1f}")
    print(f"{'floor: ' + str(steps) + ' bare steps':<34} {floor:>8.1f}")
    print(f"peak RSS of the training process: {peak_rss_mb:.0f} MB")
    print(f"ratio run / floor: {(finished - generated) / floor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
