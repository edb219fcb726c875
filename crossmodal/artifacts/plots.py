"""Figures shipped in the artifact's ``plots/``: training curves and a CLIP-style similarity heatmap."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
import torch
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from PIL import Image


def plot_training(history: list[dict[str, Any]], loss_log: list[tuple[int, float]], path: Path) -> Path:
    """Loss over steps (and its per-epoch mean) next to validation Recall@K over epochs."""
    figure, (loss_axis, recall_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    if loss_log:
        steps, losses = zip(*loss_log, strict=True)
        loss_axis.plot(steps, losses, alpha=0.4, label="every few steps")
    if history:
        loss_axis.plot([h["step"] for h in history], [h["train_loss"] for h in history], "o-", label="epoch mean")
        epochs = [h["epoch"] for h in history]
        for key, style in (("i2t_R@1", "-"), ("i2t_R@5", "--"), ("t2i_R@1", "-"), ("t2i_R@5", "--")):
            recall_axis.plot(epochs, [h["val"][key] for h in history], style, marker="o", label=key)
    loss_axis.set(xlabel="optimizer step", ylabel="contrastive loss", title="Training loss")
    recall_axis.set(xlabel="epoch", ylabel="recall (%)", title="Validation Recall@K", ylim=(0, 100))
    for axis in (loss_axis, recall_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # an empty run (no steps logged) has nothing to label
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_similarity(similarity: torch.Tensor, images: list[Image.Image], captions: list[str], path: Path) -> Path:
    """Cosine similarity of n images (columns, shown above) against their n captions (rows), like CLIP's figure.

    The diagonal holds the true pairs; a good model makes it the brightest cell of each row and column.
    """
    count = len(images)
    values = similarity.float().cpu().numpy()
    figure, axis = plt.subplots(figsize=(0.5 * count + 6, 0.5 * count + 2.5))
    axis.imshow(values, cmap="viridis", vmin=values.min(), vmax=values.max())
    for row in range(count):
        for column in range(count):
            axis.text(column, row, f"{values[row, column]:.2f}", ha="center", va="center", fontsize=5, color="w")
    axis.set_yticks(range(count), [textwrap.shorten(caption, 60) for caption in captions], fontsize=7)
    axis.set_xticks([])
    for column, image in enumerate(images):
        thumbnail = image.copy()
        thumbnail.thumbnail((48, 48))
        box = AnnotationBbox(
            OffsetImage(thumbnail, zoom=0.6),
            (column, -0.5),
            xybox=(0, 14),
            xycoords="data",
            boxcoords="offset points",
            frameon=False,
            box_alignment=(0.5, 0),
        )
        axis.add_artist(box)
    axis.set_title("Cosine similarity of test images and their captions", pad=40)
    figure.savefig(path, dpi=120, bbox_inches="tight")  # keep the long caption labels inside the picture
    plt.close(figure)
    return path
