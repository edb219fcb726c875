"""A procedurally drawn image-caption dataset in exactly the Flickr30k schema.

Each image is one coloured shape on a coloured background; three of its five captions name the shape, its colour,
size, position and the background colour, two describe only the figure or only the background. Optionally a share
of the images show two figures (``--pairs``), every caption naming both, and the test split can be Winoground-style
twins (``--twins``): a two-figure picture beside one with the same figures' colours or places exchanged, whose
captions hold the same words in another order (docs/architecture.md, "Twins"). A small model can
therefore learn the task from scratch in minutes, which makes this the dataset for tests, the offline demo and
benchmarks: the whole pipeline runs without downloading anything, and retrieval quality on it is meaningful (a
broken model scores near chance, a working one near perfect).

The captions never mention the nuisance variation (position and size jitter, colour shades, background texture, a
little pixel noise, small rotations), so the model has to generalise across it rather than memorise pixels.

    python -m crossmodal synthetic --out data/synthetic --train 1000 --val 100 --test 100

``--format webdataset`` writes the training pictures as shards instead (crossmodal/synthetic/shards.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np

from crossmodal.synthetic.captions import (
    TRAINING_WORDS,
    UNSEEN_VOCABULARIES,
    Vocabulary,
    pair_captions,
    scene_captions,
)
from crossmodal.synthetic.drawing import Layout, render, render_pair, sample_layout, sample_pair_layouts
from crossmodal.synthetic.scenes import TWIN_KINDS, PairScene, Scene, sample_pair_scenes, sample_scenes, twin_of
from crossmodal.synthetic.shards import write_webdataset

SPLITS = ("train", "val", "test")

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "split": datasets.Value("string"),
        "img_id": datasets.Value("string"),
        "filename": datasets.Value("string"),
    }
)


@dataclass(frozen=True)
class Example:
    """One generated row before it becomes a datasets row."""

    scene: Scene | PairScene
    layout: Layout | tuple[Layout, Layout]
    jpeg: bytes
    captions: tuple[str, ...]
    caption_seed: int | None = None  # a two-figure scene's (captions.pair_captions), to caption it again


def sample_captions(num_images: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Five captions for each of ``num_images`` scenes, without drawing the pictures: text at corpus scale, fast."""
    rng = np.random.default_rng([seed, len(SPLITS)])  # a stream of its own, apart from the splits'
    return [scene_captions(scene, rng) for scene in sample_scenes(num_images, rng)]


# ---------------------------------------------------------------- dataset


def _split_rng(seed: int, split: str) -> np.random.Generator:
    """An independent stream per split, so the test images do not change when only num_train does."""
    return np.random.default_rng([seed, SPLITS.index(split)])


def _pair_example(scene: PairScene, image_size: tuple[int, int], rng: np.random.Generator) -> Example:
    layouts = sample_pair_layouts(scene, image_size, rng)
    caption_seed = int(rng.integers(2**63))
    return Example(
        scene, layouts, render_pair(scene, layouts, image_size, rng), pair_captions(scene, caption_seed), caption_seed
    )


def _generate_split(
    n: int, split: str, image_size: tuple[int, int], seed: int, pair_fraction: float = 0.0
) -> list[Example]:
    """n images: one-figure scenes, then (``pair_fraction`` of n) two-figure scenes from a stream of their own, so
    the one-figure rows are those of a split without pairs, cut short."""
    rng = _split_rng(seed, split)
    pairs = round(n * pair_fraction)
    examples = []
    for scene in sample_scenes(n - pairs, rng):
        layout = sample_layout(scene, image_size, rng)
        jpeg = render(scene, layout, image_size, rng)
        examples.append(Example(scene, layout, jpeg, scene_captions(scene, rng)))
    pair_rng = np.random.default_rng([seed, SPLITS.index(split), 2])
    examples += [_pair_example(scene, image_size, pair_rng) for scene in sample_pair_scenes(pairs, pair_rng)]
    return examples


def generate_twins(
    num_pairs: int, image_size: tuple[int, int] = (96, 96), seed: int = 0, words: Vocabulary = TRAINING_WORDS
) -> list[Example]:
    """Winoground-style twins: rows 2i and 2i+1 are a two-figure scene and its twin (colours exchanged for even i,
    places for odd i), drawn apart; caption j of one holds the words of caption j of the other in another order."""
    rng = np.random.default_rng([seed, len(SPLITS), 3])
    examples = []
    for i, scene in enumerate(sample_pair_scenes(num_pairs, rng)):
        twin = twin_of(scene, TWIN_KINDS[i % len(TWIN_KINDS)])
        first = _pair_example(scene, image_size, rng)
        second = dataclasses.replace(_pair_example(twin, image_size, rng), caption_seed=first.caption_seed)
        examples += [_recaptioned(first, words), _recaptioned(second, words)]
    return examples


def _recaptioned(example: Example, words: Vocabulary) -> Example:
    return dataclasses.replace(example, captions=pair_captions(example.scene, example.caption_seed, words))


def in_unseen_words(examples: list[Example], seed: int, vocabulary: str = "first") -> list[Example]:
    """The same images, captioned again in words no training caption uses (captions.UNSEEN_VOCABULARIES: "first"
    to choose recipes on, "second" to report the chosen one on), from a stream of their own, so the pictures stay
    those of the ordinary split and only the words differ. A two-figure scene keeps its caption seed, so twins stay
    twins in the new words."""
    words = UNSEEN_VOCABULARIES[vocabulary]
    rng = np.random.default_rng([seed, len(SPLITS), 1 + list(UNSEEN_VOCABULARIES).index(vocabulary)])
    return [
        _recaptioned(ex, words)
        if isinstance(ex.scene, PairScene)
        else dataclasses.replace(ex, captions=scene_captions(ex.scene, rng, words))
        for ex in examples
    ]


def generate_examples(
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: tuple[int, int],
    seed: int,
    unseen_test_words: bool | str = False,
    pair_fraction: float = 0.0,
    twins: int = 0,
) -> dict[str, list[Example]]:
    """The rows of `generate` with their attributes and layouts, which the dataset itself does not carry."""
    if min(num_train, num_val, num_test, twins) < 0:
        raise ValueError("split sizes must be non-negative")
    if not 0.0 <= pair_fraction <= 1.0:
        raise ValueError(f"pair_fraction {pair_fraction} must be between 0 and 1")
    if min(image_size) < 16:
        raise ValueError(f"image_size {image_size} is too small to draw recognisable shapes (minimum 16x16)")
    counts = dict(zip(SPLITS, (num_train, num_val, num_test), strict=True))
    examples = {split: _generate_split(n, split, image_size, seed, pair_fraction) for split, n in counts.items()}
    if twins:
        examples["test"] = generate_twins(twins, image_size, seed)
    if unseen_test_words:
        vocabulary = "first" if unseen_test_words is True else unseen_test_words
        examples["test"] = in_unseen_words(examples["test"], seed, vocabulary)
    return examples


def _to_dataset(examples: list[Example], split: str, first_id: int) -> datasets.Dataset:
    ids = [first_id + i for i in range(len(examples))]
    filenames = [f"synthetic_{i:06d}.jpg" for i in ids]
    columns = {
        "image": [{"bytes": ex.jpeg, "path": name} for ex, name in zip(examples, filenames, strict=True)],
        "caption": [list(ex.captions) for ex in examples],
        "split": [split] * len(examples),
        "img_id": [str(i) for i in ids],
        "filename": filenames,
    }
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def generate(
    num_train: int = 1000,
    num_val: int = 100,
    num_test: int = 100,
    image_size: tuple[int, int] = (96, 96),
    seed: int = 0,
    unseen_test_words: bool | str = False,
    pair_fraction: float = 0.0,
    twins: int = 0,
) -> datasets.DatasetDict:
    """Generate the dataset in the Flickr30k schema; the same arguments always give byte-identical rows.

    image_size is (width, height). img_id counts up from 0 through train, val and test, so ids and filenames are
    unique across the whole dataset, as they are in Flickr30k. ``unseen_test_words``: the test split's captions (not
    its images) use synonyms that never occur in training or validation captions (True or "first": the vocabulary
    recipes are chosen on; "second": the one the chosen recipe is reported on). ``pair_fraction``: that share of
    every split shows two figures (:func:`_generate_split`). ``twins``: the test split is that many twin pairs
    instead (:func:`generate_twins`), and ``num_test`` is ignored.
    """
    examples = generate_examples(
        num_train, num_val, num_test, image_size, seed, unseen_test_words, pair_fraction, twins
    )
    splits = {}
    first_id = 0
    for split in SPLITS:
        splits[split] = _to_dataset(examples[split], split, first_id)
        first_id += len(examples[split])
    return datasets.DatasetDict(splits)


def save(dataset: datasets.DatasetDict, out_dir: str | Path, fmt: Literal["disk", "parquet"] = "disk") -> Path:
    """Write the dataset where training can read it: an Arrow directory, or one Parquet file per split."""
    out_dir = Path(out_dir)
    if fmt == "disk":
        dataset.save_to_disk(str(out_dir))
    elif fmt == "parquet":
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, rows in dataset.items():
            rows.to_parquet(str(out_dir / f"{split}.parquet"))
    else:
        raise ValueError(f"unknown format {fmt!r}; expected 'disk' or 'parquet'")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command line: generate a dataset and save it."""
    parser = argparse.ArgumentParser(prog="python -m crossmodal synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train", type=int, default=1000, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--test", type=int, default=100, help="test images")
    parser.add_argument("--width", type=int, default=96, help="image width in pixels")
    parser.add_argument("--height", type=int, default=96, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--format",
        choices=("disk", "parquet", "webdataset"),
        default="disk",
        help="save_to_disk, Parquet files, or webdataset shards in img2dataset's layout (--train pictures, one caption"
        " each, for --train-data; --val and --test are not written: generate them as a dataset of their own)",
    )
    parser.add_argument("--shard-size", type=int, default=10_000, help="pictures per webdataset shard")
    parser.add_argument(
        "--unseen-test-words",
        nargs="?",
        const="first",
        default=False,
        choices=("first", "second"),
        help="caption the test images with colour, shape, size and background words no training caption uses: the"
        " first unseen vocabulary (recipes are chosen on it) or the second (the chosen one is reported on it)",
    )
    parser.add_argument(
        "--pairs", type=float, default=0.0, metavar="FRACTION", help="share of every split's images with two figures"
    )
    parser.add_argument(
        "--twins",
        type=int,
        default=0,
        metavar="N",
        help="make the test split N twin pairs (two figures, then the same with colours or places exchanged)",
    )
    args = parser.parse_args(argv)

    image_size = (args.width, args.height)
    if args.format == "webdataset":
        if args.twins or args.unseen_test_words:
            parser.error("--twins and --unseen-test-words make a test split; webdataset shards hold training pairs")
        paths = write_webdataset(args.out, args.train, args.shard_size, image_size, args.seed, args.pairs)
        print(f"wrote {args.train} synthetic pairs ({args.width}x{args.height}, seed {args.seed}) as {len(paths)}"
              f" webdataset shards to {args.out}: {paths[0].name} .. {paths[-1].name}")  # fmt: skip
        return
    dataset = generate(
        args.train, args.val, args.test, image_size, args.seed, args.unseen_test_words, args.pairs, args.twins
    )
    out_dir = save(dataset, args.out, fmt=args.format)
    counts = ", ".join(f"{split}={len(rows)}" for split, rows in dataset.items())
    size = f"{args.width}x{args.height}" + (
        f"; test captions in the {args.unseen_test_words} unseen words" if args.unseen_test_words else ""
    )
    size += f"; {args.pairs:.0%} two-figure scenes" if args.pairs else ""
    size += f"; test split: {args.twins} twin pairs" if args.twins else ""
    print(f"wrote synthetic dataset ({counts}; {size}, seed {args.seed}) as {args.format} to {out_dir}")
