"""The fast training augmentation against the transform it replaces, in workers and on the device."""

import datasets
import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, v2

from crossmodal.config import PRESETS
from crossmodal.data.dataset import DataSource, load_splits
from crossmodal.data.images import decode_image, image_bytes
from crossmodal.encoding.batches import CaptionBatcher, EvalImages
from crossmodal.model.device_decode import EncodedImage, decode_batch, decodes_on_device
from crossmodal.model.preprocess import decode_for_eval, eval_draft_size, eval_transform
from crossmodal.model.tokenizer import fit_wordpiece
from crossmodal.synthetic import dataset as synthetic
from crossmodal.training.augment import CROP_RATIO, CROP_SCALE, TrainAugment, resized_crop_params
from crossmodal.training.pairs import DeviceBatch, TrainBatcher, TrainPairs

TINY = PRESETS["tiny"].model


def torchvision_transform(config) -> v2.Compose:
    """The plain implementation of the training crop: torchvision's RandomResizedCrop with augment.py's parameters."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                config.image_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.image_mean), std=list(config.image_std)),
        ]
    )  # fmt: skip


def reference(image, config, seed: int) -> torch.Tensor:
    """The training crop under a reseeded global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision_transform(config)(image)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    rows = synthetic.generate(6, 1, 1, image_size=(120, 90), seed=3)["train"]
    return [value["bytes"] for value in rows.cast_column("image", datasets.Image(decode=False))["image"]]


@pytest.mark.parametrize("height,width", [(375, 500), (500, 375), (90, 120), (40, 400)])
def test_crop_params_are_torchvision_draws_from_the_seed(height, width):
    for seed in range(20):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = torchvision_transform(TINY).transforms[1].make_params([torch.zeros(3, height, width)])
        generator = torch.Generator().manual_seed(seed)
        assert resized_crop_params(height, width, generator) == tuple(
            expected[k] for k in ("top", "left", "height", "width")
        )


def test_worker_and_device_paths_give_the_reference_pixels(jpegs):
    """At 120x90 no JPEG scaling applies (the draft needs 160 px), so all three paths are pixel-identical."""
    augment = TrainAugment(TINY)
    expected = torch.stack([reference(decode_image(data), TINY, 100 + i) for i, data in enumerate(jpegs)])
    workers = torch.stack([augment.decode(data, 100 + i) for i, data in enumerate(jpegs)])
    assert all(decodes_on_device(data) for data in jpegs)
    items = [EncodedImage(data, 100 + i) for i, data in enumerate(jpegs)]
    items[2] = augment.decode(jpegs[2], 102)  # a row the worker had to decode rides along as pixels
    device = decode_batch(items, augment, torch.device("cpu"))
    assert torch.equal(workers, expected) and torch.equal(device, expected)


def test_large_jpegs_decode_at_a_reduced_scale_without_upsampling():
    data = synthetic.generate(1, 1, 1, image_size=(500, 375))["train"].cast_column(
        "image", datasets.Image(decode=False)
    )
    image = decode_image(data[0]["image"]["bytes"], draft_size=TrainAugment(TINY).draft_size())
    assert image.size == (250, 188)  # DCT scale 1/2: the smallest crop (0.8 x 188) still resizes down to 64 by 2x
    assert TrainAugment(PRESETS["flickr30k"].model).draft_size() == (560, 560)  # 224 px: Flickr JPEGs decode whole
    assert not decodes_on_device(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)


def jpeg_rows(count: int, size: tuple[int, int]) -> datasets.Dataset:
    return synthetic.generate(count, 1, 1, image_size=size, seed=5)["train"].cast_column(
        "image", datasets.Image(decode=False)
    )


def test_eval_images_leave_for_the_device_only_jpegs_it_decodes_as_pillow_does():
    """Eval decoding shrinks a JPEG by DCT scaling once it is over twice the eval resize, which nvjpeg cannot do:
    such a row is decoded by the worker, to the pixels a search query of the same bytes gets."""
    small, large = jpeg_rows(2, (120, 90)), jpeg_rows(2, (600, 450))  # tiny resizes to 72: draft from 144 px a side
    assert eval_draft_size(TINY) == (144, 144)
    assert decode_for_eval(image_bytes(large[0]["image"]), TINY).size == (300, 225)  # 1/2 scale
    assert decode_for_eval(image_bytes(small[0]["image"]), TINY).size == (120, 90)  # whole
    assert all(isinstance(item, EncodedImage) for item in EvalImages(small, TINY, decode_on_device=True))
    on_device = EvalImages(large, TINY, decode_on_device=True)
    for index, item in enumerate(on_device):
        data = image_bytes(large[index]["image"])
        assert decodes_on_device(data) and not decodes_on_device(data, eval_draft_size(TINY))
        assert torch.equal(item, eval_transform(TINY)(decode_for_eval(data, TINY)))


def test_train_pairs_on_the_device_batch_like_in_workers(small_dataset):
    rows = load_splits(DataSource(str(small_dataset)))["train"].select(range(8))
    tokenizer = fit_wordpiece(["a red circle", "a blue square"], vocab_size=64, max_length=TINY.max_text_length)
    augment, collate = TrainAugment(TINY), TrainBatcher(CaptionBatcher(tokenizer, TINY))
    in_workers = collate([TrainPairs(rows, augment, seed=5)[i] for i in range(8)])
    on_device = collate([TrainPairs(rows, augment, seed=5, decode_on_device=True)[i] for i in range(8)])
    assert "images" in on_device and "pixel_values" not in on_device
    ready = DeviceBatch(augment, torch.device("cpu"), channels_last=True)(on_device)
    assert ready["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ready["pixel_values"], in_workers["pixel_values"])
    assert torch.equal(ready["input_ids"], in_workers["input_ids"])
    rng = np.random.default_rng([5, 0, 0])  # TrainPairs' draws for (seed 5, epoch 0, row 0): caption, then crop
    rng.integers(len(rows[0]["caption"]))
    first = decode_image(image_bytes(rows[0]["image"]))
    assert torch.equal(in_workers["pixel_values"][0], reference(first, TINY, int(rng.integers(2**62))))
