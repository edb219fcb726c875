"""The app's words: its header, the examples it offers, its model card (docs/architecture.md, "API endpoints").

Which of them a page shows depends on what is served: a model trained on Flickr30k, the demo model trained on
generated pictures, or an index of someone's own pictures (crossmodal/index/cli.py).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, constants

from crossmodal.artifacts.contract import LoadedArtifacts
from crossmodal.artifacts.model_card import negatives_line
from crossmodal.serving.search import Searcher

FLICKR_EXAMPLES = ["Two men in green shirts drinking", "a dog running through the snow", "a child on a red bicycle"]
# The demo model reads plain English through its pretrained text tower: short queries as people type them. The page
# offers only queries the shipped demo gets mostly right: benchmarks/example_queries.py scores each candidate's top 10
# against the served app (docs/benchmarks.md, "Which examples the demo answers"). These five reach 0.8-1.0; queries
# in synonyms no training caption uses ("a scarlet ball near the top") reach 0.0-0.2 and are not offered.
PLAIN_DEMO_EXAMPLES = [
    "a small red circle at the top",
    "something on a yellow background",
    "a white cross in the centre",
    "a black ring at the bottom",
    "a purple circle on a white background",
]
# What the header says of the words the demo knows: those of its generated captions, not their synonyms.
DEMO_WORDS_HINT = (
    'Ask in plain English: a colour and a shape, where it is, the background ("a white cross in the centre"). It '
    'knows the words its training captions use; synonyms they never use ("scarlet", "cobalt") are mostly missed.'
)
# An index of your own pictures: things people photograph.
OWN_PICTURE_EXAMPLES = ["a person smiling", "an animal in the grass", "a tall building against the sky"]


def is_demo_model(artifacts: LoadedArtifacts) -> bool:
    """A model trained on the generated pictures (synthetic/dataset.py names every one ``synthetic_*``): the UI
    says so and adapts its examples."""
    return all(name.startswith("synthetic_") for name in artifacts.images.column("filename").to_pylist())


def header(artifacts: LoadedArtifacts, source: str) -> str:
    if artifacts.index is not None:
        return index_header(artifacts, source)
    config, test = artifacts.config, artifacts.metrics["test"]
    lines = ["# crossmodal: text ↔ image search"]
    pretrained = [init == "pretrained" for init in (config.image_init, config.text_init)]
    if is_demo_model(artifacts) and all(pretrained):
        lines.append(
            f"**Demo model**, both towers pretrained: `{config.image_tower}` (ImageNet) and `{config.text_tower}`, "
            "with small heads trained for a few minutes on a CPU on generated pictures of one shape on a background. "
            + DEMO_WORDS_HINT
        )
    elif is_demo_model(artifacts) and config.text_init == "pretrained":
        lines.append(
            "**Demo model**: a small image tower trained for a few minutes on a CPU, on generated pictures of one "
            f"shape on a background, beside the pretrained `{config.text_tower}` text tower. " + DEMO_WORDS_HINT
        )
    elif is_demo_model(artifacts):
        lines.append(
            "**Demo model**: tiny towers trained for a few minutes on a CPU, on generated pictures of shapes. "
            "Describe a shape, its colour, size, position and background."
        )
    else:
        lines.append("Search Flickr30k photos by describing them, or find captions for a picture of your own.")
    card = card_link(source)
    negatives = negatives_line(
        artifacts.training.get("caption_negatives", 0), artifacts.training.get("hard_negative_beta", 0.0)
    )
    lines.append(
        f"Model: `{config.image_tower}` + `{config.text_tower}`, {config.embed_dim}-d, trained with {negatives}, "
        f"model card {card}. "
        f"Index: {len(artifacts.image_embeddings):,} images, {len(artifacts.text_embeddings):,} captions. "
        f"Test Recall@1/5/10: text→image {test['t2i_R@1']:.1f} / {test['t2i_R@5']:.1f} / {test['t2i_R@10']:.1f}, "
        f"image→text {test['i2t_R@1']:.1f} / {test['i2t_R@5']:.1f} / {test['i2t_R@10']:.1f}."
    )
    return "\n\n".join(lines)


def card_link(source: str) -> str:
    return "under *About this model*" if Path(source).exists() else f"[{source}]({constants.ENDPOINT}/{source})"


def index_header(artifacts: LoadedArtifacts, source: str) -> str:
    """What an index of your own pictures holds; no local path, and no test metrics: they are the model's, measured
    on its own test split, and say nothing about these pictures."""
    index, config = artifacts.index, artifacts.config
    duplicates = (
        f" Near-duplicates (cosine ≥ {index['duplicate_threshold']:g}) are shown once."
        if index.get("duplicate_threshold") is not None
        else ""
    )
    return "\n\n".join(
        [
            "# crossmodal: search your own pictures",
            f"**{index['pictures']:,} pictures from {index['folder']}**. Describe a picture, or give one to find "
            f"those like it.{duplicates}",
            f"Model: `{config.image_tower}` + `{config.text_tower}`, {config.embed_dim}-d, model card "
            f"{card_link(source)}. Image → text answers with the {len(artifacts.text_embeddings):,} captions the "
            "model was trained on.",
        ]
    )


def model_card_text(artifacts: LoadedArtifacts) -> str:
    """The artifact's model card without its YAML metadata."""
    return ModelCard.load(artifacts.folder / "README.md").text


def example_queries(searcher: Searcher) -> list[str]:
    """For the demo model, plain English (its pretrained text tower) or held-out captions in the generated data's
    language (a tokenizer fit on them); for Flickr30k, everyday scenes; for your own pictures, what people shoot."""
    if searcher.artifacts.index is not None:
        return OWN_PICTURE_EXAMPLES
    if not is_demo_model(searcher.artifacts):
        return FLICKR_EXAMPLES
    if searcher.config.text_init == "pretrained":
        return PLAIN_DEMO_EXAMPLES
    return [searcher.captions_of[row][0] for row in test_rows(searcher, 3)]


def test_rows(searcher: Searcher, count: int) -> list[int]:
    """The first ``count`` held-out images: examples the model was not trained on. In an index none was, and each
    group of near-duplicates offers one picture."""
    if searcher.artifacts.index is not None:
        return [row for row, first in enumerate(searcher.group_of) if row == first][:count]
    return [index for index, split in enumerate(searcher.splits) if split == "test"][:count]
