"""The throughput benchmarks measure what they say: their fast paths compute what the plain ones do, and they fail
loudly when a target is missed. Nothing here is timed (DESIGN 7)."""

import copy

import pytest
import torch

from benchmarks import index_throughput, train_throughput
from benchmarks.train_throughput import batch_on_device, build_bench
from crossmodal.data import EpochShuffle
from crossmodal.train import TrainBatcher, train_step

TINY_FAST = ["--preset", "tiny", "--mixed-precision", "no", "--num-workers", "0", "--rounds", "1"]


def bench(tmp_path, **kwargs):
    return build_bench("tiny", 8, batches=2, num_workers=0, mixed_precision="no", workdir=tmp_path, **kwargs)


def snapshot(bench) -> dict:
    return {
        "model": copy.deepcopy(bench.model.state_dict()),
        "optimizer": copy.deepcopy(bench.optimizer.state_dict()),
        "scheduler": copy.deepcopy(bench.scheduler.state_dict()),
    }


def restore(bench, state: dict) -> None:
    bench.model.load_state_dict(state["model"])
    bench.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    bench.scheduler.load_state_dict(state["scheduler"])


def test_floor_and_end_to_end_steps_are_train_step_on_the_same_batch(tmp_path):
    """From the same weights on the same first batch, the floor step, the end-to-end step and a plain train_step (on
    the batch TrainPairs + TrainBatcher give) end with the same loss and the same weights."""
    one = bench(tmp_path)
    start = snapshot(one)
    losses, after = {}, {}
    losses["end-to-end"] = one.end_to_end_step(next(iter(one.loader)))
    after["end-to-end"] = snapshot(one)["model"]

    restore(one, start)
    losses["floor"] = one.step(batch_on_device(one))
    after["floor"] = snapshot(one)["model"]

    restore(one, start)
    dataset = one.loader.dataset
    first_batch = list(EpochShuffle(len(dataset), dataset.seed))[:8]  # epoch 0's order
    plain = TrainBatcher(one.loader.collate_fn.captions.tokenizer, one.model_config)([dataset[i] for i in first_batch])
    losses["plain"] = train_step(one.accelerator, one.model, one.optimizer, one.scheduler, plain, one.max_grad_norm)
    expected = snapshot(one)["model"]

    assert losses["end-to-end"] == losses["floor"] == losses["plain"]
    assert any(not torch.equal(expected[name], start["model"][name]) for name in expected)  # the step did update
    for path in ("end-to-end", "floor"):
        for name, tensor in after[path].items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=f"{path}: {name}")


def test_the_device_decode_path_trains_on_the_same_step(tmp_path):
    """--decode-on-device: the loader batch carries JPEG bytes, decoded and cropped in the step's process."""
    on_device = bench(tmp_path, decode_on_device=True)
    batch = next(iter(on_device.loader))
    assert "images" in batch
    ready = on_device.device_batch(batch)
    assert ready["pixel_values"].shape == (8, 3, 64, 64)
    assert torch.isfinite(torch.tensor(on_device.end_to_end_step(batch)))


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_index_real_path_equals_the_bare_encoders(tmp_path, decode_on_device):
    index = index_throughput.build_index_bench(
        "tiny", 12, 5, 0, "no", decode_on_device=decode_on_device, workdir=tmp_path
    )
    images, captions = index.real_images(), index.real_captions()
    assert images.shape == (12, 128) and captions.shape == (60, 128)
    torch.testing.assert_close(images, index.floor_images(index.image_batches()), rtol=0, atol=1e-6)
    torch.testing.assert_close(captions, index.floor_captions(index.caption_batches()), rtol=0, atol=1e-6)


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_train_throughput_exits_1_on_a_missed_target_and_ends_with_the_ratio(capsys):
    argv = [*TINY_FAST, "--batch-size", "8", "--steps", "1", "--warmup", "0"]
    assert train_throughput.main([*argv, "--target-ratio", "1000"]) == 1
    line = last_line(capsys)
    assert line.startswith("ratio end-to-end / floor: ") and line.endswith("(target >= 1000): MISSED")
    assert train_throughput.main([*argv, "--target-ratio", "0"]) == 0
    assert last_line(capsys).endswith("(target >= 0): met")


def test_index_throughput_exits_1_on_a_missed_target_and_ends_with_the_ratios(capsys):
    argv = [*TINY_FAST, "--batch-size", "4", "--images", "8"]
    assert index_throughput.main([*argv, "--target-ratio", "1000"]) == 1
    output = capsys.readouterr().out.strip().splitlines()
    assert output[0].startswith("machine: device cpu")
    assert output[-1].startswith("ratio real / floor: images ") and output[-1].endswith("MISSED")
    assert any(line.startswith("projected Flickr30k corpus") for line in output)
