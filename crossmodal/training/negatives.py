"""Caption negatives: near-copies of a training caption that say something false of its picture (NegCLIP,
Yuksekgonul et al. 2023), added to the loss as extra wrong captions (docs/architecture.md, "Hard negatives").

A random batch almost never holds a caption that differs from the right one in one attribute, so the loss never pays
for binding a word to the wrong thing ("a red circle on a blue background" against "a blue circle on a red
background"). These negatives are exactly that, made from a small English lexicon with no parser, so they work on
Flickr30k's captions ("a man in a red shirt and a woman in a blue dress") as on the generator's. Each edit makes the
caption false by construction:

- **swap**: two different colour words of two different noun phrases exchanged ("red shirt ... blue dress" ->
  "blue shirt ... red dress"), or two opposite sides ("a man on the left and a woman on the right" -> "... on the
  right ... on the left"). Two colours of one phrase ("a red and white bus") are not swapped: that is still true.
- **colour**: one colour word replaced by a colour the caption does not name.
- **number**: one number word replaced by another ("two dogs" -> "three dogs").
- **side**: a side or place replaced by its opposite ("on the left" -> "on the right", "above" -> "below").
- **size**: a size word replaced by one of the opposite size ("a small circle" -> "a large circle").
- **relation**: the two short noun phrases around an asymmetric relation exchanged ("a cat on top of a dog" ->
  "a dog on top of a cat"). Symmetric ones ("and", "next to", "beside") are left alone: exchanging their phrases
  says nothing false.

The lexicon holds everyday words only: a test vocabulary of rarer synonyms (``--unseen-test-words``) never enters
training through a negative. Which negatives a caption gets is fixed by (seed, caption), so runs, processes and
resumes see the same ones.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence

import numpy as np

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Each word and its opposite; a multi-word place changes through its one telling word ("on the left" -> "right").
# Not "up"/"down" or "front"/"back": as particles and nouns ("sitting down", "on his back") they name no side.
OPPOSITE_SIDES = {
    "left": "right", "right": "left", "top": "bottom", "bottom": "top", "upper": "lower", "lower": "upper",
    "above": "below", "below": "above", "inside": "outside", "outside": "inside",
}  # fmt: skip
SMALL = ("small", "little", "tiny")
LARGE = ("large", "big", "huge")
# "grey" and "gray" are one colour: neither replaces the other, and they are never swapped with each other.
_SAME_COLOUR = {"grey": "gray"}
ASYMMETRIC_RELATIONS = (
    "on the left of", "on the right of", "to the left of", "to the right of", "on top of", "in front of",
    "behind", "above", "below", "under", "underneath",
)  # fmt: skip
# Words that open a noun phrase: a colour after one of these belongs to another phrase than a colour before it.
DETERMINERS = frozenset(("a", "an", "the", "his", "her", "their", "its", "some", "another", *NUMBERS))
# A side of a relation that holds one of these is a clause, not a short noun phrase: exchanging it would not read.
_CLAUSE_WORDS = frozenset(("is", "are", "was", "were", "who", "that", "which", "while"))
_MAX_PHRASE_WORDS = 6
_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


def _matching_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _colour(word: str) -> str:
    return _SAME_COLOUR.get(word, word)


def _replace(caption: str, span: tuple[int, int], word: str) -> str:
    start, end = span
    return caption[:start] + _matching_case(word, caption[start:end]) + caption[end:]


def _swaps(caption: str, words: list[re.Match]) -> list[str]:
    """Two colours, or two opposite sides, of two noun phrases exchanged (a determiner between them starts the
    second phrase): "a red circle on the left and a blue square on the right" -> "a blue circle ... a red square",
    and -> "... on the right and ... on the left"."""
    found = []
    for kind in (COLOURS, OPPOSITE_SIDES):
        named = [i for i, m in enumerate(words) if m.group().lower() in kind and not _in_on_top_of(caption, m)]
        for a, b in itertools.pairwise(named):
            first, second = words[a].group().lower(), words[b].group().lower()
            if kind is COLOURS and _colour(first) == _colour(second):
                continue
            if kind is OPPOSITE_SIDES and OPPOSITE_SIDES[first] != second:
                continue  # "at the top ... on the left": exchanged, the places would not read
            if not any(m.group().lower() in DETERMINERS for m in words[a + 1 : b]):
                continue  # one phrase: "a red and white bus"
            swapped = _replace(caption, words[b].span(), first)
            found.append(_replace(swapped, words[a].span(), second))
    return found


def _word_edits(caption: str, words: list[re.Match]) -> list[str]:
    """One colour, number, side or size word replaced by one that makes the caption false."""
    named = {_colour(m.group().lower()) for m in words}
    found = []
    for m in words:
        word = m.group().lower()
        if word in COLOURS:
            others = [c for c in COLOURS if c not in named and c not in _SAME_COLOUR]
            found += [_replace(caption, m.span(), colour) for colour in others]
        elif word in NUMBERS:
            found += [_replace(caption, m.span(), n) for n in NUMBERS if n not in named]
        elif word in OPPOSITE_SIDES and not _in_on_top_of(caption, m):  # "on bottom of" is not English
            found.append(_replace(caption, m.span(), OPPOSITE_SIDES[word]))
        elif word in SMALL or word in LARGE:
            opposite = LARGE if word in SMALL else SMALL
            found.append(_replace(caption, m.span(), opposite[(SMALL + LARGE).index(word) % 3]))
    return found


def _in_on_top_of(caption: str, word: re.Match) -> bool:
    start, end = word.span()
    return (
        word.group().lower() == "top"
        and caption[max(start - 3, 0) : start].lower() == "on "
        and (caption[end : end + 3].lower() == " of")
    )


def _is_short_noun_phrase(text: str) -> bool:
    words = [w.lower() for w in _WORD.findall(text)]
    return (
        0 < len(words) <= _MAX_PHRASE_WORDS
        and words[0] in DETERMINERS
        and not _CLAUSE_WORDS & set(words)
        and not any(w.endswith("ing") for w in words)
    )


def _relation_swaps(caption: str) -> list[str]:
    """ "X <relation> Y" -> "Y <relation> X" when the caption is just two short noun phrases around the relation."""
    body = caption.rstrip(" .")
    tail = caption[len(body) :]
    found = []
    for relation in ASYMMETRIC_RELATIONS:
        parts = re.split(rf"\s+{re.escape(relation)}\s+", body, flags=re.IGNORECASE)
        if len(parts) != 2 or not all(_is_short_noun_phrase(part) for part in parts):
            continue
        said = body[len(parts[0]) : len(body) - len(parts[1])]  # the relation as written, with its spaces
        first, second = parts
        found.append(_matching_case(second[0].lower(), first[0]) + second[1:] + said + first[0].lower() + first[1:])
        found[-1] += tail
    return found


def _candidates(caption: str) -> tuple[list[str], list[str]]:
    """The exchanges (every word of the caption still there: the hardest) and the word edits, in a fixed order."""
    words = list(_WORD.finditer(caption))
    return _swaps(caption, words) + _relation_swaps(caption), _word_edits(caption, words)


def _distinct(caption: str, candidates: list[str]) -> list[str]:
    seen = {caption.lower()}
    distinct = []
    for negative in candidates:
        if negative.lower() not in seen:
            seen.add(negative.lower())
            distinct.append(negative)
    return distinct


def all_negatives(caption: str) -> list[str]:
    """Every false near-copy of ``caption`` the lexicon can make, distinct and in a fixed order; [] when the
    caption names nothing the lexicon knows."""
    exchanges, edits = _candidates(caption)
    return _distinct(caption, exchanges + edits)


def caption_negatives(caption: str, count: int, seed: int) -> list[str]:
    """Up to ``count`` of :func:`all_negatives`, chosen by (seed, caption): exchanges first (the hardest: every
    word of the caption is still there), then word edits drawn at random."""
    if count <= 0:
        return []
    exchanges, edits = _candidates(caption)
    candidates = _distinct(caption, exchanges + edits)
    first = [n for n in candidates if n in exchanges][:count]
    rest = [n for n in candidates if n not in first]
    digest = hashlib.sha256(f"{seed}\0{caption}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    drawn = rng.choice(len(rest), size=min(count - len(first), len(rest)), replace=False) if rest else []
    return first + [rest[i] for i in sorted(drawn)]


def negatives_of(captions: Sequence[str], count: int, seed: int) -> dict[str, list[str]]:
    """Each distinct caption's negatives (see :func:`caption_negatives`)."""
    return {caption: caption_negatives(caption, count, seed) for caption in dict.fromkeys(captions)}
