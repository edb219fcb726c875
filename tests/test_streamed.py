"""Training pairs streamed from shards (--train-data; crossmodal/data/stream.py, crossmodal/training/streamed.py):
every sample at most once an epoch whatever the processes and workers, the same batches on every topology and
every rerun, hostile samples skipped and counted, and a resumed run ending with the uninterrupted run's weights.

Two processes under `accelerate launch`: the end of this file."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crossmodal.config import PRESETS
from crossmodal.data import stream
from crossmodal.data.dataset import BadDataError, DataSource
from crossmodal.data.shards import ShardError
from crossmodal.data.stream import ShardCorpus, caption_sample
from crossmodal.synthetic.shards import write_webdataset
from crossmodal.training import checkpoint, streamed
from crossmodal.training.augment import TrainAugment
from crossmodal.training.loop import train
from crossmodal.training.prepare import make_accelerator
from crossmodal.training.streamed import StreamedPairs, StreamLoader
from tests.conftest import ROOT, SUBPROCESS_ENV, accelerate_command, run_cli
from tests.test_shards import add, jpeg

TINY = PRESETS["tiny"]
BATCH = 16
# 101 pairs in shards of 10: ten whole shards and one of a single pair, so the shards are uneven.
PAIRS, SHARD_SIZE = 101, 10
FAST = dataclasses.replace(
    TINY.train, epochs=2, batch_size=BATCH, checkpoint_every=2, num_workers=0, log_every=1, stream_slots=4,
    shuffle_buffer=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream")
    write_webdataset(out, PAIRS, SHARD_SIZE, (32, 32), seed=3)
    return out


def spec(shards: Path) -> str:
    return str(shards / "{00000..00010}.tar")


def epoch_keys(corpus: ShardCorpus, processes: int, workers: int, epoch: int = 0, slots: int = 4) -> list[list[str]]:
    """The sample keys of each global batch of ``epoch``, read as ``processes`` x ``workers`` would read them (each
    process's loader run here in turn, its loader workers real), sorted within the batch."""
    accelerator = make_accelerator(FAST, Path("."))
    augment = TrainAugment(TINY.model)
    per_process = []
    for process in range(processes):
        pairs = StreamedPairs(corpus, augment, seed=5, slots=slots, batch_size=BATCH, shuffle_buffer=8,
                              process=process, processes=processes)  # fmt: skip
        loader = StreamLoader(pairs, lambda batch: batch, accelerator, workers=workers, max_bad_fraction=0.5)
        batches = []
        for _ in loader.epoch(epoch, 0):
            batches.append(loader.batch_keys)
        per_process.append(batches)
    # Run in turn, the processes cannot agree on when a slot ran dry (a run's all-reduce does): stop all at the first.
    steps = min(len(batches) for batches in per_process)
    return [sorted(key for batches in per_process for key in batches[step]) for step in range(steps)]


def test_an_epochs_slots_cut_the_shards_into_equal_ranges_in_a_seeded_order(shards):
    corpus = ShardCorpus.open(spec(shards))
    assert corpus.counts == (10,) * 10 + (1,) and corpus.num_samples == PAIRS  # from the stats files
    for epoch in (0, 1):
        pieces = [corpus.segments(5, epoch, 4, slot) for slot in range(4)]
        lengths = [sum(piece.end - piece.first for piece in slot) for slot in pieces]
        assert lengths == [PAIRS // 4] * 4  # 25 each; the 101st sample is the remainder
        positions = [
            (piece.shard, index) for slot in pieces for piece in slot for index in range(piece.first, piece.end)
        ]
        assert len(set(positions)) == len(positions) == 100
    orders = [[piece.shard for piece in corpus.segments(5, epoch, 1, 0)] for epoch in (0, 1)]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # each epoch its own shard order
    assert corpus.segments(5, 0, 1, 0) == ShardCorpus.open(spec(shards)).segments(5, 0, 1, 0)  # and a rerun the same
    assert ShardCorpus.open(spec(shards), num_samples=40).slot_quota(4) == 10


def test_two_processes_by_two_workers_read_every_sample_at_most_once_in_the_batches_one_reader_takes(shards):
    """The exactly-once check: every key of an epoch over 2 processes x 2 loader workers, none twice; the union is
    the corpus less what was reported dropped; and each global batch holds the same pairs as one process with no
    workers takes (the slots, not the topology, decide)."""
    corpus = ShardCorpus.open(spec(shards))
    four_readers, one_reader = epoch_keys(corpus, 2, 2), epoch_keys(corpus, 1, 0)
    assert four_readers == one_reader
    keys = [key for batch in four_readers for key in batch]
    assert len(keys) == len(set(keys)) == 6 * BATCH  # 25 a slot = 6 chunks of 4
    every = {f"{shard:05d}{row:01d}" if shard < 10 else "000100" for shard in range(11) for row in range(10)}
    assert set(keys) <= every and len(every - set(keys)) == PAIRS - 6 * BATCH  # 5 dropped: less than one batch
    assert epoch_keys(corpus, 1, 0, epoch=1) != one_reader  # another epoch, another order


def test_shards_of_unknown_size_share_train_num_samples_and_no_sample_is_read_twice(shards, monkeypatch):
    """Remote tars without stats files (simulated: their size is unknown): refused without --train-num-samples;
    with it, each shard is read as far as its even share, and the one-pair shard leaves its slot short."""
    monkeypatch.setattr(stream, "shard_size", lambda shard: None)
    with pytest.raises(ShardError, match="give the epoch's size with --train-num-samples"):
        ShardCorpus.open(spec(shards))
    corpus = ShardCorpus.open(spec(shards), num_samples=60)
    assert corpus.counts == (6,) * 11 and corpus.num_samples == 60
    keys = [key for batch in epoch_keys(corpus, 2, 2) for key in batch]
    assert len(keys) == len(set(keys)) and 0 < len(keys) <= 60
    assert all(int(key[-1]) < 6 for key in keys)  # never past a shard's share


def hostile_shard(folder: Path) -> Path:
    """Ten good pairs, then each kind of bad sample once (crossmodal/data/shards.py names their reasons)."""
    folder.mkdir()
    shard = folder / "hostile.tar"
    with tarfile.open(shard, "w") as archive:
        for index in range(10):
            add(archive, f"good{index}.jpg", jpeg())
            add(archive, f"good{index}.txt", f"a red square number {index}".encode())
        add(archive, "corrupt.jpg", jpeg()[:200])
        add(archive, "corrupt.txt", b"a cut picture")
        add(archive, "notimage.jpg", b"<html>403 Forbidden</html>")
        add(archive, "notimage.txt", b"a web page")
        add(archive, "nocaption.jpg", jpeg())
        add(archive, "empty.jpg", jpeg())
        add(archive, "empty.txt", b"  \n")
    return shard


def test_hostile_samples_are_skipped_and_counted_by_reason_and_too_many_stop_the_run(tmp_path, monkeypatch):
    corpus = ShardCorpus.open(str(hostile_shard(tmp_path / "shards")))
    assert corpus.num_samples == 14  # counted from the tar's headers: there is no stats file
    accelerator, augment = make_accelerator(FAST, tmp_path), TrainAugment(TINY.model)

    def loader(max_bad_fraction: float) -> StreamLoader:
        pairs = StreamedPairs(corpus, augment, seed=0, slots=1, batch_size=4, shuffle_buffer=1, process=0,
                              processes=1)  # fmt: skip
        return StreamLoader(pairs, lambda batch: batch, accelerator, workers=0, max_bad_fraction=max_bad_fraction)

    tolerant = loader(0.5)
    batches = list(tolerant.epoch(0, 0))
    assert [len(batch) for batch in batches] == [4, 4]  # 10 good pairs: two whole batches, then the slot runs dry
    assert tolerant.bad == Counter({"bad image": 2, "no caption": 1, "empty caption": 1})
    summary = tolerant.epoch_summary(len(batches))
    assert summary == {"pairs": 8, "bad": {"bad image": 2, "no caption": 1, "empty caption": 1}, "dropped": 2}
    monkeypatch.setattr(streamed, "MIN_READ_FOR_BAD_CHECK", 1)  # judge the share from the first sample on
    with pytest.raises(BadDataError, match=r"4 bad samples skipped in 14 read.*more than 1\.0% of samples are bad"):
        list(loader(0.01).epoch(0, 0))


def test_a_truncated_shard_and_a_missing_one(shards, tmp_path):
    with pytest.raises(ShardError, match=r"00011\.tar does not exist"):
        ShardCorpus.open(str(shards / "{00000..00011}.tar"))  # before anything is read
    cut = tmp_path / "00000.tar"
    cut.write_bytes((shards / "00000.tar").read_bytes()[:5000])
    (tmp_path / "00000_stats.json").write_text((shards / "00000_stats.json").read_text())  # it still says 10
    corpus = ShardCorpus.open(str(cut))
    pairs = StreamedPairs(corpus, TrainAugment(TINY.model), seed=0, slots=1, batch_size=2, shuffle_buffer=1,
                          process=0, processes=1)  # fmt: skip
    loader = StreamLoader(pairs, lambda batch: batch, make_accelerator(FAST, tmp_path), workers=0,
                          max_bad_fraction=1.0)  # fmt: skip
    batches = list(loader.epoch(0, 0))
    assert loader.bad["truncated shard"] == 1 and len(batches) < 5


def test_a_tokenizer_is_fit_on_a_bounded_sample_of_the_stream(shards):
    corpus = ShardCorpus.open(spec(shards))
    assert len(caption_sample(corpus, 25)) == 25


def run(output: Path, shards: Path, dataset: Path, train_config=FAST, **kwargs):
    source = DataSource(str(dataset), train_data=spec(shards))
    return train(make_accelerator(train_config, output), TINY.model, train_config, source, output, **kwargs)


def test_resume_mid_epoch_ends_with_the_uninterrupted_runs_weights(shards, small_dataset, tmp_path):
    """A run stopped after step 3 of 12 (its last checkpoint: step 2, as after a SIGKILL) and resumed takes the
    same batches: the same weights, bit for bit, and the same validation figures."""
    straight = run(tmp_path / "straight", shards, small_dataset)
    assert straight.state.global_step == 12  # 6 batches an epoch
    assert straight.metrics["train_stream"]["epochs"][0] == {"epoch": 1, "pairs": 96, "bad": {}, "dropped": 5}
    interrupted = tmp_path / "interrupted"
    run(interrupted, shards, small_dataset, max_steps=3)
    state = json.loads((interrupted / "checkpoints" / "step-00000002" / "state.json").read_text())["run"]
    assert state["stream"]["consumed"] == [8, 8, 8, 8]  # two chunks of 4 from each slot, nothing bad
    resumed = run(interrupted, shards, small_dataset, resume="latest")
    assert [entry["val"] for entry in resumed.state.history] == [entry["val"] for entry in straight.state.history]
    final = "checkpoints/step-00000012/model.safetensors"
    expected, actual = load_file(tmp_path / "straight" / final), load_file(interrupted / final)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


CPU_ENV = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "true"}
FLAGS = ["--preset", "tiny", "--epochs", "2", "--batch-size", str(BATCH), "--num-workers", "0", "--stream-slots",
         "4", "--shuffle-buffer", "8", "--checkpoint-every", "1"]  # fmt: skip


def launch(processes: int, shards: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [*accelerate_command(processes), "train_accelerate.py", *FLAGS, "--train-data", spec(shards),
            "--dataset", str(dataset), "--output-dir", str(output), *extra]  # fmt: skip


def test_two_processes_after_sigterm_resume_exactly_on_two_and_on_one(shards, small_dataset, tmp_path):
    """Two CPU processes, each reading its own slots, interrupted by SIGTERM mid-epoch: resumed on two they end
    with the uninterrupted run's weights bit for bit; resumed on one process (the same four slots, now all read
    by it) they continue the same epoch and end with those weights to float rounding."""
    straight = tmp_path / "straight"
    run_cli(*launch(2, shards, small_dataset, straight), env=CPU_ENV)
    metrics = json.loads((straight / "artifacts" / "metrics.json").read_text())
    assert metrics["train_stream"]["epochs"][1] == {"epoch": 2, "pairs": 96, "bad": {}, "dropped": 5}
    interrupted = tmp_path / "interrupted"
    launcher = subprocess.Popen(launch(2, shards, small_dataset, interrupted), cwd=ROOT, env=CPU_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not (interrupted / "checkpoints" / "step-00000002").is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    log, _ = launcher.communicate(timeout=120)
    assert "rerun with --resume latest" in log, log[-3000:]
    newest = checkpoint.complete_checkpoints(interrupted / "checkpoints")[-1]
    state = json.loads((newest / "state.json").read_text())["run"]
    assert 2 <= state["global_step"] < 6 and state["stream"]["consumed"] == [4 * state["global_step"]] * 4, state
    on_one = tmp_path / "on_one"
    shutil.copytree(interrupted, on_one)
    run_cli(*launch(2, shards, small_dataset, interrupted, "--resume", "latest"), env=CPU_ENV)
    run_cli(*launch(1, shards, small_dataset, on_one, "--resume", "latest"), env=CPU_ENV)
    final = "checkpoints/step-00000012/model.safetensors"
    expected = load_file(straight / final)
    for output, atol in ((interrupted, 0.0), (on_one, 1e-4)):
        actual = load_file(output / final)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=f"{output.name}: {name}")
