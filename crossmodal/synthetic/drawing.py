"""Drawing a scene: one coloured shape (or two, :func:`render_pair`) on a textured background, with the nuisance
variation no caption mentions (position and size jitter, colour shades, background texture, a little pixel noise,
small rotations), as a JPEG.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from crossmodal.synthetic.scenes import PALETTE, PairScene, Scene

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
_PAIR_SPREAD = 0.05  # two figures stand this much farther out than one (sample_pair_layouts)
_SIZE_JITTER = 0.1  # relative: small tops out at 0.143, large bottoms out at 0.198
_MAX_ROTATION_DEG = 15.0
_SHADE_JITTER = 18  # per channel, object and background
_TEXTURE_AMPLITUDE = 14.0  # brightness swing of the background texture
_PIXEL_NOISE_STD = 3.0
_RING_INNER_RATIO = 0.5  # hole radius / outer radius; leaves a band thick enough to survive a 64 px resize
_SUPERSAMPLE = 4  # the shape mask is drawn this much larger and downsampled, which anti-aliases the edges


@dataclass(frozen=True)
class Layout:
    """The unnamed details of one drawing, in pixels; kept so tests can look at the object and the background."""

    cx: float
    cy: float
    radius: float
    rotation_deg: float
    colour_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]


def _jitter_rgb(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    shifted = np.clip(np.array(rgb) + rng.integers(-_SHADE_JITTER, _SHADE_JITTER + 1, size=3), 0, 255)
    return tuple(int(v) for v in shifted)


def sample_layout(scene: Scene, image_size: tuple[int, int], rng: np.random.Generator) -> Layout:
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


def sample_pair_layouts(
    scene: PairScene, image_size: tuple[int, int], rng: np.random.Generator
) -> tuple[Layout, Layout]:
    """One small figure's layout per figure, on one background shade. Each stands _PAIR_SPREAD farther out than a
    lone figure's place, so the two never touch: centres at least 0.40 of the image apart with jitter, each figure
    at most 0.157 from its centre (a star's tips)."""
    width, height = image_size
    background_rgb = _jitter_rgb(PALETTE[scene.background], rng)
    layouts = []
    for figure in scene.figures:
        single = Scene(figure.shape, figure.colour, scene.background, figure.position, "small")
        layout = sample_layout(single, image_size, rng)
        dx, dy = (_POSITION_CENTRES[figure.position][axis] - 0.5 for axis in (0, 1))
        layouts.append(
            dataclasses.replace(
                layout,
                cx=layout.cx + math.copysign(_PAIR_SPREAD, dx) * width * (dx != 0),
                cy=layout.cy + math.copysign(_PAIR_SPREAD, dy) * height * (dy != 0),
                background_rgb=background_rgb,
            )
        )
    return layouts[0], layouts[1]


def _draw(figures: Sequence[tuple[str, Layout]], image_size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """The figures (shape, layout) over the first one's background, with pixel noise, as JPEG bytes."""
    pixels = _background(figures[0][1], image_size, rng)
    for shape, layout in figures:
        mask = _shape_mask(shape, layout, image_size)[:, :, None]
        pixels = pixels * (1 - mask) + np.array(layout.colour_rgb, dtype=np.float32) * mask
    pixels += _PIXEL_NOISE_STD * rng.standard_normal(size=pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def render(scene: Scene, layout: Layout, image_size: tuple[int, int], rng: np.random.Generator) -> bytes:
    """Draw the scene and encode it as JPEG bytes, as Flickr30k stores its images."""
    return _draw([(scene.shape, layout)], image_size, rng)


def render_pair(
    scene: PairScene, layouts: tuple[Layout, Layout], image_size: tuple[int, int], rng: np.random.Generator
) -> bytes:
    """Draw a two-figure scene as JPEG bytes."""
    return _draw(
        [(figure.shape, layout) for figure, layout in zip(scene.figures, layouts, strict=True)], image_size, rng
    )


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
