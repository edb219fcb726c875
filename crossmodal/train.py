"""The training loop: Accelerate for devices, precision, accumulation, gathering and logging.

Each epoch shows every training image once with one of its captions; validation Recall picks the best epoch; the test
split is evaluated once, with the best weights, at the end. Checkpoints restart mid-epoch and replay the same batches.
:func:`train` reads as its three steps: :func:`setup_run`, then :func:`run_epoch` and :func:`end_epoch` per epoch,
then :func:`finish`.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from crossmodal import checkpoint
from crossmodal.augment import TrainAugment
from crossmodal.batching import DeviceBatch, TrainPairs, loader_workers, make_train_loader
from crossmodal.config import KNOWN_TEXT_ARCHITECTURES, ModelConfig, TrainConfig
from crossmodal.data import DataSource, caption_table, check_rows, load_splits
from crossmodal.devices import safetensors_device
from crossmodal.encoding import SplitEmbeddings, encode_split, evaluate_split
from crossmodal.locked_image import lock_image_tower, train_image_features
from crossmodal.locked_text import lock_text_tower, train_captions
from crossmodal.loss import clip_loss
from crossmodal.model import DualEncoder, build_model
from crossmodal.optimizer import make_optimizer
from crossmodal.pinned import pin_text_tower
from crossmodal.pinned_image import pin_image_tower
from crossmodal.tokenizer import fit_wordpiece, load_tokenizer


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (non-finite losses); the last good checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM: a checkpoint was written and the run can be resumed with ``--resume latest``."""


@dataclass
class RunState:
    """Everything besides tensors that a checkpoint restores."""

    epoch: int = 0
    batches_done: int = 0  # loader batches consumed in ``epoch``: resuming skips exactly these
    global_step: int = 0  # optimizer steps
    best_rsum: float = -math.inf
    best_epoch: int = -1
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    loss_log: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) every log_every steps


@dataclass
class TrainResult:
    model: DualEncoder  # the best epoch's weights; model.config is the completed ModelConfig
    tokenizer: Any
    splits: datasets.DatasetDict  # after the bad-row checks
    state: RunState
    metrics: dict[str, dict[str, float]]
    test_embeddings: SplitEmbeddings  # what the test metrics were computed on: the artifact reuses them


class StopFlag:
    """Set by SIGTERM; checked between steps so the checkpoint is written at a clean boundary."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "requested", True))


# --- building blocks ---------------------------------------------------------------------------------------------


def make_tokenizer(config: ModelConfig, train_rows: datasets.Dataset, output_dir: Path, accelerator: Accelerator):
    """The pretrained tokenizer, or one fit on the training captions (by the main process, then shared via disk)."""
    if config.text_init == "pretrained":
        return load_tokenizer(config.text_tower, config.text_revision)
    saved = output_dir / "tokenizer"
    if accelerator.is_main_process and not (saved / "tokenizer.json").exists():
        captions, _ = caption_table(train_rows)
        vocab_size = KNOWN_TEXT_ARCHITECTURES.get(config.text_tower, {}).get("vocab_size", 30522)
        fit_wordpiece(captions, vocab_size=vocab_size, max_length=config.max_text_length).save_pretrained(saved)
    accelerator.wait_for_everyone()
    return load_tokenizer(str(saved))


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    max_grad_norm: float,
) -> float:
    """One micro-batch under ``accelerator.accumulate``; returns the loss, or NaN/inf without updating anything."""
    with accelerator.accumulate(model):
        image_embeddings, text_embeddings, scale = model(**batch)
        loss = clip_loss(image_embeddings, text_embeddings, scale)
        if not torch.isfinite(loss):  # same value on every process: the loss is computed over the global batch
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


# --- the accelerator ---------------------------------------------------------------------------------------------


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


# --- the run: set-up, one epoch, the end of an epoch, the finish ------------------------------------------------


@dataclass
class Run:
    """What a run's steps share: built by :func:`setup_run`, advanced by the epochs, read by :func:`finish`."""

    accelerator: Accelerator
    train_config: TrainConfig
    splits: datasets.DatasetDict  # after the bad-row checks
    tokenizer: Any
    model: torch.nn.Module  # prepared by Accelerate (wrapped in DDP when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: TrainPairs
    loader: DataLoader
    device_batch: DeviceBatch
    output_dir: Path
    state: RunState
    stop: StopFlag
    batches_per_epoch: int  # global batches: what a full epoch consumes on every process
    bad_in_a_row: int = 0  # non-finite losses since the last finite one

    @property
    def unwrapped(self) -> DualEncoder:
        return self.accelerator.unwrap_model(self.model)

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def best_path(self) -> Path:
        return self.output_dir / "best" / "model.safetensors"

    def save_checkpoint(self) -> Path:
        return checkpoint.save_checkpoint(
            self.accelerator, self.checkpoints, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            run_state=asdict(self.state), keep=self.train_config.keep_checkpoints,
        )  # fmt: skip


def train(
    accelerator: Accelerator,
    model_config: ModelConfig,
    train_config: TrainConfig,
    source: DataSource,
    output_dir: Path,
    *,
    resume: str | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train, select the best epoch on validation RSUM, evaluate test once; returns the best model and its metrics.

    ``accelerator`` comes from :func:`make_accelerator`. ``max_steps`` stops early after that many optimizer steps
    (smoke tests of the full-size architecture).
    """
    run = setup_run(accelerator, model_config, train_config, source, output_dir, resume)
    while run.state.epoch < train_config.epochs and (max_steps is None or run.state.global_step < max_steps):
        started = time.perf_counter()
        losses = run_epoch(run, max_steps)
        if run.state.batches_done < run.batches_per_epoch:  # stopped by max_steps
            break
        end_epoch(run, losses, time.perf_counter() - started)
    return finish(run)


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
    model_config = pin_image_tower(pin_text_tower(model_config))
    splits = load_checked(accelerator, source, train_config.max_bad_row_fraction)
    tokenizer = make_tokenizer(model_config, splits["train"], output_dir, accelerator)
    model, model_config = build_model(
        model_config, tokenizer, pretrained=True, freeze_image_norm_stats=train_config.freeze_image_norm_stats
    )
    on_cuda = accelerator.device.type == "cuda"
    if train_config.lock_text_tower:
        lock_text_tower(model)  # before the optimizer is built, so it never holds the tower's weights
    if train_config.lock_image_tower:
        lock_image_tower(model)
    optimizer = make_optimizer(model, train_config, fused=on_cuda)
    augment = TrainAugment(model_config)
    dataset, loader = make_training_data(accelerator, model, tokenizer, splits, train_config, augment)
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images is fewer than one global batch of {train_config.batch_size}")
    total_steps = batches_per_epoch // train_config.grad_accum_steps * train_config.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(train_config.warmup_fraction * total_steps), total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if accelerator.log_with:
        accelerator.init_trackers("crossmodal", config={**asdict(train_config), "embed_dim": model_config.embed_dim})
    device_batch = DeviceBatch(augment, accelerator.device, channels_last=on_cuda)
    run = Run(
        accelerator, train_config, splits, tokenizer, model, optimizer, scheduler, dataset, loader, device_batch,
        output_dir, RunState(), stop, batches_per_epoch,
    )  # fmt: skip
    resume_from = checkpoint.resolve_resume(resume, run.checkpoints)
    if resume_from is not None:  # weights, optimizer, schedule, RNG, and where in which epoch we were
        saved = checkpoint.load_checkpoint(
            accelerator, resume_from, model=model, optimizer=optimizer, scheduler=scheduler
        )
        run.state = RunState(**{**saved, "loss_log": [tuple(entry) for entry in saved["loss_log"]]})
        accelerator.print(f"resumed from {resume_from} (epoch {run.state.epoch}, batch {run.state.batches_done})")
    return run


def make_training_data(
    accelerator: Accelerator,
    model: DualEncoder,
    tokenizer: Any,
    splits: datasets.DatasetDict,
    train_config: TrainConfig,
    augment: TrainAugment,
) -> tuple[TrainPairs, DataLoader]:
    """The training pairs and their loader; a locked tower's features are computed here, once, on the run's device
    (crossmodal/locked_image.py, locked_text.py)."""
    model.to(accelerator.device)
    image_features = (
        train_image_features(model, splits, train_config.eval_batch_size, accelerator)
        if train_config.lock_image_tower
        else None
    )
    dataset = TrainPairs(
        splits["train"], augment, train_config.seed, train_config.decode_on_device, image_features=image_features
    )
    workers = loader_workers(train_config.num_workers, accelerator.num_processes)
    captions = train_captions(model, tokenizer, splits, train_config, accelerator)
    return dataset, make_train_loader(dataset, captions, train_config, workers)


def load_checked(accelerator: Accelerator, source: DataSource, max_bad_fraction: float) -> datasets.DatasetDict:
    """Load the splits, check the schema and every row; refuse if too many rows are broken."""
    with accelerator.main_process_first():
        splits, report = check_rows(load_splits(source), max_bad_fraction=max_bad_fraction)
    accelerator.print(f"data {source.describe()}: {report.summary()}")
    for example in report.examples:
        accelerator.print(f"  skipped {example}")
    return splits


def run_epoch(run: Run, max_steps: int | None) -> list[float]:
    """The epoch's batches (the rest of them, when resuming mid-epoch), one :func:`train_step` each; returns the
    finite losses. Raises :class:`TrainingAborted` after too many non-finite ones in a row."""
    accelerator, state, config = run.accelerator, run.state, run.train_config
    run.loader.set_epoch(state.epoch)  # the sampler's order
    # The dataset's captions and crops: Accelerate forwards set_epoch to the dataset only when it finds no sampler
    # to forward it to, which holds for one process but not for its sharded batch sampler in several.
    run.dataset.set_epoch(state.epoch)
    loader = accelerator.skip_first_batches(run.loader, state.batches_done) if state.batches_done else run.loader
    run.model.train()
    losses: list[float] = []
    progress = tqdm(
        loader, total=run.batches_per_epoch, initial=state.batches_done,
        desc=f"epoch {state.epoch + 1}/{config.epochs}", disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    for batch in progress:
        loss = train_step(
            accelerator, run.model, run.optimizer, run.scheduler, run.device_batch(batch), config.max_grad_norm
        )
        state.batches_done += 1
        if not math.isfinite(loss):
            count_bad_step(run, loss)
            continue
        run.bad_in_a_row = 0
        losses.append(loss)
        if not accelerator.sync_gradients:
            continue
        state.global_step += 1
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{run.scheduler.get_last_lr()[-1]:.2e}")
        after_optimizer_step(run, loss)
        if max_steps is not None and state.global_step >= max_steps:
            break
    progress.close()
    return losses


def count_bad_step(run: Run, loss: float) -> None:
    """A skipped step (nothing was updated); too many in a row end the run, with the last good checkpoint named."""
    run.bad_in_a_row += 1
    run.state.skipped_steps += 1
    run.accelerator.print(f"step {run.state.global_step}: loss is {loss}; skipped ({run.bad_in_a_row} in a row)")
    if run.bad_in_a_row >= run.train_config.max_bad_steps:
        last = checkpoint.complete_checkpoints(run.checkpoints)
        raise TrainingAborted(
            f"{run.bad_in_a_row} non-finite losses in a row; stopping. Last good checkpoint: "
            f"{last[-1] if last else 'none'} (lower --lr or try --mixed-precision no)"
        )


def after_optimizer_step(run: Run, loss: float) -> None:
    """Log the loss every log_every steps; on SIGTERM (on any process) checkpoint and stop; checkpoint every
    checkpoint_every steps."""
    accelerator, state = run.accelerator, run.state
    if state.global_step % run.train_config.log_every == 0:
        state.loss_log.append((state.global_step, loss))
        accelerator.log({"train/loss": loss, "train/scale": run.unwrapped.scale().item()}, step=state.global_step)
    interrupted = accelerator.reduce(torch.tensor(float(run.stop.requested), device=accelerator.device), "max")
    if interrupted.item() > 0:
        path = run.save_checkpoint()
        raise TrainingInterrupted(f"SIGTERM: checkpoint {path} written; rerun with --resume latest")
    if state.global_step % run.train_config.checkpoint_every == 0:
        run.save_checkpoint()


def end_epoch(run: Run, losses: list[float], seconds: float) -> None:
    """Validation Recall, the epoch's history entry, the best weights so far, a checkpoint at the epoch boundary."""
    accelerator, state = run.accelerator, run.state
    val = evaluate_split(accelerator, run.unwrapped, run.tokenizer, run.splits["val"], run.train_config.eval_batch_size)
    mean_loss = sum(losses) / max(len(losses), 1)
    state.history.append(
        {"epoch": state.epoch + 1, "step": state.global_step, "train_loss": mean_loss, "val": val, "seconds": seconds}
    )
    accelerator.log({f"val/{key}": value for key, value in val.items()}, step=state.global_step)
    accelerator.print(
        f"epoch {state.epoch + 1}: loss {mean_loss:.4f}, val R@1 i2t {val['i2t_R@1']:.1f} "
        f"t2i {val['t2i_R@1']:.1f}, rsum {val['rsum']:.1f}"
    )
    if val["rsum"] > state.best_rsum:
        state.best_rsum, state.best_epoch = val["rsum"], state.epoch + 1
        if accelerator.is_main_process:  # written aside and renamed: an interrupted write leaves the last best intact
            run.best_path.parent.mkdir(parents=True, exist_ok=True)
            save_model(run.unwrapped, str(run.best_path.with_suffix(".tmp")))
            run.best_path.with_suffix(".tmp").replace(run.best_path)
    state.epoch += 1
    state.batches_done = 0
    run.save_checkpoint()


def finish(run: Run) -> TrainResult:
    """The best epoch's weights back in the model, and the test split evaluated with them, once."""
    accelerator, state, model = run.accelerator, run.state, run.unwrapped
    accelerator.wait_for_everyone()
    if run.best_path.exists():
        load_model(model, str(run.best_path), device=safetensors_device(accelerator.device))
    best_val = next((entry["val"] for entry in state.history if entry["epoch"] == state.best_epoch), {})
    test = encode_split(accelerator, model, run.tokenizer, run.splits["test"], run.train_config.eval_batch_size)
    metrics = test.recall()
    accelerator.print(f"test (best epoch {state.best_epoch}): {format_metrics(metrics)}")
    return TrainResult(model, run.tokenizer, run.splits, state, {"val": best_val, "test": metrics}, test)


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.1f}" for key, value in metrics.items())
