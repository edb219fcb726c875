"""sha256 of the artifact files, computed on a spare core as early as possible.

Hashing a Flickr30k-scale folder (~1.1 GB) takes about 5 s on one core of the Space's CPU, and importing torch and
Gradio takes longer on the other: ``prefetch`` starts hashing before those imports, so verification finds most
digests done. This module imports only the standard library, so it can run first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path

_BLOCK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)  # releases the GIL: another thread runs meanwhile
    return digest.hexdigest()


class Digests:
    """sha256 of files, each hashed by whichever thread gets to it first: a caller, or the background prefetch.

    A digest is handed out once and then forgotten, so a later check of the same path hashes the file again. Files
    are identified by inode, size, mtime and ctime: one replaced or rewritten after a prefetch is hashed anew.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, ...], Future[str]] = {}
        self._seen: set[tuple[int, ...]] = set()

    def _claim(self, path: Path, *, background: bool) -> tuple[tuple[int, ...], Future[str] | None, bool]:
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        with self._lock:
            if key in self._pending:
                return key, self._pending[key], False
            if background and key in self._seen:
                return key, None, False  # already handed out: the caller did not need the prefetch
            self._seen.add(key)
            future: Future[str] = Future()
            self._pending[key] = future
            return key, future, True

    @staticmethod
    def _compute(path: Path, future: Future[str]) -> None:
        try:
            future.set_result(sha256_of(path))
        except BaseException as error:
            future.set_exception(error)

    def sha256(self, path: Path) -> str:
        """The file's sha256: prefetched, being prefetched (then wait for it), or hashed here and now."""
        key, future, mine = self._claim(path, background=False)
        if mine:
            self._compute(path, future)
        try:
            return future.result()
        finally:
            with self._lock:
                if self._pending.get(key) is future:
                    del self._pending[key]

    def prefetch(self, paths: list[Path]) -> threading.Thread:
        """Hash ``paths`` in one background thread, last first (a caller checking in order meets it in the middle)."""

        def run() -> None:
            for path in reversed(paths):
                try:
                    _, future, mine = self._claim(path, background=True)
                except OSError:
                    continue  # missing or unreadable: the verification that asks for it reports it properly
                if mine:
                    self._compute(path, future)

        thread = threading.Thread(target=run, name="artifact-hashing", daemon=True)
        thread.start()
        return thread


DIGESTS = Digests()


def prefetch_folder(folder: str | os.PathLike | None) -> None:
    """Start hashing every file an artifact folder's manifest lists, if ``folder`` is one; never raises."""
    try:
        folder = Path(folder)
        files = json.loads((folder / "manifest.json").read_text())["files"]
        DIGESTS.prefetch([folder / name for name in files])
    except (TypeError, OSError, ValueError, KeyError, AttributeError):
        pass  # not a local artifact folder (a Hub id, a typo): verification reports it when it gets there


def add_source_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The app's source flags, defaulting to their environment variables: the one definition, read by the app's
    parser and, before the app's imports, by :func:`prefetch_source`."""
    parser.add_argument(
        "--artifacts", default=os.environ.get("CROSSMODAL_ARTIFACTS"), help="artifact folder or Hub repo id"
    )
    parser.add_argument("--revision", default=os.environ.get("CROSSMODAL_REVISION"), help="Hub commit sha to pin")
    return parser


def prefetch_source(argv: list[str]) -> None:
    """Start hashing the artifact folder the app was asked to serve (``--artifacts``/``CROSSMODAL_ARTIFACTS``).

    A local folder is hashed where it is; a Hub repo id only if its snapshot is already in the local cache (a
    Space's preloaded one). Anything unusual is left to the app's own argument parsing and verification.
    """
    known, _ = add_source_arguments(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    if not known.artifacts:
        return
    if Path(known.artifacts).expanduser().is_dir():
        prefetch_folder(Path(known.artifacts).expanduser())
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        manifest = try_to_load_from_cache(known.artifacts, "manifest.json", revision=known.revision)
    except Exception:  # an invalid repo id, say: the app's own resolution reports it
        return
    if isinstance(manifest, str):
        prefetch_folder(Path(manifest).parent)
