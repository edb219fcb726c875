"""The training loop: Accelerate for devices, precision, accumulation, gathering and logging.

Each epoch shows every training image once with one of its captions; validation Recall picks the best epoch; the test
split is evaluated once, with the best weights, at the end. Checkpoints restart mid-epoch and replay the same batches.
:func:`train` reads as its three steps: :func:`setup_run`, then :func:`run_epoch` and :func:`end_epoch` per epoch,
then :func:`finish`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from crossmodal.config import ModelConfig, TrainConfig
from crossmodal.data.dataset import DataSource
from crossmodal.encoding.embed import encode_split, evaluate_split
from crossmodal.model.devices import safetensors_device
from crossmodal.training import checkpoint
from crossmodal.training.loss import clip_loss
from crossmodal.training.prepare import setup_run
from crossmodal.training.state import Run, TrainingAborted, TrainingInterrupted, TrainResult
from crossmodal.training.streamed import StreamLoader


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
        stopped = max_steps is not None and run.state.global_step >= max_steps
        # A stream's epoch may also end early, when a slot ran dry (training/streamed.py): it is still whole.
        if stopped and run.state.batches_done < run.batches_per_epoch:
            break
        end_epoch(run, losses, time.perf_counter() - started)
    return finish(run)


def run_epoch(run: Run, max_steps: int | None) -> list[float]:
    """The epoch's batches (the rest of them, when resuming mid-epoch), one :func:`train_step` each; returns the
    finite losses. Raises :class:`TrainingAborted` after too many non-finite ones in a row."""
    accelerator, state, config = run.accelerator, run.state, run.train_config
    loader = epoch_batches(run)
    run.model.train()
    losses: list[float] = []
    progress = tqdm(
        loader, total=run.batches_per_epoch, initial=state.batches_done,
        desc=f"epoch {state.epoch + 1}/{config.epochs}", disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    for batch in progress:
        loss = train_step(
            accelerator, run.model, run.optimizer, run.scheduler, run.device_batch(batch), config.max_grad_norm,
            hard_negative_beta=config.hard_negative_beta,
        )  # fmt: skip
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


def epoch_batches(run: Run):
    """The epoch's loader batches from ``batches_done`` on: streamed (the stream continues from its recorded place)
    or from the map-style loader (its sampler's order, then Accelerate skips what was done)."""
    state = run.state
    if isinstance(run.loader, StreamLoader):
        return run.loader.epoch(state.epoch, state.batches_done)
    run.loader.set_epoch(state.epoch)  # the sampler's order
    # The dataset's captions and crops: Accelerate forwards set_epoch to the dataset only when it finds no sampler
    # to forward it to, which holds for one process but not for its sharded batch sampler in several.
    run.dataset.set_epoch(state.epoch)
    return run.accelerator.skip_first_batches(run.loader, state.batches_done) if state.batches_done else run.loader


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    max_grad_norm: float,
    *,
    hard_negative_beta: float = 0.0,
) -> float:
    """One micro-batch under ``accelerator.accumulate``; returns the loss, or NaN/inf without updating anything.

    A batch with caption negatives (``negative_mask`` among its keys) gets their embeddings from the model as a
    fourth output."""
    batch = dict(batch)
    negative_mask = batch.pop("negative_mask", None)
    with accelerator.accumulate(model):
        image_embeddings, text_embeddings, scale, *negatives = model(**batch)
        hard: dict[str, Any] = {"hard_negative_beta": hard_negative_beta} if hard_negative_beta else {}
        if negatives:
            hard |= {"negative_embeddings": negatives[0], "negative_mask": negative_mask}
        loss = clip_loss(image_embeddings, text_embeddings, scale, **hard)
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
    if isinstance(run.loader, StreamLoader):
        state.stream_epochs.append({"epoch": state.epoch + 1, **run.loader.epoch_summary(state.batches_done)})
        accelerator.print(f"epoch {state.epoch + 1} stream: {format_stream(state.stream_epochs[-1])}")
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
    results: dict[str, Any] = {"val": best_val, "test": metrics}
    if isinstance(run.loader, StreamLoader):  # metrics.json says what the stream gave and what it skipped
        bad = run.loader.position()["bad"]
        results["train_stream"] = {"bad": bad, "epochs": state.stream_epochs}
    return TrainResult(model, run.tokenizer, run.splits, state, results, test)


def format_stream(summary: dict[str, Any]) -> str:
    bad = ", ".join(f"{reason} {count:,}" for reason, count in sorted(summary["bad"].items())) or "none"
    return (f"{summary['pairs']:,} pairs trained on, {sum(summary['bad'].values()):,} bad samples skipped ({bad}), "
            f"{summary['dropped']:,} left out to keep every process's batches equal")  # fmt: skip


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.1f}" for key, value in metrics.items())
