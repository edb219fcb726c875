"""The synthetic dataset: the Flickr30k schema, determinism, captions that match the pixels, saving and the CLI."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from crossmodal.synthetic import captions as synthetic_captions
from crossmodal.synthetic import dataset as synthetic
from crossmodal.synthetic import drawing, scenes

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["image", "caption", "split", "img_id", "filename"]
SMALL = {"num_train": 12, "num_val": 5, "num_test": 7, "image_size": (80, 64), "seed": 3}


@pytest.fixture(scope="module")
def small() -> datasets.DatasetDict:
    return synthetic.generate(**SMALL)


@pytest.fixture(scope="module")
def test_examples() -> list[synthetic.Example]:
    """A 100-image split at the default size: enough rows for every shape to appear both small and large."""
    return synthetic.generate_examples(0, 0, 100, (96, 96), seed=0)["test"]


def raw(split: datasets.Dataset) -> list[dict]:
    """Rows with the image left as its stored {"bytes", "path"}, so comparisons are byte-exact."""
    return split.cast_column("image", datasets.Image(decode=False)).to_list()


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """The palette name nearest to each pixel, as an array of names shaped like the pixel grid."""
    names = list(scenes.PALETTE)
    palette = np.array([scenes.PALETTE[name] for name in names], dtype=np.float32)
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float32) - palette, axis=-1)
    return np.array(names)[distances.argmin(axis=-1)]


def colour_at(pixels: np.ndarray, xy: tuple[int, int]) -> str:
    x, y = xy
    patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
    return str(nearest_colours(patch))


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


# ---------------------------------------------------------------- schema


def test_splits_and_features_follow_the_flickr30k_schema(small: datasets.DatasetDict) -> None:
    assert list(small) == ["train", "val", "test"]
    for split in small.values():
        assert list(split.features) == COLUMNS
        assert split.features == synthetic.FEATURES
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["caption"] == datasets.List(datasets.Value("string"))
        for name in ("split", "img_id", "filename"):
            assert split.features[name] == datasets.Value("string")
    assert {name: len(rows) for name, rows in small.items()} == {"train": 12, "val": 5, "test": 7}


def test_rows_have_five_distinct_captions_and_their_split_name(small: datasets.DatasetDict) -> None:
    for name, split in small.items():
        assert set(split["split"]) == {name}
        for captions in split["caption"]:
            assert len(captions) == 5
            assert len(set(captions)) == 5
            assert all(caption.strip() for caption in captions)


def test_ids_and_filenames_are_unique_across_splits(small: datasets.DatasetDict) -> None:
    ids = [i for split in small.values() for i in split["img_id"]]
    filenames = [f for split in small.values() for f in split["filename"]]
    assert ids == [str(i) for i in range(len(ids))]
    assert len(set(filenames)) == len(filenames)
    assert all(f.startswith("synthetic_") and f.endswith(".jpg") for f in filenames)


def test_images_are_rgb_jpegs_of_the_requested_width_and_height(small: datasets.DatasetDict) -> None:
    for split in small.values():
        for row in raw(split):
            assert row["image"]["bytes"][:2] == b"\xff\xd8"  # JPEG start-of-image marker
            assert row["image"]["path"] == row["filename"]
        for image in split["image"]:
            assert image.mode == "RGB"
            assert image.size == (80, 64)


def test_empty_splits_are_allowed() -> None:
    dataset = synthetic.generate(2, 0, 1, image_size=(32, 32))
    assert len(dataset["val"]) == 0
    assert list(dataset["val"].features) == COLUMNS
    assert dataset["test"]["img_id"] == ["2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_train": -1}, "non-negative"), ({"image_size": (8, 64)}, "too small")],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic.generate(**{"num_train": 1, "num_val": 1, "num_test": 1, **kwargs})


# ---------------------------------------------------------------- determinism


def test_the_same_seed_gives_identical_bytes_and_captions(small: datasets.DatasetDict) -> None:
    again = synthetic.generate(**SMALL)
    for name in small:
        assert raw(again[name]) == raw(small[name])


def test_a_different_seed_gives_different_data(small: datasets.DatasetDict) -> None:
    other = synthetic.generate(**{**SMALL, "seed": 4})
    for name in small:
        assert [r["image"]["bytes"] for r in raw(other[name])] != [r["image"]["bytes"] for r in raw(small[name])]
        assert other[name]["caption"] != small[name]["caption"]


def test_held_out_splits_do_not_depend_on_the_training_size() -> None:
    fewer = synthetic.generate(3, 2, 4, image_size=(32, 32))
    more = synthetic.generate(6, 2, 4, image_size=(32, 32))
    for name in ("val", "test"):
        assert [r["image"]["bytes"] for r in raw(fewer[name])] == [r["image"]["bytes"] for r in raw(more[name])]
        assert fewer[name]["caption"] == more[name]["caption"]


# ---------------------------------------------------------------- captions match the pixels


def test_generate_rows_are_the_examples_that_tests_inspect() -> None:
    examples = synthetic.generate_examples(**SMALL)
    dataset = synthetic.generate(**SMALL)
    for name, split in dataset.items():
        rows = raw(split)
        assert [r["image"]["bytes"] for r in rows] == [ex.jpeg for ex in examples[name]]
        assert [r["caption"] for r in rows] == [list(ex.captions) for ex in examples[name]]


def named_attributes(caption: str, scene: scenes.Scene, words: synthetic_captions.Vocabulary) -> set[str]:
    """Which of the scene's five attributes the caption states, in the vocabulary's words (whole words only)."""
    text = " " + " ".join(re.findall(r"[a-z-]+", caption.lower())) + " "
    colours = words.colours or {name: (name,) for name in scenes.COLOURS}
    options = {
        "size": words.sizes[scene.size],
        "shape": words.shapes[scene.shape],
        "colour": colours[scene.colour],
        "background": colours[scene.background],
        "position": synthetic_captions.POSITION_WORDS[scene.position],
    }
    return {name for name, phrases in options.items() if any(f" {phrase} " in text for phrase in phrases)}


def assert_full_then_partial(ex: synthetic.Example, words: synthetic_captions.Vocabulary) -> list[str]:
    """Three captions naming all five attributes, then two partial ones: the figure (at least its colour and shape,
    never the background's colour) or only the background. Returns each partial caption's kind."""
    everything = {"size", "shape", "colour", "background", "position"}
    full = synthetic_captions.FULL_CAPTIONS_PER_IMAGE
    for caption in ex.captions[:full]:
        assert named_attributes(caption, ex.scene, words) == everything, caption
    kinds = []
    for caption in ex.captions[full:]:
        named = named_attributes(caption, ex.scene, words)
        assert named == {"background"} or ({"colour", "shape"} <= named and "background" not in named), caption
        kinds.append("background" if named == {"background"} else "figure")
    return kinds


def test_captions_are_three_full_descriptions_then_two_partial_ones(test_examples: list[synthetic.Example]) -> None:
    kinds = Counter()
    for ex in test_examples:
        assert len(ex.captions) == synthetic_captions.CAPTIONS_PER_IMAGE == len(set(ex.captions)), ex.captions
        kinds.update(assert_full_then_partial(ex, synthetic_captions.TRAINING_WORDS))
    # 7 figure and 3 background templates: about 70% / 30% of the 200 partial captions.
    assert 100 <= kinds["figure"] <= 180 and 20 <= kinds["background"] <= 100, kinds


def test_captions_range_from_a_few_words_to_a_long_sentence(test_examples: list[synthetic.Example]) -> None:
    lengths = [len(caption.split()) for ex in test_examples for caption in ex.captions]
    assert min(lengths) <= 2 and max(lengths) >= 30, (min(lengths), max(lengths))
    assert sum(length <= 4 for length in lengths) >= 50  # short, as people type queries
    assert sum(length >= 20 for length in lengths) >= 15


def test_captions_do_not_use_words_of_other_attribute_values(test_examples: list[synthetic.Example]) -> None:
    """A caption must not also contain a synonym of a different size, since 'small' vs 'large' is the signal."""
    for ex in test_examples:
        other_size = "large" if ex.scene.size == "small" else "small"
        for caption in ex.captions:
            words = set(caption.lower().replace(",", " ").replace(".", " ").replace(":", " ").split())
            assert not words & set(synthetic_captions.SIZE_WORDS[other_size]), caption


def test_the_named_colours_are_the_drawn_colours(test_examples: list[synthetic.Example]) -> None:
    for ex in test_examples:
        pixels = decode(ex.jpeg)
        assert colour_at(pixels, drawing.object_probe(ex.scene, ex.layout)) == ex.scene.colour, ex.scene
        assert colour_at(pixels, drawing.background_probe(ex.layout, (96, 96))) == ex.scene.background, ex.scene


def test_a_ring_has_a_hole_and_other_shapes_do_not(test_examples: list[synthetic.Example]) -> None:
    for ex in test_examples:
        centre = colour_at(decode(ex.jpeg), (round(ex.layout.cx), round(ex.layout.cy)))
        expected = ex.scene.background if ex.scene.shape == "ring" else ex.scene.colour
        assert centre == expected, ex.scene


def test_the_named_position_is_where_the_object_is(test_examples: list[synthetic.Example]) -> None:
    low, high = 0.42, 0.58
    for ex in test_examples:
        ys, xs = np.nonzero(nearest_colours(decode(ex.jpeg)) == ex.scene.colour)
        x, y = xs.mean() / 96, ys.mean() / 96
        middle_x, middle_y = low < x < high, low < y < high
        expected = {
            "left": x < low and middle_y,
            "right": x > high and middle_y,
            "top": y < low and middle_x,
            "bottom": y > high and middle_x,
            "centre": middle_x and middle_y,
        }
        assert expected[ex.scene.position], (ex.scene, x, y)


def test_every_small_shape_is_smaller_than_every_large_one_of_its_kind(
    test_examples: list[synthetic.Example],
) -> None:
    areas: dict[tuple[str, str], list[int]] = defaultdict(list)
    for ex in test_examples:
        area = int((nearest_colours(decode(ex.jpeg)) == ex.scene.colour).sum())
        areas[ex.scene.shape, ex.scene.size].append(area)
    for shape in scenes.SHAPES:
        small, large = areas[shape, "small"], areas[shape, "large"]
        assert small and large, f"the split should hold small and large {shape}s"
        assert max(small) * 1.3 < min(large), (shape, small, large)


# ---------------------------------------------------------------- distinct descriptions


def test_a_split_of_100_has_100_distinct_descriptions(test_examples: list[synthetic.Example]) -> None:
    assert len({ex.scene for ex in test_examples}) == 100


def test_scenes_repeat_only_after_every_combination_was_used() -> None:
    pool = scenes.all_scenes()
    sampled = scenes.sample_scenes(len(pool) + 10, np.random.default_rng(0))
    assert set(sampled[: len(pool)]) == set(pool)
    assert len(set(sampled[: len(pool)])) == len(pool)


def test_every_combination_has_a_contrasting_background() -> None:
    pool = scenes.all_scenes()
    assert len(pool) == len(set(pool)) > 1000
    for scene in pool:
        fg, bg = (np.array(scenes.PALETTE[name]) for name in (scene.colour, scene.background))
        assert np.linalg.norm(fg - bg) > 140, scene


# ---------------------------------------------------------------- saving and the CLI


def test_save_to_disk_round_trips(small: datasets.DatasetDict, tmp_path: Path) -> None:
    out = synthetic.save(small, tmp_path / "disk", fmt="disk")
    assert out == tmp_path / "disk"
    loaded = datasets.load_from_disk(str(out))
    assert list(loaded) == list(small)
    for name in small:
        assert loaded[name].features == small[name].features
        assert raw(loaded[name]) == raw(small[name])


def test_save_to_parquet_round_trips(small: datasets.DatasetDict, tmp_path: Path) -> None:
    out = synthetic.save(small, tmp_path / "pq", fmt="parquet")
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet", "val.parquet"]
    files = {name: str(out / f"{name}.parquet") for name in small}
    loaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    for name in small:
        assert loaded[name].features == small[name].features
        assert raw(loaded[name]) == raw(small[name])


def test_save_refuses_an_unknown_format(small: datasets.DatasetDict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format"):
        synthetic.save(small, tmp_path, fmt="csv")  # type: ignore[arg-type]


def test_cli_writes_parquet_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    args = ["--out", str(out), "--train", "4", "--val", "2", "--test", "3", "--width", "40", "--height", "32"]
    result = subprocess.run(
        [sys.executable, "-m", "crossmodal", "synthetic", *args, "--seed", "5", "--format", "parquet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "train=4" in lines[0] and "val=2" in lines[0] and "test=3" in lines[0] and str(out) in lines[0]
    expected = synthetic.generate(4, 2, 3, image_size=(40, 32), seed=5)
    for name in expected:
        written = datasets.Dataset.from_parquet(str(out / f"{name}.parquet"), cache_dir=str(tmp_path / "cache"))
        assert raw(written) == raw(expected[name])


def test_main_saves_to_disk_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic.main(["--out", str(tmp_path / "d"), "--train", "2", "--val", "1", "--test", "1", "--width", "32"])
    assert "train=2" in capsys.readouterr().out
    loaded = datasets.load_from_disk(str(tmp_path / "d"))
    assert {name: len(rows) for name, rows in loaded.items()} == {"train": 2, "val": 1, "test": 1}
    assert loaded["train"][0]["image"].size == (32, 96)


# ---------------------------------------------------------------- the unseen-words test split


def words_of(texts) -> set[str]:
    return {word for text in texts for word in re.findall(r"[a-z]+", text.lower())}


def attribute_words(vocabulary: synthetic_captions.Vocabulary) -> set[str]:
    colours = vocabulary.colours or {name: (name,) for name in scenes.COLOURS}
    phrases = [*vocabulary.background_nouns]
    for table in (vocabulary.sizes, vocabulary.shapes, colours):
        phrases += [phrase for options in table.values() for phrase in options]
    return words_of(phrases)


@pytest.fixture(scope="module")
def unseen() -> dict[str, list[synthetic.Example]]:
    return synthetic.generate_examples(300, 50, 100, (96, 96), seed=0, unseen_test_words=True)


def test_unseen_test_words_change_only_the_test_captions(unseen):
    ordinary = synthetic.generate_examples(300, 50, 100, (96, 96), seed=0)
    for split in ("train", "val"):
        assert unseen[split] == ordinary[split]
    assert [ex.jpeg for ex in unseen["test"]] == [ex.jpeg for ex in ordinary["test"]]  # the same pictures
    assert [ex.scene for ex in unseen["test"]] == [ex.scene for ex in ordinary["test"]]
    assert all(a.captions != b.captions for a, b in zip(unseen["test"], ordinary["test"], strict=True))


def test_no_training_or_validation_caption_and_no_template_uses_an_unseen_word(unseen):
    new_words = attribute_words(synthetic_captions.UNSEEN_WORDS)
    seen = words_of(caption for split in ("train", "val") for ex in unseen[split] for caption in ex.captions)
    seen |= words_of(synthetic_captions.TEMPLATES + synthetic_captions.PARTIAL_TEMPLATES) | words_of(
        phrase for options in synthetic_captions.POSITION_WORDS.values() for phrase in options
    )
    assert new_words & seen == set()
    assert new_words & attribute_words(synthetic_captions.TRAINING_WORDS) == set()
    assert len(new_words) >= 40


def test_every_unseen_caption_names_its_attributes_in_new_words_only(unseen):
    old_words = attribute_words(synthetic_captions.TRAINING_WORDS)
    for ex in unseen["test"]:
        assert_full_then_partial(ex, synthetic_captions.UNSEEN_WORDS)
        for caption in ex.captions:
            assert words_of([caption]) & old_words == set(), caption


def test_the_cli_writes_an_unseen_words_test_split(tmp_path):
    out = tmp_path / "data"
    synthetic.main(["--out", str(out), "--train", "4", "--val", "2", "--test", "3", "--unseen-test-words"])
    written = datasets.load_from_disk(str(out))
    new_words = attribute_words(synthetic_captions.UNSEEN_WORDS)
    assert words_of(c for five in written["test"]["caption"] for c in five) & new_words
    assert not words_of(c for five in written["train"]["caption"] for c in five) & new_words


def test_the_second_unseen_vocabulary_shares_no_word_with_the_first_or_training():
    """Recipes are chosen on the first unseen vocabulary and reported on the second: no word may serve both."""
    second = attribute_words(synthetic_captions.SECOND_UNSEEN_WORDS)
    templates = synthetic_captions.TEMPLATES + synthetic_captions.PARTIAL_TEMPLATES + synthetic_captions.PAIR_TEMPLATES
    assert second & attribute_words(synthetic_captions.UNSEEN_WORDS) == set()
    assert second & attribute_words(synthetic_captions.TRAINING_WORDS) == set()
    assert second & words_of(templates) == set()
    assert len(second) >= 40


def test_the_cli_writes_the_second_unseen_vocabulary_on_the_same_pictures(tmp_path):
    for vocabulary in ("first", "second"):
        synthetic.main(["--out", str(tmp_path / vocabulary), "--train", "2", "--val", "1", "--test", "4",
                        "--unseen-test-words", vocabulary])  # fmt: skip
    first, second = (datasets.load_from_disk(str(tmp_path / name))["test"] for name in ("first", "second"))
    assert [row["bytes"] for row in first.cast_column("image", datasets.Image(decode=False))["image"]] == [
        row["bytes"] for row in second.cast_column("image", datasets.Image(decode=False))["image"]
    ]
    said = words_of(c for five in second["caption"] for c in five)
    assert said & attribute_words(synthetic_captions.SECOND_UNSEEN_WORDS)
    assert not said & attribute_words(synthetic_captions.UNSEEN_WORDS)
