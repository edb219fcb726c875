"""Setting a training run up: the accelerator, the checked data, the tokenizer, the model with its pinned towers, the
optimizer, a locked tower's features, the training loader and the schedule, and a checkpoint to resume from.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from crossmodal.config import ModelConfig, TrainConfig
from crossmodal.data.dataset import DataSource, caption_table, check_rows, load_splits
from crossmodal.data.shards import Keys
from crossmodal.data.stream import ShardCorpus, caption_sample
from crossmodal.encoding.batches import CaptionBatcher, loader_workers
from crossmodal.model.dual_encoder import DualEncoder, build_model
from crossmodal.model.pinned import pin_towers
from crossmodal.model.tokenizer import run_tokenizer
from crossmodal.training import checkpoint
from crossmodal.training.augment import TrainAugment
from crossmodal.training.locked import locked_inputs
from crossmodal.training.optimizer import make_optimizer
from crossmodal.training.pairs import DeviceBatch, TrainBatcher, TrainPairs, make_train_loader
from crossmodal.training.state import Run, RunState, StopFlag
from crossmodal.training.streamed import StreamedPairs, StreamLoader

TOKENIZER_SAMPLE = 100_000  # captions a tokenizer fit on a stream (the tiny preset) reads: a bounded sample


def make_accelerator(
    train_config: TrainConfig,
    project_dir: Path,
    mixed_precision: str | None = None,
    report_to: str | None = None,
    dynamo_backend: str | None = None,
) -> Accelerator:
    """One global batch per step, split across processes: any process count sees exactly the same batches.

    ``dynamo_backend`` ("inductor": torch.compile) defaults to the accelerate config, like ``mixed_precision``.
    """
    return Accelerator(
        mixed_precision=mixed_precision,
        dynamo_backend=dynamo_backend,
        gradient_accumulation_steps=train_config.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=report_to,
        project_dir=str(project_dir),
    )


def setup_run(
    accelerator: Accelerator,
    model_config: ModelConfig,
    train_config: TrainConfig,
    source: DataSource,
    output_dir: Path,
    resume: str | None,
) -> Run:
    """Seed; load and check the data; build the tokenizer, model, optimizer, loader and schedule; resume if asked."""
    if train_config.batch_size % accelerator.num_processes:
        raise ValueError(
            f"--batch-size {train_config.batch_size} is the global batch; it must divide by the "
            f"{accelerator.num_processes} processes"
        )
    set_seed(train_config.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    stop = StopFlag()  # installed early: a SIGTERM during set-up still ends at the first clean boundary
    # A pinned tower's files are verified before any is read.
    model_config = pin_towers(model_config)
    splits = load_checked(accelerator, source, train_config.max_bad_row_fraction)
    # Streamed pairs (crossmodal/training/streamed.py): shards counted, nothing else read before the first step.
    corpus = ShardCorpus.open(source.train_data, source.train_num_samples) if source.train_data else None
    if corpus is not None:  # a tokenizer fit on the captions (tiny) reads a bounded sample of the stream
        tokenizer = run_tokenizer(
            model_config, lambda: caption_sample(corpus, TOKENIZER_SAMPLE, source.keys), output_dir, accelerator
        )
    else:
        tokenizer = run_tokenizer(model_config, lambda: caption_table(splits["train"])[0], output_dir, accelerator)
    model, model_config = build_model(
        model_config, tokenizer, pretrained=True, freeze_image_norm_stats=train_config.freeze_image_norm_stats
    )
    on_cuda = accelerator.device.type == "cuda"
    # Before the optimizer is built, so it never holds a locked tower's weights.
    model.lock(text=train_config.lock_text_tower, image=train_config.lock_image_tower)
    optimizer = make_optimizer(model, train_config, fused=on_cuda)
    augment = TrainAugment(model_config)
    if corpus is None:
        dataset, loader = make_training_data(accelerator, model, tokenizer, splits, train_config, augment)
    else:
        dataset, loader = make_streamed_data(accelerator, model, tokenizer, corpus, source.keys, train_config, augment)
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images is fewer than one global batch of {train_config.batch_size}")
    total_steps = batches_per_epoch // train_config.grad_accum_steps * train_config.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(train_config.warmup_fraction * total_steps), total_steps)
    if corpus is None:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    else:  # each process reads its own slots: Accelerate's loader would dispatch every batch from rank 0
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.log_with:
        accelerator.init_trackers("crossmodal", config={**asdict(train_config), "embed_dim": model_config.embed_dim})
    device_batch = DeviceBatch(augment, accelerator.device, channels_last=on_cuda)
    run = Run(
        accelerator, train_config, splits, tokenizer, model, optimizer, scheduler, dataset, loader, device_batch,
        output_dir, RunState(), stop, batches_per_epoch,
    )  # fmt: skip
    resume_run(run, resume)
    return run


def resume_run(run: Run, resume: str | None) -> None:
    """Weights, optimizer, schedule, RNG, and where in which epoch we were (a stream: each slot's place)."""
    resume_from = checkpoint.resolve_resume(resume, run.checkpoints)
    if resume_from is None:
        return
    saved = checkpoint.load_checkpoint(
        run.accelerator, resume_from, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler
    )
    run.state = RunState(**{**saved, "loss_log": [tuple(entry) for entry in saved["loss_log"]]})
    if isinstance(run.loader, StreamLoader) and run.state.stream:
        run.loader.restore(run.state.stream)
    run.accelerator.print(f"resumed from {resume_from} (epoch {run.state.epoch}, batch {run.state.batches_done})")


def make_training_data(
    accelerator: Accelerator,
    model: DualEncoder,
    tokenizer: Any,
    splits: datasets.DatasetDict,
    train_config: TrainConfig,
    augment: TrainAugment,
) -> tuple[TrainPairs, DataLoader]:
    """The training pairs and their loader; a locked tower's features are computed here, once, on the run's device
    (crossmodal/training/locked.py)."""
    model.to(accelerator.device)
    locked = locked_inputs(accelerator, model, tokenizer, splits, train_config)
    dataset = TrainPairs(
        splits["train"], augment, train_config.seed, train_config.decode_on_device, image_features=locked.image_features
    )
    workers = loader_workers(train_config.num_workers, accelerator.num_processes)
    return dataset, make_train_loader(dataset, locked.captions, train_config, workers)


def make_streamed_data(
    accelerator: Accelerator,
    model: DualEncoder,
    tokenizer: Any,
    corpus: ShardCorpus,
    keys: Keys,
    train_config: TrainConfig,
    augment: TrainAugment,
) -> tuple[StreamedPairs, StreamLoader]:
    """Pairs streamed from ``corpus``'s shards, each process reading its own slots; a locked tower runs on every
    batch (its features are not computed ahead: that would read the whole corpus before the first step)."""
    if train_config.caption_negatives:
        raise ValueError("--caption-negatives needs the training captions ahead of time; --train-data streams them")
    model.to(accelerator.device)
    workers = loader_workers(train_config.num_workers, accelerator.num_processes)
    slots = train_config.stream_slots or accelerator.num_processes * max(workers, 1)
    readers = accelerator.num_processes * max(workers, 1)
    if slots % readers or train_config.batch_size % slots:
        raise ValueError(
            f"{slots} stream slots must divide by the {readers} readers ({accelerator.num_processes} processes x "
            f"{max(workers, 1)} loader workers) and the global batch of {train_config.batch_size} by the slots"
        )
    pairs = StreamedPairs(
        corpus, augment, seed=train_config.seed, slots=slots, batch_size=train_config.batch_size,
        shuffle_buffer=train_config.shuffle_buffer, process=accelerator.process_index,
        processes=accelerator.num_processes, keys=keys,
    )  # fmt: skip
    collate = TrainBatcher(CaptionBatcher(tokenizer, model.config))
    loader = StreamLoader(
        pairs, collate, accelerator, workers=workers, max_bad_fraction=train_config.max_bad_row_fraction
    )
    accelerator.print(
        f"train data {corpus.spec}: {len(corpus.shards):,} shards, {corpus.num_samples:,} pairs an epoch, "
        f"{slots} slots, {len(loader):,} batches an epoch"
    )
    return pairs, loader


def load_checked(accelerator: Accelerator, source: DataSource, max_bad_fraction: float) -> datasets.DatasetDict:
    """Load the splits, check the schema and every row; refuse if too many rows are broken."""
    with accelerator.main_process_first():
        splits, report = check_rows(load_splits(source), max_bad_fraction=max_bad_fraction)
    accelerator.print(f"data {source.describe()}: {report.summary()}")
    for example in report.examples:
        accelerator.print(f"  skipped {example}")
    return splits
