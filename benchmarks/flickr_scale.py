"""A Flickr30k-scale artifact folder built offline, for the query and start-up benchmarks.

    python -m benchmarks.flickr_scale --out .cache/flickr-scale      # builds once (a few minutes), then reuses

The default architecture (EfficientNet-B0 + MiniLM-L12 shapes, a 30,522-piece vocabulary, 512-d) with random
weights, 31,783 images and 158,915 captions, written by the same ``write_artifacts`` training uses, so the app loads
and verifies it exactly as it would the real one. Random weights rank nothing meaningfully, but speed does not depend
on the weights. Three shortcuts keep the build to minutes on 2 cores, and none changes what is measured:
- thumbnails are photo-like noise at Flickr thumbnail size (~16 KB each, like a 256 px JPEG of a photo), drawn
  directly rather than rendered scenes scaled down;
- the embeddings are random unit vectors, except the rows the golden self-test re-encodes, which are real;
- captions are the generated dataset's (12.9 words on average; Flickr30k's are 12.3).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from benchmarks.common import FLICKR30K_IMAGES, FLICKR_SIZE, random_model
from crossmodal.artifacts.contract import GOLDEN_CAPTIONS, ArtifactError, golden_rows, verify_files
from crossmodal.artifacts.export import write_artifacts
from crossmodal.config import PRESETS
from crossmodal.data.dataset import Corpus
from crossmodal.data.images import image_bytes
from crossmodal.model.dual_encoder import DualEncoder, tokenize
from crossmodal.model.preprocess import decode_for_eval, image_batch
from crossmodal.synthetic.dataset import FEATURES, sample_captions

SPLIT_SIZES = {"train": 29_769, "val": 1_014, "test": 1_000}  # Karpathy's val and test; the rest trains
THUMBNAIL_SIZE = (256, 192)
_NOISE_STD = 16.0  # pixel noise that makes a 256 px JPEG as large as one of a real photo (~16 KB at quality 85)
_CALIBRATION_IMAGES = 32
_BUILD_VERSION = 5  # bump when the folder this writes changes, so cached folders are rebuilt


class PhotoMaker:
    """Photo-like JPEGs: smooth random colour fields plus sensor-like noise, so they compress like photographs.

    The noise comes from one large field cropped at random offsets: drawing fresh noise per image costs 5x more.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.noise = self.rng.normal(0, _NOISE_STD, (1024, 1024, 3)).astype(np.float32)

    def jpeg(self, size: tuple[int, int], quality: int = 90) -> bytes:
        width, height = size
        coarse = Image.fromarray(self.rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
        noise = self.noise  # larger than any size asked for here (Flickr's 500x375 at most)
        top, left = self.rng.integers(0, len(noise) - height), self.rng.integers(0, noise.shape[1] - width)
        pixels = np.clip(smooth + noise[top : top + height, left : left + width], 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()


def _corpus(num_images: int, seed: int) -> Corpus:
    scale = num_images / FLICKR30K_IMAGES
    sizes = {name: max(1, round(count * scale)) for name, count in SPLIT_SIZES.items()}
    sizes["train"] = num_images - sizes["val"] - sizes["test"]
    photos = PhotoMaker(seed)
    images = [photos.jpeg(THUMBNAIL_SIZE) for _ in tqdm(range(num_images), desc="Images", leave=False)]
    everything = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": f"{index}.jpg"} for index, data in enumerate(images)],
            "caption": [list(five) for five in sample_captions(num_images, seed)],
            "split": [name for name, count in sizes.items() for _ in range(count)],
            "img_id": [str(index) for index in range(num_images)],
            "filename": [f"{index}.jpg" for index in range(num_images)],
        },
        features=FEATURES,
    ).cast_column("image", datasets.Image(decode=False))  # as load_splits hands them over: bytes, undecoded
    bounds = np.cumsum([0, *sizes.values()]).tolist()
    splits = {
        name: everything.select(range(start, end)) for name, start, end in zip(sizes, bounds, bounds[1:], strict=False)
    }
    return Corpus.from_splits(datasets.DatasetDict(splits))


def _calibrate_batch_norm(model: DualEncoder, thumbnails: list[bytes]) -> None:
    """Estimate the image tower's BatchNorm statistics from a few images, as pretraining would have.

    With its initial statistics (mean 0, variance 1) a random EfficientNet-B0's features shrink to ~1e-13 by the last
    stage, below ``F.normalize``'s epsilon: the embeddings would not be unit vectors and the folder would not verify.
    """
    model.eval()  # dropout and stochastic depth off: only the statistics are being estimated
    for module in model.image_tower.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
            module.train()
    with torch.no_grad():
        model.encode_image(image_batch([decode_for_eval(data, model.config) for data in thumbnails], model.config))
    model.eval()


def _random_unit(rows: int, width: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, width, generator=generator), dim=1)


def build(folder: Path, num_images: int = FLICKR30K_IMAGES, seed: int = 0, preset_name: str = "flickr30k") -> Path:
    """Write the artifact folder (see the module docstring) for ``preset_name``'s architecture; returns ``folder``."""
    preset = PRESETS[preset_name]
    corpus = _corpus(num_images, seed)
    model, model_config, tokenizer = random_model(preset.model, corpus.rows)  # MiniLM's full 30,522-piece vocabulary
    _calibrate_batch_norm(model, [image_bytes(corpus.rows[row]["image"]) for row in range(_CALIBRATION_IMAGES)])
    generator = torch.Generator().manual_seed(seed)
    width = model_config.embed_dim
    image_embeddings = _random_unit(len(corpus.rows), width, generator)
    text_embeddings = _random_unit(len(corpus.captions), width, generator)
    caption_rows = golden_rows(len(corpus.captions), GOLDEN_CAPTIONS)
    with torch.inference_mode():  # the self-test re-encodes these captions and must find them
        golden = tokenize(tokenizer, [corpus.captions[row] for row in caption_rows], model_config)
        text_embeddings[caption_rows] = model.encode_text(**golden)
    metrics = {
        split: {f"{d}_R@{k}": 0.0 for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"rsum": 0.0}
        for split in ("val", "test")
    }
    return write_artifacts(
        folder,
        model=model,
        tokenizer=tokenizer,
        train_config=preset.train,
        corpus=corpus,
        image_embeddings=image_embeddings,
        text_embeddings=text_embeddings,
        metrics=metrics,
        history=[],
        loss_log=[],
        dataset={"id": "generated: benchmarks.flickr_scale", "revision": None},
    )


def ensure(cache: Path, num_images: int = FLICKR30K_IMAGES, seed: int = 0) -> Path:
    """The folder for these settings under ``cache``: reused if it verifies, built (again) otherwise."""
    folder = Path(cache) / f"flickr-scale-{num_images}-seed{seed}-v{_BUILD_VERSION}"
    try:
        verify_files(folder)
        return folder
    except ArtifactError:
        return build(folder, num_images, seed)


def query_images(count: int, seed: int = 1) -> list[bytes]:
    """``count`` distinct 500x375 photo-like JPEGs to search with."""
    photos = PhotoMaker(seed)
    return [photos.jpeg(FLICKR_SIZE, quality=95) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".cache/benchmarks"), help="cache folder")
    parser.add_argument("--images", type=int, default=FLICKR30K_IMAGES)
    args = parser.parse_args(argv)
    folder = ensure(args.out, args.images)
    manifest = json.loads((folder / "manifest.json").read_text())
    size = sum(entry["size"] for entry in manifest["files"].values())
    counts = manifest["counts"]
    print(f"{folder}: {counts['images']:,} images, {counts['captions']:,} captions, {size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
