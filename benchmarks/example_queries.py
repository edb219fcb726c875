"""Which example queries the demo answers: each candidate's precision in the top 10, asked of the served app.

    python -m benchmarks.example_queries --artifacts runs/demo/artifacts

The app's page offers example queries (crossmodal/serving/page.py, ``PLAIN_DEMO_EXAMPLES``); a person clicks one and
judges the model by what comes back, so the page should offer only queries the shipped model gets mostly right.
Every candidate here states what a right picture has (the attributes its words name, nothing else); it is sent to
/text_to_image over HTTP with gradio_client, and a hit is a top-10 picture with all of them. Precision is hits out
of what a perfect ranking could find (10, or fewer when the index holds fewer right pictures). A candidate is
offered when its precision reaches ``--offer-at``; the shipped examples are marked, so a shipped one under the bar
shows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from gradio_client import Client

from benchmarks.live_server import start_app
from benchmarks.short_queries import scenes_by_image_id
from crossmodal.serving.page import PLAIN_DEMO_EXAMPLES
from crossmodal.synthetic.scenes import PairScene, Scene

TOP_K = 10


@dataclass(frozen=True)
class Candidate:
    text: str
    wants: dict[str, str]  # Scene attribute -> value: what a right picture has
    words: str  # "training": the generated captions' words; "unseen": words no training caption uses


CANDIDATES = (
    Candidate(
        "a small red circle at the top",
        {"colour": "red", "shape": "circle", "position": "top", "size": "small"},
        "training",
    ),
    Candidate("a scarlet ball near the top", {"colour": "red", "shape": "circle", "position": "top"}, "unseen"),
    Candidate("an emerald star on the left", {"colour": "green", "shape": "star", "position": "left"}, "unseen"),
    Candidate("a giant cobalt box", {"colour": "blue", "shape": "square", "size": "large"}, "unseen"),
    Candidate("something on a golden backdrop", {"background": "yellow"}, "unseen"),
    Candidate("a green star on the left", {"colour": "green", "shape": "star", "position": "left"}, "training"),
    Candidate("a large blue square", {"colour": "blue", "shape": "square", "size": "large"}, "training"),
    Candidate("something on a yellow background", {"background": "yellow"}, "training"),
    Candidate("a white cross in the centre", {"colour": "white", "shape": "cross", "position": "centre"}, "training"),
    Candidate("a black ring at the bottom", {"colour": "black", "shape": "ring", "position": "bottom"}, "training"),
    Candidate("an orange triangle", {"colour": "orange", "shape": "triangle"}, "training"),
    Candidate(
        "a purple circle on a white background",
        {"colour": "purple", "shape": "circle", "background": "white"},
        "training",
    ),
    Candidate("a yellow star", {"colour": "yellow", "shape": "star"}, "training"),
    Candidate(
        "a red square on a black background", {"colour": "red", "shape": "square", "background": "black"}, "training"
    ),
)


def is_right(scene: Scene | PairScene, candidate: Candidate) -> bool:
    """One-figure pictures only: a two-figure scene's attributes are not one figure's."""
    return isinstance(scene, Scene) and all(getattr(scene, name) == value for name, value in candidate.wants.items())


def shipped_candidates() -> tuple[Candidate, ...]:
    """The page's own examples, each with what a right picture has; a shipped example no candidate judges is an
    error, so the page cannot offer a query this benchmark never scored."""
    by_text = {candidate.text: candidate for candidate in CANDIDATES}
    unjudged = [text for text in PLAIN_DEMO_EXAMPLES if text not in by_text]
    if unjudged:
        raise KeyError(f"the page offers examples no candidate judges: {unjudged}")
    return tuple(by_text[text] for text in PLAIN_DEMO_EXAMPLES)


def measure(
    url: str, artifacts: Path, scenes: dict[str, Scene | PairScene], candidates: tuple[Candidate, ...] = CANDIDATES
) -> list[dict]:
    client = Client(url, verbose=False, download_files=False)
    indexed = pq.read_table(artifacts / "images.parquet", columns=["image_id"]).column("image_id").to_pylist()
    rows = []
    for candidate in candidates:
        _, results = client.predict(candidate.text, TOP_K, api_name="/text_to_image")
        hits = sum(is_right(scenes[result["image_id"]], candidate) for result in results)
        ceiling = min(TOP_K, sum(is_right(scenes[image_id], candidate) for image_id in indexed))
        rows.append({"query": candidate.text, "words": candidate.words, "hits": hits, "ceiling": ceiling,
                     "precision": hits / ceiling if ceiling else 0.0,
                     "shipped": candidate.text in PLAIN_DEMO_EXAMPLES})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="a demo model's artifact folder")
    parser.add_argument("--train", type=int, default=1000, help="the generated dataset's arguments (its defaults)")
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offer-at", type=float, default=0.6, help="the precision an offered example reaches")
    args = parser.parse_args(argv)
    scenes = scenes_by_image_id(args.train, args.val, args.test, args.seed)
    server = start_app(args.artifacts, Path(tempfile.mkdtemp()) / "server.log", timeout=300)
    try:
        rows = measure(server.url, args.artifacts, scenes)
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
    print("| query | words | hits in the top 10 | possible | precision | on the page today | offer |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        offer = "yes" if row["precision"] >= args.offer_at else "no"
        print(f"| {row['query']} | {row['words']} | {row['hits']} | {row['ceiling']} | {row['precision']:.1f} | "
              f"{'yes' if row['shipped'] else ''} | {offer} |")  # fmt: skip
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
