"""Query latency and start-up of the app at Flickr30k scale, each against its floor measured in the same run.

    python -m benchmarks.query_latency                  # builds .cache/benchmarks/flickr-scale-* once (~3 min)
    python -m benchmarks.query_latency --queries 50 --client-queries 100 --startups 3      # the defaults

The index: ``benchmarks.flickr_scale`` (the default architecture with random weights, 31,783 images, 158,915
captions, 512-d float16). Queries: generated captions of Flickr length, 500x375 photo-like JPEGs; k = 10.

in-process  ``Searcher`` from the raw query (text as typed, JPEG bytes as uploaded) vs the floor
            (``benchmarks.bare_floor``: the bare tower on an already-prepared input, then ``topk`` over the same
            matrix), the least any search costs. Target per kind: p50 / floor p50 < 1.25.
client      the launched app (``benchmarks.noop_app``: app.py plus two twins of each endpoint). The no-op twin answers
            a same-sized result without searching: what Gradio costs anyway. The floor twin answers the same after
            running the floor on the compute thread: the floor as a served request meets it, on cores that idled
            between requests, which costs more than back to back (docs/benchmarks.md). Target per kind:
            (endpoint p50 - no-op p50) / (floor twin p50 - no-op p50) < 1.25, what the app adds to the work it
            cannot skip. Two clients: "json client" takes the answer's JSON and file URLs, "client" also fetches
            every gallery file, all at once, as a browser showing the answer does.
start-up    ``python app.py`` from spawn to the first answered query (JSON), and its peak RSS, vs a bare ``import``
            of the app's dependencies. Targets: < import + 5 s, < import's RSS + 1.5 GB.

The client is ``benchmarks.gradio_http`` (raw HTTP on one asyncio loop), not ``gradio_client``: gradio_client sees
each answer only on its 50 ms poll, so an endpoint 20 ms slower than its twin comes out 0 or 50 ms slower, and it
builds a TLS context (~40 ms of CPU) for each of its HTTP clients, on the cores the server searches with. The
client also runs at SCHED_IDLE, so what CPU it does use is left over by the server, as on another machine. Each
kind's queries run interleaved with their floor (and twins) one by one, the first turning, so the machine's drift
hits them alike. Exits 1 if any target is missed; the last line carries every ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import bare_floor, flickr_scale
from benchmarks.common import FLICKR30K_IMAGES, Target, command_line, machine_line, percentile, seconds
from benchmarks.gradio_http import GradioHttp
from benchmarks.live_server import free_port, start_app
from crossmodal.artifacts.contract import load_verified
from crossmodal.model.dual_encoder import tokenize
from crossmodal.model.preprocess import decode_for_eval, image_batch
from crossmodal.serving.search import Searcher
from crossmodal.synthetic.dataset import sample_captions

K = 10
LATENCY_TARGET = 1.25  # x floor
STARTUP_SECONDS = 5.0  # over the bare import
STARTUP_GB = 1.5  # peak RSS over the bare import's
KINDS = ("text_to_image", "image_to_text", "image_to_image")
CLIENTS = {"client": True, "json client": False}  # does it fetch the gallery files?
LABEL = 44  # characters of a row's label
DEPENDENCIES = "gradio, torch, torchvision, transformers, safetensors, huggingface_hub, pyarrow.parquet, PIL.Image"


@dataclass
class Queries:
    texts: list[str]
    images: list[bytes]


def make_queries(count: int) -> Queries:
    texts = [five[0] for five in sample_captions(count, seed=1)]  # not the index's captions
    return Queries(texts, flickr_scale.query_images(count))


def interleave(measures: list[Callable[[int], object]], count: int, warmup: int = 3) -> list[list[float]]:
    """Time each of ``measures`` on query i, one after the other, for each i; which goes first turns with i, so none
    always follows the same one. Returns the seconds of each measure."""
    for index in range(warmup):
        for measure in measures:
            measure(index % count)
    timed: list[list[float]] = [[] for _ in measures]
    for index in range(count):
        for turn in range(len(measures)):
            which = (index + turn) % len(measures)
            timed[which].append(seconds(lambda: measures[which](index)))  # noqa: B023 - called at once, here
    return timed


def _row(label: str, values: list[float]) -> str:
    return f"  {label:<{LABEL}} {1000 * percentile(values, 0.5):>8.1f} {1000 * percentile(values, 0.95):>8.1f}"


def _p50_ratio(timed: list[float], floor: list[float]) -> float:
    return percentile(timed, 0.5) / percentile(floor, 0.5)


# --- in-process -----------------------------------------------------------------------------------------------------


class Floor:
    """The least any search can cost (``benchmarks.bare_floor``), on each query prepared beforehand."""

    def __init__(self, searcher: Searcher, queries: Queries) -> None:
        self.searcher = searcher
        config, tokenizer = searcher.config, searcher.tokenizer
        self.tokens = [tokenize(tokenizer, [text], config) for text in queries.texts]
        self.pixels = [image_batch([decode_for_eval(data, config)], config) for data in queries.images]

    def text_to_image(self, index: int) -> list[int]:
        return bare_floor.text_to_image(self.searcher, self.tokens[index], K)

    def image_to_text(self, index: int) -> list[int]:
        return bare_floor.image_to_text(self.searcher, self.pixels[index], K)

    def image_to_image(self, index: int) -> list[int]:
        return bare_floor.image_to_image(self.searcher, self.pixels[index], K)


class InProcess:
    """What each endpoint's handler calls, from the raw query (text as typed, image as uploaded bytes)."""

    def __init__(self, searcher: Searcher, queries: Queries) -> None:
        self.searcher = searcher
        self.queries = queries

    def text_to_image(self, index: int) -> list[int]:
        return [hit.image_index for hit in self.searcher.text_to_image(self.queries.texts[index], K)]

    def image_to_text(self, index: int) -> list[int]:
        return [hit.caption_index for hit in self.searcher.image_to_text(self.queries.images[index], K)]

    def image_to_image(self, index: int) -> list[int]:
        return [hit.image_index for hit in self.searcher.image_to_image(self.queries.images[index], K)]


def in_process_targets(ours: InProcess, floor: Floor, count: int) -> list[Target]:
    found = []
    for kind in KINDS:
        timed, floored = interleave([getattr(ours, kind), getattr(floor, kind)], count)
        print(_row(f"floor {kind}", floored))
        print(_row(f"in-process {kind}", timed))
        found.append(Target(f"in-process {kind}", _p50_ratio(timed, floored), LATENCY_TARGET, at_least=False))
    return found


# --- through the launched app ---------------------------------------------------------------------------------------


def served(
    loop: asyncio.AbstractEventLoop, client: GradioHttp, endpoint: str, queries: Queries, files: bool, texts: list[str]
) -> Callable[[int], None]:
    """Query i sent to ``endpoint`` (a text endpoint gets ``texts[i]``, an image one uploads ``queries.images[i]``),
    waited for until its answer (and, with ``files``, every gallery file) has arrived."""

    def send(index: int) -> None:
        query = texts[index] if endpoint.endswith("text_to_image") else queries.images[index]
        outcome, outputs = loop.run_until_complete(client.search(endpoint, query, K, files))
        if outcome != "complete" or not isinstance(outputs[1], list) or len(outputs[1]) != K:
            raise RuntimeError(f"/{endpoint} did not answer {K} results: {outcome} {str(outputs)[:300]}")

    return send


def client_targets(url: str, queries: Queries, floor_ids: list[str], count: int) -> list[Target]:
    """Each endpoint against its no-op and floor twins, through each client, interleaved query by query.
    ``floor_ids``: each query's token ids, as the text -> image floor twin takes them."""
    found = []
    loop = asyncio.new_event_loop()
    client = GradioHttp(url, connections=K)
    try:
        for flavour, files in CLIENTS.items():
            for kind in KINDS:
                endpoint, noop, floor = (
                    served(loop, client, kind, queries, files, queries.texts),
                    served(loop, client, f"noop_{kind}", queries, files, queries.texts),
                    served(loop, client, f"floor_{kind}", queries, files, floor_ids),
                )
                timed, idle, floored = interleave([endpoint, noop, floor], count)
                print(_row(f"{flavour} no-op twin {kind}", idle))
                print(_row(f"{flavour} floor twin {kind}", floored))
                print(_row(f"{flavour} {kind}", timed))
                idle_p50 = percentile(idle, 0.5)
                served_floor, extra = percentile(floored, 0.5) - idle_p50, percentile(timed, 0.5) - idle_p50
                ratio = extra / served_floor if served_floor > 0 else float("inf")
                found.append(Target(f"{flavour} {kind}", ratio, LATENCY_TARGET, at_least=False))
    finally:
        loop.run_until_complete(client.close())
        loop.run_until_complete(loop.shutdown_asyncgens())  # and the closings of httpx's streams still queued
        loop.close()
    return found


@contextlib.contextmanager
def client_yields_the_cores():
    """Run this thread at SCHED_IDLE: it gets a core only when the server leaves one idle, as a client on another
    machine would; on a 2-core machine its CPU would otherwise come out of the server's two compute threads."""
    policy = os.sched_getscheduler(0)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, os.sched_param(0))


# --- start-up -------------------------------------------------------------------------------------------------------


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def bare_import() -> tuple[float, float]:
    """Seconds and peak RSS (MB) of a fresh interpreter importing the app's dependencies and nothing else."""
    # VmHWM, read by the child itself: getrusage's maxrss survives exec and would count this (large) parent's pages.
    report = "print([line for line in open('/proc/self/status') if line.startswith('VmHWM:')][0].split()[1])"
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", f"import {DEPENDENCIES}; {report}"], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if output.returncode != 0:
        raise RuntimeError(f"importing {DEPENDENCIES} failed:\n{output.stderr[-2000:]}")
    return elapsed, int(output.stdout.split()[-1]) / 1024


async def _first_answer(url: str, query: str) -> None:
    client = GradioHttp(url, connections=1)
    try:
        outcome, outputs = await client.search("text_to_image", query, K)
    finally:
        await client.close()
    if outcome != "complete":
        raise RuntimeError(f"the first query failed: {outcome} {str(outputs)[:300]}")


def app_start(folder: Path, query: str, log: Path) -> tuple[float, float]:
    """Seconds from spawning ``python app.py`` to the first answered query, and the server's peak RSS (MB) then."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--artifacts", str(folder), "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                time.sleep(0.02)
        asyncio.run(_first_answer(url, query))
        return time.perf_counter() - started, _peak_rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def startup_targets(folder: Path, query: str, workdir: Path, runs: int) -> list[Target]:
    imports = [bare_import() for _ in range(runs)]
    starts = [app_start(folder, query, workdir / f"start_{run}.log") for run in range(runs)]
    import_s, import_mb = percentile([t for t, _ in imports], 0.5), percentile([m for _, m in imports], 0.5)
    start_s, start_mb = percentile([t for t, _ in starts], 0.5), percentile([m for _, m in starts], 0.5)
    print(f"  {'start-up (median of ' + str(runs) + ')':<{LABEL}} {'seconds':>8} {'peak MB':>8}")
    print(f"  {'bare import of the dependencies':<{LABEL}} {import_s:>8.2f} {import_mb:>8.0f}")
    print(f"  {'app: spawn to first answered query':<{LABEL}} {start_s:>8.2f} {start_mb:>8.0f}")
    return [
        Target("start-up extra s", start_s - import_s, STARTUP_SECONDS, at_least=False),
        Target("start-up extra GB", (start_mb - import_mb) / 1024, STARTUP_GB, at_least=False),
    ]


# --- report ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=50, help="timed in-process queries of each kind")
    parser.add_argument("--client-queries", type=int, default=100, help="timed queries of each kind, per client")
    parser.add_argument("--startups", type=int, default=3, help="app starts timed (the median counts)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/benchmarks"))
    parser.add_argument("--images", type=int, default=FLICKR30K_IMAGES, help="index size (fewer: a dry run)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crossmodal-latency-") as workdir:
        return measure(args, Path(workdir), command_line("benchmarks.query_latency", argv))


def measure(args: argparse.Namespace, workdir: Path, command: str) -> int:
    """Every target, with the servers' logs in ``workdir``; returns the exit status."""
    folder = flickr_scale.ensure(args.cache, args.images)
    queries = make_queries(max(args.queries, args.client_queries))
    searcher = Searcher(load_verified(folder))
    print(command)
    print(machine_line(torch.device("cpu")))
    print(
        f"index: {len(searcher.image_ids):,} images, {len(searcher.captions):,} captions, "
        f"{searcher.config.embed_dim}-d {searcher.image_embeddings.dtype}; k = {K}"
    )
    print(f"  {'milliseconds':<{LABEL}} {'p50':>8} {'p95':>8}")
    floor = Floor(searcher, queries)
    found = in_process_targets(InProcess(searcher, queries), floor, args.queries)
    floor_ids = [bare_floor.ids_text(tokens) for tokens in floor.tokens]
    del searcher, floor  # the server below gets the memory and both cores

    server = start_app(folder, workdir / "noop_app.log", entry=["-m", "benchmarks.noop_app"])
    try:
        with client_yields_the_cores():
            found += client_targets(server.url, queries, floor_ids, args.client_queries)
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
    found += startup_targets(folder, queries.texts[0], workdir, args.startups)

    for target in found:
        print(target.describe())
    print("ratios: " + ", ".join(f"{target.name} {target.value:.2f}" for target in found))
    return 0 if all(target.met for target in found) else 1


if __name__ == "__main__":
    sys.exit(main())
