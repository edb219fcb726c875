"""The training loop in one process: resume, checkpoints cut short, non-finite losses, SIGTERM, the real architecture.

Two processes: tests/test_two_processes.py.
"""

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from crossmodal.config import PRESETS
from crossmodal.data.dataset import DataSource
from crossmodal.training import checkpoint
from crossmodal.training import loop as train_module
from crossmodal.training.loop import train
from crossmodal.training.prepare import make_accelerator
from crossmodal.training.state import TrainingAborted
from tests.conftest import ROOT, SUBPROCESS_ENV, corrupt_images, run_cli

TINY = PRESETS["tiny"]
# 256 training images / 32 = 8 steps an epoch; no loader workers: in-process tests stay light.
FAST = dataclasses.replace(TINY.train, epochs=2, batch_size=32, checkpoint_every=3, num_workers=0, log_every=1)


def run(tmp_path, dataset, train_config=FAST, model_config=TINY.model, **kwargs):
    accelerator = make_accelerator(train_config, tmp_path)
    return train(accelerator, model_config, train_config, DataSource(str(dataset)), tmp_path, **kwargs)


def weights(path):
    return load_file(path / "model.safetensors")


def test_resume_mid_epoch_ends_with_the_same_weights(tmp_path, small_dataset):
    straight = run(tmp_path / "straight", small_dataset)
    assert straight.state.global_step == 16

    interrupted = tmp_path / "interrupted"
    run(interrupted, small_dataset, max_steps=5)  # stops mid-epoch 1; the last checkpoint is step 3
    saved = checkpoint.complete_checkpoints(interrupted / "checkpoints")
    assert [path.name for path in saved] == ["step-00000003"]
    # Two decoys that resume must ignore: a newer folder cut short, and an unfinished temporary folder.
    cut_short = interrupted / "checkpoints" / "step-00000004"
    shutil.copytree(saved[0], cut_short)
    (cut_short / "model.safetensors").write_bytes((cut_short / "model.safetensors").read_bytes()[:1000])
    shutil.copytree(saved[0], interrupted / "checkpoints" / ".tmp-step-00000005")
    assert checkpoint.resolve_resume("latest", interrupted / "checkpoints") == saved[0]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(cut_short), interrupted / "checkpoints")

    resumed = run(interrupted, small_dataset, resume="latest")
    assert resumed.state.global_step == 16
    assert [entry["val"] for entry in resumed.state.history] == [entry["val"] for entry in straight.state.history]
    final = "step-00000016"
    expected, actual = (
        weights(tmp_path / "straight" / "checkpoints" / final),
        weights(interrupted / "checkpoints" / final),
    )
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    assert resumed.metrics == straight.metrics


def poison_loss(monkeypatch, is_nan):
    """Make the real loss NaN on the calls (1, 2, ...) for which ``is_nan(call)`` holds."""
    real_loss = train_module.clip_loss
    calls = iter(range(1, 10**6))

    def loss(*args):
        value = real_loss(*args)
        return value * float("nan") if is_nan(next(calls)) else value

    monkeypatch.setattr(train_module, "clip_loss", loss)


def test_a_nan_loss_skips_the_step(tmp_path, small_dataset, monkeypatch):
    poison_loss(monkeypatch, lambda call: call == 3)
    result = run(tmp_path, small_dataset, train_config=dataclasses.replace(FAST, epochs=1))
    assert result.state.skipped_steps == 1
    assert result.state.global_step == 7  # 8 batches, one skipped
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert all(math.isfinite(loss) for _, loss in result.state.loss_log)


def test_repeated_nan_losses_abort_with_the_last_good_checkpoint_intact(tmp_path, small_dataset, monkeypatch):
    poison_loss(monkeypatch, lambda call: call > 2)
    config = dataclasses.replace(FAST, checkpoint_every=1, max_bad_steps=3)
    with pytest.raises(TrainingAborted, match=r"3 non-finite losses in a row.*step-00000002"):
        run(tmp_path, small_dataset, train_config=config)
    last = checkpoint.complete_checkpoints(tmp_path / "checkpoints")[-1]
    assert last.name == "step-00000002"
    assert all(torch.isfinite(tensor).all() for tensor in weights(last).values())


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path, small_dataset):
    output = tmp_path / "run"
    command = [
        sys.executable, "train_accelerate.py", "--preset", "tiny", "--dataset", str(small_dataset),
        "--output-dir", str(output), "--epochs", "50", "--batch-size", "32", "--num-workers", "0",
        "--checkpoint-every", "100000",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (output / "tokenizer" / "tokenizer.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # into the training steps
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr.decode()[-3000:]
    assert b"rerun with --resume latest" in stdout + stderr
    newest = checkpoint.complete_checkpoints(output / "checkpoints")[-1]
    run_state = json.loads((newest / "state.json").read_text())["run"]
    assert run_state["batches_done"] > 0  # written mid-epoch, at the step after the signal
    assert not (output / "artifacts").exists()  # an interrupted run publishes nothing


def test_default_flickr30k_architecture_trains_one_step_on_cpu(tmp_path, small_dataset):
    """EfficientNet-B0 + MiniLM-L12 built from config (no download), embed dim 512: one real step."""
    model_config = dataclasses.replace(
        PRESETS["flickr30k"].model, image_init="random", text_init="random", embed_dim=512
    )
    train_config = dataclasses.replace(
        PRESETS["flickr30k"].train, batch_size=4, num_workers=0, eval_batch_size=16, log_every=1
    )
    result = run(tmp_path, small_dataset, train_config=train_config, model_config=model_config, max_steps=1)
    assert result.state.global_step == 1
    assert math.isfinite(result.state.loss_log[0][1])
    model = result.model
    assert model.config.embed_dim == 512 and model.image_projection.in_features == 1280
    assert model.text_tower.config.hidden_size == 384 and model.text_tower.config.num_hidden_layers == 12
    assert 3.9e6 < sum(p.numel() for p in model.image_tower.parameters()) < 4.1e6  # EfficientNet-B0 trunk: 4.0M
    encoder_parameters = sum(p.numel() for p in model.text_tower.encoder.parameters())
    assert 21.2e6 < encoder_parameters < 21.4e6  # MiniLM-L12's 12 layers; its vocabulary was fit on our captions
    model.train()
    batch_norms = [m for m in model.image_tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and not any(m.training for m in batch_norms)  # statistics frozen
    assert set(result.metrics["test"]) >= {"i2t_R@1", "t2i_R@10", "rsum"}


def test_a_dataset_with_one_percent_broken_images_trains_and_reports_them(tmp_path, full_dataset):
    corrupt_images(full_dataset, tmp_path / "data", fraction=0.01)
    result = run_cli(
        sys.executable, "train_accelerate.py", "--preset", "tiny", "--dataset", tmp_path / "data",
        "--output-dir", tmp_path / "run", "--max-steps", "2", "--num-workers", "0",
    )  # fmt: skip
    assert "train: 10/1000 skipped; val: 1/100 skipped; test: 1/100 skipped" in result.stdout
    assert "corrupt or truncated" in result.stdout
    manifest = json.loads((tmp_path / "run" / "artifacts" / "manifest.json").read_text())
    assert manifest["counts"]["images_per_split"] == {"train": 990, "val": 99, "test": 99}


def test_a_dataset_with_five_percent_broken_images_is_refused(tmp_path, full_dataset):
    corrupt_images(full_dataset, tmp_path / "data", fraction=0.05)
    command = [sys.executable, "train_accelerate.py", "--preset", "tiny", "--dataset", str(tmp_path / "data")]
    result = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "50 of 1000 rows of the train split (5.0%) are unusable, more than the 1% tolerated" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
