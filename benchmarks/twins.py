"""Binding, as Winoground measures it: does a model tell a picture from its twin?

    python -m benchmarks.twins --artifacts runs/demo/artifacts --artifacts runs/other/artifacts

Generates held-out twin pairs (``python -m crossmodal synthetic --twins N``: two figures, and the same two with their
colours or places exchanged, every caption naming both with colour, shape and place), encodes them with each
artifact's own model, and reports Winoground's scores (crossmodal/encoding/metrics.py, ``twin_scores``): a caption
picks its own picture over the twin (chance 50 %), a picture its own caption (50 %), and all four comparisons of a
pair right (the group score, 16.7 %), overall and for colour and place twins apart, beside text->image Recall@1 and
@5 over the twin pictures (finding the pair is easy; picking the right one of the two is binding). ``--words
first`` (or ``second``) captions the same pictures in the first (second) vocabulary no training caption uses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator

from crossmodal.artifacts.contract import LoadedArtifacts, load_verified
from crossmodal.encoding.embed import SplitEmbeddings, encode_split
from crossmodal.encoding.metrics import twin_scores
from crossmodal.synthetic import dataset as synthetic
from crossmodal.synthetic.captions import CAPTIONS_PER_IMAGE

COLUMNS = ("caption_picks_image", "image_picks_caption", "group", "colour_group", "place_group", "t2i_r1", "t2i_r5")


def twin_embeddings(
    loaded: LoadedArtifacts, pairs: int, seed: int, words: str, batch_size: int = 128
) -> tuple[SplitEmbeddings, torch.Tensor, torch.Tensor]:
    """The twin split encoded by the artifact's model, and its pictures [P, 2, D] and captions [P, 2, 5, D]."""
    unseen = False if words == "training" else words
    rows = synthetic.generate(0, 0, 0, seed=seed, twins=pairs, unseen_test_words=unseen)["test"]
    rows = rows.cast_column("image", datasets.Image(decode=False))  # encoded, as training's loader reads them
    embeddings = encode_split(Accelerator(cpu=True), loaded.model, loaded.tokenizer, rows, batch_size)
    # caption_table order: each row's five captions in turn, rows 2i and 2i + 1 a pair and its twin.
    images = embeddings.images.reshape(pairs, 2, -1)
    captions = embeddings.texts.reshape(pairs, 2, CAPTIONS_PER_IMAGE, -1)
    return embeddings, images, captions


def score_artifact(artifacts: Path, pairs: int, seed: int, words: str) -> dict[str, float]:
    """Twin scores of the model in ``artifacts`` on ``pairs`` generated twin pairs."""
    embeddings, images, captions = twin_embeddings(load_verified(artifacts), pairs, seed, words)
    result = twin_scores(images, captions)
    result["colour_group"] = twin_scores(images[0::2], captions[0::2])["group"]
    result["place_group"] = twin_scores(images[1::2], captions[1::2])["group"]
    recall = embeddings.recall()
    result["t2i_r1"], result["t2i_r5"] = recall["t2i_R@1"], recall["t2i_R@5"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, action="append", required=True, help="an artifact folder (repeat)")
    parser.add_argument("--pairs", type=int, default=150, help="twin pairs (half colour, half place)")
    parser.add_argument("--seed", type=int, default=0, help="the generator's seed (twins have a stream of their own)")
    parser.add_argument(
        "--words",
        choices=("training", "first", "second"),
        default="training",
        help="the captions' words: training's, or the first or second unseen vocabulary",
    )
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"{args.pairs} twin pairs, captions in {args.words} words; chance: 50, 50, 16.7")
    print("| artifacts | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    results = {}
    for artifacts in args.artifacts:
        results[str(artifacts)] = found = score_artifact(artifacts, args.pairs, args.seed, args.words)
        print(f"| {artifacts} | " + " | ".join(f"{found[name]:.1f}" for name in COLUMNS) + " |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
