"""What the throughput benchmarks share: the machine line, Flickr-size data, the preset's model, targets."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from crossmodal.config import KNOWN_TEXT_ARCHITECTURES, PRESETS, ModelConfig
from crossmodal.data.dataset import DataSource, caption_table, load_splits
from crossmodal.encoding.batches import usable_cores
from crossmodal.model.dual_encoder import DualEncoder, build_model
from crossmodal.model.tokenizer import fit_wordpiece
from crossmodal.synthetic import dataset as synthetic

FLICKR_SIZE = (500, 375)  # width x height of a typical Flickr30k photo
FLICKR30K_IMAGES = 31_783
FLICKR30K_CAPTIONS = 158_915


def machine_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    cores = usable_cores()
    return (
        f"machine: device {device} ({name}), {cores} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )


def command_line(module: str, argv: list[str] | None) -> str:
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def throughput_parser(description: str) -> argparse.ArgumentParser:
    """The flags both throughput benchmarks share; each adds its batch size, counts and corpus-level target."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flickr30k")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="bf16")
    parser.add_argument("--rounds", type=int, default=3, help="floor and measured rounds, alternating")
    parser.add_argument("--num-workers", type=int, default=None, help="default: as train_accelerate.py")
    parser.add_argument("--decode-on-device", action="store_true", help="JPEG decode on the device (nvjpeg)")
    parser.add_argument("--target-ratio", type=float, default=0.85, help="measured / floor must reach this")
    return parser


def flickr_size_rows(num_rows: int, workdir: Path, unique: int = 128) -> datasets.Dataset:
    """``num_rows`` rows in the Flickr30k schema (docs/architecture.md, "Dataset schema") with 500x375 JPEGs, loaded
    undecoded as training loads them.

    Drawing a 500x375 scene costs ~40 ms, so ``unique`` scenes are drawn and repeated: decoding a repeated JPEG
    costs what decoding a new one does.
    """
    unique = max(1, min(unique, num_rows))
    synthetic.save(synthetic.generate(unique, 1, 1, image_size=FLICKR_SIZE), workdir / "data")
    rows = load_splits(DataSource(str(workdir / "data")))["train"]
    return rows.select([index % unique for index in range(num_rows)])


def random_model(config: ModelConfig, rows: datasets.Dataset) -> tuple[DualEncoder, ModelConfig, object]:
    """The preset's architecture with random weights (speed does not depend on them) and a tokenizer fit on ``rows``.

    The text tower keeps its full vocabulary (30,522 for MiniLM), not the few hundred pieces the generated captions
    need: the embedding table is a third of MiniLM's parameters, and AdamW updates all of them every step.
    """
    known = KNOWN_TEXT_ARCHITECTURES[config.text_tower]
    tokenizer = fit_wordpiece(caption_table(rows)[0], vocab_size=known["vocab_size"], max_length=config.max_text_length)
    text_config = {**known, "pad_token_id": tokenizer.pad_token_id}
    config = dataclasses.replace(config, image_init="random", text_init="random", text_config=text_config)
    torch.manual_seed(0)  # the same weights every time: the tests compare paths on them
    model, config = build_model(config, tokenizer, pretrained=False, freeze_image_norm_stats=True)
    return model, config, tokenizer


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank; p50 of an even count is the upper middle)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock reads the work done and not only the work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall-clock seconds of ``run()``, with the device's queued work finished at both ends."""
    device = device or torch.device("cpu")
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def one_core_seconds(make: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``make()`` on one torch thread, as a loader worker runs (after a warm-up)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make()
        return min(seconds(make) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)


def data_path_line(device: torch.device, name: str, data_seconds: float, floor_seconds: float) -> str:
    """What the data path costs next to the compute it must hide behind, and, when no core is left over for the
    loader workers (a CPU run with a compute thread on every core), the best ratio those cores allow."""
    line = f"data path alone ({name}, one core): {data_seconds:.3f} s, {data_seconds / floor_seconds:.0%} of the floor"
    if device.type == "cpu" and torch.get_num_threads() >= usable_cores():
        line += f"; no spare core, so at best {floor_seconds / (floor_seconds + data_seconds):.2f} of floor here"
    return line


@dataclass(frozen=True)
class Target:
    """One pass/fail line of a benchmark."""

    name: str
    value: float
    bound: float
    at_least: bool = True  # False: the value must stay under the bound

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value < self.bound

    def describe(self) -> str:
        relation = ">=" if self.at_least else "<"
        return f"{self.name} {self.value:,.2f} (target {relation} {self.bound:g}): {'met' if self.met else 'MISSED'}"
