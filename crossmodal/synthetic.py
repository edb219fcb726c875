"""A procedurally drawn image-caption dataset in exactly the Flickr30k schema.

Each image is one coloured shape on a coloured background; three of its five captions name the shape, its colour,
size, position and the background colour, two describe only the figure or only the background. A small model can
therefore learn the task from scratch in minutes, which makes this the dataset for tests, the offline demo and
benchmarks: the whole pipeline runs without downloading anything, and retrieval quality on it is meaningful (a
broken model scores near chance, a working one near perfect).

The captions never mention the nuisance variation (position and size jitter, colour shades, background texture, a
little pixel noise, small rotations), so the model has to generalise across it rather than memorise pixels.

    python -m crossmodal.synthetic --out data/synthetic --train 1000 --val 100 --test 100
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from PIL import Image, ImageDraw

from crossmodal.synthetic_captions import UNSEEN_WORDS, scene_captions

SPLITS = ("train", "val", "test")

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")

# Nominal RGB of every colour name; the drawn shade varies around it (see Layout).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 50),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)

# Object/background pairs a viewer could confuse once shades vary and JPEG blurs the edges (close hue or luminance).
LOW_CONTRAST_PAIRS = frozenset(
    frozenset(pair)
    for pair in (("yellow", "orange"), ("red", "orange"), ("blue", "purple"), ("red", "purple"), ("yellow", "white"))
)

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "split": datasets.Value("string"),
        "img_id": datasets.Value("string"),
        "filename": datasets.Value("string"),
    }
)

JPEG_QUALITY = 90

# Geometry as fractions of the image: centres of the named positions, radii of the named sizes, and the jitter added
# to both. Positions sit 0.18 apart and jitter is 0.03, so a jittered "left" is never mistaken for "centre"; a large
# shape at its most extreme loses at most half a pixel to the 72->64 centre crop of the tiny preset.
_POSITION_CENTRES = {
    "left": (0.32, 0.5),
    "right": (0.68, 0.5),
    "top": (0.5, 0.32),
    "bottom": (0.5, 0.68),
    "centre": (0.5, 0.5),
}
_SIZE_RADII = {"small": 0.13, "large": 0.22}
_POSITION_JITTER = 0.03
_SIZE_JITTER = 0.1  # relative: small tops out at 0.143, large bottoms out at 0.198
_MAX_ROTATION_DEG = 15.0
_SHADE_JITTER = 18  # per channel, object and background
_TEXTURE_AMPLITUDE = 14.0  # brightness swing of the background texture
_PIXEL_NOISE_STD = 3.0
_RING_INNER_RATIO = 0.5  # hole radius / outer radius; leaves a band thick enough to survive a 64 px resize
_SUPERSAMPLE = 4  # the shape mask is drawn this much larger and downsampled, which anti-aliases the edges


@dataclass(frozen=True)
class Scene:
    """The named attributes of one image: what its full captions state (partial ones state a subset)."""

    shape: str
    colour: str
    background: str
    position: str
    size: str


@dataclass(frozen=True)
class Layout:
    """The unnamed details of one drawing, in pixels; kept so tests can look at the object and the background."""

    cx: float
    cy: float
    radius: float
    rotation_deg: float
    colour_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Example:
    """One generated row before it becomes a datasets row."""

    scene: Scene
    layout: Layout
    jpeg: bytes
    captions: tuple[str, ...]


def all_scenes() -> list[Scene]:
    """Every allowed attribute combination, in a fixed order (the sampling pool)."""
    return [
        Scene(shape, colour, background, position, size)
        for shape, colour, background, position, size in itertools.product(SHAPES, COLOURS, COLOURS, POSITIONS, SIZES)
        if colour != background and frozenset((colour, background)) not in LOW_CONTRAST_PAIRS
    ]


def sample_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """Draw n scenes, without replacement until the pool is exhausted, so a split's descriptions are distinct."""
    pool = all_scenes()
    order: list[int] = []
    while len(order) < n:
        order.extend(rng.permutation(len(pool)).tolist())
    return [pool[i] for i in order[:n]]


# ---------------------------------------------------------------- drawing


def _jitter_rgb(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    shifted = np.clip(np.array(rgb) + rng.integers(-_SHADE_JITTER, _SHADE_JITTER + 1, size=3), 0, 255)
    return tuple(int(v) for v in shifted)


def _sample_layout(scene: Scene, image_size: tuple[int, int], rng: np.random.Generator) -> Layout:
    width, height = image_size
    fx, fy = _POSITION_CENTRES[scene.position]
    fx += rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)
    fy += rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)
    radius = _SIZE_RADII[scene.size] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER) * min(width, height)
    return Layout(
        cx=fx * width,
        cy=fy * height,
        radius=radius,
        rotation_deg=rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG),
        colour_rgb=_jitter_rgb(PALETTE[scene.colour], rng),
        background_rgb=_jitter_rgb(PALETTE[scene.background], rng),
    )


def _polygon(points: Sequence[tuple[float, float]], layout: Layout, scale: float) -> list[tuple[float, float]]:
    """Rotate unit-radius points by the layout's rotation and place them at its centre (in mask pixels)."""
    theta = math.radians(layout.rotation_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    r = layout.radius * scale
    return [
        (layout.cx * scale + r * (x * cos - y * sin), layout.cy * scale + r * (x * sin + y * cos)) for x, y in points
    ]


def _angles(n: int) -> list[float]:
    """n equally spaced angles starting straight up (image y points down)."""
    return [math.radians(-90 + 360 * k / n) for k in range(n)]


def _turn(point: tuple[float, float], quarter_turns: int) -> tuple[float, float]:
    x, y = point
    for _ in range(quarter_turns):
        x, y = -y, x
    return x, y


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape around the origin, sized so the shapes look about equally big."""
    if shape == "square":
        h = 0.82
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":  # pointing up; its centroid is the origin, so the centre pixel is inside
        return [(1.1 * math.cos(a), 1.1 * math.sin(a)) for a in _angles(3)]
    if shape == "star":
        radii = (1.1, 0.47) * 5  # alternating tips and notches
        return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, _angles(10), strict=True)]
    if shape == "cross":
        w = 0.32  # half the arm width; arms reach 1
        arm = [(-w, -1.0), (w, -1.0), (w, -w)]  # the top arm, then the same turned by 90 degrees three times
        return [(x, y) for k in range(4) for x, y in (_turn(point, k) for point in arm)]
    raise ValueError(f"{shape!r} is not a polygonal shape")


def _shape_mask(shape: str, layout: Layout, image_size: tuple[int, int]) -> np.ndarray:
    """Coverage of the object in [0, 1] per pixel, as a (height, width) float array."""
    s = _SUPERSAMPLE
    width, height = image_size
    mask = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = layout.cx * s, layout.cy * s, layout.radius * s
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            hole = r * _RING_INNER_RATIO
            draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
    else:
        draw.polygon(_polygon(_unit_outline(shape), layout, s), fill=255)
    return np.asarray(mask.resize(image_size, Image.Resampling.BOX), dtype=np.float32) / 255.0


def _background(layout: Layout, image_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A plain, gradient or blotchy field of the background colour; only brightness varies, so the hue stays named."""
    width, height = image_size
    kind = rng.integers(3)
    if kind == 1:
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xs / max(width - 1, 1) - 0.5) * math.cos(angle) + (ys / max(height - 1, 1) - 0.5) * math.sin(angle)
        brightness = _TEXTURE_AMPLITUDE * 2 * ramp
    elif kind == 2:
        coarse = Image.fromarray(rng.uniform(-1, 1, size=(4, 4)).astype(np.float32), mode="F")
        brightness = _TEXTURE_AMPLITUDE * np.asarray(coarse.resize(image_size, Image.Resampling.BILINEAR))
    else:
        brightness = np.zeros((height, width), dtype=np.float32)
    return np.array(layout.background_rgb, dtype=np.float32) + brightness[:, :, None]


def _render(scene: Scene, layout: Layout, image_size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """Draw the scene and encode it as JPEG bytes, as Flickr30k stores its images."""
    background = _background(layout, image_size, rng)
    mask = _shape_mask(scene.shape, layout, image_size)[:, :, None]
    pixels = background * (1 - mask) + np.array(layout.colour_rgb, dtype=np.float32) * mask
    pixels += _PIXEL_NOISE_STD * rng.standard_normal(size=pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def object_probe(scene: Scene, layout: Layout) -> tuple[int, int]:
    """A pixel (x, y) well inside the object: its centre, except for a ring, whose centre is the hole."""
    if scene.shape == "ring":
        band_middle = layout.radius * (1 + _RING_INNER_RATIO) / 2
        return round(layout.cx), round(layout.cy - band_middle)
    return round(layout.cx), round(layout.cy)


def background_probe(layout: Layout, image_size: tuple[int, int]) -> tuple[int, int]:
    """A pixel (x, y) of pure background: near the image corner farthest from the object."""
    width, height = image_size
    inset = 3
    corners = [(x, y) for x in (inset, width - 1 - inset) for y in (inset, height - 1 - inset)]
    return max(corners, key=lambda c: math.dist(c, (layout.cx, layout.cy)))


def sample_captions(num_images: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Five captions for each of ``num_images`` scenes, without drawing the pictures: text at corpus scale, fast."""
    rng = np.random.default_rng([seed, len(SPLITS)])  # a stream of its own, apart from the splits'
    return [scene_captions(scene, rng) for scene in sample_scenes(num_images, rng)]


# ---------------------------------------------------------------- dataset


def _split_rng(seed: int, split: str) -> np.random.Generator:
    """An independent stream per split, so the test images do not change when only num_train does."""
    return np.random.default_rng([seed, SPLITS.index(split)])


def _generate_split(n: int, split: str, image_size: tuple[int, int], seed: int) -> list[Example]:
    rng = _split_rng(seed, split)
    examples = []
    for scene in sample_scenes(n, rng):
        layout = _sample_layout(scene, image_size, rng)
        jpeg = _render(scene, layout, image_size, rng)
        examples.append(Example(scene, layout, jpeg, scene_captions(scene, rng)))
    return examples


def in_unseen_words(examples: list[Example], seed: int) -> list[Example]:
    """The same images, captioned again in words no training caption uses (synthetic_captions.UNSEEN_WORDS), from a
    stream of their own, so the pictures stay those of the ordinary split and only the words differ."""
    rng = np.random.default_rng([seed, len(SPLITS), 1])
    return [dataclasses.replace(ex, captions=scene_captions(ex.scene, rng, UNSEEN_WORDS)) for ex in examples]


def generate_examples(
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: tuple[int, int],
    seed: int,
    unseen_test_words: bool = False,
) -> dict[str, list[Example]]:
    """The rows of `generate` with their attributes and layouts, which the dataset itself does not carry."""
    if min(num_train, num_val, num_test) < 0:
        raise ValueError("split sizes must be non-negative")
    if min(image_size) < 16:
        raise ValueError(f"image_size {image_size} is too small to draw recognisable shapes (minimum 16x16)")
    counts = dict(zip(SPLITS, (num_train, num_val, num_test), strict=True))
    examples = {split: _generate_split(n, split, image_size, seed) for split, n in counts.items()}
    if unseen_test_words:
        examples["test"] = in_unseen_words(examples["test"], seed)
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
    unseen_test_words: bool = False,
) -> datasets.DatasetDict:
    """Generate the dataset in the Flickr30k schema; the same arguments always give byte-identical rows.

    image_size is (width, height). img_id counts up from 0 through train, val and test, so ids and filenames are
    unique across the whole dataset, as they are in Flickr30k. ``unseen_test_words``: the test split's captions (not
    its images) use synonyms that never occur in training or validation captions.
    """
    examples = generate_examples(num_train, num_val, num_test, image_size, seed, unseen_test_words)
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
    parser = argparse.ArgumentParser(prog="python -m crossmodal.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train", type=int, default=1000, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--test", type=int, default=100, help="test images")
    parser.add_argument("--width", type=int, default=96, help="image width in pixels")
    parser.add_argument("--height", type=int, default=96, help="image height in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("disk", "parquet"), default="disk", help="save_to_disk or Parquet files")
    parser.add_argument(
        "--unseen-test-words",
        action="store_true",
        help="caption the test images with colour, shape, size and background words no training caption uses",
    )
    args = parser.parse_args(argv)

    image_size = (args.width, args.height)
    dataset = generate(args.train, args.val, args.test, image_size, args.seed, args.unseen_test_words)
    out_dir = save(dataset, args.out, fmt=args.format)
    counts = ", ".join(f"{split}={len(rows)}" for split, rows in dataset.items())
    size = f"{args.width}x{args.height}" + ("; test captions in unseen words" if args.unseen_test_words else "")
    print(f"wrote synthetic dataset ({counts}; {size}, seed {args.seed}) as {args.format} to {out_dir}")


if __name__ == "__main__":
    main()
