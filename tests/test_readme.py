"""Every shell command README shows is run here as README writes it, or checked against what runs it.

`COMMANDS` lists them, each with how it is checked; `test_readme_shows_exactly_the_tested_commands` fails when README
gains, loses or changes a command that this file does not, and the reverse. The commands run in a sandbox laid out
like a fresh clone (tests/readme.py), in the order a new user meets them: the demo first (conftest's `demo_run`),
whose data/ and runs/tiny/ the later ones use.
"""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
from gradio_client import Client, handle_file
from huggingface_hub import SpaceCard

import push_to_hub
from crossmodal.artifacts.contract import load_verified
from tests.conftest import SHA
from tests.readme import (
    DEMO,
    INDEX_PICTURES,
    INSTALL_PINNED,
    README,
    ROOT,
    SERVE_PICTURES,
    TRAIN_TINY,
    readme_commands,
    script_commands,
)

INSTALL = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && source .venv/bin/activate"
GENERATE = "python -m crossmodal synthetic --out data/synthetic"
TRAIN_DEMO = "accelerate launch train_accelerate.py --preset demo --dataset data/synthetic --output-dir runs/demo"
EVALUATE_DEMO = "python -m crossmodal evaluate --artifacts runs/demo/artifacts"
SERVE = "python app.py --artifacts runs/demo/artifacts"
EVALUATE = "python -m crossmodal evaluate --artifacts runs/tiny/artifacts"
PYTEST = "python -m pytest -q"
TEST_SCRIPT = "bash scripts/test.sh"
ACCELERATE_CONFIG = "accelerate config"
TRAIN_FLICKR = "accelerate launch train_accelerate.py --preset flickr30k --output-dir runs/flickr30k"
TRAIN_TWO_PROCESSES = (
    "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train_accelerate.py --preset tiny "
    "--dataset data/synthetic --output-dir runs/ddp --epochs 2"
)
EVALUATE_FROM_DATA = (
    "python -m crossmodal evaluate --artifacts runs/tiny/artifacts --dataset data/synthetic --split test"
)
SHARDS = "python -m crossmodal synthetic --format webdataset --train 2000 --shard-size 500 --out data/shards"
TRAIN_STREAMED = (
    "accelerate launch train_accelerate.py --preset tiny --train-data 'data/shards/{00000..00003}.tar' "
    "--dataset data/synthetic --output-dir runs/streamed --epochs 1"
)
CC3M_FLAGS = (
    "train_accelerate.py --preset flickr30k --output-dir runs/cc3m --train-data "
    "'hf://datasets/pixparse/cc3m-wds/cc3m-train-*.tar' --train-num-samples 2900000"
)
TRAIN_CC3M = f"accelerate launch {CC3M_FLAGS}"
TRAIN_MACHINES = (
    "accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 --main_process_ip 10.0.0.1 "
    f"--main_process_port 29500 {CC3M_FLAGS}"
)
PUSH = (
    "python push_to_hub.py --artifacts runs/flickr30k/artifacts --repo-id your-name/crossmodal-flickr30k "
    "--space-readme README.md"
)
CREATE_SPACE = "hf repos create your-name/crossmodal --repo-type space --space-sdk gradio"
PUSH_SPACE = "git remote add space <the Space's git URL> && git push space main"
BENCHMARKS = [
    "python -m benchmarks.query_latency",
    "python -m benchmarks.train_throughput",
    "python -m benchmarks.index_throughput",
    "python -m benchmarks.load_test",
    "python -m benchmarks.tiny_end_to_end",
    "python -m benchmarks.twins --artifacts runs/demo/artifacts",
]

COMMANDS = {
    DEMO: "run as typed: test_the_demo_trains_and_serves (conftest's demo_run)",
    INSTALL_PINNED: "scripts/demo.sh runs it; and as typed by conftest's `minilm` (tests/test_pinned_text_tower.py)",
    TRAIN_DEMO: "scripts/demo.sh runs it: test_the_typed_quick_start_is_what_the_demo_runs",
    EVALUATE_DEMO: "scripts/demo.sh runs it: test_the_demo_trains_and_serves",
    TEST_SCRIPT: ".ci/run runs it: test_ci_runs_the_test_script",
    INSTALL: "scripts/setup.sh runs it for the demo and .ci/run: test_setup_installs_as_readme_says",
    GENERATE: "scripts/demo.sh runs it: test_the_typed_quick_start_is_what_the_demo_runs",
    TRAIN_TINY: "run as typed: conftest's `tiny_run`, which the end-to-end, artifact, hub and app tests share",
    EVALUATE: "run as typed: test_evaluate_reproduces_metrics_json",
    SERVE: "scripts/demo.sh runs it and answers queries: test_the_demo_trains_and_serves",
    PYTEST: "scripts/test.sh runs it: test_ci_runs_the_test_script",
    ACCELERATE_CONFIG: "interactive (accelerate's questionnaire): test_accelerate_config_exists",
    TRAIN_FLICKR: "run as typed, offline: test_the_flickr30k_command_offline_names_the_dataset_and_stops",
    TRAIN_TWO_PROCESSES: "run as typed: test_the_two_process_command_trains_and_writes_a_verified_folder",
    EVALUATE_FROM_DATA: "run as typed: test_evaluate_reproduces_metrics_json",
    SHARDS: "run as typed: test_the_streamed_command_trains_on_shards",
    TRAIN_STREAMED: "run as typed: test_the_streamed_command_trains_on_shards",
    TRAIN_CC3M: "needs the Hub; its flags are checked: test_the_hub_and_machine_commands_take_flags_that_exist",
    TRAIN_MACHINES: "needs machines; its flags are checked: test_the_hub_and_machine_commands_take_flags_that_exist",
    PUSH: "run as typed against the mocked HfApi: test_the_push_command_publishes_and_pins_the_readme",
    CREATE_SPACE: "needs the Hub; its flags are checked: test_the_space_is_created_with_flags_hf_knows",
    PUSH_SPACE: "a placeholder for the user's Space URL, and the Hub: not run",
    INDEX_PICTURES: "run as typed, with HOME a folder the test fills: conftest's `pictures_run`",
    SERVE_PICTURES: "run as typed, queried, then Ctrl-C: test_your_own_pictures_are_indexed_and_served",
    **{command: "its --help runs: test_benchmark_commands_parse" for command in BENCHMARKS},
}


def test_readme_shows_exactly_the_tested_commands():
    shown = readme_commands()
    assert len(shown) == len(set(shown))
    assert set(shown) - set(COMMANDS) == set(), "README shows commands no test runs: add them to COMMANDS"
    assert set(COMMANDS) - set(shown) == set(), "tests run commands README no longer shows"


# --- the quick start --------------------------------------------------------------------------------------------


def test_the_typed_quick_start_is_what_the_demo_runs():
    typed = readme_commands()
    start = typed.index(INSTALL)
    quick_start = [INSTALL, INSTALL_PINNED, GENERATE, TRAIN_DEMO, EVALUATE_DEMO, SERVE, PYTEST]
    assert typed[start : start + len(quick_start)] == quick_start  # README's order
    assert script_commands(ROOT / "scripts" / "demo.sh") == quick_start[1:-1]


def test_setup_installs_as_readme_says():
    install = INSTALL.removesuffix(" && source .venv/bin/activate")  # the script puts .venv/bin on PATH instead
    assert install in script_commands(ROOT / "scripts" / "setup.sh")


def test_ci_runs_the_test_script():
    assert script_commands(ROOT / ".ci" / "run")[-1] == TEST_SCRIPT
    assert f'{PYTEST} "$@"' in script_commands(ROOT / "scripts" / "test.sh")


def test_the_demo_trains_and_serves(demo_run):
    """`bash scripts/demo.sh`: data, training, metrics, then the app answering held-out captions until Ctrl-C."""
    assert "test: i2t_R@1" in demo_run.log and '"t2i_R@1"' in demo_run.log  # training's and evaluate's reports
    found = []
    for (caption, image_id), answer in zip(demo_run.queries, demo_run.answer, strict=True):
        assert [hit["rank"] for hit in answer] == list(range(1, 11)), caption
        found.append(image_id in [hit["image_id"] for hit in answer])
    assert sum(found) >= 4, list(zip(demo_run.queries, found, strict=True))  # R@10 is ~100% on this test split
    assert demo_run.exit_code == 0, demo_run.log[-3000:]
    assert "Traceback" not in demo_run.log
    assert "interrupted: closing the server" in demo_run.log


def test_evaluate_reproduces_metrics_json(readme_sandbox, tiny_run):
    stored = json.loads((tiny_run / "metrics.json").read_text())["test"]
    for command in (EVALUATE, EVALUATE_FROM_DATA):
        evaluated = json.loads(readme_sandbox.run(command).stdout)
        # metrics.json scores the float32 embeddings training computed; the folder stores them in float16. Rounding
        # may at most swap a near-tie: one of the 100 test images' queries is 1 point (measured: no change at all).
        assert evaluated == pytest.approx(stored, abs=1.0), command


def test_your_own_pictures_are_indexed_and_served(pictures_run):
    """README's two commands of "Search your own pictures", queried through gradio_client as a user would."""
    assert "8 pictures (8 embedded by this run" in pictures_run.index_output, pictures_run.index_output
    client = Client(pictures_run.server.url, verbose=False, download_files=False)
    _, results = client.predict("a big cat", 5, api_name="/text_to_image")
    assert [hit["rank"] for hit in results] == list(range(1, 6))
    assert all(hit["file_path"] == hit["image_id"] and hit["split"] == "index" for hit in results)

    photo = pictures_run.home / "Pictures" / "work" / "grace_hopper.jpg"
    _, similar = client.predict(handle_file(photo), 3, api_name="/image_to_image")
    assert similar[0]["score"] >= 0.999  # the stored embedding is the one an upload gets
    copies = ["grace_hopper again.jpg", "work/grace_hopper.jpg"]  # the same bytes: one result
    assert sorted([similar[0]["file_path"], *similar[0]["duplicates"]]) == copies
    assert all(hit["file_path"] not in copies for hit in similar[1:])
    _, captions = client.predict(handle_file(photo), 3, api_name="/image_to_text")
    assert len(captions) == 3 and all(hit["image_id"] is None and hit["caption"] for hit in captions)
    report = json.loads((pictures_run.index / "skipped.json").read_text())
    assert [(item["path"], item["reason"][:20]) for item in report["skipped"]] == [
        ("shopping list.txt", "not a supported imag")
    ]


# --- training ---------------------------------------------------------------------------------------------------


def test_accelerate_config_exists(readme_sandbox):
    assert "usage: accelerate <command> [<args>] config" in readme_sandbox.run(f"{ACCELERATE_CONFIG} --help").stdout


def test_the_flickr30k_command_offline_names_the_dataset_and_stops(readme_sandbox):
    """With no Hub to reach, the real recipe's command stops before anything trains and says why and what to do."""
    result = readme_sandbox.run(TRAIN_FLICKR, check=False, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: could not load 'umaru97/flickr30k_train_val_test'" in output
    assert "pass a local save_to_disk or Parquet folder" in output
    assert 'train_accelerate.py", line' not in output  # no traceback of ours (the launcher prints its own)
    assert not (readme_sandbox.root / "runs" / "flickr30k" / "checkpoints").exists()


def test_the_two_process_command_trains_and_writes_a_verified_folder(readme_sandbox, demo_run):
    """README's two-process command on the demo's data: a complete, verified artifact folder whose metrics
    `evaluate` reproduces, well above chance after two epochs. That two processes train what one does is
    tests/test_two_processes.py's (the same global batches, step by step)."""
    readme_sandbox.run(TRAIN_TWO_PROCESSES, timeout=900)
    artifacts = readme_sandbox.root / "runs" / "ddp" / "artifacts"
    load_verified(artifacts)  # checksums, weights against config, embeddings against tables, golden self-test
    two = json.loads((artifacts / "metrics.json").read_text())
    assert json.loads((artifacts / "config.json").read_text())["training"]["epochs"] == 2
    evaluated = json.loads(readme_sandbox.run(f"python -m crossmodal evaluate --artifacts {artifacts}").stdout)
    assert evaluated == pytest.approx(two["test"], abs=1.0)
    assert two["test"]["t2i_R@10"] > 20, two  # chance: 10%


def test_the_streamed_command_trains_on_shards(readme_sandbox, demo_run):
    """README's streamed training on generated shards, after the demo wrote data/synthetic: the shards are counted,
    one epoch of pairs streams through, and the artifact's gallery is the dataset's, not the shards'."""
    readme_sandbox.run(SHARDS)
    result = readme_sandbox.run(TRAIN_STREAMED, timeout=900)
    output = result.stdout + result.stderr
    assert "train data data/shards/{00000..00003}.tar: 4 shards, 2,000 pairs an epoch" in output, output[-3000:]
    assert "1,984 pairs trained on, 0 bad samples skipped (none), 16 left out" in output, output[-3000:]
    artifacts = readme_sandbox.root / "runs" / "streamed" / "artifacts"
    loaded = load_verified(artifacts)
    assert len(loaded.image_embeddings) == 1200  # data/synthetic's 1000 + 100 + 100 pictures
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["train_stream"]["epochs"] == [{"epoch": 1, "pairs": 1984, "bad": {}, "dropped": 16}]
    assert (
        json.loads((artifacts / "manifest.json").read_text())["dataset"]["train_data"]
        == "data/shards/{00000..00003}.tar"
    )


def test_the_hub_and_machine_commands_take_flags_that_exist(readme_sandbox):
    """The CC3M and two-machine commands need the Hub and machines; every flag they pass is one the launcher or
    train_accelerate.py lists."""
    launcher = readme_sandbox.run("accelerate launch --help").stdout
    training = readme_sandbox.run("python train_accelerate.py --help").stdout
    for command in (TRAIN_CC3M, TRAIN_MACHINES):
        words = shlex.split(command)
        script = words.index("train_accelerate.py")
        for flag in (word for word in words[:script] if word.startswith("--")):
            assert flag in launcher, flag
        for flag in (word for word in words[script:] if word.startswith("--")):
            assert flag in training, flag


# --- publishing -------------------------------------------------------------------------------------------------


def test_the_push_command_publishes_and_pins_the_readme(readme_sandbox, demo_run, hf_api_class, api, monkeypatch):
    """README's push, word for word, on an artifact folder where step 1 would have left it, with only HfApi
    mocked: one commit of the verified files, and the sandbox's README pinned to it."""
    published = readme_sandbox.root / "runs" / "flickr30k" / "artifacts"
    shutil.copytree(demo_run.artifacts, published)
    monkeypatch.chdir(readme_sandbox.root)
    program, script, *argv = shlex.split(PUSH)
    assert (program, script) == ("python", "push_to_hub.py")
    assert push_to_hub.main(argv) == 0
    api.create_commit.assert_called_once()
    assert api.create_commit.call_args.kwargs["repo_id"] == "your-name/crossmodal-flickr30k"
    card = SpaceCard.load(readme_sandbox.root / "README.md")
    assert card.data.models == ["your-name/crossmodal-flickr30k"]
    assert card.data.preload_from_hub[0].endswith(f" {SHA}")
    assert SpaceCard.load(README).data.preload_from_hub[0].endswith(" " + "0" * 40)  # the checkout's is untouched


def test_the_space_is_created_with_flags_hf_knows(readme_sandbox):
    command = shlex.split(CREATE_SPACE)
    assert command[:3] == ["hf", "repos", "create"]
    usage = readme_sandbox.run("hf repos create --help").stdout
    for flag in (word for word in command if word.startswith("--")):
        assert flag in usage, flag


# --- benchmarks -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark_usages(readme_sandbox) -> dict[str, str]:
    """Each benchmark command of README with `--help`, as typed, all started at once: each spends its ~7 s importing
    torch and gradio on one core."""
    logs = readme_sandbox.root / "benchmark-usage"
    logs.mkdir(exist_ok=True)
    started = {
        command: readme_sandbox.start(f"{command} --help", logs / f"{index}.txt")
        for index, command in enumerate(BENCHMARKS)
    }
    usages = {}
    for index, (command, process) in enumerate(started.items()):
        assert process.wait(timeout=120) == 0, (logs / f"{index}.txt").read_text()[-3000:]
        usages[command] = (logs / f"{index}.txt").read_text()
    return usages


@pytest.mark.parametrize("command", BENCHMARKS)
def test_benchmark_commands_parse(benchmark_usages, command):
    """Each benchmark takes minutes; here the benchmark itself parses README's command line up to `--help`, and
    every flag README passes must be one its usage lists."""
    module = shlex.split(command)[2]
    usage = benchmark_usages[command]
    assert usage.startswith("usage: "), usage[:500]
    assert module in usage or module.split(".")[-1] in usage
    for flag in (word for word in shlex.split(command) if word.startswith("--")):
        assert flag in usage, flag
