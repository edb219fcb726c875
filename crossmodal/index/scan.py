"""Listing a folder of someone's pictures for indexing (docs/architecture.md, "Indexing your own pictures").

Every regular file under the folder is a candidate: whether it is an image we accept is for the decoder to say
(data/images.py), so a file named ``.jpg`` that is not one, or a picture without a suffix, is judged by its bytes.
What the walk itself refuses, and why, goes into the report beside the index:
- a symbolic link whose target lies outside the folder (indexing someone's folder must not read the rest of the disk);
- anything that is not a regular file once links are resolved (sockets, devices, FIFOs, which could block a read).
Hidden folders and files (names starting with ".") are left out unless asked for: they hold caches, thumbnails and
version-control data, not pictures. Symbolically linked folders are not descended into: their pictures, when inside
the folder, are indexed under their own path once, and a link cycle cannot loop the walk.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class FileEntry:
    """A candidate picture: its path relative to the folder (POSIX separators), size and modification time."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, order=True)
class Skipped:
    """A file left out of the index and why, in words its owner understands."""

    path: str
    size: int
    mtime_ns: int
    reason: str


def _inside(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def scan_folder(
    root: Path, *, include_hidden: bool = False, exclude: tuple[Path, ...] = ()
) -> tuple[list[FileEntry], list[Skipped]]:
    """Every candidate picture under ``root`` in path order, and the files refused on the way.

    ``exclude``: folders never entered (the index's own output, when it is written inside the folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    real_root = root.resolve()
    excluded = {path.resolve() for path in exclude}
    entries: list[FileEntry] = []
    skipped: list[Skipped] = []
    for directory, folders, files in os.walk(root, followlinks=False):
        here = Path(directory)
        folders[:] = sorted(
            name
            for name in folders
            if (include_hidden or not name.startswith(".")) and (here / name).resolve() not in excluded
        )
        for name in sorted(files):
            if name.startswith(".") and not include_hidden:
                continue
            path = here / name
            relative = path.relative_to(root).as_posix()
            try:
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    if not _inside(path.resolve(), real_root):
                        skipped.append(Skipped(relative, 0, 0, "a symbolic link to a file outside the folder"))
                        continue
                    info = path.stat()  # what the link points to
            except OSError as error:  # vanished since the listing, a broken link, no permission
                skipped.append(Skipped(relative, 0, 0, f"cannot be read ({error.strerror or error})"))
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append(Skipped(relative, 0, 0, "not a regular file"))
                continue
            entries.append(FileEntry(relative, info.st_size, info.st_mtime_ns))
    return sorted(entries), sorted(skipped)
