"""Shared fixtures: generated datasets on disk and one real tiny training run through the CLI."""

from __future__ import annotations

import os

# Offline before anything imports huggingface_hub or datasets (they read these once, at import): no test may wait on
# a network that is not there.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from crossmodal import synthetic
from tests.live_server import start_app

ROOT = Path(__file__).resolve().parents[1]

# Subprocesses (accelerate launch, the CLIs) must find the package and stay offline like the tests themselves.
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
}


def run_cli(*args: str | Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command as a user would; fail the test with its output if it fails."""
    command = [str(arg) for arg in args]
    result = subprocess.run(
        command, cwd=ROOT, env=env or SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def accelerate_command(num_processes: int) -> list[str]:
    """`accelerate launch`, with two CPU processes when asked (ACCELERATE_USE_CPU=true in the env)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes == 1:
        return [
            *launcher,
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    return [
        *launcher, "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A few hundred generated pairs on disk: enough for a handful of steps, quick to decode."""
    folder = tmp_path_factory.mktemp("small_dataset")
    synthetic.save(synthetic.generate(num_train=256, num_val=32, num_test=32, image_size=(72, 72), seed=1), folder)
    return folder


@pytest.fixture(scope="session")
def full_dataset(tmp_path_factory) -> Path:
    """The default generated dataset (1000/100/100 at 96 px), as README's quick start makes it."""
    folder = tmp_path_factory.mktemp("full_dataset")
    run_cli(sys.executable, "-m", "crossmodal.synthetic", "--out", folder)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, full_dataset) -> Path:
    """One full `tiny` training run through `accelerate launch`, shared by the end-to-end and artifact tests."""
    output = tmp_path_factory.mktemp("tiny_run")
    run_cli(
        *accelerate_command(1), "train_accelerate.py", "--preset", "tiny", "--dataset", full_dataset,
        "--output-dir", output,
    )  # fmt: skip
    return output / "artifacts"


def corrupt_images(source: Path, destination: Path, fraction: float) -> int:
    """Copy a saved dataset, replacing ``fraction`` of every split's images with undecodable bytes."""
    splits = datasets.load_from_disk(str(source))
    broken = 0

    def damage(row, index):
        nonlocal broken
        if index % round(1 / fraction) == 0:
            broken += 1
            data = row["image"]["bytes"]
            row["image"] = {"bytes": data[: len(data) // 3], "path": row["image"]["path"]}  # truncated JPEG
        return row

    raw = splits.cast_column("image", datasets.Image(decode=False))
    raw.map(damage, with_indices=True).cast_column("image", datasets.Image()).save_to_disk(str(destination))
    return broken


@pytest.fixture(scope="session")
def app_server(tiny_run, tmp_path_factory):
    """The real Gradio server over the tiny run's artifacts, shared by the app, hardening and browser tests."""
    server = start_app(tiny_run, tmp_path_factory.mktemp("app") / "server.log", env=SUBPROCESS_ENV)
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)
