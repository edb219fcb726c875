"""The optimizer: AdamW over parameter groups that give each part of the model the recipe's learning rate and weight
decay (docs/architecture.md, "Recipe defaults")."""

from __future__ import annotations

from typing import Any

import torch

from crossmodal.config import TrainConfig
from crossmodal.model.dual_encoder import DualEncoder


def parameter_groups(model: DualEncoder, train: TrainConfig) -> list[dict[str, Any]]:
    """Towers at lr * tower_lr_ratio (the text tower at lr * text_tower_lr_ratio if set), the rest at lr; no weight
    decay on biases, norms and the scale. Without a text ratio: the four groups, in the order old checkpoints hold."""
    groups: dict[tuple[bool, bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            own_ratio = train.text_tower_lr_ratio is not None and name.startswith("text_tower.")
            key = (name.startswith(("image_tower.", "text_tower.")), parameter.ndim >= 2, own_ratio)
            groups.setdefault(key, []).append(parameter)
    ratio = {(True, False): train.tower_lr_ratio, (False, False): 1.0, (True, True): train.text_tower_lr_ratio}
    return [
        {"params": params, "lr": train.lr * ratio[in_tower, own], "weight_decay": train.weight_decay if decays else 0.0}
        for (in_tower, decays, own), params in sorted(groups.items())
    ]


def make_optimizer(model: DualEncoder, train: TrainConfig, *, fused: bool) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; ``fused`` (one kernel for all parameters) is what pays on CUDA."""
    return torch.optim.AdamW(parameter_groups(model, train), lr=train.lr, fused=True if fused else None)
