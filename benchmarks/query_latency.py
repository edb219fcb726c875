"""Query latency and start-up of the app at Flickr30k scale on this machine, each against its floor in the same run.

    python -m benchmarks.query_latency                  # builds .cache/benchmarks/flickr-scale-* once (~3 min)
    python -m benchmarks.query_latency --queries 50 --startups 3

The index: ``benchmarks.flickr_scale`` (the default architecture with random weights, 31,783 images, 158,915
captions, 512-d). Queries: generated captions of Flickr length for text -> image, 500x375 photo-like JPEGs for
image -> text and image -> image, k = 10.

in-process  ``Searcher`` (what each endpoint calls) vs the floor: the bare tower forward on an already-preprocessed
            input plus a bare ``topk`` over the same embedding matrix. Target: p50 <= 1.25 x floor p50. A row for
            12 MP phone uploads (image -> text) follows, as context without a target.
client      ``gradio_client`` against the launched app (``benchmarks.noop_app``: app.py plus two twins of each
            endpoint). The no-op twin returns a same-sized answer without searching: the framework's own cost. The
            floor twin returns the same and also runs the query's floor on the compute thread: the floor as the
            server meets it, after the same pause between requests and on the same cold cores. Target: p50 <= no-op
            p50 + 1.25 x floor, with the floor the floor twin's p50 less the no-op's. The served floor's ratio to
            the in-process one, and the endpoint's extra in in-process floors, are printed as context.
            Two clients from ``benchmarks.measuring_client`` (woken by their answer instead of gradio_client's
            50 ms poll, one TLS context for all their HTTP clients; it says why): the default one, which downloads
            every gallery file, and a JSON-only one (``download_files=False``), which isolates what the server
            adds. Both must meet the target. A stock JSON-only client follows, as context without a target: its
            answers arrive on a 50 ms grid.
start-up    ``python app.py`` from spawn to the first answered query (through gradio_client, which receives the
            answer's JSON and file URLs) and its peak RSS, vs a bare ``import`` of the app's dependencies.
            Targets: time <= import + 5 s, RSS <= import RSS + 1.5 GB.

Each kind's queries are interleaved with their floor (and twins) one by one, so the machine's drift hits them alike.
Context rows also time the in-process search and floor after 50 ms of idling each, as a server searches between
requests rather than back to back, and time the floors again after the client rows, to show how far the machine
drifted while those ran.
Exits 1 if any target is missed; the last line carries every ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from gradio_client import Client, handle_file

from benchmarks import bare_floor, flickr_scale
from benchmarks.common import FLICKR30K_IMAGES, percentile, seconds
from benchmarks.measuring_client import measuring_client
from crossmodal.artifacts import verify_artifacts
from crossmodal.preprocess import decode_for_eval, image_batch, tokenize
from crossmodal.search import Searcher
from crossmodal.synthetic import sample_captions
from tests.live_server import free_port, start_app

K = 10
LATENCY_TARGET = 1.25  # x floor
STARTUP_SECONDS = 5.0  # over the bare import
STARTUP_RSS_MB = 1536.0  # over the bare import's
KINDS = ("text_to_image", "image_to_text", "image_to_image")
PHONE_UPLOADS = 5  # distinct 12 MP JPEGs, taken in turn
PAUSE = 0.05  # s of idling before each query of the context rows: a server searches after a pause, not back to back
PHONE = "x".join(map(str, flickr_scale.PHONE_SIZE))
LABEL = 62  # characters of a row's label
DEPENDENCIES = "gradio, torch, torchvision, transformers, safetensors, huggingface_hub, pyarrow.parquet, PIL.Image"


@dataclass
class Queries:
    texts: list[str]
    images: list[bytes]
    image_files: list[str]  # the same images as files, for gradio_client to upload


def make_queries(count: int, folder: Path) -> Queries:
    texts = [five[0] for five in sample_captions(count, seed=1)]  # not the index's captions
    images = flickr_scale.query_images(count)
    files = []
    for index, data in enumerate(images):
        path = folder / f"query_{index}.jpg"
        path.write_bytes(data)
        files.append(str(path))
    return Queries(texts, images, files)


# --- the floor and the real thing, query by query -------------------------------------------------------------------


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
        query = self.searcher.text_query(self.queries.texts[index])
        return [hit.image_index for hit in self.searcher.text_to_image(query, K)]

    def image_to_text(self, index: int) -> list[int]:
        return self.image_to_text_bytes(self.queries.images[index])

    def image_to_text_bytes(self, data: bytes) -> list[int]:
        return [hit.caption_index for hit in self.searcher.image_to_text(data, K)]

    def image_to_image(self, index: int) -> list[int]:
        return [hit.image_index for hit in self.searcher.image_to_image(self.queries.images[index], K)]


# How each client flavour is built: the default downloads the answer's files, the JSON-only one takes their URLs.
# The targets apply to CLIENTS; CONTEXT_CLIENTS show what a stock gradio_client sees, with its 50 ms poll.
CLIENTS = {"client": (measuring_client, {}), "json client": (measuring_client, {"download_files": False})}
CONTEXT_CLIENTS = {"stock json client": (Client, {"verbose": False, "download_files": False})}


class ThroughClient:
    """One gradio_client user of the launched app, calling an endpoint or one of its twins (``prefix``).

    ``texts`` replaces the queries' captions as the text sent: the floor twin takes token ids.
    """

    def __init__(self, client: Client, queries: Queries, prefix: str = "", texts: list[str] | None = None) -> None:
        self.client = client
        self.queries = queries
        self.prefix = prefix
        self.texts = queries.texts if texts is None else texts

    def _call(self, kind: str, index: int):
        query = self.texts[index] if kind == "text_to_image" else handle_file(self.queries.image_files[index])
        return self.client.predict(query, K, api_name=f"/{self.prefix}{kind}")

    def text_to_image(self, index: int):
        return self._call("text_to_image", index)

    def image_to_text(self, index: int):
        return self._call("image_to_text", index)

    def image_to_image(self, index: int):
        return self._call("image_to_image", index)


def phone_uploads(ours: InProcess, floor: Floor, count: int) -> tuple[list[float], list[float]]:
    """Context, no target: image -> text from 12 MP phone JPEGs against the same floor. Decoding them is the
    difference, which JPEG DCT scaling (``preprocess.decode_for_eval``) keeps to a fraction of a full decode."""
    phone = flickr_scale.phone_images(PHONE_UPLOADS)
    return interleave([lambda index: ours.image_to_text_bytes(phone[index % len(phone)]), floor.image_to_text], count)


def _scan(matrix: torch.Tensor, queries: torch.Tensor) -> Callable[[int], list[int]]:
    return lambda index: bare_floor.top(matrix, queries[index], K)


def scan_rows(searcher: Searcher, count: int) -> None:
    """Context: the floor's scan alone over each stored matrix (float16), next to the same scan over a float32 copy,
    query by query: what storing the index in float16 buys. The ratio is float32's time to float16's."""
    generator = torch.Generator().manual_seed(0)
    for name, matrix in (("images", searcher.image_embeddings), ("captions", searcher.text_embeddings)):
        wide = matrix.float()
        queries = torch.nn.functional.normalize(torch.randn(count, matrix.shape[1], generator=generator), dim=1)
        stored, single = interleave([_scan(matrix, queries), _scan(wide, queries)], count)
        shape = f"{matrix.shape[0]:,} x {matrix.shape[1]} {name}"
        print(_row(f"scan + topk over {shape}, {str(matrix.dtype).removeprefix('torch.')}", stored))
        print(_row(f"scan + topk over {shape}, float32 copy", single, percentile(stored, 0.5)) + " (context)")
        del wide


@contextlib.contextmanager
def client_yields_the_cores():
    """Run this thread, and the client threads it starts, at SCHED_IDLE: they get a core only when the server leaves
    one idle, as a client on another machine would. A stock gradio_client spends ~85 ms of CPU per call (most of it
    building TLS contexts, which the measuring client does once); on a shared 2-core machine that time would come out
    of the server's two compute threads and be counted as the endpoint's."""
    policy = os.sched_getscheduler(0)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, os.sched_param(0))


@contextlib.contextmanager
def client_files_in(folder: Path):
    """gradio_client downloads into a shared temporary folder and leaves an empty temporary folder behind for every
    file it downloads (~10 per gallery call, 80,000 a week of runs here). Both go under ``folder`` while inside."""
    folder.mkdir()
    previous, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def interleave(measures: list[Callable[[int], object]], count: int, warmup: int = 3, pause: float = 0.0):
    """Time each of ``measures`` on query i, one after the other, for each i, each after ``pause`` seconds of idling
    (not timed). Which goes first turns with i, so none always follows the same one. Returns seconds per measure."""
    for index in range(warmup):
        for measure in measures:
            measure(index % count)
    timed: list[list[float]] = [[] for _ in measures]
    rest = time.sleep if pause else lambda _: None  # back to back means back to back: not even a sleep(0)
    for index in range(count):
        for turn in range(len(measures)):
            which = (index + turn) % len(measures)
            rest(pause)
            timed[which].append(seconds(lambda: measures[which](index)))  # noqa: B023 - called at once, here
    return timed


def client_rows(
    url: str, queries: Queries, floor_ids: list[str], floors: dict[str, float], count: int
) -> tuple[dict[str, float], list[str]]:
    """Each endpoint against its no-op and floor twins through each client flavour, interleaved query by query.

    ``floor_ids``: each query's token ids, as the text -> image floor twin takes them; ``floors``: the in-process floor
    p50 (seconds) per kind, for context. The target's floor is the floor twin's p50 less the no-op's: the floor as
    the server meets it, after the same pause between requests. Prints the rows; returns each targeted ratio (the
    endpoint's cost beyond the framework's, in served floors) and the misses.
    """
    ratios, missed = {}, []
    for flavour, (make_client, options) in {**CLIENTS, **CONTEXT_CLIENTS}.items():
        targeted = flavour in CLIENTS
        if "download_files" not in options:  # it downloads: into the current temporary folder, not gradio's shared one
            options = {**options, "download_files": tempfile.gettempdir()}
        client = make_client(url, **options)
        real, noop = ThroughClient(client, queries), ThroughClient(client, queries, prefix="noop_")
        floor = ThroughClient(client, queries, prefix="floor_", texts=floor_ids)
        for kind in KINDS:
            timed, idle, floored = interleave([getattr(real, kind), getattr(noop, kind), getattr(floor, kind)], count)
            p50, idle_p50 = percentile(timed, 0.5), percentile(idle, 0.5)
            served, extra = percentile(floored, 0.5) - idle_p50, p50 - idle_p50  # the floor's and ours, beyond a no-op
            ratio = extra / served if served > 0 else float("inf")
            context = "" if targeted else " (context)"
            print(_row(f"{flavour} no-op {kind}", idle))
            print(
                _row(f"{flavour} served floor {kind} (vs in-process)", floored)
                + f" {served / floors[kind]:>7.2f} (context)"
            )
            print(
                _row(f"{flavour} {kind} (extra / served floor)", timed)
                + f" {ratio:>7.2f} ({extra / floors[kind]:.2f} in-process floors){context}"
            )
            if not targeted:
                continue
            ratios[f"{flavour} {kind}"] = ratio
            allowed = idle_p50 + LATENCY_TARGET * served
            if p50 > allowed:
                missed.append(f"{flavour} {kind}: p50 {1000 * p50:.1f} ms > {1000 * allowed:.1f} ms")
    return ratios, missed


def floor_drift(folder: Path, queries: Queries, floors: dict[str, list[float]], count: int) -> None:
    """Context: the floors once more, after the client rows, against those measured before them (the targets'): how
    far the machine drifted while the client rows ran."""
    floor = Floor(Searcher(verify_artifacts(folder)), queries)
    for kind in KINDS:
        (again,) = interleave([getattr(floor, kind)], count)
        print(_row(f"floor {kind}, again after the client rows", again, percentile(floors[kind], 0.5)) + " (context)")


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
        # Answered means the server's answer arrived; fetching the 10 thumbnails it links is the client's own cost
        # (a new HTTP client per file), measured by the no-op rows above instead.
        measuring_client(url, download_files=False).predict(query, K, api_name="/text_to_image")
        elapsed = time.perf_counter() - started
        return elapsed, _peak_rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- report ---------------------------------------------------------------------------------------------------------


def _row(label: str, values: list[float], reference: float | None = None) -> str:
    p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
    ratio = f"{p50 / reference:>7.2f}" if reference else ""
    return f"  {label:<{LABEL}} {1000 * p50:>8.1f} {1000 * p95:>8.1f} {ratio}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=50, help="timed in-process queries of each kind")
    parser.add_argument(
        "--client-queries", type=int, default=100, help="timed gradio_client queries of each kind, per client"
    )
    parser.add_argument("--startups", type=int, default=3, help="app starts timed (the median counts)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/benchmarks"))
    parser.add_argument("--images", type=int, default=FLICKR30K_IMAGES, help="index size (fewer: a dry run)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crossmodal-latency-") as workdir:
        return measure(args, Path(workdir))


def measure(args: argparse.Namespace, workdir: Path) -> int:
    """Every row, with query files, logs and the clients' downloads in ``workdir``; returns the exit status."""
    folder = flickr_scale.ensure(args.cache, args.images)
    queries = make_queries(max(args.queries, args.client_queries), workdir)
    searcher = Searcher(verify_artifacts(folder))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; index {len(searcher.image_ids):,} images, {len(searcher.captions):,} captions, "
        f"{searcher.config.embed_dim}-d {searcher.image_embeddings.dtype}, k = {K}"
    )

    ratios: dict[str, float] = {}
    missed: list[str] = []
    print(f"  {'milliseconds':<{LABEL}} {'p50':>8} {'p95':>8} {'ratio':>7}")
    floor, ours = Floor(searcher, queries), InProcess(searcher, queries)
    floors = {}
    for kind in KINDS:
        timed, floors[kind] = interleave([getattr(ours, kind), getattr(floor, kind)], args.queries)
        ratios[f"in-process {kind}"] = ratio = percentile(timed, 0.5) / percentile(floors[kind], 0.5)
        print(_row(f"floor {kind}", floors[kind]))
        print(_row(f"in-process {kind}", timed, percentile(floors[kind], 0.5)))
        if ratio > LATENCY_TARGET:
            missed.append(f"in-process {kind}: {ratio:.2f} x floor > {LATENCY_TARGET}")
    scan_rows(searcher, args.queries)
    timed, floor_again = phone_uploads(ours, floor, args.queries)
    print(_row(f"in-process image_to_text, {PHONE} upload", timed, percentile(floor_again, 0.5)) + " (context)")
    # What a search costs when the machine has idled before it, as a server's has: the ratio is to the floor measured
    # back to back above, the target's floor, so it shows what the pause alone adds.
    for kind in KINDS:
        timed, floor_paused = interleave([getattr(ours, kind), getattr(floor, kind)], args.queries, pause=PAUSE)
        reference = percentile(floors[kind], 0.5)
        print(_row(f"floor {kind}, after {1000 * PAUSE:.0f} ms idle", floor_paused, reference) + " (context)")
        print(_row(f"in-process {kind}, after {1000 * PAUSE:.0f} ms idle", timed, reference) + " (context)")
    floor_ids = [bare_floor.ids_text(tokens) for tokens in floor.tokens]
    del searcher, floor, ours  # the server below gets the memory and both cores

    server = start_app(folder, workdir / "noop_app.log", entry=["-m", "benchmarks.noop_app"])
    try:
        with client_yields_the_cores(), client_files_in(workdir / "client"):
            floor_p50 = {kind: percentile(times, 0.5) for kind, times in floors.items()}
            client_ratios, client_missed = client_rows(server.url, queries, floor_ids, floor_p50, args.client_queries)
        ratios.update(client_ratios)
        missed += client_missed
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
    floor_drift(folder, queries, floors, args.queries)

    imports = [bare_import() for _ in range(args.startups)]
    starts = [app_start(folder, queries.texts[0], workdir / f"start_{run}.log") for run in range(args.startups)]
    import_s, import_mb = percentile([t for t, _ in imports], 0.5), percentile([m for _, m in imports], 0.5)
    start_s, start_mb = percentile([t for t, _ in starts], 0.5), percentile([m for _, m in starts], 0.5)
    print(f"  {'start-up (median of ' + str(args.startups) + ')':<{LABEL}} {'seconds':>8} {'peak MB':>8}")
    print(f"  {'bare import of the dependencies':<{LABEL}} {import_s:>8.2f} {import_mb:>8.0f}")
    print(f"  {'app: spawn to first answered query':<{LABEL}} {start_s:>8.2f} {start_mb:>8.0f}")
    ratios["start-up extra s"] = start_s - import_s
    ratios["start-up extra GB"] = (start_mb - import_mb) / 1024
    if start_s > import_s + STARTUP_SECONDS:
        missed.append(f"start-up {start_s:.2f} s > import {import_s:.2f} s + {STARTUP_SECONDS} s")
    if start_mb > import_mb + STARTUP_RSS_MB:
        missed.append(f"start-up peak RSS {start_mb:.0f} MB > import {import_mb:.0f} MB + {STARTUP_RSS_MB:.0f} MB")

    for line in missed:
        print(f"MISSED {line}")
    print("ratios: " + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items()))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
