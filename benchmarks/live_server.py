"""Start the real app the way a user does (`python app.py --artifacts ...`), for tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    artifacts: Path
    log: Path


def start_app(
    artifacts: Path, log: Path, timeout: float = 120, env: dict | None = None, entry: list[str] | None = None
) -> Server:
    """`python app.py --artifacts ...` on a free local port, as a user starts it; returns once it answers HTTP.

    ``entry`` replaces ``["app.py"]`` (e.g. ``["-m", "benchmarks.noop_app"]``, which takes the same flags).
    """
    port = free_port()
    command = [sys.executable, *(entry or ["app.py"]), "--artifacts", str(artifacts), "--port", str(port)]
    handle = open(log, "w")  # noqa: SIM115 - stays open for the server's lifetime
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env or {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    wait_until_answering(url, process, log, timeout)
    return Server(url, process, artifacts, log)


def wait_until_answering(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once ``url`` answers 200; raise with the end of ``log`` if ``process`` exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"nothing answered at {url} within {timeout} s:\n{log.read_text()[-3000:]}")
