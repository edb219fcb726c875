"""The Hub boundary: push hands over exactly the verified files in one commit; pull reads a real offline cache.

Only the upload side is mocked (``HfApi`` autospecced); the pull side runs the real ``snapshot_download`` against a
cache laid out on disk the way huggingface_hub lays it out (blobs, relative symlinks in snapshots/, refs/main).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import httpx2
import pytest
import yaml
from huggingface_hub import CommitOperationAdd, SpaceCard, constants
from huggingface_hub.errors import HfHubHTTPError

import push_to_hub
from crossmodal.artifacts import hub
from crossmodal.artifacts.contract import ArtifactError, load_verified
from tests.conftest import COMMIT_URL, REAL_PHOTOS, SHA, SUBPROCESS_ENV, run_cli

TOKEN = "hf_SECRETvalue123"


# --- fixtures and helpers ----------------------------------------------------------------------------------------


@pytest.fixture
def folder(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the real tiny-run artifact folder, free to damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "artifacts"))


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty, offline huggingface_hub cache. Its constants are read at import, so patch them, not just the env."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def expected_paths(folder: Path) -> set[str]:
    return {*manifest_of(folder)["files"], "manifest.json"}


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def cache_snapshot(cache: Path, repo_id: str, sha: str, source: Path) -> Path:
    """Lay ``source``'s published files into ``cache`` as a download would: blobs, symlinked snapshot, refs/main."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / sha
    for relative in sorted(expected_paths(source)):
        data = (source / relative).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(sha)  # no newline: the library reads the file verbatim
    return snapshot


# --- push ----------------------------------------------------------------------------------------------------------


def test_push_uploads_exactly_the_manifest_in_one_commit(folder, api):
    (folder / ".DS_Store").write_bytes(b"\0junk")
    (folder / "plots" / "scratch.png").write_bytes(b"not in the manifest")
    commit = hub.push_artifacts(folder, "owner/name", private=True, commit_message="v1", api=api)

    assert commit.oid == SHA
    api.create_repo.assert_called_once_with("owner/name", repo_type="model", private=True, exist_ok=True)
    assert api.create_commit.call_count == 1
    kwargs = api.create_commit.call_args.kwargs
    assert (kwargs["repo_id"], kwargs["repo_type"], kwargs["commit_message"]) == ("owner/name", "model", "v1")
    operations = kwargs["operations"]
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    uploaded = {op.path_in_repo for op in operations}
    assert uploaded == expected_paths(folder)
    assert ".DS_Store" not in uploaded and "plots/scratch.png" not in uploaded
    assert all(Path(op.path_or_fileobj) == folder / op.path_in_repo for op in operations)
    assert [name for name, *_ in api.mock_calls] == ["create_repo", "create_commit"]  # repo first, then one commit


def test_push_defaults_to_a_public_repo_and_the_library_token(folder, hf_api_class, api):
    hub.push_artifacts(folder, "owner/name")
    hf_api_class.assert_called_once_with(token=None)  # None: HF_TOKEN or `hf auth login`, resolved by the library
    api.create_repo.assert_called_once_with("owner/name", repo_type="model", private=False, exist_ok=True)
    assert api.create_commit.call_args.kwargs["commit_message"]


def test_push_refuses_a_folder_that_fails_verification(folder, api):
    flip_byte(folder / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        hub.push_artifacts(folder, "owner/name", api=api)
    assert api.mock_calls == []  # not even create_repo


def test_push_refuses_a_file_a_pull_would_never_fetch(folder, api):
    # Listed and hashed correctly, so the folder verifies; but ALLOW_PATTERNS would skip it on the way back down.
    extra = folder / "extras" / "notes.txt"
    extra.parent.mkdir()
    extra.write_text("notes")
    manifest = manifest_of(folder)
    manifest["files"]["extras/notes.txt"] = {"sha256": hashlib.sha256(b"notes").hexdigest(), "size": 5}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"extras/notes\.txt"):
        hub.push_artifacts(folder, "owner/name", api=api)
    assert api.mock_calls == []


# --- push_to_hub.py ------------------------------------------------------------------------------------------------


def test_cli_prints_the_commit_and_how_to_pin_it(folder, hf_api_class, api, capsys):
    code = push_to_hub.main(
        ["--artifacts", str(folder), "--repo-id", "owner/name", "--private", "--revision-note", "first"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert api.create_commit.call_args.kwargs["commit_message"] == "first"
    api.create_repo.assert_called_once_with("owner/name", repo_type="model", private=True, exist_ok=True)
    lines = out.splitlines()
    assert f"commit: {SHA}" in lines
    assert f"url: {COMMIT_URL}" in lines
    assert "CROSSMODAL_ARTIFACTS=owner/name" in lines
    assert f"CROSSMODAL_REVISION={SHA}" in lines
    # The front matter block parses as YAML into the documented `repo file1,file2 commit` item, files listed.
    block = "\n".join(lines[lines.index("preload_from_hub:") :])
    (entry,) = yaml.safe_load(block)["preload_from_hub"]
    repo, files, commit = entry.split(" ")
    assert (repo, commit) == ("owner/name", SHA)
    assert sorted(files.split(",")) == sorted(expected_paths(folder))


@pytest.mark.parametrize("via", ["flag", "env"])
def test_cli_never_shows_the_token(folder, hf_api_class, api, capsys, caplog, monkeypatch, via):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    argv = ["--artifacts", str(folder), "--repo-id", "owner/name"]
    if via == "flag":
        argv += ["--token", TOKEN]
    else:
        monkeypatch.setenv("HF_TOKEN", TOKEN)

    assert push_to_hub.main(argv) == 0
    hf_api_class.assert_called_once_with(token=TOKEN if via == "flag" else None)  # handed over, never shown

    # The upload fails with errors that quote the token; what is printed must not.
    request = httpx2.Request("POST", "https://hub.invalid/api/models/owner/name/commit/main")
    response = httpx2.Response(401, request=request)
    failures = [
        HfHubHTTPError(f"401 Unauthorized: bad token {TOKEN} (Authorization: Bearer {TOKEN})", response=response),
        OSError(f"connection reset while sending Bearer {TOKEN}"),
    ]
    for failure in failures:
        api.create_commit.side_effect = failure
        assert push_to_hub.main(argv) == 1
    out, err = capsys.readouterr()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for text in (out, err, logged):
        assert TOKEN not in text
    assert err.count("***") >= 3  # both failures reported, redacted
    assert "HfHubHTTPError" in err and "OSError" in err


def test_cli_uploads_nothing_from_a_failing_folder(folder, hf_api_class, api, capsys):
    flip_byte(folder / "model.safetensors")
    assert push_to_hub.main(["--artifacts", str(folder), "--repo-id", "owner/name"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "model.safetensors" in err
    assert "commit:" not in out
    assert api.mock_calls == []


def test_cli_refuses_a_malformed_repo_id(tmp_path, hf_api_class, api, capsys):
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.main(["--artifacts", str(tmp_path), "--repo-id", "not a/repo/id"])
    assert exit_info.value.code == 2
    assert "--repo-id" in capsys.readouterr().err
    assert hf_api_class.call_count == 0


# --- pull ----------------------------------------------------------------------------------------------------------


def test_pull_by_commit_from_an_offline_cache(tiny_run, hub_cache, caplog):
    snapshot = cache_snapshot(hub_cache, "owner/name", SHA, tiny_run)
    loaded = hub.load_artifacts("owner/name", revision=SHA)
    assert loaded.folder.resolve() == snapshot.resolve()
    assert loaded.metrics == json.loads((tiny_run / "metrics.json").read_text())
    assert loaded.image_embeddings.shape[0] == loaded.images.num_rows
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "pinned" in r.getMessage()]


def test_pull_without_a_revision_follows_refs_main_and_warns(tiny_run, hub_cache, caplog):
    snapshot = cache_snapshot(hub_cache, "owner/name", SHA, tiny_run)
    folder = hub.resolve_artifacts("owner/name")
    assert folder.resolve() == snapshot.resolve()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == hub.__name__]
    assert any("owner/name@main" in message and "not pinned" in message for message in warnings)
    hub.resolve_artifacts("owner/name", revision="main")  # a branch name: same folder, same warning
    assert sum("not pinned" in r.getMessage() for r in caplog.records) == 2


def test_pull_of_a_corrupted_snapshot_fails_closed(tiny_run, hub_cache):
    snapshot = cache_snapshot(hub_cache, "owner/name", SHA, tiny_run)
    flip_byte((snapshot / "text_embeddings.safetensors").resolve())  # the blob behind the symlink
    with pytest.raises(ArtifactError, match=r"text_embeddings\.safetensors"):
        hub.load_artifacts("owner/name", revision=SHA)


def test_pull_of_an_uncached_repo_fails_fast_and_says_how_to_fix_it(hub_cache):
    start = time.monotonic()
    with pytest.raises(ArtifactError) as error:
        hub.load_artifacts("owner/missing", revision=SHA)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert f"owner/missing@{SHA}" in message
    assert "not in the local Hugging Face cache" in message and "could not be reached" in message
    assert "HF_HUB_OFFLINE=0" in message and "local artifact folder" in message


def test_a_local_folder_is_used_as_is_without_the_cache(tiny_run, hub_cache):
    assert hub.resolve_artifacts(tiny_run) == tiny_run
    assert hub.resolve_artifacts(str(tiny_run)) == tiny_run
    loaded = hub.load_artifacts(tiny_run)
    assert loaded.folder == tiny_run
    assert not hub_cache.exists()  # nothing was looked up, nothing was written


def test_a_local_folder_takes_no_revision(tiny_run, hub_cache):
    with pytest.raises(ValueError, match="local folder"):
        hub.resolve_artifacts(tiny_run, revision=SHA)


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path, hub_cache):
    with pytest.raises(ArtifactError, match="no artifact folder there"):
        hub.resolve_artifacts(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="no artifact folder there"):
        hub.resolve_artifacts("./runs/nowhere/artifacts")
    assert not hub_cache.exists()


# --- Space packaging ---------------------------------------------------------------------------------------------


def test_cli_pins_the_space_readme_to_the_commit(folder, hf_api_class, api, tmp_path, capsys):
    readme = tmp_path / "README.md"
    shutil.copy(Path(__file__).resolve().parents[1] / "README.md", readme)
    body_before = readme.read_text().split("\n---\n", 1)[1]
    argv = ["--artifacts", str(folder), "--repo-id", "owner/name", "--space-readme", str(readme)]
    assert push_to_hub.main(argv) == 0
    card = SpaceCard.load(readme)
    assert card.data.models == ["owner/name"]
    (entry,) = card.data.preload_from_hub
    repo_id, files, sha = entry.split(" ")
    assert (repo_id, sha) == ("owner/name", SHA)
    assert set(files.split(",")) == expected_paths(folder)
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"  # the rest of the front matter is kept
    assert readme.read_text().split("\n---\n", 1)[1] == body_before  # and the body untouched


def test_readme_front_matter_is_a_valid_space_config():
    root = Path(__file__).resolve().parents[1]
    card = SpaceCard.load(root / "README.md")
    pins = dict(line.split("==") for line in (root / "requirements.txt").read_text().splitlines() if "==" in line)
    assert card.data.sdk == "gradio" and card.data.sdk_version == pins["gradio"]  # the Space runs the tested gradio
    assert card.data.python_version == "3.11"
    assert card.data.app_file == "app.py"
    assert card.data.datasets == ["umaru97/flickr30k_train_val_test"]
    (entry,) = card.data.preload_from_hub
    assert entry.split(" ")[0] == card.data.models[0]


def test_an_index_of_your_pictures_takes_a_model_pinned_on_the_hub(tiny_run, hub_cache, tmp_path):
    """`python -m crossmodal index --artifacts OWNER/NAME --revision SHA`: from the offline cache, as the app."""
    cache_snapshot(hub_cache, "owner/name", SHA, tiny_run)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for photo in REAL_PHOTOS[:3]:
        shutil.copy(photo, pictures / photo.name)
    output = tmp_path / "index"
    env = {**SUBPROCESS_ENV, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    run_cli(sys.executable, "-m", "crossmodal", "index", "--artifacts", "owner/name", "--revision", SHA, "--images",
            pictures, "--output-dir", output, env=env)  # fmt: skip
    loaded = load_verified(output)
    assert loaded.index["model"] == f"owner/name@{SHA}" and loaded.index["pictures"] == 3
    assert loaded.index["model_sha256"] == manifest_of(tiny_run)["files"]["model.safetensors"]["sha256"]
