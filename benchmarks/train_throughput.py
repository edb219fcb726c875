"""Training throughput (image-caption pairs/s) of a preset's architecture, against its floor in the same run.

    python -m benchmarks.train_throughput                         # GPU: flickr30k, global batch 256, bf16
    python -m benchmarks.train_throughput --preset flickr30k --batch-size 32 --mixed-precision no   # CPU
    python -m benchmarks.train_throughput --preset tiny --batch-size 64 --mixed-precision no

floor:      forward + backward + AdamW step on batches already on the device (no data path at all)
end-to-end: the real data path (500x375 JPEG bytes -> decode -> seeded crop -> tokenize, in loader workers, or on the
            device with --decode-on-device) feeding the same step through Accelerate, as train.py runs it
Rounds alternate floor and end-to-end, so a machine busy with something else slows both alike; each end-to-end round
starts its loader afresh and first drains what the workers had queued, so it measures the steady state. Towers are
built from config with random weights: nothing is downloaded, and speed does not depend on the weights.
Targets: end-to-end >= 85% of floor everywhere; >= 3,000 pairs/s on CUDA with the flickr30k preset. Exit 1 if missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from benchmarks.common import (
    Target,
    command_line,
    data_path_line,
    flickr_size_rows,
    machine_line,
    one_core_seconds,
    random_model,
    seconds,
    throughput_parser,
)
from crossmodal.config import PRESETS
from crossmodal.encoding.batches import CaptionBatcher, loader_workers
from crossmodal.training.augment import TrainAugment
from crossmodal.training.loop import train_step
from crossmodal.training.optimizer import make_optimizer
from crossmodal.training.pairs import DeviceBatch, TrainPairs, make_train_loader
from crossmodal.training.prepare import make_accelerator

PREFETCH_FACTOR = 2  # DataLoader's default: batches each worker queues ahead


@dataclass
class Bench:
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
    device_batch: DeviceBatch
    max_grad_norm: float
    num_workers: int
    model_config: Any
    decode_on_device: bool

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """The floor: train.py's step on a batch already on the device."""
        return train_step(self.accelerator, self.model, self.optimizer, self.scheduler, batch, self.max_grad_norm)

    def end_to_end_step(self, batch: dict[str, Any]) -> float:
        """A loader batch made ready on the device, then the same step: what train.py's loop does per batch."""
        return self.step(self.device_batch(batch))

    @property
    def queued(self) -> int:
        """Batches the workers have ready when a fresh loader's first step starts."""
        return self.num_workers * PREFETCH_FACTOR


def build_bench(
    preset_name: str,
    batch_size: int,
    batches: int,
    num_workers: int | None,
    mixed_precision: str,
    *,
    decode_on_device: bool = False,
    compile_model: bool = False,
    cuda_options: bool | None = None,
    workdir: Path | None = None,
) -> Bench:
    """The preset's architecture (random init), AdamW and train.py's loader over ``batches`` global batches.

    ``cuda_options``: fused AdamW and channels_last inputs, as train.py uses them on CUDA (default: on CUDA only);
    the tests turn them on for CPU, so those branches run without a GPU.
    """
    preset = PRESETS[preset_name]
    workdir = workdir or Path(tempfile.mkdtemp(prefix="crossmodal-bench-"))
    train_config = dataclasses.replace(preset.train, batch_size=batch_size, decode_on_device=decode_on_device)
    accelerator = make_accelerator(
        train_config, workdir, mixed_precision=mixed_precision, dynamo_backend="inductor" if compile_model else "no"
    )
    workers = loader_workers(preset.train.num_workers if num_workers is None else num_workers, 1)
    rows = flickr_size_rows(batch_size * batches, workdir)
    model, model_config, tokenizer = random_model(preset.model, rows)
    cuda_like = accelerator.device.type == "cuda" if cuda_options is None else cuda_options
    optimizer = make_optimizer(model, train_config, fused=cuda_like)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    augment = TrainAugment(model_config)
    dataset = TrainPairs(rows, augment, train_config.seed, decode_on_device=decode_on_device)
    loader = make_train_loader(dataset, CaptionBatcher(tokenizer, model_config), train_config, workers)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    device_batch = DeviceBatch(augment, accelerator.device, channels_last=cuda_like)
    return Bench(
        accelerator, model, optimizer, scheduler, loader, device_batch, train_config.max_grad_norm, workers,
        model_config, decode_on_device,
    )  # fmt: skip


def seconds_per_step(run_step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        run_step()
    return seconds(lambda: [run_step() for _ in range(steps)], device) / steps


def batches_on_device(bench: Bench, count: int) -> list[dict[str, torch.Tensor]]:
    """The floor's batches: the loader's first ``count`` of epoch 0, decoded, on the device, ready for the model.

    Several, not one batch repeated: captions are padded to the longest in their batch, so one batch's text tower
    cost is not every batch's.
    """
    bench.loader.set_epoch(0)
    return [bench.device_batch(batch) for batch, _ in zip(bench.loader, range(count), strict=False)]


def floor_seconds(bench: Bench, batches: list[dict[str, torch.Tensor]], steps: int, warmup: int) -> float:
    """Seconds per step of the same training step on batches that are already on the device (taken in turn)."""
    ready = itertools.cycle(batches)
    return seconds_per_step(lambda: bench.step(next(ready)), steps, warmup, bench.accelerator.device)


def data_path_seconds(bench: Bench, batch_size: int) -> float:
    """Seconds one core takes to make one global batch as the loader workers do (decode, crop, tokenize, collate)."""
    dataset, collate = bench.loader.dataset, bench.loader.collate_fn
    return one_core_seconds(lambda: collate([dataset[index] for index in range(batch_size)]))


def end_to_end_seconds(bench: Bench, steps: int, warmup: int, epoch: int) -> float:
    """Seconds per step with batches from a fresh epoch of the real loader; what workers queued at start is drained
    (untimed) first, so the timed steps wait on the data path exactly as long as a long epoch would."""
    bench.loader.set_epoch(epoch)
    batches = iter(bench.loader)  # workers start here, and stop when it is dropped on return: before the next floor
    return seconds_per_step(
        lambda: bench.end_to_end_step(next(batches)), steps, warmup + bench.queued, bench.accelerator.device
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = throughput_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (default: the recipe's 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round (plus the queued batches)")
    parser.add_argument("--compile", action="store_true", help="torch.compile via Accelerate's dynamo_backend")
    parser.add_argument("--target-pairs-per-s", type=float, default=3000.0, help="on CUDA with flickr30k only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # 1. The bench: model, optimizer, loader as train.py builds them, over enough batches for every round.
    args = parse_args(argv)
    workers = loader_workers(
        PRESETS[args.preset].train.num_workers if args.num_workers is None else args.num_workers, 1
    )
    batches = args.warmup + workers * PREFETCH_FACTOR + args.steps
    bench = build_bench(
        args.preset, args.batch_size, batches, workers, args.mixed_precision,
        decode_on_device=args.decode_on_device, compile_model=args.compile,
    )  # fmt: skip
    device = bench.accelerator.device

    # 2. Alternating rounds.
    ready = batches_on_device(bench, args.steps)
    floor, end_to_end = [], []
    for round_ in range(args.rounds):
        floor.append(floor_seconds(bench, ready, args.steps, args.warmup))
        end_to_end.append(end_to_end_seconds(bench, args.steps, args.warmup, epoch=round_))
    data_path = data_path_seconds(bench, args.batch_size)
    floor_rate = args.batch_size / statistics.median(floor)
    e2e_rate = args.batch_size / statistics.median(end_to_end)

    # 3. The table; the ratio line last.
    on_cuda = device.type == "cuda"
    config = bench.model_config
    print(machine_line(device))
    print(f"command: {command_line('benchmarks.train_throughput', argv)}")
    print(
        f"preset {args.preset} ({config.image_tower} + {config.text_tower}), global batch {args.batch_size}, "
        f"{args.mixed_precision} precision, {bench.num_workers} loader workers, JPEG 500x375 decoded "
        f"{'on the device' if args.decode_on_device else 'in workers'}, AdamW {'fused' if on_cuda else 'foreach'}, "
        f"{'channels_last' if on_cuda else 'contiguous'} images, compile {'on' if args.compile else 'off'}; "
        f"median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'measure':<12} {'s/step':>8} {'pairs/s':>9}")
    print(f"{'floor':<12} {statistics.median(floor):>8.3f} {floor_rate:>9.1f}")
    print(f"{'end-to-end':<12} {statistics.median(end_to_end):>8.3f} {e2e_rate:>9.1f}")
    print(data_path_line(device, "a batch", data_path, statistics.median(floor)))
    targets = [Target("ratio end-to-end / floor:", e2e_rate / floor_rate, args.target_ratio)]
    if on_cuda and args.preset == "flickr30k":
        rate = Target("end-to-end pairs/s:", e2e_rate, args.target_pairs_per_s)
        print(rate.describe())
        targets.append(rate)
    else:
        print(f"end-to-end pairs/s target (>= {args.target_pairs_per_s:g}): only on CUDA with the flickr30k preset")
    print(targets[0].describe())
    return 0 if all(target.met for target in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
