"""Indexing your own pictures (crossmodal/index/cli.py): a folder the test writes, indexed by the command a user types,
checked against the serving path, against a from-scratch index, across a SIGTERM and across two processes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from crossmodal.artifacts import hub
from crossmodal.artifacts.contract import INDEX_REPORT, NO_IMAGE, load_verified, verify_files
from crossmodal.index import write as index_write
from crossmodal.index.embed import read_chunks
from crossmodal.index.scan import scan_folder
from crossmodal.index.write import duplicate_groups
from crossmodal.serving.search import Searcher
from tests.conftest import REAL_PHOTOS, ROOT, SUBPROCESS_ENV, accelerate_command, run_cli

GENERATED = 48  # held-out generated pictures, in nested folders, with their captions
# What each hostile file must be reported as (crossmodal/data/images.py's words, crossmodal/index/scan.py's).
HOSTILE_REASONS = {
    "bad/empty.jpg": "the file is empty",
    "bad/notes.txt": "not a supported image",
    "bad/truncated.jpg": "corrupt or truncated",
    "bad/bomb.png": "megapixels",
    "bad/tiny.png": "at least 16 px",
    "bad/outside.jpg": "a symbolic link to a file outside the folder",
}


def index_command(model: Path, images: Path, output: Path, *extra: str) -> list:
    return [sys.executable, "-m", "crossmodal", "index", "--artifacts", model, "--images", images,
            "--output-dir", output, *extra]  # fmt: skip


def write_generated(folder: Path, dataset: Path, count: int) -> dict[str, list[str]]:
    """The first ``count`` test pictures of the generated dataset as JPEG files in nested folders; path -> captions."""
    test = datasets.load_from_disk(str(dataset))["test"].cast_column("image", datasets.Image(decode=False))
    captions = {}
    for row in range(count):
        relative = f"generated/{row % 3}/{'deeper/' * (row % 2)}picture_{row:03d}.jpg"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(test[row]["image"]["bytes"])
        captions[relative] = test[row]["caption"]
    return captions


def write_hostile(folder: Path, outside: Path) -> None:
    bad = folder / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("not a picture")
    (bad / "truncated.jpg").write_bytes(REAL_PHOTOS[0].read_bytes()[:4000])
    Image.new("1", (8000, 6000)).save(bad / "bomb.png")  # 48 MP in a few kB
    Image.new("RGB", (8, 8), "red").save(bad / "tiny.png")
    outside.write_bytes(REAL_PHOTOS[0].read_bytes())
    (bad / "outside.jpg").symlink_to(outside)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, readme_sandbox, tiny_run) -> tuple[Path, dict[str, list[str]]]:
    """Generated pictures, real photographs, duplicates, hostile files, links and a hidden folder; and the captions
    of the generated ones."""
    root = tmp_path_factory.mktemp("own") / "My Pictures"
    captions = write_generated(root, readme_sandbox.root / "data" / "synthetic", GENERATED)
    (root / "photos").mkdir()
    for photo in REAL_PHOTOS:
        shutil.copy(photo, root / "photos" / photo.name)
    shutil.copy(REAL_PHOTOS[0], root / "photos" / "grace_hopper copy.jpg")  # the same bytes twice
    with Image.open(REAL_PHOTOS[0]) as image:  # a smaller re-encoding: a near-duplicate
        image.resize((image.width // 2, image.height // 2)).save(root / "photos" / "grace_hopper_small.jpg", quality=80)
    write_hostile(root, root.parent / "outside.jpg")
    (root / "photos" / "linked_lion.jpg").symlink_to(root / "photos" / "lion.jpg")  # inside: indexed
    (root / "linked_folder").symlink_to(root / "photos", target_is_directory=True)  # never descended into
    (root / ".thumbnails").mkdir()
    shutil.copy(REAL_PHOTOS[0], root / ".thumbnails" / "cached.jpg")
    return root, captions


@pytest.fixture(scope="module")
def index(pictures, tiny_run, tmp_path_factory) -> Path:
    root, _ = pictures
    output = tmp_path_factory.mktemp("index") / "my-index"
    result = run_cli(*index_command(tiny_run, root, output))
    assert "embedded by this run" in result.stdout
    return output


def expected_paths(root: Path) -> list[str]:
    photos = [f"photos/{photo.name}" for photo in REAL_PHOTOS]
    extra = ["photos/grace_hopper copy.jpg", "photos/grace_hopper_small.jpg", "photos/linked_lion.jpg"]
    generated = [path.relative_to(root).as_posix() for path in (root / "generated").rglob("*.jpg")]
    return sorted([*photos, *extra, *generated])


def test_the_index_is_an_artifact_folder_of_every_picture(index, pictures):
    root, _ = pictures
    loaded = load_verified(index)  # every file, shape, and the golden self-test
    table = pq.read_table(index / "images.parquet").to_pydict()
    assert table["filename"] == expected_paths(root) == table["image_id"]
    assert set(table["split"]) == {"index"}
    for row, path in enumerate(table["filename"]):
        data = (root / path).read_bytes()
        assert table["size"][row] == len(data) and table["mtime_ns"][row] == (root / path).stat().st_mtime_ns
        assert table["sha256"][row] == hashlib.sha256(data).hexdigest()
    assert loaded.index["folder"] == "My Pictures" and loaded.index["pictures"] == len(table["filename"])
    assert set(pq.read_table(index / "captions.parquet").column("image_index").to_pylist()) == {NO_IMAGE}
    assert str(root) not in (index / "manifest.json").read_text()  # no local path is published


def test_bad_files_are_reported_with_their_reason_and_nothing_else_is(index):
    report = {item["path"]: item["reason"] for item in json.loads((index / INDEX_REPORT).read_text())["skipped"]}
    assert set(report) == set(HOSTILE_REASONS)
    for path, reason in HOSTILE_REASONS.items():
        assert reason in report[path], (path, report[path])
    assert INDEX_REPORT not in json.loads((index / "manifest.json").read_text())["files"]  # local, never published


def test_each_stored_embedding_is_what_the_app_computes_for_the_file_uploaded(index, pictures):
    root, _ = pictures
    searcher = Searcher(load_verified(index))
    for row, path in enumerate(searcher.filenames):
        uploaded = searcher.encode_image((root / path).read_bytes())
        cosine = float(uploaded @ searcher.image_embeddings[row].float())
        assert cosine >= 0.999, (path, cosine)


def test_text_search_finds_the_generated_pictures_far_above_chance(index, pictures):
    _, captions = pictures
    searcher = Searcher(load_verified(index))
    hits = 0
    for path, texts in captions.items():
        found = [hit.filename for hit in searcher.text_to_image(texts[0], 5)]
        hits += path in found
    chance = 5 / len(searcher.image_ids)
    assert hits / len(captions) >= 5 * chance, (hits, len(captions), chance)


def test_near_duplicates_are_one_result_listing_the_others(index):
    searcher = Searcher(load_verified(index))
    original = searcher.row("photos/grace_hopper.jpg")
    hits = searcher.more_like(original, 10)
    assert not any(hit.filename.startswith("photos/grace_hopper") for hit in hits)  # its whole group left out
    first = searcher.image_to_image(REAL_PHOTOS[0].read_bytes(), 5)[0]
    assert first.filename.startswith("photos/grace_hopper") and first.score > 0.999, first
    assert sorted([first.filename, *first.duplicates]) == [
        "photos/grace_hopper copy.jpg", "photos/grace_hopper.jpg", "photos/grace_hopper_small.jpg",
    ]  # fmt: skip
    assert first.as_json()["file_path"] == first.filename and first.as_json()["duplicates"] == first.duplicates


@pytest.mark.parametrize("scores_at_a_time", [1 << 24, 100], ids=["one block", "blocks of one row"])
def test_duplicate_groups_are_the_connected_components_of_the_threshold_graph(monkeypatch, scores_at_a_time):
    monkeypatch.setattr(index_write, "_DUPLICATE_SCORES", scores_at_a_time)
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(60, 8), dim=1)
    embeddings[10] = embeddings[3]
    embeddings[20] = torch.nn.functional.normalize(embeddings[3] + 0.05 * torch.randn(8), dim=0)
    embeddings[30] = torch.nn.functional.normalize(embeddings[20] + 0.05 * torch.randn(8), dim=0)  # joined via 20
    groups = duplicate_groups(embeddings, 0.99)
    similar = (embeddings @ embeddings.T >= 0.99).numpy()
    component = list(range(60))  # brute force: relabel until nothing changes
    changed = True
    while changed:
        changed = False
        for i, j in zip(*np.nonzero(similar), strict=True):
            low = min(component[i], component[j])
            if component[i] != low or component[j] != low:
                component[i] = component[j] = low
                changed = True
    assert groups == component
    assert groups[10] == groups[20] == groups[30] == 3


def test_a_rerun_with_nothing_changed_rewrites_nothing(index, pictures, tiny_run):
    root, _ = pictures
    before = (index / "manifest.json").read_bytes()
    result = run_cli(*index_command(tiny_run, root, index))
    assert "up to date" in result.stdout and (index / "manifest.json").read_bytes() == before


def change_folder(root: Path) -> None:
    """Added, changed, renamed and deleted pictures, and a file changed in place with its size and time kept."""
    with Image.open(REAL_PHOTOS[1]) as image:  # new bytes (a copy would be found by its content)
        image.transpose(Image.Transpose.ROTATE_90).save(root / "generated" / "added.jpg")
    with Image.open(root / "generated" / "1" / "picture_004.jpg") as image:
        image.save(root / "generated" / "0" / "picture_000.jpg", quality=70)
    os.rename(root / "generated" / "2" / "picture_002.jpg", root / "generated" / "renamed.jpg")
    (root / "generated" / "1" / "deeper" / "picture_001.jpg").unlink()


def same_index(first: Path, second: Path) -> None:
    """Equal rows and thumbnails, embeddings equal up to float noise, and the same manifest checks."""
    a, b = pq.read_table(first / "images.parquet").to_pydict(), pq.read_table(second / "images.parquet").to_pydict()
    assert a == b
    embeddings = [load_file(path / "image_embeddings.safetensors")["embeddings"].float() for path in (first, second)]
    torch.testing.assert_close(embeddings[0], embeddings[1], atol=2e-3, rtol=0)
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (first, second)]
    for key in ("counts", "tensors", "index", "dataset"):
        assert manifests[0][key] == manifests[1][key], key
    assert manifests[0]["golden"]["image_rows"] == manifests[1]["golden"]["image_rows"]
    assert json.loads((first / INDEX_REPORT).read_text()) == json.loads((second / INDEX_REPORT).read_text())
    load_verified(first), load_verified(second)


def test_an_incremental_run_embeds_only_what_changed_and_equals_a_fresh_index(pictures, tiny_run, tmp_path):
    root = tmp_path / "My Pictures"
    shutil.copytree(pictures[0], root, symlinks=True)
    output = tmp_path / "index"
    run_cli(*index_command(tiny_run, root, output))
    change_folder(root)
    result = run_cli(*index_command(tiny_run, root, output))
    assert "(2 embedded by this run" in result.stdout, result.stdout  # added and changed; renamed is found by content
    scratch = tmp_path / "scratch"
    run_cli(*index_command(tiny_run, root, scratch))
    same_index(output, scratch)

    # The same size and modification time over new bytes: only --verify sees it.
    target = root / "generated" / "0" / "deeper" / "picture_003.jpg"
    info = target.stat()
    with Image.open(target) as image:  # another picture in as many bytes (decoders stop at the JPEG's end marker)
        other = io.BytesIO()
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other, format="JPEG", quality=40)
    assert other.tell() <= info.st_size
    target.write_bytes(other.getvalue().ljust(info.st_size, b"\0"))
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert "up to date" in run_cli(*index_command(tiny_run, root, output)).stdout
    assert "(1 embedded by this run" in run_cli(*index_command(tiny_run, root, output, "--verify")).stdout
    run_cli(*index_command(tiny_run, root, tmp_path / "scratch after verify"))
    same_index(output, tmp_path / "scratch after verify")


def test_sigterm_halfway_keeps_the_previous_index_and_the_rerun_finishes_the_work(demo_run, pictures, tmp_path):
    """With the demo's real image tower (slow enough on 2 cores to stop halfway through 100 pictures)."""
    root = tmp_path / "pictures"
    with Image.open(REAL_PHOTOS[0]) as image:
        for number in range(100):  # distinct bytes each: every one needs the tower
            path = root / f"{number // 25}" / f"turn_{number:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.rotate(number * 3.6).save(path, quality=90)
    # The previous index holds the first 25 (under other paths): the run reuses them by content.
    output = tmp_path / "index"
    shutil.copytree(root / "0", tmp_path / "first")
    run_cli(*index_command(demo_run.artifacts, tmp_path / "first", output))
    before = verify_files(output)

    command = [str(arg) for arg in index_command(demo_run.artifacts, root, output, "--batch-size", "4")]
    process = subprocess.Popen(command, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    work = output.with_name(f".{output.name}.work")
    deadline = time.monotonic() + 300
    # 7 chunks of 4 hold the 25 pictures found by content, then 3 embedded: stop after 10.
    while len(list(work.glob("chunk-*.arrow"))) < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert "is as it was" in stderr.decode()
    assert verify_files(output) == before  # untouched, and still servable
    load_verified(output)

    kept = sum(len(table) - table.column("embedding").null_count for _, table in read_chunks(work))
    assert kept > 0

    result = run_cli(*index_command(demo_run.artifacts, root, output, "--batch-size", "4"))
    assert f"({75 - kept} embedded by this run" in result.stdout, (kept, result.stdout)
    scratch = tmp_path / "scratch"
    run_cli(*index_command(demo_run.artifacts, root, scratch, "--batch-size", "4"))
    same_index(output, scratch)


def test_two_processes_index_what_one_does(index, pictures, tiny_run, tmp_path):
    root, _ = pictures
    output = tmp_path / "two"
    env = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "true"}
    run_cli(*accelerate_command(2), "-m", "crossmodal", "index", "--artifacts", tiny_run, "--images", root,
            "--output-dir", output, env=env)  # fmt: skip
    same_index(output, index)


def test_two_processes_stop_together_when_the_output_is_refused(pictures, tiny_run, tmp_path):
    """The main process refuses before any plan is made: the other must be told, not left waiting for one."""
    root, _ = pictures
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "thesis.txt").write_text("years of work")
    command = [*accelerate_command(2), "-m", "crossmodal", "index", "--artifacts", tiny_run, "--images", root,
               "--output-dir", tmp_path / "documents"]  # fmt: skip
    result = subprocess.run(
        [str(arg) for arg in command], cwd=ROOT, env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "true"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0 and "is not an index" in result.stderr, result.stderr[-2000:]
    assert sorted(path.name for path in (tmp_path / "documents").iterdir()) == ["thesis.txt"]


def test_the_output_folder_is_never_something_else(pictures, tiny_run, tmp_path):
    root, _ = pictures
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    for output, message in [(precious, "is not an index"), (tiny_run, "the model's own folder"), (root, "holds the")]:
        result = subprocess.run(
            [str(arg) for arg in index_command(tiny_run, root, output)], cwd=ROOT, env=SUBPROCESS_ENV,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert (precious / "thesis.txt").read_text() == "years of work"
    empty = tmp_path / "nothing here"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no pictures")
    result = subprocess.run(
        [str(arg) for arg in index_command(tiny_run, empty, tmp_path / "out")], cwd=ROOT, env=SUBPROCESS_ENV,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "no pictures we can index" in result.stderr


def test_the_walk_skips_hidden_folders_and_never_leaves_the_folder(pictures):
    root, _ = pictures
    entries, _ = scan_folder(root)
    paths = {entry.path for entry in entries}
    assert not any(path.startswith((".thumbnails", "linked_folder")) for path in paths)
    assert "bad/outside.jpg" not in paths and "photos/linked_lion.jpg" in paths
    assert any(path.startswith(".thumbnails") for path in {e.path for e in scan_folder(root, include_hidden=True)[0]})
    fifo = root.parent / "fifo-folder"
    fifo.mkdir(exist_ok=True)
    os.mkfifo(fifo / "pipe.jpg")  # reading it would block the run forever
    assert [item.reason for item in scan_folder(fifo)[1]] == ["not a regular file"]


def test_push_to_hub_publishes_the_index_without_its_local_report(index, api):
    hub.push_artifacts(index, "owner/my-pictures", api=api)
    operations = api.create_commit.call_args.kwargs["operations"]
    uploaded = {operation.path_in_repo for operation in operations}
    assert uploaded == {*json.loads((index / "manifest.json").read_text())["files"], "manifest.json"}
    assert INDEX_REPORT not in uploaded and "images.parquet" in uploaded


def test_the_swap_replaces_the_index_in_one_step_or_recovers_from_a_cut_fallback(tmp_path, monkeypatch):
    target, staging = tmp_path / "index", tmp_path / ".index.staging"
    for folder, text in ((target, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
    index_write.replace_folder(staging, target)  # renameat2(RENAME_EXCHANGE) on Linux
    assert (target / "manifest.json").read_text() == "new" and not staging.exists()

    monkeypatch.setattr(index_write, "_exchange", lambda first, second: False)  # a system without it
    staging.mkdir()
    (staging / "manifest.json").write_text("newer")
    index_write.replace_folder(staging, target)
    assert (target / "manifest.json").read_text() == "newer" and sorted(tmp_path.iterdir()) == [target]

    target.rename(index_write.previous_name(target))  # a crash between the fallback's two renames
    index_write.recover_folder(target)
    assert (target / "manifest.json").read_text() == "newer"


def test_ranking_by_group_is_argsort_keeping_each_groups_best(index):
    """Searcher.rank_images against a brute-force reference: every score, sorted, the first picture of each group."""
    searcher = Searcher(load_verified(index))
    groups = searcher.group_of
    assert len(set(groups)) < len(groups)  # the folder has near-duplicates to collapse
    torch.manual_seed(0)
    random = torch.nn.functional.normalize(torch.randn(5, searcher.image_embeddings.shape[1]), dim=1)
    for query in [*searcher.image_embeddings[:5].float(), *random]:
        scores = searcher.image_embeddings.float() @ query
        expected, seen = [], set()
        for row in torch.argsort(scores, descending=True, stable=True).tolist():
            if groups[row] not in seen:
                seen.add(groups[row])
                expected.append(row)
        for k in (1, 5, 50):
            hits = searcher.rank_images(query, k)
            # By group: exact copies tie, and either may stand for its group.
            assert [groups[hit.image_index] for hit in hits] == [groups[row] for row in expected[:k]]
            torch.testing.assert_close(torch.tensor([hit.score for hit in hits]), scores[expected[:k]])
