"""The scenes of the synthetic dataset: the named attributes of one picture (shape, colour, background, place, size)
and the pool they are sampled from. What a full caption states (crossmodal/synthetic/captions.py) and what is drawn
(crossmodal/synthetic/drawing.py) both come from a :class:`Scene`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class Scene:
    """The named attributes of one image: what its full captions state (partial ones state a subset)."""

    shape: str
    colour: str
    background: str
    position: str
    size: str


def _contrasts(colour: str, background: str) -> bool:
    return colour != background and frozenset((colour, background)) not in LOW_CONTRAST_PAIRS


def all_scenes() -> list[Scene]:
    """Every allowed attribute combination, in a fixed order (the sampling pool)."""
    return [
        Scene(shape, colour, background, position, size)
        for shape, colour, background, position, size in itertools.product(SHAPES, COLOURS, COLOURS, POSITIONS, SIZES)
        if _contrasts(colour, background)
    ]


def sample_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """Draw n scenes, without replacement until the pool is exhausted, so a split's descriptions are distinct."""
    pool = all_scenes()
    order: list[int] = []
    while len(order) < n:
        order.extend(rng.permutation(len(pool)).tolist())
    return [pool[i] for i in order[:n]]


# ---------------------------------------------------------------- two figures, and their twins

# Two figures stand on opposite sides, both small, so they never touch (docs/architecture.md, "Twins").
PAIR_PLACES = (("left", "right"), ("top", "bottom"))
TWIN_KINDS = ("colour", "place")


@dataclass(frozen=True)
class Figure:
    """One figure of a two-figure scene."""

    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class PairScene:
    """Two figures of different shape and colour on opposite sides of one background: the scene whose twin
    (:func:`twin_of`) has the same words in another order."""

    figures: tuple[Figure, Figure]
    background: str


def sample_pair_scenes(n: int, rng: np.random.Generator) -> list[PairScene]:
    """Draw n two-figure scenes: shapes differ, colours differ, and both stand out from the background."""
    scenes = []
    while len(scenes) < n:
        shapes = rng.choice(len(SHAPES), size=2, replace=False)
        colours = rng.choice(len(COLOURS), size=2, replace=False)
        places = PAIR_PLACES[int(rng.integers(len(PAIR_PLACES)))]
        if rng.random() < 0.5:
            places = places[::-1]
        background = COLOURS[int(rng.integers(len(COLOURS)))]
        if not all(_contrasts(COLOURS[c], background) for c in colours):
            continue
        figures = tuple(
            Figure(SHAPES[s], COLOURS[c], place) for s, c, place in zip(shapes, colours, places, strict=True)
        )
        scenes.append(PairScene(figures, background))
    return scenes


def twin_of(scene: PairScene, kind: str) -> PairScene:
    """The same two figures with their colours exchanged ("colour") or their places exchanged ("place"): every
    caption of the twin uses the words of the scene's caption, in another order."""
    first, second = scene.figures
    if kind == "colour":
        swapped = (
            Figure(first.shape, second.colour, first.position),
            Figure(second.shape, first.colour, second.position),
        )
    elif kind == "place":
        swapped = (
            Figure(first.shape, first.colour, second.position),
            Figure(second.shape, second.colour, first.position),
        )
    else:
        raise ValueError(f"unknown twin kind {kind!r}; expected one of {TWIN_KINDS}")
    return PairScene(swapped, scene.background)
