"""Train the crossmodal dual encoder and write its artifact folder.

    accelerate launch train_accelerate.py --preset flickr30k --output-dir runs/flickr30k
    python train_accelerate.py --preset tiny --dataset data/synthetic --output-dir runs/tiny

The artifact folder (docs/architecture.md, "Artifact folder") lands in OUTPUT_DIR/artifacts; checkpoints in
OUTPUT_DIR/checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from crossmodal.artifacts.export import write_artifacts
from crossmodal.config import DEFAULT_DATASET, IMAGE_NORMALISATION, IMAGE_TOWERS, INITS, PRESETS
from crossmodal.data.dataset import BadDataError, Corpus, DataSource, DataUnavailableError, SchemaError
from crossmodal.data.shards import IMAGE_EXTENSIONS, Keys, ShardError
from crossmodal.encoding.batches import loader_workers
from crossmodal.encoding.embed import encode_corpus
from crossmodal.model.wheels import PinnedFileError
from crossmodal.training.loop import format_metrics, train
from crossmodal.training.prepare import make_accelerator
from crossmodal.training.state import TrainingAborted, TrainingInterrupted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", default=DEFAULT_DATASET, help="Hub dataset id, save_to_disk folder or Parquet folder"
    )
    data.add_argument("--dataset-revision", default=None, help="Hub revision (branch, tag or commit sha) to pin")
    data.add_argument("--image-column", default="image", help="column holding the images")
    data.add_argument("--caption-column", default="caption", help="column holding each image's list of captions")
    data.add_argument("--val-split", default=None, help="name of the validation split (default: val or validation)")
    stream = parser.add_argument_group('streamed training pairs (docs/architecture.md, "Streaming shards")')
    stream.add_argument(
        "--train-data",
        default=None,
        metavar="SPEC",
        help="train on pairs streamed from webdataset or Parquet shards ('shards/{00000..00331}.tar', a glob, a "
        "folder, 'a.tar::b.tar', hf://datasets/...); --dataset then supplies only val, test and the gallery",
    )
    stream.add_argument("--train-num-samples", type=int, default=None, help="an epoch's pairs (default: every shard's)")
    stream.add_argument("--shuffle-buffer", type=int, help="samples each slot shuffles among (default 1000)")
    stream.add_argument("--stream-slots", type=int, help="slots an epoch is cut into (default: processes x workers)")
    stream.add_argument("--image-key", default=None, help="comma-separated image members (default jpg,jpeg,png,webp)")
    stream.add_argument("--text-key", default="txt", help="the caption's member (default txt)")
    stream.add_argument("--caption-key", default="caption", help="the caption in KEY.json, or the Parquet column")
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default="flickr30k")
    run.add_argument("--output-dir", type=Path, required=True)
    run.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    run.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config"
    )
    run.add_argument("--report-to", default=None, help="an Accelerate tracker: tensorboard, wandb, ...")
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)")
    recipe = parser.add_argument_group("recipe overrides (default: the preset's)")
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--batch-size", type=int, help="global batch: the in-batch negatives of one step")
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--seed", type=int)
    recipe.add_argument("--grad-accum-steps", type=int)
    recipe.add_argument("--num-workers", type=int)
    recipe.add_argument("--checkpoint-every", type=int)
    recipe.add_argument("--text-tower-lr-ratio", type=float, help="the text tower's lr / --lr (default: the towers')")
    recipe.add_argument(
        "--lock-text-tower",
        action=argparse.BooleanOptionalAction,
        help="train nothing of the text tower; its caption features are computed once (LiT)",
    )
    recipe.add_argument(
        "--lock-image-tower",
        action=argparse.BooleanOptionalAction,
        help="train nothing of the image tower; each picture's features are computed once (no augmentation)",
    )
    recipe.add_argument(
        "--caption-negatives",
        type=int,
        help="false near-copies of each training caption added as wrong captions (0: none; docs: Hard negatives)",
    )
    recipe.add_argument(
        "--hard-negative-beta", type=float, help="HN-NCE: weight negatives by exp(beta * logit) (0: plain InfoNCE)"
    )
    model = parser.add_argument_group("model overrides (default: the preset's)")
    model.add_argument("--image-tower", choices=IMAGE_TOWERS)
    model.add_argument("--text-tower", help="a transformers encoder: Hub id or local folder")
    model.add_argument("--embed-dim", type=int)
    model.add_argument("--text-adapter-width", type=int, help="a residual MLP on the text features (0: none)")
    model.add_argument("--init", choices=INITS, help="both towers; random: from config, no download")
    model.add_argument("--image-init", choices=INITS, help="the image tower only (overrides --init)")
    model.add_argument("--text-init", choices=INITS, help="the text tower only (overrides --init)")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace, names: list[str]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> int:
    # 1. Configuration: the preset, then whatever the command line overrides.
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    inits = {"image_init": args.init, "text_init": args.init} if args.init else {}
    inits |= overrides(args, ["image_init", "text_init"])  # one tower's flag wins over --init
    model_config = dataclasses.replace(
        preset.model, **inits, **overrides(args, ["image_tower", "text_tower", "embed_dim", "text_adapter_width"])
    )
    if args.image_tower:  # its preprocessing normalises as the tower was pretrained
        mean, std = IMAGE_NORMALISATION[args.image_tower]
        model_config = dataclasses.replace(model_config, image_mean=mean, image_std=std)
    recipe = ["epochs", "batch_size", "lr", "seed", "grad_accum_steps", "num_workers", "checkpoint_every"]
    recipe += ["text_tower_lr_ratio", "lock_text_tower", "lock_image_tower", "caption_negatives", "hard_negative_beta"]
    recipe += ["shuffle_buffer", "stream_slots"]
    train_config = dataclasses.replace(preset.train, **overrides(args, recipe))
    image_keys = tuple(args.image_key.split(",")) if args.image_key else IMAGE_EXTENSIONS
    source = DataSource(
        args.dataset, args.dataset_revision, args.image_column, args.caption_column, args.val_split,
        train_data=args.train_data, train_num_samples=args.train_num_samples,
        keys=Keys(image_keys, args.text_key, args.caption_key),
    )  # fmt: skip
    accelerator = make_accelerator(train_config, args.output_dir, args.mixed_precision, args.report_to)

    # 2. Train; the best epoch's weights come back, already evaluated on the test split.
    try:
        result = train(
            accelerator,
            model_config,
            train_config,
            source,
            args.output_dir,
            resume=args.resume,
            max_steps=args.max_steps,
        )
    except (SchemaError, BadDataError, DataUnavailableError, PinnedFileError, ShardError) as error:
        accelerator.print(f"error: {error}")
        return 2
    except TrainingAborted as error:
        accelerator.print(f"error: {error}")
        return 1
    except TrainingInterrupted as error:
        accelerator.print(str(error))
        return 143  # 128 + SIGTERM, as if the signal had ended us, but with a checkpoint on disk

    # 3. Embed every image and caption of the dataset for search: the splits in artifact order, the test split last,
    #    whose embeddings train() has already computed for its metrics and encode_corpus reuses.
    corpus = Corpus.from_splits(result.splits)
    image_embeddings, text_embeddings = encode_corpus(
        accelerator, result.model, result.tokenizer, corpus, result.test_embeddings, train_config.eval_batch_size,
        loader_workers(train_config.num_workers, accelerator.num_processes), train_config.decode_on_device,
    )  # fmt: skip

    # 4. The artifact folder, written once by the main process.
    if accelerator.is_main_process:
        folder = write_artifacts(
            args.output_dir / "artifacts",
            model=result.model.to(torch.device("cpu")),
            tokenizer=result.tokenizer,
            train_config=train_config,
            corpus=corpus,
            image_embeddings=image_embeddings,
            text_embeddings=text_embeddings,
            metrics=result.metrics,
            history=result.state.history,
            loss_log=result.state.loss_log,
            dataset={
                "id": args.dataset,
                "revision": args.dataset_revision,
                "local": Path(args.dataset).exists(),
                "train_data": args.train_data,  # streamed pairs: trained on, never in the gallery
                "test_images": len(result.splits["test"]),
                "num_images": len(corpus.rows),
                "num_captions": len(corpus.captions),
            },
        )
        print(f"test: {format_metrics(result.metrics['test'])}")
        print(f"artifacts: {folder}")
    accelerator.end_training()  # closes trackers and the process group: nothing distributed after this
    return 0


if __name__ == "__main__":
    sys.exit(main())
