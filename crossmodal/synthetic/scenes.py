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
