"""Training throughput (image-caption pairs/s) of a preset's architecture, against its floor in the same run.

    python -m benchmarks.train_throughput --preset flickr30k --batch-size 32 --steps 5      # CPU, real architecture
    python -m benchmarks.train_throughput --preset tiny --batch-size 64 --steps 20

floor:      forward + backward + AdamW step on one batch already on the device (no data path at all)
end-to-end: the real data path (JPEG bytes at Flickr size -> decode -> augment -> tokenize, in loader workers) feeding
            the same training step through Accelerate, as train.py runs it
Towers are built from config with random weights, so nothing is downloaded; speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from crossmodal import synthetic
from crossmodal.config import PRESETS
from crossmodal.data import DataSource, EpochShuffle, TrainPairs, caption_table, load_splits
from crossmodal.model import build_model
from crossmodal.preprocess import image_transform
from crossmodal.tokenizer import fit_wordpiece
from crossmodal.train import TrainBatcher, make_accelerator, parameter_groups, train_step


def time_steps(run_step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run_step()
    durations = []
    for _ in range(steps):
        started = time.perf_counter()
        run_step()
        durations.append(time.perf_counter() - started)
    return durations


@dataclasses.dataclass
class Bench:
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: torch.utils.data.DataLoader
    max_grad_norm: float
    num_workers: int
    model_config: object

    def step(self, batch) -> float:
        return train_step(self.accelerator, self.model, self.optimizer, self.scheduler, batch, self.max_grad_norm)


def build_bench(
    preset_name: str, batch_size: int, batches: int, num_workers: int | None, mixed_precision: str
) -> Bench:
    """The preset's architecture (random init), AdamW and a loader over ``batches`` batches of Flickr-size JPEGs."""
    preset = PRESETS[preset_name]
    model_config = dataclasses.replace(preset.model, init="random")
    workers = preset.train.num_workers if num_workers is None else num_workers
    train_config = dataclasses.replace(preset.train, batch_size=batch_size, num_workers=workers)
    workdir = Path(tempfile.mkdtemp(prefix="crossmodal-bench-"))
    accelerator = make_accelerator(train_config, workdir, mixed_precision=mixed_precision)
    synthetic.save(synthetic.generate(batch_size * batches, 2, 2, image_size=(500, 375)), workdir / "data")
    rows = load_splits(DataSource(str(workdir / "data")))["train"]
    tokenizer = fit_wordpiece(caption_table(rows)[0], vocab_size=30522, max_length=model_config.max_text_length)
    model, model_config = build_model(model_config, tokenizer, pretrained=False, freeze_image_norm_stats=True)
    optimizer = torch.optim.AdamW(parameter_groups(model, train_config), lr=train_config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dataset = TrainPairs(rows, image_transform(model_config, train=True), seed=0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffle(len(dataset), seed=0),
        drop_last=True,
        num_workers=train_config.num_workers,
        collate_fn=TrainBatcher(tokenizer, model_config),
        pin_memory=torch.cuda.is_available(),
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    return Bench(
        accelerator, model, optimizer, scheduler, loader, train_config.max_grad_norm, train_config.num_workers,
        model_config,
    )  # fmt: skip


def floor_seconds(bench: Bench, steps: int, warmup: int) -> list[float]:
    """The same training step on one batch that is already on the device: no data path at all."""
    fixed = next(iter(bench.loader))
    return time_steps(lambda: bench.step(fixed), steps, warmup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flickr30k")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=None, help="default: the preset's")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    args = parser.parse_args()

    bench = build_bench(
        args.preset, args.batch_size, 2 * (args.steps + args.warmup) + 1, args.num_workers, args.mixed_precision
    )
    floor = floor_seconds(bench, args.steps, args.warmup)
    batches = iter(bench.loader)  # end to end: batches come from the data path while the model trains
    end_to_end = time_steps(lambda: bench.step(next(batches)), args.steps, args.warmup)
    model_config = bench.model_config
    floor_rate = args.batch_size / statistics.median(floor)
    e2e_rate = args.batch_size / statistics.median(end_to_end)
    threads = torch.get_num_threads()
    device = bench.accelerator.device
    print(f"machine: {platform.machine()}, {threads} threads, device {device}, torch {torch.__version__}")
    print(
        f"preset {args.preset} ({model_config.image_tower} + {model_config.text_tower}), batch {args.batch_size}, "
        f"{args.mixed_precision} precision, {bench.num_workers} loader workers, median of {args.steps} steps"
    )
    print(f"{'measure':<12} {'s/step':>8} {'steps/s':>8} {'pairs/s':>8}")
    print(f"{'floor':<12} {statistics.median(floor):>8.3f} {1 / statistics.median(floor):>8.3f} {floor_rate:>8.1f}")
    print(
        f"{'end-to-end':<12} {statistics.median(end_to_end):>8.3f} {1 / statistics.median(end_to_end):>8.3f} "
        f"{e2e_rate:>8.1f}"
    )
    print(f"ratio end-to-end / floor: {e2e_rate / floor_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
