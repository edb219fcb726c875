"""Indexing throughput (images/s, captions/s) of the artifact embeddings, against the bare encoders in the same run.

    python -m benchmarks.index_throughput                         # GPU: flickr30k, batch 256, bf16
    python -m benchmarks.index_throughput --preset flickr30k --batch-size 32 --mixed-precision no --images 256  # CPU
    python -m benchmarks.index_throughput --preset tiny --mixed-precision no
    python -m benchmarks.index_throughput --folder 10000 --preset demo --mixed-precision no   # your own pictures

With --folder N it measures indexing a folder of N pictures with `python -m crossmodal index` instead
(benchmarks/index_folder.py says how). Without it:

real:  crossmodal.encoding.embed.encode_images / encode_captions through an Accelerator, as train_accelerate.py
       calls them (its loader workers, its batch size): 500x375 JPEG bytes -> decode -> eval transform -> image
       tower; captions -> tokenizer -> text tower
floor: model.encode_image on the same images already preprocessed and on the device; model.encode_text on the same
       captions already tokenized (the same batches, so the same padding) and on the device; same batch size and
       precision, under the same inference_mode and autocast
Rounds alternate floor and real; medians are reported, and the time the whole Flickr30k corpus (31,783 images,
158,915 captions) would take at the measured rates. Towers are random-init from config: nothing is downloaded.
Targets: real >= 85% of floor for images and for captions everywhere; the corpus in < 60 s on CUDA with flickr30k.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from benchmarks import index_folder
from benchmarks.common import (
    FLICKR30K_CAPTIONS,
    FLICKR30K_IMAGES,
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
from crossmodal.data.dataset import caption_table
from crossmodal.data.images import image_bytes
from crossmodal.encoding.batches import CaptionBatcher, EvalImages, collate_images, loader_workers
from crossmodal.encoding.embed import encode_captions, encode_images
from crossmodal.model.dual_encoder import DualEncoder
from crossmodal.model.preprocess import decode_for_eval, image_batch
from crossmodal.training.prepare import make_accelerator


@dataclass
class IndexBench:
    accelerator: Accelerator
    model: DualEncoder
    tokenizer: object
    rows: object  # datasets.Dataset of 500x375 JPEGs
    captions: list[str]
    batch_size: int
    num_workers: int
    decode_on_device: bool

    # --- the real path ---

    def real_images(self) -> torch.Tensor:
        return encode_images(
            self.accelerator, self.model, self.rows, self.batch_size, self.num_workers, self.decode_on_device
        )

    def real_captions(self) -> torch.Tensor:
        return encode_captions(
            self.accelerator, self.model, self.tokenizer, self.captions, self.batch_size, self.num_workers
        )

    # --- the floor: the same batches, prepared beforehand ---

    def image_batches(self) -> list[torch.Tensor]:
        """Every batch of images, eval-preprocessed (the one definition: preprocess.image_batch), on the device."""
        layout = torch.channels_last if self.accelerator.device.type == "cuda" else torch.contiguous_format
        batches = []
        for start in range(0, len(self.rows), self.batch_size):
            values = self.rows[start : start + self.batch_size]["image"]
            images = [decode_for_eval(image_bytes(value), self.model.config) for value in values]
            pixels = image_batch(images, self.model.config)
            batches.append(pixels.to(self.accelerator.device).contiguous(memory_format=layout))
        return batches

    def caption_batches(self) -> list[dict[str, torch.Tensor]]:
        """Every batch of captions, tokenized by the indexing collate (same padding), on the device."""
        batcher = CaptionBatcher(self.tokenizer, self.model.config)
        batches = []
        for start in range(0, len(self.captions), self.batch_size):
            tokens = batcher(self.captions[start : start + self.batch_size])
            batches.append({key: value.to(self.accelerator.device) for key, value in tokens.items()})
        return batches

    # --- the data path alone, on one core ---

    def data_path_images(self) -> float:
        """Seconds one core takes to decode and eval-preprocess every image, as a loader worker does (from the
        first batch, scaled to all)."""
        dataset = EvalImages(self.rows, self.model.config, self.decode_on_device)
        first = range(min(self.batch_size, len(dataset)))
        return one_core_seconds(lambda: collate_images([dataset[i] for i in first])) * len(dataset) / len(first)

    def data_path_captions(self) -> float:
        """Seconds one core takes to tokenize every caption batch."""
        batcher, size = CaptionBatcher(self.tokenizer, self.model.config), self.batch_size
        return one_core_seconds(
            lambda: [batcher(self.captions[i : i + size]) for i in range(0, len(self.captions), size)]
        )

    def floor_images(self, batches: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode(), self.accelerator.autocast():
            return torch.cat([self.model.encode_image(pixels).float() for pixels in batches])

    def floor_captions(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        with torch.inference_mode(), self.accelerator.autocast():
            return torch.cat([self.model.encode_text(**tokens).float() for tokens in batches])


def build_index_bench(
    preset_name: str,
    num_images: int,
    batch_size: int | None,
    num_workers: int | None,
    mixed_precision: str,
    *,
    decode_on_device: bool = False,
    workdir: Path | None = None,
) -> IndexBench:
    """The preset's architecture (random init) in eval mode on the Accelerator's device, over Flickr-size images."""
    preset = PRESETS[preset_name]
    workdir = workdir or Path(tempfile.mkdtemp(prefix="crossmodal-index-bench-"))
    accelerator = make_accelerator(preset.train, workdir, mixed_precision=mixed_precision)
    rows = flickr_size_rows(num_images, workdir)
    model, _config, tokenizer = random_model(preset.model, rows)
    model = model.to(accelerator.device).eval()
    workers = loader_workers(preset.train.num_workers if num_workers is None else num_workers, 1)
    batch = batch_size or preset.train.eval_batch_size
    return IndexBench(accelerator, model, tokenizer, rows, caption_table(rows)[0], batch, workers, decode_on_device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = throughput_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's eval batch (256 / 128)")
    parser.add_argument("--images", type=int, default=2560, help="images per round (5 captions each)")
    parser.add_argument("--target-corpus-seconds", type=float, default=60.0, help="on CUDA with flickr30k only")
    parser.add_argument("--folder", type=int, default=None, help="index a folder of this many pictures instead")
    args = parser.parse_args(argv)
    if args.folder is not None and args.target_ratio == parser.get_default("target_ratio"):
        args.target_ratio = index_folder.TARGET_RATIO
    return args


def main(argv: list[str] | None = None) -> int:
    # 1. The bench and the floor's prepared batches.
    args = parse_args(argv)
    if args.folder is not None:
        return index_folder.main(args, argv)
    bench = build_index_bench(
        args.preset, args.images, args.batch_size, args.num_workers, args.mixed_precision,
        decode_on_device=args.decode_on_device,
    )  # fmt: skip
    device = bench.accelerator.device
    image_batches, caption_batches = bench.image_batches(), bench.caption_batches()

    # 2. Alternating rounds, one warm-up of each first (allocator, kernels, worker start-up code paths).
    bench.floor_images(image_batches[:1])
    bench.floor_captions(caption_batches[:1])
    times: dict[str, list[float]] = {"floor images": [], "real images": [], "floor captions": [], "real captions": []}
    for _ in range(args.rounds):
        times["floor images"].append(seconds(lambda: bench.floor_images(image_batches), device))
        times["real images"].append(seconds(bench.real_images, device))
        times["floor captions"].append(seconds(lambda: bench.floor_captions(caption_batches), device))
        times["real captions"].append(seconds(bench.real_captions, device))
    data_path = {"images": bench.data_path_images(), "captions": bench.data_path_captions()}
    counts = {"images": len(bench.rows), "captions": len(bench.captions)}
    rates = {name: counts[name.split()[1]] / statistics.median(values) for name, values in times.items()}
    projected = FLICKR30K_IMAGES / rates["real images"] + FLICKR30K_CAPTIONS / rates["real captions"]

    # 3. The table; the ratio line last.
    config = bench.model.config
    print(machine_line(device))
    print(f"command: {command_line('benchmarks.index_throughput', argv)}")
    print(
        f"preset {args.preset} ({config.image_tower} + {config.text_tower}), batch {bench.batch_size}, "
        f"{args.mixed_precision} precision, {bench.num_workers} loader workers, {counts['images']} JPEG 500x375 "
        f"decoded {'on the device' if args.decode_on_device else 'in workers'}, {counts['captions']} captions; "
        f"median of {args.rounds} rounds"
    )
    print(f"{'measure':<16} {'seconds':>8} {'items/s':>9}")
    for name, values in times.items():
        print(f"{name:<16} {statistics.median(values):>8.3f} {rates[name]:>9.1f}")
    for kind, data_seconds in data_path.items():
        print(data_path_line(device, f"all {kind}", data_seconds, statistics.median(times[f"floor {kind}"])))
    corpus = f"projected Flickr30k corpus (31,783 images + 158,915 captions): {projected:,.1f} s"
    targets = []
    if device.type == "cuda" and args.preset == "flickr30k":
        targets.append(Target("projected Flickr30k corpus seconds:", projected, args.target_corpus_seconds, False))
        print(f"{corpus} (target < {args.target_corpus_seconds:g} s): {'met' if targets[0].met else 'MISSED'}")
    else:
        print(f"{corpus} (target < {args.target_corpus_seconds:g} s applies on CUDA with flickr30k only)")
    ratios = {kind: rates[f"real {kind}"] / rates[f"floor {kind}"] for kind in ("images", "captions")}
    targets += [Target(kind, ratio, args.target_ratio) for kind, ratio in ratios.items()]
    verdict = "met" if all(target.met for target in targets[-2:]) else "MISSED"
    print(
        f"ratio real / floor: images {ratios['images']:.2f}, captions {ratios['captions']:.2f} "
        f"(target >= {args.target_ratio:g}): {verdict}"
    )
    return 0 if all(target.met for target in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
