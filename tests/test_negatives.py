"""Caption negatives (crossmodal/training/negatives.py) on captions written the way Flickr30k's annotators write, their
collation beside the positives, and a training run that uses them, with HN-NCE weighting, locked and not."""

import dataclasses
import math
import re

import pytest
import torch

from crossmodal.config import PRESETS
from crossmodal.data.dataset import DataSource, caption_table, load_splits
from crossmodal.encoding.batches import CaptionBatcher
from crossmodal.model.tokenizer import fit_wordpiece
from crossmodal.training.loop import train
from crossmodal.training.negatives import (
    COLOURS,
    LARGE,
    NUMBERS,
    OPPOSITE_SIDES,
    SMALL,
    all_negatives,
    caption_negatives,
    negatives_of,
)
from crossmodal.training.pairs import WithCaptionNegatives
from crossmodal.training.prepare import make_accelerator

FLICKR_STYLE = [
    "A man in a red shirt and a woman in a blue dress are dancing.",
    "Two young boys in green jerseys play soccer on a field.",
    "A black dog jumps over a white fence.",
    "A little girl with a pink umbrella walks in the rain",
    "three people sit on a bench on the left of a large tree",
    "A cat on top of a dog.",
    "A woman in a yellow jacket stands above a man in a brown coat",
    "a small red circle on the left of a blue background",
]
NOTHING_TO_CHANGE = ["A man is standing next to a woman", "People walking down a busy street.", "A dog runs.", ""]
CATEGORIES = [set(COLOURS), set(NUMBERS), set(OPPOSITE_SIDES), set(SMALL), set(LARGE)]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())


def kind_of_edit(caption: str, negative: str) -> str:
    """How ``negative`` differs from ``caption``, asserting it is one of the edits that make a caption false."""
    before, after = words(caption), words(negative)
    assert negative != caption and before != after
    if sorted(before) == sorted(after):  # the same words, moved: two colours or two phrases exchanged
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        if len(changed) == 2 and all(before[i] in COLOURS for i in changed):
            first, second = changed
            assert before[first] == after[second] and before[second] == after[first]
            # Two phrases: a determiner opens the second one between the two colours.
            assert {"a", "an", "the", *NUMBERS} & set(before[first + 1 : second]), (caption, negative)
            return "swap"
        return "relation"
    assert len(before) == len(after)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(changed) == 1, (caption, negative)
    old, new = before[changed[0]], after[changed[0]]
    if old in COLOURS:
        assert new in COLOURS and new not in before and {old, new} != {"grey", "gray"}
        return "colour"
    if old in NUMBERS:
        assert new in NUMBERS and new not in before
        return "number"
    if old in OPPOSITE_SIDES:
        assert new == OPPOSITE_SIDES[old]
        return "side"
    assert (old in SMALL and new in LARGE) or (old in LARGE and new in SMALL), (old, new)
    return "size"


@pytest.mark.parametrize("caption", FLICKR_STYLE)
def test_every_negative_is_one_edit_that_makes_the_caption_false(caption):
    negatives = all_negatives(caption)
    assert negatives and len(set(negatives)) == len(negatives)
    for negative in negatives:
        kind_of_edit(caption, negative)


def test_the_edits_read_as_expected_on_real_looking_captions():
    couple = all_negatives(FLICKR_STYLE[0])
    assert couple[0] == "A man in a blue shirt and a woman in a red dress are dancing."
    assert "A dog on top of a cat." in all_negatives("A cat on top of a dog.")
    assert "A cat on bottom of a dog." not in all_negatives("A cat on top of a dog.")  # not English
    assert "Three young boys in green jerseys play soccer on a field." in all_negatives(FLICKR_STYLE[1])
    assert "a small blue circle on the left of a red background" in all_negatives(FLICKR_STYLE[-1])
    assert "a small red circle on the right of a blue background" in all_negatives(FLICKR_STYLE[-1])
    assert "a large red circle on the left of a blue background" in all_negatives(FLICKR_STYLE[-1])


def test_two_colours_of_one_phrase_are_not_swapped():
    kinds = {kind_of_edit(c, n) for c in ["A red and white bus"] for n in all_negatives(c)}
    assert kinds == {"colour"}


@pytest.mark.parametrize("caption", NOTHING_TO_CHANGE)
def test_a_caption_with_nothing_to_change_gets_no_negatives(caption):
    assert all_negatives(caption) == [] and caption_negatives(caption, 4, seed=0) == []


def test_the_words_held_out_for_unseen_tests_never_enter_through_a_negative():
    """A negative only ever writes a lexicon word, and no lexicon word is in either unseen vocabulary."""
    from crossmodal.synthetic.captions import UNSEEN_VOCABULARIES
    from crossmodal.training import negatives
    from tests.test_synthetic import attribute_words

    held_out = set().union(*(attribute_words(vocabulary) for vocabulary in UNSEEN_VOCABULARIES.values()))
    lexicon = {*negatives.COLOURS, *negatives.NUMBERS, *negatives.OPPOSITE_SIDES.values(), *negatives.SMALL}
    lexicon |= {*negatives.LARGE, *(w for relation in negatives.ASYMMETRIC_RELATIONS for w in relation.split())}
    assert not lexicon & held_out
    produced = {w for caption in FLICKR_STYLE for n in all_negatives(caption) for w in words(n)}
    written = produced - {w for caption in FLICKR_STYLE for w in words(caption)}
    assert written and written <= lexicon


def test_the_choice_is_fixed_by_seed_and_caption_and_the_hardest_come_first():
    caption = FLICKR_STYLE[0]
    chosen = caption_negatives(caption, 3, seed=5)
    assert chosen == caption_negatives(caption, 3, seed=5) and len(chosen) == 3
    assert kind_of_edit(caption, chosen[0]) == "swap"
    assert {tuple(caption_negatives(caption, 3, seed=s)) for s in range(6)} != {tuple(chosen)}  # seeds differ
    assert caption_negatives(caption, 0, seed=5) == []
    assert len(caption_negatives("A cat on top of a dog.", 5, seed=0)) == 1  # no more than there are
    assert negatives_of([caption, caption, "A dog runs."], 2, seed=5) == {
        caption: caption_negatives(caption, 2, seed=5),
        "A dog runs.": [],
    }


def test_negatives_are_collated_beside_their_captions_with_one_padded_length():
    tokenizer = fit_wordpiece(FLICKR_STYLE + NOTHING_TO_CHANGE, vocab_size=300, max_length=32)
    config = PRESETS["tiny"].model
    tokens = CaptionBatcher(tokenizer, config)
    captions = [FLICKR_STYLE[0], "A dog runs.", FLICKR_STYLE[5]]
    negatives = negatives_of(captions, 2, seed=0)
    batch = WithCaptionNegatives(tokens, negatives, 2)(captions)
    assert batch["negative_mask"].tolist() == [[True, True], [False, False], [True, False]]
    length = batch["input_ids"].shape[1]
    assert batch["negative_input_ids"].shape == (3, 2, length) == batch["negative_attention_mask"].shape
    alone = tokens(negatives[FLICKR_STYLE[0]])
    real = alone["attention_mask"].shape[1]
    assert torch.equal(batch["negative_input_ids"][0, :, :real], alone["input_ids"])
    assert not batch["negative_attention_mask"][0, :, real:].any()
    # Without negatives the positives are collated exactly as before.
    plain = tokens(captions)
    assert torch.equal(plain["input_ids"], batch["input_ids"][:, : plain["input_ids"].shape[1]])


@pytest.mark.parametrize("locked", [False, True], ids=["tokens", "locked text tower"])
def test_a_run_with_caption_negatives_and_hn_nce_trains(tmp_path, small_dataset, locked):
    tiny = PRESETS["tiny"]
    recipe = dataclasses.replace(
        tiny.train, epochs=1, batch_size=32, num_workers=0, caption_negatives=2, hard_negative_beta=0.5,
        lock_text_tower=locked, lock_image_tower=locked, log_every=1,
    )  # fmt: skip
    accelerator = make_accelerator(recipe, tmp_path)
    result = train(accelerator, tiny.model, recipe, DataSource(str(small_dataset)), tmp_path, max_steps=4)
    assert result.state.global_step == 4 and result.state.skipped_steps == 0
    assert len(result.state.loss_log) == 4 and all(math.isfinite(loss) for _, loss in result.state.loss_log)
    if locked:  # the negatives' features were computed once, with the captions'
        known = result.model.known_text_features
        captions = caption_table(load_splits(DataSource(str(small_dataset)))["train"])[0]
        expected = {n for caption in captions for n in caption_negatives(caption, 2, recipe.seed)}
        assert expected and known.holds(sorted(expected))


def test_the_model_card_and_the_page_say_which_negatives_the_model_was_trained_with(tiny_run):
    from huggingface_hub import ModelCard

    from crossmodal.artifacts.contract import load_verified
    from crossmodal.serving.page import header

    assert "negatives: in-batch negatives only (no hard negatives)" in ModelCard.load(tiny_run / "README.md").text
    loaded = load_verified(tiny_run)
    assert loaded.training["caption_negatives"] == 0 and loaded.training["hard_negative_beta"] == 0.0
    assert "trained with in-batch negatives only" in header(loaded, str(tiny_run))
    hard = dataclasses.replace(loaded, training={**loaded.training, "caption_negatives": 3, "hard_negative_beta": 0.5})
    said = header(hard, str(tiny_run))
    assert (
        "trained with 3 caption negatives per caption" in said
        and "HN-NCE weighting of hard negatives (beta 0.5)" in said
    )
