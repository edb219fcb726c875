"""benchmarks/load_test.py end to end on the demo's artifacts: a short run of every scenario, read from its report."""

import os
import re
import subprocess
import sys

from benchmarks.live_server import ROOT


def test_the_load_benchmark_runs_every_scenario_without_errors(tiny_run):
    command = [sys.executable, "-m", "benchmarks.load_test", "--artifacts", str(tiny_run), "--seconds", "0.5",
               "--users", "1", "4", "--crowd", "100", "--no-targets"]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        found = re.match(r"(\S.*?)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.nan]+)\s+\S+\s+\S+\s+(\d+)  (.*)$", line)
        if found:
            label, users, count, _, _, errors, batches = found.groups()
            rows[(label, int(users))] = (int(count), int(errors), batches)
    for users in (1, 4):
        for name in ("text_to_image", "image_to_text", "image_to_image"):
            for label in (name, f"noop_{name}"):
                count, errors, batches = rows[(label, users)]
                assert count > 0 and errors == 0, (label, users, rows[(label, users)])
                assert re.search(r"\d+:\d+", batches), batches  # the batch sizes the server reported
        assert rows[("mix of the three", users)][1] == 0
    assert {label for label, _ in rows} >= {"browser-like text_to_image", "browser-like noop_image_to_image"}
    crowd = re.search(r"crowd: (\d+) answered .*?, (\d+) told the queue is full .*?, (\d+) errors", result.stdout)
    answered, busy, errors = map(int, crowd.groups())
    assert answered + busy == 100 and answered >= 64 and errors == 0, crowd.group(0)
    assert rows[("after the crowd: text_to_image", 1)][1] == 0
