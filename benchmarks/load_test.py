"""Load: many people at once against the launched app, measured at the server by a raw-HTTP asyncio client.

    python -m benchmarks.load_test                          # Flickr30k-scale index (benchmarks.flickr_scale), ~7 min
    python -m benchmarks.load_test --artifacts runs/tiny/artifacts --seconds 5 --no-targets

Starts ``python -m benchmarks.noop_app`` (app.py as users launch it, plus a no-op twin of each endpoint that answers
a same-sized result without searching: the framework's own ceiling) on a free port of 127.0.0.1, then lowers its own
CPU priority so that the server, not the client, gets the cores. The client (``benchmarks.gradio_http``) speaks
Gradio's HTTP API directly, as any program can: ``POST /gradio_api/upload`` for an image,
``POST /gradio_api/call/<endpoint>``, then the event stream ``GET /gradio_api/call/<endpoint>/<event_id>``, all from
one asyncio loop (``gradio_client`` users are threads whose own CPU, polling and TLS set-up would be what gets
measured). A request's time runs from its first byte out (the upload, for an image) to the end of its answer.

For 1, 8 and 32 concurrent users, each sending its next request as soon as the last one is answered, for
``--seconds`` each: the three endpoints and a random mix of them, and each endpoint's no-op twin at the same
concurrency. Then a browser-like pass at 8 users that also fetches every gallery file of each answer, and a crowd:
``--crowd`` users (200) sending one text query at the same moment, where those past the queue's bound must get
Gradio's "queue is full" answer (HTTP 503) at once, the others their results, and the server must answer a lone
user normally afterwards.

Reports req/s, p50/p95/p99, errors, and the batch sizes that formed (read from the server after each run). Exits 1
when a target is missed (``--no-targets``: report only). The targets (issue 15) compare with this benchmark's run on
the main branch before batched search (``BEFORE``, same machine and day, recorded in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyarrow.parquet as pq

from benchmarks import flickr_scale
from benchmarks.common import Target, command_line, percentile
from benchmarks.gradio_http import GradioHttp
from benchmarks.live_server import start_app

K = 10
ENDPOINTS = ("text_to_image", "image_to_text", "image_to_image")
USERS = (1, 8, 32)
WARM_UP_SECONDS = 2.0
BUSY_FAST = 1.0  # s: a "queue is full" answer must come back within this, not after a wait
# This benchmark on main before batched search (commit 7de212a, 2026-12-02, 2 cores, default flags): req/s at 8 users
# and p50 at 1 user. Issue 15 measured text -> image at 8.4 req/s at 8 users on another day with another client; its
# target is 2x that figure, and the ratio to this run's 14.5 is printed beside it.
BEFORE = {
    "text_to_image": {"rps_8": 14.5, "p50_1": 0.073},
    "image_to_text": {"rps_8": 15.0, "p50_1": 0.071},
    "image_to_image": {"rps_8": 11.0, "p50_1": 0.090},
}
ISSUE_TEXT_RPS_8 = 8.4


@dataclass
class Material:
    texts: list[str]
    images: list[bytes]


@dataclass
class Run:
    """What one scenario measured: each answered request's seconds, and what went wrong."""

    label: str
    users: int
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # seconds to a "queue is full" answer
    errors: Counter = field(default_factory=Counter)
    batches: dict = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def p(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) if self.latencies else float("nan")

    def line(self) -> str:
        batches = " ".join(f"{size}:{count}" for size, count in sorted(self.batches.items())) or "-"
        return (
            f"{self.label:<34} {self.users:>5} {len(self.latencies):>6} {self.rps:>7.1f} {self.p(0.5):>7.3f} "
            f"{self.p(0.95):>7.3f} {self.p(0.99):>7.3f} {sum(self.errors.values()):>6}  {batches}"
        )


HEADER = (
    f"{'scenario':<34} {'users':>5} {'n':>6} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'errors':>6}  batches"
)


async def request(
    client: GradioHttp, endpoint: str, material: Material, rng: random.Random, browser: bool
) -> tuple[str, float, object]:
    """One person's search, timed from the first byte sent to the last byte of the answer (and its files)."""
    started = time.perf_counter()
    query = rng.choice(material.texts if endpoint.endswith("text_to_image") else material.images)
    outcome, outputs = await client.search(endpoint, query, K, files=browser)
    return outcome, time.perf_counter() - started, outputs


async def scenario(
    client: GradioHttp, label: str, endpoints: list[str], users: int, seconds: float, material: Material,
    browser: bool = False,
) -> Run:  # fmt: skip
    """``users`` people, each sending its next request as soon as its last is answered, for ``seconds``."""
    run = Run(label, users)

    async def person(seed: int, deadline: float, record: bool) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            endpoint = rng.choice(endpoints)
            try:
                outcome, elapsed, outputs = await request(client, endpoint, material, rng, browser)
            except (httpx.HTTPError, OSError) as error:
                outcome, elapsed, outputs = "error", 0.0, f"{type(error).__name__}: {error}"
            if not record:
                continue
            if outcome == "complete":
                run.latencies.append(elapsed)
            else:
                run.errors[f"{endpoint}: {outcome}: {str(outputs)[:120]}"] += 1

    warm = time.monotonic() + min(WARM_UP_SECONDS, seconds)
    await asyncio.gather(*(person(seed, warm, record=False) for seed in range(users)))
    before = await client.batch_sizes()
    started = time.perf_counter()
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(person(1000 + seed, deadline, record=True) for seed in range(users)))
    run.wall = time.perf_counter() - started
    after = await client.batch_sizes()
    for endpoint in endpoints:
        counts = Counter(after.get(endpoint, {})) - Counter(before.get(endpoint, {}))
        for size, count in counts.items():
            run.batches[size] = run.batches.get(size, 0) + count
    return run


async def crowd(client: GradioHttp, users: int, material: Material) -> Run:
    """``users`` text queries sent at the same moment: answered, or told at once that the queue is full."""
    run = Run(f"crowd: {users} at once, text_to_image", users)
    rng = random.Random(7)

    async def person() -> None:
        try:
            outcome, elapsed, outputs = await request(client, "text_to_image", material, rng, browser=False)
        except (httpx.HTTPError, OSError) as error:
            outcome, elapsed, outputs = "error", 0.0, f"{type(error).__name__}: {error}"
        if outcome == "complete":
            run.latencies.append(elapsed)
        elif outcome == "busy":
            run.busy.append(elapsed)
        else:
            run.errors[f"{outcome}: {str(outputs)[:120]}"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(person() for _ in range(users)))
    run.wall = time.perf_counter() - started
    return run


def load_material(artifacts: Path, count: int = 64) -> Material:
    """Captions from the index as text queries; 500x375 photo-like JPEGs (a Flickr photo's size) as uploads."""
    rng = random.Random(0)
    captions = pq.read_table(artifacts / "captions.parquet", columns=["caption"]).column("caption").to_pylist()
    return Material(texts=rng.sample(captions, min(count, len(captions))), images=flickr_scale.query_images(16))


async def measure(url: str, args: argparse.Namespace, material: Material) -> dict[str, Run]:
    client = GradioHttp(url, connections=max(args.crowd, max(args.users)) + 8)
    runs: dict[str, Run] = {}
    try:
        for users in args.users:
            for endpoint in args.endpoints:
                for name in (endpoint, f"noop_{endpoint}"):
                    runs[f"{name}@{users}"] = await scenario(client, name, [name], users, args.seconds, material)
                    print(runs[f"{name}@{users}"].line(), flush=True)
            if args.quick:
                continue
            mix = await scenario(client, "mix of the three", list(ENDPOINTS), users, args.seconds, material)
            runs[f"mix@{users}"] = mix
            print(mix.line(), flush=True)
        if args.quick:
            return runs
        for name in ("text_to_image", "noop_text_to_image", "image_to_image", "noop_image_to_image"):
            label = f"browser-like {name}"
            runs[f"browser {name}"] = await scenario(client, label, [name], 8, args.seconds, material, browser=True)
            print(runs[f"browser {name}"].line(), flush=True)
        runs["crowd"] = await crowd(client, args.crowd, material)
        print(runs["crowd"].line(), flush=True)
        after = await scenario(client, "after the crowd: text_to_image", ["text_to_image"], 1, 3.0, material)
        runs["after crowd"] = after
        print(after.line(), flush=True)
    finally:
        await client.close()
    return runs


def targets(runs: dict[str, Run]) -> list[Target]:
    text, twin = runs["text_to_image@8"], runs["noop_text_to_image@8"]
    found = [
        Target("text_to_image req/s at 8 users / issue 15's 8.4", text.rps / ISSUE_TEXT_RPS_8, 2.0),
        Target(
            "text_to_image req/s at 8 users / before (this benchmark)", text.rps / BEFORE["text_to_image"]["rps_8"], 2.0
        ),
        Target("text_to_image req/s at 8 users / its no-op twin's", text.rps / twin.rps, 0.8),
        Target("text_to_image p95 at 8 users, s", text.p(0.95), 0.6, at_least=False),
    ]
    for endpoint in ("image_to_text", "image_to_image"):
        found.append(
            Target(f"{endpoint} req/s at 8 users / before", runs[f"{endpoint}@8"].rps / BEFORE[endpoint]["rps_8"], 2.0)
        )
    for endpoint in ENDPOINTS:
        found.append(
            Target(f"{endpoint} p50 at 1 user / before", runs[f"{endpoint}@1"].p(0.5) / BEFORE[endpoint]["p50_1"],
                   1.10, at_least=False)
        )  # fmt: skip
    errors = sum(sum(run.errors.values()) for name, run in runs.items() if "@" in name or name == "after crowd")
    found.append(Target("errors at 1, 8 and 32 users", errors, 1, at_least=False))
    crowd_run, after = runs["crowd"], runs["after crowd"]
    found.append(Target("crowd: errors and time-outs", sum(crowd_run.errors.values()), 1, at_least=False))
    found.append(Target("crowd: answered", len(crowd_run.latencies), 1))
    found.append(Target("crowd: told the queue is full", len(crowd_run.busy), 1))
    found.append(Target("crowd: slowest 'queue is full' answer, s", max(crowd_run.busy, default=0.0), BUSY_FAST,
                        at_least=False))  # fmt: skip
    found.append(Target("after the crowd: lone p50 / before", after.p(0.5) / BEFORE["text_to_image"]["p50_1"], 1.10,
                        at_least=False))  # fmt: skip
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None, help="default: the Flickr30k-scale index (built once)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/benchmarks"), help="where that index is kept")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per scenario")
    parser.add_argument("--users", type=int, nargs="+", default=list(USERS))
    parser.add_argument("--crowd", type=int, default=200, help="users arriving at once in the crowd case")
    parser.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(ENDPOINTS))
    parser.add_argument(
        "--quick", action="store_true", help="only the endpoints and their twins (no mix, browser, crowd)"
    )
    parser.add_argument("--no-targets", action="store_true", help="report only (a small or different index)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    artifacts = args.artifacts or flickr_scale.ensure(args.cache)
    material = load_material(artifacts)
    with tempfile.TemporaryDirectory(prefix="crossmodal-load-") as scratch:
        server = start_app(artifacts, Path(scratch) / "server.log", entry=["-m", "benchmarks.noop_app"])
        os.nice(19)  # after the server started (it keeps its priority): the client yields the cores to it
        print(command_line("benchmarks.load_test", argv))
        print(f"server: {server.url} serving {artifacts}; client at nice 19, one asyncio loop; k = {K}")
        print(HEADER)
        try:
            runs = asyncio.run(measure(server.url, args, material))
        finally:
            server.process.terminate()
            server.process.wait(timeout=30)
    for run in runs.values():
        for error, count in list(run.errors.items())[:3]:
            print(f"error ({run.label}, {count}x): {error}")
    if "crowd" in runs:
        crowd_run = runs["crowd"]
        print(
            f"crowd: {len(crowd_run.latencies)} answered (p50 {crowd_run.p(0.5):.2f} s), {len(crowd_run.busy)} told "
            f"the queue is full (slowest {max(crowd_run.busy, default=0.0):.3f} s), {sum(crowd_run.errors.values())} "
            f"errors; {runs['after crowd'].p(0.5):.3f} s p50 for a lone user after"
        )
    if args.no_targets or args.quick:
        return 0
    found = targets(runs)
    for target in found:
        print(target.describe())
    missed = [target.name for target in found if not target.met]
    print(
        f"targets: {len(found) - len(missed)} of {len(found)} met"
        + (f"; missed: {', '.join(missed)}" if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
