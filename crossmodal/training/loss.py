"""Symmetric InfoNCE (CLIP) over the global batch.

Every process computes the same loss over all ``N = sum of local batches`` pairs: its own features keep their
gradients, everyone else's arrive through a gradient-carrying all-gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features`` [B, D] from every process in rank order -> [N, D], keeping gradients.

    ``accelerator.gather`` would detach them. The differentiable all-gather sums each process's gradient for our shard
    in backward; DDP then averages over processes, so every parameter receives exactly the gradient that one process
    would compute on the whole global batch (including the logit scale, which open_clip's re-inserted-shard trick
    would over-count).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return torch.cat(all_gather(features), dim=0)


def clip_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; pair i is the positive of row i and column i.

    Inputs are this process's L2-normalised embeddings [B, D] and the (already exponentiated) scale.
    """
    all_images = gather_features(image_embeddings)  # [N, D]
    all_texts = gather_features(text_embeddings)  # [N, D]
    logits_per_image = logit_scale * all_images @ all_texts.T  # [N, N]
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image.float(), targets)
    text_to_image = F.cross_entropy(logits_per_image.T.float(), targets)
    return (image_to_text + text_to_image) / 2
