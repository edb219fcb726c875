"""Two CPU processes under `accelerate launch`, through whole epochs: evaluation, the best checkpoint saved and
reloaded, the test split, the artifact folder; and SIGTERM to the launcher, then `--resume latest`."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crossmodal.artifacts.contract import load_verified
from crossmodal.training import checkpoint
from tests.conftest import ROOT, SUBPROCESS_ENV, accelerate_command, run_cli

CPU_ENV = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "true"}
# 256 training images / 32 = 8 steps an epoch, two epochs: the second one's captions and crops differ from the
# first's, so a process that never moved to epoch 2's choices trains another model.
TRAIN_FLAGS = ["--preset", "tiny", "--epochs", "2", "--batch-size", "32", "--num-workers", "0"]
STEPS = 16


def train_command(processes: int, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        *accelerate_command(processes), "train_accelerate.py", *TRAIN_FLAGS, "--dataset", str(dataset),
        "--output-dir", str(output), *extra,
    ]  # fmt: skip


def final_name(output: Path) -> str:
    return checkpoint.complete_checkpoints(output / "checkpoints")[-1].name


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "checkpoints" / final_name(output) / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset) -> dict[int, Path]:
    """The same two-epoch run with one process and with two."""
    outputs = {}
    for processes in (1, 2):
        outputs[processes] = tmp_path_factory.mktemp(f"p{processes}")
        run_cli(*train_command(processes, small_dataset, outputs[processes]), env=CPU_ENV)
    return outputs


def test_two_processes_write_a_complete_artifact_folder(runs):
    output = runs[2]
    artifacts = load_verified(output / "artifacts")  # checksums, weights vs config, golden self-test
    run_state = json.loads((output / "checkpoints" / final_name(output) / "state.json").read_text())["run"]
    assert [entry["epoch"] for entry in run_state["history"]] == [1, 2]  # both epochs evaluated on val
    assert run_state["best_epoch"] in (1, 2)
    best = load_file(output / "best" / "model.safetensors")  # what was reloaded for the test split
    for name, tensor in artifacts.model.state_dict().items():
        torch.testing.assert_close(tensor, best[name], rtol=0, atol=0, msg=name)
    stored = json.loads((output / "artifacts" / "metrics.json").read_text())
    evaluated = json.loads(
        run_cli(sys.executable, "-m", "crossmodal", "evaluate", "--artifacts", output / "artifacts").stdout
    )
    assert evaluated == pytest.approx(stored["test"], abs=1.0)  # float16 storage may swap a near-tie


def test_two_processes_train_like_one(runs):
    """Same global batches, same gradients: 2 CPU processes end both epochs with the weights of 1 process."""
    one, two = final_weights(runs[1]), final_weights(runs[2])
    assert final_name(runs[1]) == final_name(runs[2]) == f"step-{STEPS:08d}"
    assert one.keys() == two.keys()
    for name in one:
        # Gradients agree to float32 rounding (test_loss); Adam divides by sqrt(v), which magnifies that rounding
        # for tiny gradients, so allow a fifth of one full step (lr 5e-4) rather than bit equality (measured: 4e-7).
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4, msg=name)
    one_metrics, two_metrics = (json.loads((run / "artifacts/metrics.json").read_text()) for run in (runs[1], runs[2]))
    for split in ("val", "test"):
        # 32 images, 160 captions: one swapped near-tie moves an image-query Recall by 3.1 points
        assert two_metrics[split] == pytest.approx(one_metrics[split], abs=3.2), split


def test_sigterm_to_the_launcher_then_resume_ends_like_an_uninterrupted_run(runs, small_dataset, tmp_path):
    output = tmp_path / "interrupted"
    launcher = subprocess.Popen(
        train_command(2, small_dataset, output, "--checkpoint-every", "1"),
        cwd=ROOT,
        env=CPU_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not (output / "checkpoints" / "step-00000002").is_dir():  # renamed into place once complete
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # what a scheduler's pre-emption sends
    log, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0, log[-3000:]
    assert "rerun with --resume latest" in log, log[-3000:]
    assert not (output / "artifacts").exists()
    newest = checkpoint.complete_checkpoints(output / "checkpoints")[-1]
    interrupted_at = json.loads((newest / "state.json").read_text())
    assert 2 <= interrupted_at["run"]["global_step"] < STEPS, interrupted_at["run"]
    assert interrupted_at["num_processes"] == 2

    resumed = run_cli(*train_command(2, small_dataset, output, "--resume", "latest"), env=CPU_ENV)
    assert f"resumed from {output / 'checkpoints'}" in resumed.stdout + resumed.stderr
    expected, actual = final_weights(runs[2]), final_weights(output)
    assert final_name(output) == f"step-{STEPS:08d}"
    for name in expected:  # the same processes replaying the same batches: the same arithmetic, bit for bit
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    uninterrupted = json.loads((runs[2] / "artifacts/metrics.json").read_text())
    assert json.loads((output / "artifacts/metrics.json").read_text()) == uninterrupted


def test_a_locked_image_tower_trains_its_head_in_two_processes_like_in_one(small_dataset, tmp_path):
    """--lock-image-tower: each process encodes its share of the pictures once, Accelerate gathers them all, and the
    global batches of cached features train the head as one process does (crossmodal/training/locked.py)."""
    weights = {}
    for processes in (1, 2):
        output = tmp_path / f"p{processes}"
        run_cli(*train_command(processes, small_dataset, output, "--lock-image-tower", "--epochs", "1"), env=CPU_ENV)
        weights[processes] = final_weights(output)
    for name in weights[1]:
        if name.startswith("image_tower."):
            assert torch.equal(weights[2][name], weights[1][name]), name  # locked: the seeded init, untouched
        torch.testing.assert_close(weights[2][name], weights[1][name], rtol=0, atol=1e-4, msg=name)
