"""What a person sees: short one-figure queries, typed as people type them, over a served model's whole index.

    python -m benchmarks.short_queries --artifacts runs/demo/artifacts --artifacts runs/tiny/artifacts

For every colour x shape pair, one query in the training captions' words ("a small red circle at the top") and one
in words no training caption uses ("a scarlet ball near the top"), sent to each app's /text_to_image over HTTP with
gradio_client, as a user's script would. A hit is one of the top 10 images whose figure has the asked colour and
shape and sits at the top; the score is hits out of 10, averaged over the pairs. The index holds only a few such
pictures of each pair (about 1 in 240 images), so the ceiling (what a perfect ranking scores) is reported beside it,
and so is the looser score that ignores the place. Chance is what 10 images drawn at random would score. The
pictures' attributes come from generating the dataset again with the same arguments (crossmodal/synthetic/dataset.py is
deterministic): the artifact itself holds only captions.
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
from crossmodal.synthetic import dataset as synthetic
from crossmodal.synthetic.captions import UNSEEN_VOCABULARIES
from crossmodal.synthetic.scenes import COLOURS, SHAPES, PairScene, Scene

TOP_K = 10
PLACE = "top"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ShortQuery:
    colour: str
    shape: str
    text: str


def short_queries(words: str) -> list[ShortQuery]:
    """One query per colour x shape: ``words`` "training" (the generated captions' words), or an unseen vocabulary
    ("first", "second": captions.UNSEEN_VOCABULARIES)."""
    queries = []
    for colour in COLOURS:
        for shape in SHAPES:
            if words == "training":
                text = f"a small {colour} {shape} at the {PLACE}"
            else:
                vocabulary = UNSEEN_VOCABULARIES[words]
                said_colour, said_shape = vocabulary.colours[colour][0], vocabulary.shapes[shape][0]
                text = f"{article(said_colour)} {said_colour} {said_shape} near the {PLACE}"
            queries.append(ShortQuery(colour, shape, text))
    return queries


def scenes_by_image_id(
    num_train: int, num_val: int, num_test: int, seed: int, pair_fraction: float = 0.0
) -> dict[str, Scene | PairScene]:
    """Each generated image's attributes by its img_id (ids count up through train, val and test)."""
    examples = synthetic.generate_examples(num_train, num_val, num_test, (96, 96), seed, pair_fraction=pair_fraction)
    scenes = [example.scene for split in synthetic.SPLITS for example in examples[split]]
    return {str(index): scene for index, scene in enumerate(scenes)}


def is_hit(scene: Scene | PairScene, query: ShortQuery, place: bool = True) -> bool:
    """The picture has a figure of the asked colour and shape (at the top, with ``place``)."""
    figures = scene.figures if isinstance(scene, PairScene) else (scene,)
    return any(
        figure.colour == query.colour and figure.shape == query.shape and (figure.position == PLACE or not place)
        for figure in figures
    )


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def score(client: Client, queries: list[ShortQuery], scenes: dict[str, Scene | PairScene]) -> tuple[float, float]:
    """Mean hits in the top 10 over ``queries``, asked through the served /text_to_image: with the place, without."""
    hits, loose = [], []
    for query in queries:
        _, results = client.predict(query.text, TOP_K, api_name="/text_to_image")
        found = [scenes[result["image_id"]] for result in results]
        hits.append(sum(is_hit(scene, query) for scene in found))
        loose.append(sum(is_hit(scene, query, place=False) for scene in found))
    return mean(hits), mean(loose)


def ceiling_and_chance(
    queries: list[ShortQuery], indexed: list[str], scenes: dict[str, Scene | PairScene]
) -> tuple[float, float]:
    """What a perfect ranking and 10 images drawn at random would score, averaged over ``queries``."""
    counts = [sum(is_hit(scenes[image_id], query) for image_id in indexed) for query in queries]
    return mean([min(count, TOP_K) for count in counts]), TOP_K * mean(counts) / len(indexed)


def score_served(
    url: str, artifacts: Path, scenes: dict[str, Scene | PairScene], unseen: str = "first"
) -> dict[str, float]:
    """Training words and the ``unseen`` vocabulary against the app at ``url`` (serving ``artifacts``), with chance
    over its index."""
    client = Client(url, verbose=False, download_files=False)
    indexed = pq.read_table(artifacts / "images.parquet", columns=["image_id"]).column("image_id").to_pylist()
    training, unseen_queries = short_queries("training"), short_queries(unseen)
    (training_hits, training_loose), (unseen_hits, unseen_loose) = (
        score(client, training, scenes),
        score(client, unseen_queries, scenes),
    )
    ceiling, at_random = ceiling_and_chance(training, indexed, scenes)
    return {
        "training_words": training_hits,
        "unseen_words": unseen_hits,
        "training_words_colour_shape": training_loose,
        "unseen_words_colour_shape": unseen_loose,
        "ceiling": ceiling,
        "chance": at_random,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, action="append", required=True, help="an artifact folder (repeat)")
    parser.add_argument("--train", type=int, default=1000, help="the generated dataset's arguments (its defaults)")
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=float, default=0.0, help="the dataset's share of two-figure scenes")
    parser.add_argument("--unseen", choices=tuple(UNSEEN_VOCABULARIES), default="first", help="which unseen words")
    args = parser.parse_args(argv)
    scenes = scenes_by_image_id(args.train, args.val, args.test, args.seed, args.pairs)
    print("| artifacts | training words | unseen words | ceiling | chance | colour+shape: training | unseen |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for artifacts in args.artifacts:
        server = start_app(artifacts, Path(tempfile.mkdtemp()) / "server.log", timeout=300)
        try:
            results[str(artifacts)] = found = score_served(server.url, artifacts, scenes, args.unseen)
        finally:
            server.process.terminate()
            server.process.wait(timeout=30)
        columns = ["training_words", "unseen_words", "ceiling", "chance"]
        columns += ["training_words_colour_shape", "unseen_words_colour_shape"]
        print(f"| {artifacts} | " + " | ".join(f"{found[name]:.2f}" for name in columns) + " |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
