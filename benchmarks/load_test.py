"""Load: concurrent gradio_client users against the launched app, next to the same queries sent by one user.

    python -m benchmarks.load_test --artifacts runs/tiny/artifacts [--clients 8 --seconds 60]

Starts `python app.py` on a free local port, then
  floor: one client sends each kind of query (text -> image, image -> text, image -> image) sequentially;
  load:  N clients, each in its own thread with its own Client, send a random mix of the three for S seconds.
Reports p50/p95 per kind and the ratio of loaded to unloaded p50; exits non-zero on any server error.
Traffic goes to 127.0.0.1 only, and the loop is bounded in time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from gradio_client import Client, handle_file

from benchmarks.common import percentile
from tests.live_server import start_app

KINDS = ("/text_to_image", "/image_to_text", "/image_to_image")


def make_queries(artifacts: Path, folder: Path, count: int = 40) -> tuple[list[str], list[str]]:
    """Real captions and real thumbnails (as files to upload) from the artifact folder."""
    rng = random.Random(0)
    captions = pq.read_table(artifacts / "captions.parquet", columns=["caption"]).column("caption").to_pylist()
    thumbnails = pq.read_table(artifacts / "images.parquet", columns=["thumbnail"]).column("thumbnail")
    texts = rng.sample(captions, count)
    images = []
    for index in rng.sample(range(len(thumbnails)), count):
        path = folder / f"query_{index}.jpg"
        path.write_bytes(thumbnails[index].as_py())
        images.append(str(path))
    return texts, images


def send(client: Client, kind: str, texts: list[str], images: list[str], rng: random.Random) -> float:
    query = rng.choice(texts) if kind == "/text_to_image" else handle_file(rng.choice(images))
    started = time.perf_counter()
    client.predict(query, 10, api_name=kind)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--floor-queries", type=int, default=20, help="sequential queries of each kind, unloaded")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="crossmodal-load-") as scratch:
        folder = Path(scratch)
        texts, images = make_queries(args.artifacts, folder)
        server = start_app(args.artifacts, folder / "server.log")
        try:
            # Floor: the same queries from one client, one at a time.
            rng = random.Random(1)
            client = Client(server.url, verbose=False)
            floor = {
                kind: [send(client, kind, texts, images, rng) for _ in range(args.floor_queries)] for kind in KINDS
            }

            # Load: N clients, a random mix, until the deadline.
            latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
            errors: list[str] = []
            lock = threading.Lock()
            deadline = time.monotonic() + args.seconds

            def user(seed: int) -> None:
                user_rng = random.Random(seed)
                user_client = Client(server.url, verbose=False)
                while time.monotonic() < deadline:
                    kind = user_rng.choice(KINDS)
                    try:
                        elapsed = send(user_client, kind, texts, images, user_rng)
                    except Exception as error:  # any failure is a server error for this benchmark
                        with lock:
                            errors.append(f"{kind}: {type(error).__name__}: {error}")
                        continue
                    with lock:
                        latencies[kind].append(elapsed)

            threads = [threading.Thread(target=user, args=(seed,)) for seed in range(args.clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
        finally:
            server.process.terminate()
            server.process.wait(timeout=30)

    total = sum(len(values) for values in latencies.values())
    print(f"{args.clients} clients for {args.seconds:.0f} s against {args.artifacts}: {total} requests "
          f"({total / wall:.1f}/s), {len(errors)} errors")  # fmt: skip
    print(f"{'endpoint':<16} {'n':>5} {'floor p50':>10} {'load p50':>9} {'load p95':>9} {'p50 ratio':>10}")
    ratios = []
    for kind in KINDS:
        values = latencies[kind]
        if not values:
            continue
        floor_p50, p50, p95 = statistics.median(floor[kind]), statistics.median(values), percentile(values, 0.95)
        ratios.append(p50 / floor_p50)
        print(f"{kind:<16} {len(values):>5} {floor_p50:>10.3f} {p50:>9.3f} {p95:>9.3f} {p50 / floor_p50:>10.2f}")
    for error in errors[:5]:
        print(f"error: {error}")
    print(f"ratio loaded / unloaded p50 (worst endpoint): {max(ratios):.2f}; errors: {len(errors)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
