"""The artifact's README.md: a Hub model card with the test Recall@K as ``model-index`` results."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from crossmodal.config import ModelConfig, TrainConfig
from crossmodal.model.pinned_image import PINNED_IMAGE
from crossmodal.model.pinned_text import PINNED

METRIC_NAMES = {
    "i2t_R@1": "Image-to-text Recall@1",
    "i2t_R@5": "Image-to-text Recall@5",
    "i2t_R@10": "Image-to-text Recall@10",
    "t2i_R@1": "Text-to-image Recall@1",
    "t2i_R@5": "Text-to-image Recall@5",
    "t2i_R@10": "Text-to-image Recall@10",
    "rsum": "RSUM",
}

TEMPLATE = """---
{card_data}
---

# {model_name}

A CLIP-style dual encoder for text-to-image and image-to-text search, trained with crossmodal on `{dataset}`.

- Image tower: `{image_tower}` ({image_size}px input), text tower: `{text_tower}` (mean pooling, up to {max_len} word
  pieces), both projected to a shared {embed_dim}-d space and L2-normalised.
- Initialisation: {init}. Training: symmetric InfoNCE over the global batch of {batch_size}, {epochs} epochs, AdamW at
  lr {lr} (towers: {tower_ratio}), warmup then cosine; negatives: {negatives}; checkpoint picked on validation RSUM.

## Results (test split, {test_images} images, Recall in %)

| direction | R@1 | R@5 | R@10 |
|---|---|---|---|
| image -> text | {i2t_R@1:.1f} | {i2t_R@5:.1f} | {i2t_R@10:.1f} |
| text -> image | {t2i_R@1:.1f} | {t2i_R@5:.1f} | {t2i_R@10:.1f} |

RSUM {rsum:.1f}. Ties count against the model. Training curves and a similarity heatmap are in `plots/`.

![training curves](plots/training_curves.png)
![test similarity](plots/test_similarity.png)

## Use

With the crossmodal package (this project's repository) installed:

```python
from crossmodal.artifacts.hub import load_artifacts
artifacts = load_artifacts("<this repo id>", revision="<commit sha>")  # verified: checksums, shapes, self-test
model, tokenizer, image_index = artifacts.model, artifacts.tokenizer, artifacts.image_embeddings
```

`artifacts.model.encode_text(...)` and `encode_image(...)` return L2-normalised vectors comparable with the
shipped `image_embeddings.safetensors` ({num_images} images) and `text_embeddings.safetensors` ({num_captions}
captions), stored in float16 (score in float32: `image_index.float() @ query`); `images.parquet` and
`captions.parquet` hold their metadata and thumbnails in the same order.

## Data and limitations

Flickr30k images come from Flickr and are licensed for non-commercial research use only; captions are English.
The model knows the Flickr domain (people, animals, everyday scenes) and English text only; it inherits the biases
of its captions. Embeddings of every image and caption of the dataset ship with the model for search.
"""


def tower_line(name: str, init: str, revision: str | None = None, source: str | None = None) -> str:
    if init != "pretrained":
        return f"`{name}` from random init"
    at = f" at commit `{revision}`" if revision else ""
    at += f" from {source}" if source else ""
    pinned = PINNED.get(name) or PINNED_IMAGE.get(name)
    licence = f", licence {pinned.licence}, every file checked against its pinned sha256" if pinned else ""
    return f"`{name}` pretrained{at}{licence}"


def tower_ratio_text(train: TrainConfig) -> str:
    """The towers' learning-rate ratios as the card states them; a locked tower is not trained at all."""
    text_ratio = train.tower_lr_ratio if train.text_tower_lr_ratio is None else train.text_tower_lr_ratio
    if train.lock_text_tower and train.lock_image_tower:
        return "both locked, not trained: only the heads learn"
    if train.lock_image_tower:
        return f"image tower locked, not trained; x{text_ratio} text"
    if train.lock_text_tower:
        return f"x{train.tower_lr_ratio} image; text tower locked, not trained (LiT)"
    if train.text_tower_lr_ratio is None:
        return f"x{train.tower_lr_ratio}"
    return f"x{train.tower_lr_ratio} image, x{train.text_tower_lr_ratio} text"


def negatives_line(caption_negatives: int, hard_negative_beta: float) -> str:
    """Which hard negatives the model was trained with (docs/architecture.md, "Hard negatives"), as the card and the
    app say it."""
    parts = []
    if caption_negatives:
        parts.append(
            f"{caption_negatives} caption negatives per caption (false near-copies: colours or sides exchanged "
            "between its phrases, a colour, number, side or size replaced)"
        )
    if hard_negative_beta:
        parts.append(f"HN-NCE weighting of hard negatives (beta {hard_negative_beta:g})")
    return " and ".join(parts) if parts else "in-batch negatives only (no hard negatives)"


def init_line(model: ModelConfig) -> str:
    """Where each tower's starting weights came from, and under which licence."""
    image = tower_line(model.image_tower, model.image_init, source=model.image_source)
    text = tower_line(model.text_tower, model.text_init, model.text_revision)
    tokenizer = "its own tokenizer" if model.text_init == "pretrained" else "a tokenizer fit on the training captions"
    return f"image tower {image}; text tower {text}, with {tokenizer}"


def render_model_card(
    model: ModelConfig, train: TrainConfig, metrics: dict[str, dict[str, float]], dataset: dict[str, str | None]
) -> str:
    test = metrics.get("test", {})
    dataset_id = dataset.get("id") or "unknown"
    card_data = ModelCardData(
        model_name=f"crossmodal {model.image_tower} + {model.text_tower}",
        library_name="crossmodal",
        language="en",
        base_model=[model.text_tower] if model.text_init == "pretrained" and model.text_tower in PINNED else None,
        tags=["image-text-retrieval", "clip", "dual-encoder", "flickr30k"],
        datasets=None if dataset.get("local") else [dataset_id],  # the Hub only links Hub datasets
        eval_results=[
            EvalResult(
                task_type="image-text-retrieval",
                task_name="Image-text retrieval",
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                dataset_split="test",
                dataset_revision=dataset.get("revision"),
                metric_type=key.lower().replace("@", "_at_"),
                metric_name=name,
                metric_value=round(test[key], 2),
            )
            for key, name in METRIC_NAMES.items()
            if key in test
        ],
    )
    card = ModelCard(
        TEMPLATE.format(
            card_data=card_data.to_yaml(),
            model_name=card_data.model_name,
            dataset=dataset_id,
            image_tower=model.image_tower,
            image_size=model.image_size,
            text_tower=model.text_tower,
            max_len=model.max_text_length,
            embed_dim=model.embed_dim,
            init=init_line(model),
            batch_size=train.batch_size,
            epochs=train.epochs,
            lr=train.lr,
            tower_ratio=tower_ratio_text(train),
            negatives=negatives_line(train.caption_negatives, train.hard_negative_beta),
            test_images=dataset.get("test_images", "?"),
            num_images=dataset.get("num_images", "?"),
            num_captions=dataset.get("num_captions", "?"),
            **{key: test.get(key, float("nan")) for key in METRIC_NAMES},
        )
    )
    return str(card)
