"""`python -m crossmodal <command>` (crossmodal/__main__.py): the project's commands behind one short entry point."""

import subprocess
import sys

import pytest

from crossmodal.__main__ import COMMANDS


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crossmodal", *args], capture_output=True, text=True, timeout=300)


def test_without_a_command_it_lists_every_command_and_fails():
    result = run()
    assert result.returncode == 2
    for name in COMMANDS:
        assert f"  {name} " in result.stdout


def test_an_unknown_command_is_named_and_refused():
    result = run("pinnd", "install")
    assert result.returncode == 2
    assert "unknown command 'pinnd'" in result.stderr and "pinned" in result.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_answers_help_under_its_own_name(command):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m crossmodal {command} ")


def test_a_command_passes_its_exit_status_through():
    result = run("evaluate", "--artifacts", "no/such/folder/anywhere")
    assert result.returncode == 2
    assert "error:" in result.stderr
