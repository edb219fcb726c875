"""The throughput benchmarks measure what they say: their fast paths compute what the plain ones do, and they fail
loudly when a target is missed. Nothing here is timed (docs/architecture.md, "Measuring")."""

import copy
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import is_compiled_module

from benchmarks import index_throughput, train_throughput
from benchmarks.train_throughput import batches_on_device, build_bench
from crossmodal.encoding.batches import EvalImages
from crossmodal.model.device_decode import EncodedImage
from crossmodal.training.loop import train_step
from crossmodal.training.loss import clip_loss
from crossmodal.training.pairs import EpochShuffle, TrainBatcher

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
    losses["floor"] = one.step(batches_on_device(one, 1)[0])
    after["floor"] = snapshot(one)["model"]

    restore(one, start)
    dataset = one.loader.dataset
    first_batch = list(EpochShuffle(len(dataset), dataset.seed))[:8]  # epoch 0's order
    plain = TrainBatcher(one.loader.collate_fn.captions)([dataset[i] for i in first_batch])
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


def train_steps(bench, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    batches = iter(bench.loader)
    losses = [bench.end_to_end_step(next(batches)) for _ in range(steps)]
    return losses, plain_module(bench).state_dict()


def plain_module(bench) -> torch.nn.Module:
    """The model under Accelerate's wrappers and torch.compile's (whose state_dict names carry a prefix)."""
    return bench.accelerator.unwrap_model(bench.model, keep_torch_compile=False)


def assert_trains_like(candidate, reference, steps: int, atol: float) -> None:
    """From the same weights on the same batches: the same losses and weights, to float rounding (for optimizers;
    a change upstream of AdamW is compared by its gradients, see :func:`assert_same_loss_and_gradients`)."""
    start = copy.deepcopy(plain_module(candidate).state_dict())
    losses, weights = train_steps(candidate, steps)
    expected_losses, expected = train_steps(reference, steps)
    assert any(not torch.equal(weights[name], start[name]) for name in weights)  # the steps did update
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=0, atol=atol)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=atol, msg=name)


def test_fused_adamw_steps_like_foreach_adamw_on_cpu(tmp_path):
    """Training's CUDA optimizer (fused AdamW) runs on CPU too: the same steps, to float rounding."""
    fused = bench(tmp_path / "fused", cuda_options=True)
    fused.device_batch.channels_last = False  # the optimizer alone; channels_last has its own test
    assert fused.optimizer.optimizer.defaults["fused"]
    assert_trains_like(fused, bench(tmp_path / "foreach"), steps=2, atol=1e-6)


def loss_and_gradients(bench, model: torch.nn.Module | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of ``model`` (default: the bench's) on the loader's first batch, without a step."""
    model = model or bench.model
    batch = bench.device_batch(next(iter(bench.loader)))
    model.zero_grad(set_to_none=True)
    loss = clip_loss(*model(**batch))
    loss.backward()
    named = plain_module(bench).named_parameters()  # the same tensors, without torch.compile's name prefix
    return loss.item(), {name: p.grad.clone() for name, p in named if p.grad is not None}


def assert_same_loss_and_gradients(candidate, reference) -> None:
    """To float rounding. Gradients, not weights after a step: AdamW's first steps move every weight by about lr
    whatever its gradient's size, so rounding in a near-zero gradient shows in the weights at the scale of lr."""
    (loss, gradients), (expected_loss, expected) = candidate, reference
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    assert gradients.keys() == expected.keys()
    for name, gradient in gradients.items():
        scale = expected[name].abs().max().item()  # rounding shows relative to a tensor's largest entries
        torch.testing.assert_close(gradient, expected[name], rtol=1e-3, atol=1e-4 * scale + 1e-9, msg=name)


def test_channels_last_inputs_give_the_same_loss_and_gradients_on_cpu(tmp_path):
    """Training's CUDA image layout, here on CPU."""
    cuda_like = bench(tmp_path / "cuda", cuda_options=True)
    pixels = cuda_like.device_batch(next(iter(cuda_like.loader)))["pixel_values"]
    assert pixels.is_contiguous(memory_format=torch.channels_last) and not pixels.is_contiguous()
    assert_same_loss_and_gradients(loss_and_gradients(cuda_like), loss_and_gradients(bench(tmp_path / "plain")))


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process, and an Accelerator made after another keeps the first one's dynamo
    backend; Accelerate's own test cases clear it between tests (AccelerateTestCase), as this does."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_the_compiled_model_computes_what_the_eager_one_does_and_trains(tmp_path, fresh_accelerate_state):
    """--compile (Accelerate's dynamo_backend="inductor", compiled for this CPU): the same loss and gradients as the
    same module run eagerly, and a training step through it."""
    compiled = bench(tmp_path, compile_model=True)
    assert is_compiled_module(compiled.model)
    eager = plain_module(compiled)  # the very parameters the compiled graph runs on
    assert_same_loss_and_gradients(loss_and_gradients(compiled), loss_and_gradients(compiled, eager))
    before = copy.deepcopy(eager.state_dict())
    losses, after = train_steps(compiled, steps=2)
    assert all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(after[name], before[name]) for name in after)


# The device path needs JPEGs eval decoding keeps whole: 500x375 is that for flickr30k's 256 px resize, not tiny's 72.
@pytest.mark.parametrize(("preset", "width", "decode_on_device"), [("tiny", 128, False), ("flickr30k", 512, True)])
def test_index_real_path_equals_the_bare_encoders(tmp_path, preset, width, decode_on_device):
    index = index_throughput.build_index_bench(
        preset, 12, 5, 0, "no", decode_on_device=decode_on_device, workdir=tmp_path
    )
    if decode_on_device:
        assert all(isinstance(item, EncodedImage) for item in EvalImages(index.rows, index.model.config, True))
    images, captions = index.real_images(), index.real_captions()
    assert images.shape == (12, width) and captions.shape == (60, width)
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


def test_index_throughput_folder_path_indexes_a_folder_twice_and_ends_with_the_ratio(capsys):
    """The folder path end to end on a few pictures: the real command runs twice (the second time: up to date)."""
    argv = ["--preset", "tiny", "--mixed-precision", "no", "--folder", "24", "--batch-size", "8"]
    assert index_throughput.main([*argv, "--target-ratio", "1000"]) == 1
    output = capsys.readouterr().out.strip().splitlines()
    assert output[0].startswith("machine: device cpu")
    rows = {line.split("  ")[0]: line for line in output}
    assert "python -m crossmodal index" in rows and "rerun, nothing changed" in rows
    assert output[-2].startswith("rerun / first run: ")
    assert output[-1].startswith("ratio real / floor: pictures ") and output[-1].endswith("MISSED")
