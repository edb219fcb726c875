"""The dual encoder: an image tower and a text tower, each projected into one L2-normalised space (CLIP).

image [B, 3, S, S] -> image tower -> [B, C, h, w] -> global (+ grid) average -> [B, F_img] -> head -> [B, D] -> L2 norm
text  [B, T] ids   -> text tower  -> [B, T, H]  -> masked mean -> [B, H] -> linear -> [B, D] -> L2 norm
logits = exp(logit_scale) * image_emb @ text_emb.T            (logit_scale learnable, clamped at log 100)
"""

from __future__ import annotations

import dataclasses
import math

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase

from crossmodal.config import IMAGE_TOWERS, KNOWN_TEXT_ARCHITECTURES, ModelConfig
from crossmodal.model.pinned_image import PINNED_IMAGE, load_pinned


class TinyCNN(nn.Module):
    """Four stride-2 conv stages with GroupNorm: a small image tower for the ``tiny`` preset; returns its last
    feature map.

    GroupNorm rather than BatchNorm so its output does not depend on how the batch is split across processes.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.GroupNorm(8, width),
                nn.GELU(),
                nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(8, width),
                nn.GELU(),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.out_features = in_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values)  # [B, C, h, w]


class TimmTower(nn.Module):
    """A timm ImageNet network without its classifier: its last feature map [B, C, h, w] (``forward_features``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.body = timm.create_model(name, pretrained=False, num_classes=0)
        self.out_features = self.body.num_features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(pixel_values)


class GridPool(nn.Module):
    """[B, C, h, w] -> [B, C * (1 + g * g)]: the global average, then the average of each cell of a g x g grid (rows
    first), so where in the picture a feature fired survives pooling."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = feature_map.mean(dim=(2, 3))
        if not self.grid:
            return pooled
        cells = F.adaptive_avg_pool2d(feature_map, self.grid).flatten(1)  # [B, C * g * g], channel-major
        return torch.cat([pooled, cells], dim=1)


class CellwiseLinear(nn.Module):
    """One linear map shared by the global feature and every grid cell of :class:`GridPool`'s output, concatenated
    again: [B, C * (1 + g * g)] -> [B, W * (1 + g * g)]. Every cell keeps its place in the output, for C x W weights
    instead of (C x W) per cell."""

    def __init__(self, channels: int, cells: int, width: int) -> None:
        super().__init__()
        self.channels, self.cells = channels, cells
        self.linear = nn.Linear(channels, width)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        whole, grid = pooled[:, : self.channels], pooled[:, self.channels :]
        grid = grid.reshape(len(pooled), self.channels, self.cells - 1).transpose(1, 2)  # [B, g * g, C]
        return F.gelu(self.linear(torch.cat([whole.unsqueeze(1), grid], dim=1))).flatten(1)


def image_head(config: ModelConfig, image_width: int) -> nn.Module:
    """Pooled image features -> the joint space: linear, or an MLP (``image_head_width``), optionally after a
    per-cell map (``image_cell_width``) that shrinks each grid cell's features before they are mixed."""
    cells = 1 + config.image_grid**2
    layers: list[nn.Module] = []
    width = image_width * cells
    if config.image_cell_width:
        layers.append(CellwiseLinear(image_width, cells, config.image_cell_width))
        width = config.image_cell_width * cells
    if config.image_head_width:
        layers += [nn.Linear(width, config.image_head_width), nn.GELU()]
        width = config.image_head_width
    if not layers:  # a plain linear projection: the weight name artifacts written before heads existed hold
        return nn.Linear(width, config.embed_dim, bias=False)
    return nn.Sequential(*layers, nn.Linear(width, config.embed_dim, bias=False))


def build_image_tower(name: str, *, pretrained: bool) -> tuple[nn.Module, int]:
    """The image tower (returning its last feature map) and its channel count.

    Every ImageNet tower comes through timm (docs/architecture.md, "Image towers come through timm").
    ``pretrained``: a pinned tower's verified safetensors (crossmodal/model/pinned_image.py), or timm's own pretrained
    weights for any other.
    """
    if name == "tiny-cnn":
        tower = TinyCNN()
        return tower, tower.out_features
    if name not in IMAGE_TOWERS:
        raise ValueError(f"unknown image tower {name!r}; choose one of {', '.join(IMAGE_TOWERS)}")
    tower = TimmTower(name)
    if pretrained and name in PINNED_IMAGE:
        state = load_pinned(PINNED_IMAGE[name])
        classifier = tower.body.pretrained_cfg["classifier"]
        tower.body.load_state_dict({k: v for k, v in state.items() if not k.startswith(f"{classifier}.")})
    elif pretrained:
        tower.body = timm.create_model(name, pretrained=True, num_classes=0)
    return tower, tower.out_features


def text_tower_config(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> dict:
    """The transformers config of a random-init text tower: stored, a known architecture, or the Hub's."""
    if config.text_config is not None:
        return dict(config.text_config)
    if config.text_tower in KNOWN_TEXT_ARCHITECTURES:
        values = dict(KNOWN_TEXT_ARCHITECTURES[config.text_tower])
    else:
        values = AutoConfig.from_pretrained(config.text_tower).to_dict()
    values["vocab_size"] = len(tokenizer)  # the tokenizer may have been fit on the captions
    values["pad_token_id"] = tokenizer.pad_token_id
    return values


def build_text_tower(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, pretrained: bool) -> nn.Module:
    if pretrained:  # a pinned tower's files were verified first (crossmodal/model/pinned_text.py, pin_text_tower)
        return AutoModel.from_pretrained(config.text_tower, revision=config.text_revision, add_pooling_layer=False)
    values = text_tower_config(config, tokenizer)
    model_type = values.pop("model_type")
    tower_config = AutoConfig.for_model(model_type, **values)
    return AutoModel.from_config(tower_config, add_pooling_layer=False)


class DualEncoder(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        image_tower: nn.Module,
        image_width: int,
        text_tower: nn.Module,
        *,
        freeze_image_norm_stats: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_pool = GridPool(config.image_grid)
        self.image_projection = image_head(config, image_width)
        width = text_tower.config.hidden_size
        # A residual MLP on the pooled text features, trained beside a locked tower (config.text_adapter_width);
        # its last layer starts at zero, so training starts from the tower's own features.
        self.text_adapter = None
        if config.text_adapter_width:
            self.text_adapter = nn.Sequential(
                nn.Linear(width, config.text_adapter_width), nn.GELU(), nn.Linear(config.text_adapter_width, width)
            )
            nn.init.zeros_(self.text_adapter[-1].weight)
            nn.init.zeros_(self.text_adapter[-1].bias)
        self.text_projection = nn.Linear(width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.freeze_image_norm_stats = freeze_image_norm_stats
        self.text_tower_locked = False  # see lock(): not trained, so no dropout either
        self.image_tower_locked = False  # see lock(): not trained, BatchNorm in eval mode
        # A locked image tower's pooled features of the pictures it has seen (training/locked.py, KnownImageFeatures).
        self.known_image_features = None
        # A locked tower's features of the captions it has seen (training/locked.py, LockedCaptionBatcher); not saved.
        self.known_text_features = None

    def lock(self, *, text: bool = False, image: bool = False) -> None:
        """Freeze the named towers' weights (an optimizer built afterwards never sees them) and keep them in eval mode
        (crossmodal/training/locked.py computes their features once)."""
        if text:
            self.text_tower.requires_grad_(False)
            self.text_tower_locked = True
        if image:
            self.image_tower.requires_grad_(False)
            self.image_tower_locked = True

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if mode and self.text_tower_locked:
            self.text_tower.eval()
        if mode and self.image_tower_locked:
            self.image_tower.eval()
        if mode and self.freeze_image_norm_stats:
            # Pretrained BatchNorm statistics are better than ones re-estimated from small contrastive batches.
            for module in self.image_tower.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features before the head: [B, F_img]."""
        return self.image_pool(self.image_tower(pixel_values))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_features(pixel_values))

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(pooled), dim=-1)  # [B, F_img] -> [B, D]

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's sentence vector before the projection: sentence-transformers' mean pooling."""
        hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # mean over real tokens: [B, H]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project_text(self.text_features(input_ids, attention_mask))

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.text_adapter is not None:
            pooled = pooled + self.text_adapter(pooled)
        return F.normalize(self.text_projection(pooled), dim=-1)  # [B, H] -> [B, D]

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        negative_text_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Pixels and tokens, or a locked tower's precomputed features (crossmodal/training/locked.py): the image and
        text embeddings [B, D] and the scale. With caption negatives (``negative_*``: [B, K, L] tokens or [B, K, H]
        locked features, crossmodal/training/negatives.py), their embeddings [B, K, D] come fourth; they go through
        forward so that DDP sees every use of the text head."""
        if text_features is not None:
            text = self.project_text(text_features.to(self.text_projection.weight.dtype))
        else:
            text = self.encode_text(input_ids, attention_mask)
        if image_features is not None:
            image = self.project_image(image_features.to(self.logit_scale.dtype))
        else:
            image = self.encode_image(pixel_values)
        if negative_text_features is not None:
            shape = negative_text_features.shape[:2]
            flat = negative_text_features.flatten(0, 1).to(self.text_projection.weight.dtype)
            return image, text, self.scale(), self.project_text(flat).unflatten(0, shape)
        if negative_input_ids is not None:
            shape = negative_input_ids.shape[:2]
            flat = self.encode_text(negative_input_ids.flatten(0, 1), negative_attention_mask.flatten(0, 1))
            return image, text, self.scale(), flat.unflatten(0, shape)
        return image, text, self.scale()


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The text tower's input: pad to the longest text in the batch, truncate at ``max_text_length`` word pieces.

    The one text preprocessing of training, indexing and search, so query embeddings stay comparable to stored ones.
    """
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=config.max_text_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def build_model(
    config: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    pretrained: bool,
    freeze_image_norm_stats: bool = False,
) -> tuple[DualEncoder, ModelConfig]:
    """Build the dual encoder, and return the config completed with the text tower's full transformers config.

    ``pretrained=True`` loads the towers whose config says pretrained (``image_init``, ``text_init``);
    ``pretrained=False`` downloads nothing: this is how an artifact is rebuilt before its weights are loaded.
    """
    image_pretrained = pretrained and config.image_init == "pretrained"
    image_tower, image_width = build_image_tower(config.image_tower, pretrained=image_pretrained)
    text_tower = build_text_tower(config, tokenizer, pretrained=pretrained and config.text_init == "pretrained")
    text_config = {
        key: value
        for key, value in text_tower.config.to_dict().items()
        if key not in ("transformers_version", "_name_or_path")  # provenance, not architecture
    }
    completed = dataclasses.replace(config, text_config=text_config)
    model = DualEncoder(
        completed, image_tower, image_width, text_tower, freeze_image_norm_stats=freeze_image_norm_stats
    )
    return model, completed
