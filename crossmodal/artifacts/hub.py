"""The Hugging Face Hub boundary: pull an artifact folder (docs/architecture.md, "Artifact folder") into the local
cache, or push one as one commit.

Everything that crosses this boundary is verified on our side of it: a pull is handed to ``load_verified`` before
anyone uses it, and a push verifies the folder before the first request, so a broken folder is never published and a
broken download is never served.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, SpaceCard, constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from crossmodal.artifacts.contract import ALLOW_PATTERNS, ArtifactError, LoadedArtifacts, load_verified

logger = logging.getLogger(__name__)

REPO_TYPE = "model"
FULL_SHA = re.compile(r"[0-9a-f]{40}")  # a commit id: the only revision that cannot move under a running app


def looks_like_path(source: str | Path) -> bool:
    """A Path, or a string no repo id can be (``/x``, ``./x``, ``~/x``, ``a/b/c``): meant as a folder, not the Hub."""
    if isinstance(source, Path):
        return True
    return source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or "\\" in source


def resolve_artifacts(source: str | Path, revision: str | None = None) -> Path:
    """Return a local artifact folder for ``source``: the folder itself, or a Hub snapshot of repo ``source``.

    A local directory wins, so development and tests never touch the cache; a revision makes no sense for it
    (ValueError). Anything else is a model repo id, fetched with ``snapshot_download`` restricted to the contract's
    files (ALLOW_PATTERNS), so stray files in the repo are never downloaded. Offline (``HF_HUB_OFFLINE=1``) this
    only reads the cache and fails at once when the snapshot is not there, with no retries or timeouts.

    The folder is not verified here; ``load_artifacts`` does that.
    """
    if Path(source).expanduser().is_dir():
        if revision is not None:
            raise ValueError(f"{source} is a local folder; a revision ({revision!r}) applies only to a Hub repo id")
        return Path(source).expanduser()
    if looks_like_path(source):
        raise ArtifactError(f"{source}: no artifact folder there")
    repo_id = str(source)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ArtifactError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({error})") from error

    if revision is None or not FULL_SHA.fullmatch(revision):
        # A branch or tag can move between two restarts of the app; only a commit id serves the same bytes forever.
        logger.warning(
            "%s@%s is not pinned to a commit: a branch or tag can move; pin the 40-hex commit sha in production",
            repo_id,
            revision or constants.DEFAULT_REVISION,
        )
    asked = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
    try:
        folder = snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, repo_type=REPO_TYPE
        )
    except RevisionNotFoundError as error:
        raise ArtifactError(
            f"{asked}: the repository exists but has no such revision; check the commit sha, branch or tag"
        ) from error
    except RepositoryNotFoundError as error:  # also gated/private repos without a valid token
        raise ArtifactError(
            f"{asked}: repository not found on the Hub (or it is private or gated and no valid token was given); "
            "check the repo id, or log in with `hf auth login` / set HF_TOKEN"
        ) from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, HfHubHTTPError) as error:
        raise ArtifactError(
            f"{asked}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub could not be reached "
            f"({type(error).__name__}: {error}). To fix: download it once with network access (HF_HUB_OFFLINE=0), "
            f"e.g. `hf download {repo_id} --revision {revision or constants.DEFAULT_REVISION}`, "
            "or pass a local artifact folder instead"
        ) from error
    return Path(folder)


def load_artifacts(source: str | Path, revision: str | None = None) -> LoadedArtifacts:
    """Resolve ``source`` (local folder or Hub repo id); load it only if every check of ``load_verified`` passes."""
    return load_verified(resolve_artifacts(source, revision))


def upload_paths(manifest: dict[str, Any]) -> list[str]:
    """What a push publishes: the manifest's files and manifest.json itself, sorted; nothing else from the folder.

    Each path must stay inside the folder, fit in a ``preload_from_hub`` line (no commas or spaces) and be one a
    pull fetches (ALLOW_PATTERNS): a file outside those patterns would be uploaded but never downloaded, and the
    pulled folder would then fail verification. All of this is checked before anything is sent.
    """
    paths = sorted({*manifest["files"], "manifest.json"})
    for path in paths:
        if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts or "\\" in path:
            raise ArtifactError(f"manifest.json: lists {path!r}, which is not a path inside the artifact folder")
        if "," in path or any(char.isspace() for char in path):
            raise ArtifactError(f"manifest.json: lists {path!r}; commas and spaces break preload_from_hub's format")
    unreachable = sorted(set(paths) - set(filter_repo_objects(paths, allow_patterns=ALLOW_PATTERNS)))
    if unreachable:
        raise ArtifactError(
            f"manifest.json: lists {unreachable}, which a pull would not fetch (allowed: {ALLOW_PATTERNS}); "
            "the published folder could never be verified"
        )
    return paths


def push_artifacts(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> CommitInfo:
    """Publish a verified artifact folder to model repo ``repo_id`` as one commit; returns the commit's info.

    ``load_verified`` runs first: a folder that fails it raises ArtifactError before any request, not even
    ``create_repo``. Exactly the manifest's files plus manifest.json are uploaded, so stray files (editor backups,
    .DS_Store) never reach the repo. Deletions are not needed: the contract's file names are fixed.

    Safe to re-run after an interruption: a commit on the Hub is atomic (it lands whole or not at all, so a reader
    never sees half a folder), and large files are content-addressed, so identical blobs uploaded before the
    interruption are deduplicated rather than sent again.

    ``token`` goes to ``HfApi`` only; without it the library resolves one (HF_TOKEN, then ``hf auth login``'s cache).
    It is never logged.
    """
    folder = Path(folder)
    loaded = load_verified(folder)
    paths = upload_paths(loaded.manifest)
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in paths]
    logger.info("Uploading %d files from %s to %s in one commit", len(operations), folder, repo_id)
    return api.create_commit(
        repo_id=repo_id,
        repo_type=REPO_TYPE,
        operations=operations,
        commit_message=commit_message or f"Upload crossmodal artifacts ({len(operations)} files)",
    )


def preload_entry(repo_id: str, paths: list[str], sha: str) -> str:
    """One ``preload_from_hub`` item, ``repo_id file1,file2,... commit_sha`` (Spaces config reference).

    The files are listed one by one (the reference documents comma-separated names, no globs), and the commit pins
    the build to exactly the bytes this push verified. ``upload_paths`` already refused names this would break.
    """
    return f"{repo_id} {','.join(paths)} {sha}"


def pin_space_readme(readme: Path, repo_id: str, paths: list[str], sha: str) -> None:
    """Point a Space's README front matter at this commit: ``models`` and ``preload_from_hub``; the body is kept.

    The Space then downloads exactly these files at build time, and the app (``CROSSMODAL_REVISION``) asks for the
    same commit, so start-up finds them in the cache and needs no network.
    """
    card = SpaceCard.load(readme)
    card.data.models = [repo_id]
    card.data.preload_from_hub = [preload_entry(repo_id, paths, sha)]
    card.save(readme)
