"""The captions of the synthetic dataset: five phrasings of a scene, as varied as Flickr30k's annotators.

Like Flickr30k's five captions per image, which run from a few words to a long sentence and often describe only part
of the picture, each scene gets three full descriptions (terse to long, all five attributes) and two partial ones
(the figure with or without its place, or only the background). Synonyms for every attribute and templates that
differ in wording and order make a model read the words rather than match one fixed sentence; the partial ones teach
it that a short query such as "a small red circle at the top" is about the figure, not the background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from crossmodal.synthetic.scenes import PALETTE, PairScene, Scene

CAPTIONS_PER_IMAGE = 5
FULL_CAPTIONS_PER_IMAGE = 3  # the other two are partial (PARTIAL_TEMPLATES)

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "filled circle", "round dot"),
    "square": ("square", "filled square", "square block"),
    "triangle": ("triangle", "triangular shape", "filled triangle"),
    "star": ("star", "five-pointed star", "star shape"),
    "cross": ("cross", "plus sign", "plus shape"),
    "ring": ("ring", "hoop", "donut shape"),
}
# Every phrase must read well both alone ("... on the left.") and before "of the image".
POSITION_WORDS = {
    "left": ("on the left", "on the left-hand side", "at the left"),
    "right": ("on the right", "on the right-hand side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
BACKGROUND_NOUNS = ("background", "backdrop")

# The unseen-words test split (``generate(..., unseen_test_words=True)``): a synonym for every colour, shape, size and
# background word that no training or validation caption, and no template, ever uses, so a text tower can only read
# it with what it knew before training. Positions keep their training words: the split asks about vocabulary.
UNSEEN_SIZE_WORDS = {"small": ("petite", "miniature", "teeny"), "large": ("enormous", "giant", "massive")}
UNSEEN_SHAPE_WORDS = {
    "circle": ("ball", "orb", "sphere"),
    "square": ("box", "tile", "cube"),
    "triangle": ("pyramid", "wedge"),
    "star": ("pentagram", "asterisk"),
    "cross": ("crucifix", "cruciform figure"),
    "ring": ("loop", "halo", "bagel"),
}
UNSEEN_COLOUR_WORDS = {
    "red": ("scarlet", "crimson"),
    "green": ("emerald", "jade"),
    "blue": ("azure", "cobalt", "sapphire"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "orange": ("tangerine", "amber"),
    "white": ("ivory", "snowy"),
    "black": ("ebony", "inky", "charcoal"),
}
UNSEEN_BACKGROUND_NOUNS = ("surface", "field", "wall")


@dataclass(frozen=True)
class Vocabulary:
    """The words a caption may use for each attribute value."""

    sizes: Mapping[str, Sequence[str]]
    shapes: Mapping[str, Sequence[str]]
    background_nouns: Sequence[str]
    colours: Mapping[str, Sequence[str]] | None = None  # None: the palette name itself (no draw, as always)


# A second unseen vocabulary, disjoint from the first and from training's: recipes are chosen on the first, and the
# chosen one is reported on this one, so the choice cannot fit the words it is judged by (docs/benchmarks.md).
SECOND_UNSEEN_SIZE_WORDS = {"small": ("wee", "diminutive", "compact"), "large": ("gigantic", "colossal", "hefty")}
SECOND_UNSEEN_SHAPE_WORDS = {
    "circle": ("coin", "medallion", "spot"),
    "square": ("slab", "plaque"),
    "triangle": ("delta", "arrowhead"),
    "star": ("starburst", "sheriff badge"),
    "cross": ("crosshair", "junction mark"),
    "ring": ("annulus", "doughnut", "wreath"),
}
SECOND_UNSEEN_COLOUR_WORDS = {
    "red": ("ruby", "cherry"),
    "green": ("lime", "leafy"),
    "blue": ("navy", "cerulean"),
    "yellow": ("canary", "mustard"),
    "purple": ("plum", "mauve"),
    "orange": ("apricot", "pumpkin"),
    "white": ("chalk", "pearly"),
    "black": ("jet", "onyx"),
}
SECOND_UNSEEN_BACKGROUND_NOUNS = ("backcloth", "panel", "ground")

TRAINING_WORDS = Vocabulary(SIZE_WORDS, SHAPE_WORDS, BACKGROUND_NOUNS)
UNSEEN_WORDS = Vocabulary(UNSEEN_SIZE_WORDS, UNSEEN_SHAPE_WORDS, UNSEEN_BACKGROUND_NOUNS, UNSEEN_COLOUR_WORDS)
SECOND_UNSEEN_WORDS = Vocabulary(
    SECOND_UNSEEN_SIZE_WORDS, SECOND_UNSEEN_SHAPE_WORDS, SECOND_UNSEEN_BACKGROUND_NOUNS, SECOND_UNSEEN_COLOUR_WORDS
)
# The unseen vocabularies by the name ``--unseen-test-words`` takes.
UNSEEN_VOCABULARIES = {"first": UNSEEN_WORDS, "second": SECOND_UNSEEN_WORDS}

# Each template mentions all five attributes; they differ in wording, order and length (from a terse list to a long
# sentence), so picking distinct templates gives distinct captions. Lower-case terse ones mimic the untidy
# annotations of real caption datasets. No template may use a word of UNSEEN_WORDS (tests/test_synthetic.py).
TEMPLATES = (
    "{Obj} {loc}, set against {a_bg} {bg} {bg_noun}.",
    "{Loc}, there is {obj} on {a_bg} {bg} {bg_noun}.",
    "{Obj} sitting {loc} of {a_bg} {bg} picture.",
    "{Bg} {bg_noun} with {obj} {loc}.",
    "{size} {colour} {shape}, {loc}, {bg} {bg_noun}",
    "The picture shows {obj} {loc} of the frame, on {bg}.",
    "{Obj} is drawn {loc} of the image; the {bg_noun} is {bg}.",
    "{A_bg} {bg} image with {obj} placed {loc}.",
    "{Loc} of {a_bg} {bg} canvas: {obj}.",
    "{Obj} on {a_bg} {bg} {bg_noun}, positioned {loc}.",
    "one {size} {colour} {shape} {loc} of the image, {bg} {bg_noun}",
    "This simple drawing has {a_bg} plain {bg} {bg_noun} that fills the whole frame, and {obj} has been placed {loc}"
    " of it, turned slightly to one side.",
    "{Obj}, slightly rotated and with soft edges, sits {loc} of the picture, drawn over {a_bg} {bg} {bg_noun} that"
    " has a faint texture and nothing else on it.",
)
# What an annotator writes who describes only part of the picture: the figure (with or without its place and size),
# or only the background. They state nothing false and nothing of the rest.
FIGURE_TEMPLATES = (
    "{obj} {loc}",
    "{Obj} {loc}.",
    "{colour} {shape} {loc}",
    "{Obj}.",
    "{a_colour} {colour} {shape}",
    "{size} {colour} {shape}",
    "There is {obj} {loc} of the picture.",
)
BACKGROUND_TEMPLATES = (
    "{A_bg} plain {bg} {bg_noun}.",
    "{bg} {bg_noun}",
    "Something drawn on {a_bg} {bg} {bg_noun}.",
)
PARTIAL_TEMPLATES = FIGURE_TEMPLATES + BACKGROUND_TEMPLATES


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _caption(template: str, scene: Scene, rng: np.random.Generator, words: Vocabulary) -> str:
    """Fill one template, drawing a synonym for every attribute independently."""
    size = _pick(words.sizes[scene.size], rng)
    shape = _pick(words.shapes[scene.shape], rng)
    loc = _pick(POSITION_WORDS[scene.position], rng)
    colour, background = scene.colour, scene.background
    if words.colours is not None:
        colour, background = _pick(words.colours[colour], rng), _pick(words.colours[background], rng)
    obj = f"{_article(size)} {size} {colour} {shape}"
    fields = {
        "obj": obj,
        "a_colour": _article(colour),
        "Obj": _capitalise(obj),
        "size": size,
        "colour": colour,
        "shape": shape,
        "loc": loc,
        "Loc": _capitalise(loc),
        "bg": background,
        "Bg": _capitalise(background),
        "a_bg": _article(background),
        "A_bg": _capitalise(_article(background)),
        "bg_noun": _pick(words.background_nouns, rng),
    }
    return template.format(**fields)


def scene_captions(scene: Scene, rng: np.random.Generator, words: Vocabulary = TRAINING_WORDS) -> tuple[str, ...]:
    """Five different phrasings of the same scene, like Flickr30k's five annotators: three full, then two partial
    (the first caption, which the app shows under a thumbnail, describes the whole picture)."""
    full = rng.choice(len(TEMPLATES), size=FULL_CAPTIONS_PER_IMAGE, replace=False)
    partial = rng.choice(len(PARTIAL_TEMPLATES), size=CAPTIONS_PER_IMAGE - FULL_CAPTIONS_PER_IMAGE, replace=False)
    templates = [TEMPLATES[i] for i in full] + [PARTIAL_TEMPLATES[i] for i in partial]
    return tuple(_caption(template, scene, rng, words) for template in templates)


# ---------------------------------------------------------------- two figures

# Every caption of a two-figure scene names both figures with colour, shape and place, and the background; a
# twin's caption from the same template and synonyms holds the same words in another order (scenes.twin_of).
PAIR_TEMPLATES = (
    "{A} {loc_a} and {b} {loc_b}, on {a_bg} {bg} {bg_noun}.",
    "{Bg} {bg_noun} with {a} {loc_a} and {b} {loc_b}.",
    "{Loc_a} there is {a}, and {loc_b} {b}.",
    "{a} {loc_a}, {b} {loc_b}, {bg} {bg_noun}",
    "Two figures on {a_bg} {bg} {bg_noun}: {a} {loc_a} and {b} {loc_b}.",
    "{A} sits {loc_a} of the picture and {b} {loc_b}, over {a_bg} {bg} {bg_noun}.",
    "{Loc_b} of {a_bg} {bg} canvas is {b}; {loc_a} is {a}.",
)


def _one_word_per_value(options: Mapping[str, Sequence[str]], rng: np.random.Generator) -> dict[str, str]:
    """A synonym for every value, drawn in the mapping's fixed order: the same draws whatever the scene holds."""
    return {value: _pick(words, rng) for value, words in options.items()}


def pair_captions(scene: PairScene, seed: int, words: Vocabulary = TRAINING_WORDS) -> tuple[str, ...]:
    """Five phrasings of a two-figure scene, each from its own template. Templates and synonyms come from ``seed``
    alone, a synonym per attribute value (not per figure), so a twin captioned with the same seed gets the same
    templates and words: its caption ``i`` is caption ``i`` with the words in another order."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(PAIR_TEMPLATES), size=CAPTIONS_PER_IMAGE, replace=False)
    captions = []
    for index in chosen:
        colours = _one_word_per_value(words.colours or {c: (c,) for c in PALETTE}, rng)
        shapes = _one_word_per_value(words.shapes, rng)
        places = _one_word_per_value(POSITION_WORDS, rng)
        (a, loc_a), (b, loc_b) = (
            (f"{_article(colours[f.colour])} {colours[f.colour]} {shapes[f.shape]}", places[f.position])
            for f in scene.figures
        )
        background = colours[scene.background]
        fields = {
            "a": a, "A": _capitalise(a), "loc_a": loc_a, "Loc_a": _capitalise(loc_a),
            "b": b, "loc_b": loc_b, "Loc_b": _capitalise(loc_b),
            "bg": background, "Bg": _capitalise(background), "a_bg": _article(background),
            "bg_noun": _pick(words.background_nouns, rng),
        }  # fmt: skip
        captions.append(PAIR_TEMPLATES[int(index)].format(**fields))
    return tuple(captions)
