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


def clip_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    negative_embeddings: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    hard_negative_beta: float = 0.0,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; pair i is the positive of row i and column i.

    Inputs are this process's L2-normalised embeddings [B, D] and the (already exponentiated) scale.

    ``negative_embeddings`` [B, K, D] (with ``negative_mask`` [B, K], False where a caption had fewer than K): caption
    negatives (crossmodal/training/negatives.py), gathered like the rest and added as N * K extra columns of
    image->text, wrong for every picture; text->image is unchanged (a negative has no picture).

    ``hard_negative_beta`` > 0: HN-NCE (Radenovic et al. 2023): each negative of a row is weighted by
    ``exp(beta * logit)`` normalised to mean 1 over the row's negatives, so look-alikes cost more; the weights are
    not differentiated through. 0 is plain InfoNCE.
    """
    all_images = gather_features(image_embeddings)  # [N, D]
    all_texts = gather_features(text_embeddings)  # [N, D]
    logits_per_image = logit_scale * all_images @ all_texts.T  # [N, N]
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_logits = logits_per_image.float()
    if negative_embeddings is not None:
        negatives = gather_features(negative_embeddings).flatten(0, 1)  # [N * K, D]
        present = gather_features(negative_mask.float()).flatten().bool()  # [N * K]
        negative_logits = (logit_scale * all_images @ negatives.T).float()  # [N, N * K]
        image_logits = torch.cat([image_logits, negative_logits.masked_fill(~present, float("-inf"))], dim=1)
    image_to_text = F.cross_entropy(weigh_hard_negatives(image_logits, hard_negative_beta), targets)
    text_to_image = F.cross_entropy(weigh_hard_negatives(logits_per_image.T.float(), hard_negative_beta), targets)
    return (image_to_text + text_to_image) / 2


def weigh_hard_negatives(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """[N, M] logits (row i's positive in column i) with log(w_ij) added to each negative: w_ij = exp(beta * l_ij)
    over the mean of exp(beta * l_ik) across row i's negatives (HN-NCE with alpha = 1). beta = 0: unchanged."""
    if not beta:
        return logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    is_negative = torch.ones_like(logits, dtype=torch.bool)
    is_negative[rows, rows] = False
    is_negative &= torch.isfinite(logits)  # an absent caption negative stays absent
    scaled = (beta * logits.detach()).masked_fill(~is_negative, float("-inf"))
    count = is_negative.sum(dim=1, keepdim=True).clamp(min=1)
    log_weights = scaled - torch.logsumexp(scaled, dim=1, keepdim=True) + count.log()
    return torch.where(is_negative, logits + log_weights, logits)
