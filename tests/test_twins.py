"""Two-figure scenes, their Winoground-style twins, and the twin scores (issue 38)."""

import io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel

from benchmarks import twins as twins_benchmark
from benchmarks.binding_probe import Probe, TunedLayers, labels_of
from crossmodal.artifacts.contract import encode_thumbnails, load_verified
from crossmodal.encoding.batches import CaptionBatcher
from crossmodal.encoding.metrics import twin_scores
from crossmodal.synthetic import dataset as synthetic
from crossmodal.synthetic.captions import TRAINING_WORDS, UNSEEN_WORDS
from crossmodal.synthetic.drawing import object_probe
from crossmodal.synthetic.scenes import PALETTE, PairScene, Scene, sample_pair_scenes, twin_of
from tests.test_synthetic import attribute_words

TWIN_PAIRS = 12


def words_of(caption: str) -> list[str]:
    return sorted(re.findall(r"[a-z]+(?:-[a-z]+)*", caption.lower()))


@pytest.fixture(scope="module")
def twins():
    return synthetic.generate_twins(TWIN_PAIRS, (96, 96), seed=3)


def test_a_twin_has_the_same_words_in_another_order(twins):
    for first, second in zip(twins[::2], twins[1::2], strict=True):
        assert len(first.captions) == len(second.captions) == 5
        for ours, theirs in zip(first.captions, second.captions, strict=True):
            assert ours != theirs
            assert words_of(ours) == words_of(theirs), (ours, theirs)


def test_a_twin_exchanges_colours_or_places(twins):
    for pair, (first, second) in enumerate(zip(twins[::2], twins[1::2], strict=True)):
        (a, b), (a_twin, b_twin) = first.scene.figures, second.scene.figures
        assert first.scene.background == second.scene.background
        assert (a.shape, b.shape) == (a_twin.shape, b_twin.shape) and a.shape != b.shape and a.colour != b.colour
        if pair % 2 == 0:
            assert (a_twin.colour, b_twin.colour, a_twin.position) == (b.colour, a.colour, a.position)
        else:
            assert (a_twin.position, b_twin.position, a_twin.colour) == (b.position, a.position, a.colour)


def test_every_caption_names_both_figures_and_their_places(twins):
    for example in twins:
        for caption in example.captions:
            for figure in example.scene.figures:
                assert figure.colour in caption.lower()
            assert sum(side in caption for side in ("left", "right", "top", "bottom", "upper", "lower")) >= 2


def test_both_figures_are_drawn_apart_in_their_colours(twins):
    for example in twins:
        image = np.asarray(Image.open(io.BytesIO(example.jpeg)).convert("RGB"), dtype=float)
        first, second = example.layout
        assert math.dist((first.cx, first.cy), (second.cx, second.cy)) > 1.2 * (first.radius + second.radius)
        for figure, layout in zip(example.scene.figures, example.layout, strict=True):
            x, y = object_probe(
                Scene(figure.shape, figure.colour, example.scene.background, figure.position, "small"), layout
            )
            assert np.abs(image[y, x] - PALETTE[figure.colour]).max() < 60, (figure, image[y, x])


def test_twins_in_unseen_words_stay_twins_and_use_none_of_the_training_words():
    unseen = synthetic.generate_twins(4, (96, 96), seed=3, words=UNSEEN_WORDS)
    trained = synthetic.generate_twins(4, (96, 96), seed=3)
    assert [ex.jpeg for ex in unseen] == [ex.jpeg for ex in trained]  # the same pictures, other words
    for first, second in zip(unseen[::2], unseen[1::2], strict=True):
        for ours, theirs in zip(first.captions, second.captions, strict=True):
            assert words_of(ours) == words_of(theirs)
            assert not set(words_of(ours)) & attribute_words(TRAINING_WORDS), ours


def test_pairs_share_a_split_and_leave_its_one_figure_rows_as_they_were():
    plain = synthetic.generate_examples(20, 0, 0, (64, 64), seed=1)["train"]
    mixed = synthetic.generate_examples(20, 0, 0, (64, 64), seed=1, pair_fraction=0.25)["train"]
    assert len(mixed) == 20
    assert [ex.jpeg for ex in mixed[:15]] == [ex.jpeg for ex in plain[:15]]
    assert all(isinstance(ex.scene, PairScene) for ex in mixed[15:])
    with pytest.raises(ValueError, match="between 0 and 1"):
        synthetic.generate_examples(20, 0, 0, (64, 64), seed=1, pair_fraction=1.5)


def test_the_command_line_writes_a_twin_test_split(tmp_path):
    synthetic.main(["--out", str(tmp_path / "twins"), "--train", "4", "--val", "2", "--twins", "3", "--pairs", "0.5"])
    written = synthetic.datasets.load_from_disk(str(tmp_path / "twins"))
    assert {split: len(rows) for split, rows in written.items()} == {"train": 4, "val": 2, "test": 6}
    captions = written["test"]["caption"]
    assert words_of(captions[0][0]) == words_of(captions[1][0]) and captions[0][0] != captions[1][0]


def brute_force_twin_scores(images, captions):
    """Winoground's definitions, one item (pair, caption j) at a time."""
    score = lambda p, j, c, i: float(captions[p, c, j] @ images[p, i])  # noqa: E731
    counts = dict.fromkeys(("caption_picks_image", "image_picks_caption", "text", "image", "group"), 0)
    items = captions.shape[0] * captions.shape[2]
    for p in range(captions.shape[0]):
        for j in range(captions.shape[2]):
            captions_pick = [score(p, j, c, c) > score(p, j, c, 1 - c) for c in (0, 1)]
            images_pick = [score(p, j, i, i) > score(p, j, 1 - i, i) for i in (0, 1)]
            counts["caption_picks_image"] += sum(captions_pick) / 2
            counts["image_picks_caption"] += sum(images_pick) / 2
            counts["text"] += all(images_pick)
            counts["image"] += all(captions_pick)
            counts["group"] += all(images_pick) and all(captions_pick)
    return {name: 100 * count / items for name, count in counts.items()}


def test_twin_scores_match_winogrounds_definitions_item_by_item():
    generator = torch.Generator().manual_seed(0)
    images, captions = torch.randn(40, 2, 8, generator=generator), torch.randn(40, 2, 5, 8, generator=generator)
    expected = brute_force_twin_scores(images, captions)
    assert twin_scores(images, captions) == pytest.approx(expected, abs=1e-4)
    assert expected["text"] != expected["image"]  # the two directions are told apart


def test_twin_scores_of_a_model_that_binds_and_one_that_cannot():
    images = torch.nn.functional.normalize(torch.randn(10, 2, 16), dim=-1)
    perfect = images.unsqueeze(2).expand(10, 2, 3, 16)
    assert twin_scores(images, perfect) == pytest.approx(dict.fromkeys(twin_scores(images, perfect), 100.0))
    blind = images.mean(dim=1, keepdim=True).unsqueeze(2).expand(10, 2, 3, 16)  # both captions the same vector
    assert twin_scores(images, blind)["group"] == 0.0  # ties count as wrong
    with pytest.raises(ValueError, match="twins need"):
        twin_scores(images, perfect[:, :1])


def test_the_benchmark_lines_up_each_twin_with_its_own_pictures_and_captions(tiny_run):
    """benchmarks/twins.py reshapes one encoded split into pairs; each slot must hold what encoding that picture and
    that caption alone, through the serving path, gives."""
    loaded = load_verified(tiny_run)
    _, images, captions = twins_benchmark.twin_embeddings(loaded, pairs=3, seed=5, words="training")
    examples = synthetic.generate_twins(3, (96, 96), seed=5)
    with torch.inference_mode():
        for row, example in enumerate(examples):
            pair, slot = divmod(row, 2)
            alone = encode_thumbnails(loaded.model, [example.jpeg])[0]
            assert torch.allclose(images[pair, slot], alone, atol=1e-4)
            for j, caption in enumerate(example.captions):
                tokens = CaptionBatcher(loaded.tokenizer, loaded.model.config)([caption])
                assert torch.allclose(captions[pair, slot, j], loaded.model.encode_text(**tokens)[0], atol=1e-4)
    scores = twins_benchmark.score_artifact(tiny_run, pairs=3, seed=5, words="training")
    assert set(twins_benchmark.COLUMNS) <= set(scores)


def test_binding_probe_labels_tell_a_scene_from_its_twins_and_probes_ignore_padding():
    """benchmarks/binding_probe.py: the labels a probe learns are what a twin changes, and neither probe reads the
    padding a longer caption in the batch adds."""
    scene = sample_pair_scenes(1, np.random.default_rng(0))[0]
    colours, places = labels_of(scene)
    assert labels_of(twin_of(scene, "colour"))[0] != colours and labels_of(twin_of(scene, "colour"))[1] == places
    assert labels_of(twin_of(scene, "place"))[0] == colours and labels_of(twin_of(scene, "place"))[1] != places
    torch.manual_seed(0)
    states, mask = torch.randn(3, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    padded_states = torch.cat([states, torch.randn(3, 2, 16)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    for queries in (0, 2):
        probe = Probe(16, queries, hidden=8).eval()
        for plain, padded in zip(probe(states, mask), probe(padded_states, padded_mask), strict=True):
            torch.testing.assert_close(plain, padded)


def test_the_probes_tuned_layers_are_the_towers_own_top_layers():
    """benchmarks/binding_probe.py's fine-tune starts from the tower itself: its copied top layers, run on the states
    of the layers below, give the tower's own output on the real tokens."""
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32)  # fmt: skip
    tower = BertModel(config, add_pooling_layer=False).eval()
    input_ids = torch.tensor([[1, 5, 7, 2, 0, 0], [1, 9, 8, 6, 4, 2]])
    mask = input_ids != 0
    with torch.no_grad():
        output = tower(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
        tuned = TunedLayers(list(tower.encoder.layer[-2:])).eval()(output.hidden_states[-3], mask)
    torch.testing.assert_close(tuned[mask], output.last_hidden_state[mask])
