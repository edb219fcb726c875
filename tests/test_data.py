"""Loading every supported layout, schema errors that name the flag, bad-row accounting, and epoch sampling."""

import datasets
import pytest
import torch

from crossmodal.config import PRESETS
from crossmodal.data.dataset import (
    BadDataError,
    DataSource,
    DataUnavailableError,
    SchemaError,
    caption_table,
    check_rows,
    clean_captions,
    load_splits,
)
from crossmodal.synthetic import dataset as synthetic
from crossmodal.training.augment import TrainAugment
from crossmodal.training.pairs import EpochShuffle, TrainPairs
from tests.conftest import corrupt_images

SCHEMA = ["image", "caption", "split", "img_id", "filename"]


def assert_schema(splits, sizes=(256, 32, 32)):
    assert list(splits) == ["train", "val", "test"]
    for (name, split), size in zip(splits.items(), sizes, strict=True):
        assert split.column_names == SCHEMA
        assert len(split) == size
        assert set(split["split"]) == {name}
        assert split.features["image"].decode is False  # decoded later, in loader workers


def test_load_save_to_disk_folder(small_dataset):
    assert_schema(load_splits(DataSource(str(small_dataset))))


def test_load_parquet_folder(tmp_path):
    synthetic.save(synthetic.generate(20, 4, 4, image_size=(32, 32)), tmp_path, fmt="parquet")
    assert_schema(load_splits(DataSource(str(tmp_path))), sizes=(20, 4, 4))


def test_one_split_with_split_column(tmp_path, small_dataset):
    """Like nlphuji/flickr30k at refs/convert/parquet: every row in one split, Karpathy split in a column."""
    everything = datasets.concatenate_datasets(list(datasets.load_from_disk(str(small_dataset)).values()))
    everything.shuffle(seed=0).save_to_disk(str(tmp_path / "one"))
    assert_schema(load_splits(DataSource(str(tmp_path / "one"))))


def test_validation_split_and_renamed_columns(tmp_path, small_dataset):
    splits = datasets.load_from_disk(str(small_dataset))
    renamed = datasets.DatasetDict({"train": splits["train"], "dev_set": splits["val"], "test": splits["test"]})
    renamed = renamed.rename_columns({"caption": "sentences", "image": "photo"}).remove_columns(["split"])
    renamed.save_to_disk(str(tmp_path / "renamed"))
    source = DataSource(
        str(tmp_path / "renamed"), image_column="photo", caption_column="sentences", val_split="dev_set"
    )
    assert_schema(load_splits(source))


def test_validation_split_name_is_recognised(tmp_path, small_dataset):
    splits = datasets.load_from_disk(str(small_dataset))
    datasets.DatasetDict({"train": splits["train"], "validation": splits["val"], "test": splits["test"]}).save_to_disk(
        str(tmp_path / "v")
    )
    assert_schema(load_splits(DataSource(str(tmp_path / "v"))))


@pytest.mark.parametrize(
    "rename,flag",
    [({"caption": "sentences"}, "--caption-column"), ({"image": "photo"}, "--image-column")],
)
def test_missing_column_names_the_flag(tmp_path, small_dataset, rename, flag):
    datasets.load_from_disk(str(small_dataset)).rename_columns(rename).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(SchemaError, match=f"no column '{next(iter(rename))}'.*{flag} NAME"):
        load_splits(DataSource(str(tmp_path / "d")))


def test_one_caption_per_row_is_refused(tmp_path, small_dataset):
    splits = datasets.load_from_disk(str(small_dataset))
    flat = splits.map(lambda row: {"caption": row["caption"][0]})
    flat.save_to_disk(str(tmp_path / "flat"))
    with pytest.raises(SchemaError, match="list of captions per image"):
        load_splits(DataSource(str(tmp_path / "flat")))


def test_missing_split_is_refused(tmp_path, small_dataset):
    splits = datasets.load_from_disk(str(small_dataset))
    datasets.DatasetDict({"train": splits["train"]}).remove_columns("split").save_to_disk(str(tmp_path / "t"))
    with pytest.raises(SchemaError, match="no 'split' column"):
        load_splits(DataSource(str(tmp_path / "t")))


def test_missing_path_is_treated_as_a_hub_id_and_fails_offline():
    with pytest.raises(DataUnavailableError, match=r"no local folder has that name.*python -m crossmodal synthetic"):
        load_splits(DataSource("no-such-owner/no-such-dataset"))


def test_one_percent_bad_images_are_skipped_and_reported(tmp_path, small_dataset):
    broken = corrupt_images(small_dataset, tmp_path / "bad1", fraction=0.01)
    kept, report = check_rows(load_splits(DataSource(str(tmp_path / "bad1"))), max_bad_fraction=0.04)
    assert sum(report.bad.values()) == broken == 3 + 1 + 1  # rows 0, 100, 200 of train; row 0 of val and test
    assert len(kept["train"]) == 256 - 3
    assert "corrupt or truncated" in report.examples[0]


def test_one_percent_passes_and_five_percent_aborts(tmp_path, full_dataset):
    corrupt_images(full_dataset, tmp_path / "bad1", fraction=0.01)
    kept, report = check_rows(load_splits(DataSource(str(tmp_path / "bad1"))), max_bad_fraction=0.01)
    assert report.bad == {"train": 10, "val": 1, "test": 1}
    assert [len(kept[name]) for name in kept] == [990, 99, 99]
    corrupt_images(full_dataset, tmp_path / "bad5", fraction=0.05)
    with pytest.raises(BadDataError, match=r"50 of 1000 rows of the train split \(5.0%\) are unusable"):
        check_rows(load_splits(DataSource(str(tmp_path / "bad5"))), max_bad_fraction=0.01)


def test_rows_without_captions_are_skipped(tmp_path, small_dataset):
    splits = datasets.load_from_disk(str(small_dataset))
    emptied = splits.map(lambda row, i: {"caption": ["  ", ""] if i == 3 else row["caption"]}, with_indices=True)
    emptied.save_to_disk(str(tmp_path / "e"))
    _kept, report = check_rows(load_splits(DataSource(str(tmp_path / "e"))), max_bad_fraction=0.05)
    assert report.bad["train"] == 1 and "no non-empty caption" in report.examples[0]
    assert clean_captions([" a dog ", "", None, 3, "b"]) == ["a dog", "b"]


def test_epoch_sampling_is_deterministic_and_one_caption_per_image(small_dataset):
    splits = load_splits(DataSource(str(small_dataset)))
    config = PRESETS["tiny"].model
    pairs = TrainPairs(splits["train"], TrainAugment(config), seed=7)
    first = [pairs[i] for i in range(8)]
    again = [pairs[i] for i in range(8)]
    for (image_a, caption_a), (image_b, caption_b) in zip(first, again, strict=True):
        assert torch.equal(image_a, image_b) and caption_a == caption_b  # fixed by (seed, epoch, row)
    assert first[0][0].shape == (3, config.image_size, config.image_size)
    captions_by_epoch = []
    for epoch in range(4):
        pairs.set_epoch(epoch)
        captions_by_epoch.append([pairs[i][1] for i in range(8)])
    assert len({tuple(c) for c in captions_by_epoch}) > 1  # other epochs draw other captions
    own_captions = splits["train"][:8]["caption"]
    assert all(caption in own_captions[i] for epoch in captions_by_epoch for i, caption in enumerate(epoch))

    sampler = EpochShuffle(256, seed=7)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert sorted(orders[-1]) == list(range(256))  # every image exactly once: no image twice in a batch
    assert orders[0] != orders[1]
    sampler.set_epoch(0)
    assert list(sampler) == orders[0]


def test_caption_table_flattens_in_row_order(small_dataset):
    split = load_splits(DataSource(str(small_dataset)))["val"]
    captions, image_index = caption_table(split, image_offset=10)
    assert len(captions) == 5 * len(split)
    assert image_index[:6] == [10, 10, 10, 10, 10, 11]
    assert captions[5] == split[1]["caption"][0]
