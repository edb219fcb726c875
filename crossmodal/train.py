"""The training loop: Accelerate for devices, precision, accumulation, gathering and logging.

Each epoch shows every training image once with one of its captions; validation Recall picks the best epoch; the test
split is evaluated once, with the best weights, at the end. Checkpoints restart mid-epoch and replay the same batches.
"""

from __future__ import annotations

import math
import os
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
from crossmodal.augment import EncodedImage, TrainAugment, decode_batch
from crossmodal.config import KNOWN_TEXT_ARCHITECTURES, ModelConfig, TrainConfig
from crossmodal.data import DataSource, EpochShuffle, TrainPairs, caption_table, check_rows, load_splits
from crossmodal.devices import safetensors_device
from crossmodal.indexing import CaptionBatcher, encode_captions, encode_images
from crossmodal.loss import clip_loss
from crossmodal.metrics import recall_at_k
from crossmodal.model import DualEncoder, build_model
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
class SplitEmbeddings:
    """The embeddings of one split: every image in row order, every caption in caption_table order."""

    images: torch.Tensor  # [N_images, D]
    texts: torch.Tensor  # [N_captions, D]
    caption_image: torch.Tensor  # [N_captions] row of each caption's image


@dataclass
class TrainResult:
    model: DualEncoder  # the best epoch's weights; model.config is the completed ModelConfig
    tokenizer: Any
    splits: datasets.DatasetDict  # after the bad-row checks
    state: RunState
    metrics: dict[str, dict[str, float]]
    test_embeddings: SplitEmbeddings  # what the test metrics were computed on: the artifact reuses them


class TrainBatcher:
    """Stack images, tokenize the sampled captions; images left for the device to decode stay a list."""

    def __init__(self, tokenizer, config: ModelConfig) -> None:
        self.captions = CaptionBatcher(tokenizer, config)

    def __call__(self, items: list[tuple[torch.Tensor | EncodedImage, str]]) -> dict[str, Any]:
        images, captions = zip(*items, strict=True)
        if any(isinstance(image, EncodedImage) for image in images):
            return {"images": list(images), **self.captions(list(captions))}
        return {"pixel_values": torch.stack(images), **self.captions(list(captions))}


class DeviceBatch:
    """A loader batch, on the training device, made ready for the model.

    ``decode_on_device`` batches carry JPEG bytes: they are decoded and cropped here (nvjpeg on CUDA). channels_last
    is the layout cuDNN runs EfficientNet's convolutions fastest in; a channels_last input is enough for every
    convolution to follow it, and the weights stay contiguous for safetensors.
    """

    def __init__(self, augment: TrainAugment, device: torch.device, *, channels_last: bool) -> None:
        self.augment = augment
        self.device = device
        self.channels_last = channels_last

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        batch = dict(batch)
        if "images" in batch:
            batch["pixel_values"] = decode_batch(batch.pop("images"), self.augment, self.device)
        if self.channels_last:
            batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
        return batch


class StopFlag:
    """Set by SIGTERM; checked between steps so the checkpoint is written at a clean boundary."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


# --- building blocks ---------------------------------------------------------------------------------------------


def make_tokenizer(config: ModelConfig, train_rows: datasets.Dataset, output_dir: Path, accelerator: Accelerator):
    """The pretrained tokenizer, or one fit on the training captions (by the main process, then shared via disk)."""
    if config.init == "pretrained":
        return load_tokenizer(config.text_tower)
    saved = output_dir / "tokenizer"
    if accelerator.is_main_process and not (saved / "tokenizer.json").exists():
        captions, _ = caption_table(train_rows)
        vocab_size = KNOWN_TEXT_ARCHITECTURES.get(config.text_tower, {}).get("vocab_size", 30522)
        fit_wordpiece(captions, vocab_size=vocab_size, max_length=config.max_text_length).save_pretrained(saved)
    accelerator.wait_for_everyone()
    return load_tokenizer(str(saved))


def parameter_groups(model: DualEncoder, train: TrainConfig) -> list[dict[str, Any]]:
    """Towers at lr * tower_lr_ratio, projections and scale at lr; no weight decay on biases, norms and the scale."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_tower = name.startswith(("image_tower.", "text_tower."))
        decays = parameter.ndim >= 2
        groups.setdefault((in_tower, decays), []).append(parameter)
    return [
        {
            "params": params,
            "lr": train.lr * (train.tower_lr_ratio if in_tower else 1.0),
            "weight_decay": train.weight_decay if decays else 0.0,
        }
        for (in_tower, decays), params in sorted(groups.items())
    ]


def make_optimizer(model: DualEncoder, train: TrainConfig, *, fused: bool) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; ``fused`` (one kernel for all parameters) is what pays on CUDA."""
    return torch.optim.AdamW(parameter_groups(model, train), lr=train.lr, fused=True if fused else None)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(configured: int | None, num_processes: int) -> int:
    """Loader workers per process: as configured, or every core this process's share has but one (it drives the
    model), since decode + augment is the CPU-heavy part of a step."""
    if configured is not None:
        return configured
    return max(usable_cores() // num_processes - 1, 0)


def make_train_loader(
    dataset: TrainPairs, tokenizer, model_config: ModelConfig, train_config: TrainConfig, num_workers: int
) -> DataLoader:
    """Global batches of ``dataset`` in the epoch's order (``set_epoch``), collated by :class:`TrainBatcher`."""
    return DataLoader(
        dataset,
        batch_size=train_config.batch_size,
        sampler=EpochShuffle(len(dataset), train_config.seed),
        drop_last=True,  # every step sees a full global batch: the same number of negatives
        num_workers=num_workers,
        collate_fn=TrainBatcher(tokenizer, model_config),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers must see each epoch's set_epoch
    )


def encode_rows(
    accelerator: Accelerator, model: DualEncoder, tokenizer, rows: datasets.Dataset, batch_size: int
) -> SplitEmbeddings:
    """Embeddings of all images and captions of ``rows``."""
    captions, caption_image = caption_table(rows)
    images = encode_images(accelerator, model, rows, batch_size)
    texts = encode_captions(accelerator, model, tokenizer, captions, batch_size)
    return SplitEmbeddings(images, texts, torch.tensor(caption_image))


def split_metrics(embeddings: SplitEmbeddings) -> dict[str, float]:
    return recall_at_k(embeddings.images, embeddings.texts, embeddings.caption_image)


def evaluate_rows(
    accelerator: Accelerator, model: DualEncoder, tokenizer, rows: datasets.Dataset, batch_size: int
) -> dict[str, float]:
    """Recall@K of ``model`` on ``rows`` (all their images and captions)."""
    return split_metrics(encode_rows(accelerator, model, tokenizer, rows, batch_size))


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


# --- the run -----------------------------------------------------------------------------------------------------


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
    # 1. Accelerate's view of the run.
    if train_config.batch_size % accelerator.num_processes:
        raise ValueError(
            f"--batch-size {train_config.batch_size} is the global batch; it must divide by the "
            f"{accelerator.num_processes} processes"
        )
    set_seed(train_config.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = output_dir / "checkpoints"
    stop = StopFlag()

    # 2. Data: load, check the schema and every row, refuse if too many rows are broken.
    with accelerator.main_process_first():
        splits, report = check_rows(load_splits(source), max_bad_fraction=train_config.max_bad_row_fraction)
    accelerator.print(f"data {source.describe()}: {report.summary()}")
    for example in report.examples:
        accelerator.print(f"  skipped {example}")

    # 3. Model, tokenizer, optimizer, schedule.
    tokenizer = make_tokenizer(model_config, splits["train"], output_dir, accelerator)
    model, model_config = build_model(
        model_config,
        tokenizer,
        pretrained=model_config.init == "pretrained",
        freeze_image_norm_stats=train_config.freeze_image_norm_stats,
    )
    on_cuda = accelerator.device.type == "cuda"
    optimizer = make_optimizer(model, train_config, fused=on_cuda)
    augment = TrainAugment(model_config)
    dataset = TrainPairs(splits["train"], augment, train_config.seed, decode_on_device=train_config.decode_on_device)
    device_batch = DeviceBatch(augment, accelerator.device, channels_last=on_cuda)
    loader = make_train_loader(
        dataset,
        tokenizer,
        model_config,
        train_config,
        loader_workers(train_config.num_workers, accelerator.num_processes),
    )
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images is fewer than one global batch of {train_config.batch_size}")
    steps_per_epoch = batches_per_epoch // train_config.grad_accum_steps
    total_steps = steps_per_epoch * train_config.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(train_config.warmup_fraction * total_steps), total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if accelerator.log_with:
        accelerator.init_trackers("crossmodal", config={**asdict(train_config), "embed_dim": model_config.embed_dim})

    # 4. Resume: weights, optimizer, schedule, RNG, and where in which epoch we were.
    state = RunState()
    resume_from = checkpoint.resolve_resume(resume, checkpoints)
    if resume_from is not None:
        saved = checkpoint.load_checkpoint(
            accelerator, resume_from, model=model, optimizer=optimizer, scheduler=scheduler
        )
        state = RunState(**{**saved, "loss_log": [tuple(entry) for entry in saved["loss_log"]]})
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch}, batch {state.batches_done})")

    def save(run_state: RunState) -> Path:
        return checkpoint.save_checkpoint(
            accelerator,
            checkpoints,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            run_state=asdict(run_state),
            keep=train_config.keep_checkpoints,
        )

    # 5. Epochs.
    unwrapped: DualEncoder = accelerator.unwrap_model(model)
    best_path = output_dir / "best" / "model.safetensors"
    bad_in_a_row = 0
    while state.epoch < train_config.epochs and (max_steps is None or state.global_step < max_steps):
        loader.set_epoch(state.epoch)  # the sampler's order
        # The dataset's captions and crops: Accelerate forwards set_epoch to the dataset only when it finds no sampler
        # to forward it to, which holds for one process but not for its sharded batch sampler in several.
        dataset.set_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, state.batches_done) if state.batches_done else loader
        model.train()
        epoch_losses: list[float] = []
        started = time.perf_counter()
        progress = tqdm(
            epoch_loader,
            total=batches_per_epoch,
            initial=state.batches_done,
            desc=f"epoch {state.epoch + 1}/{train_config.epochs}",
            disable=not accelerator.is_local_main_process,
        )
        for batch in progress:
            loss = train_step(accelerator, model, optimizer, scheduler, device_batch(batch), train_config.max_grad_norm)
            state.batches_done += 1
            if not math.isfinite(loss):
                bad_in_a_row += 1
                state.skipped_steps += 1
                accelerator.print(f"step {state.global_step}: loss is {loss}; skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= train_config.max_bad_steps:
                    last = checkpoint.complete_checkpoints(checkpoints)
                    raise TrainingAborted(
                        f"{bad_in_a_row} non-finite losses in a row; stopping. Last good checkpoint: "
                        f"{last[-1] if last else 'none'} (lower --lr or try --mixed-precision no)"
                    )
                continue
            bad_in_a_row = 0
            epoch_losses.append(loss)
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            if state.global_step % train_config.log_every == 0:
                state.loss_log.append((state.global_step, loss))
                accelerator.log({"train/loss": loss, "train/scale": unwrapped.scale().item()}, step=state.global_step)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
            interrupted = accelerator.reduce(torch.tensor(float(stop.requested), device=accelerator.device), "max")
            if interrupted.item() > 0:
                path = save(state)
                raise TrainingInterrupted(f"SIGTERM: checkpoint {path} written; rerun with --resume latest")
            if state.global_step % train_config.checkpoint_every == 0:
                save(state)
            if max_steps is not None and state.global_step >= max_steps:
                break
        progress.close()
        if state.batches_done < batches_per_epoch:  # stopped by max_steps
            break

        # End of epoch: validation, best-model selection, checkpoint at the epoch boundary.
        val = evaluate_rows(accelerator, unwrapped, tokenizer, splits["val"], train_config.eval_batch_size)
        mean_loss = sum(epoch_losses) / max(len(epoch_losses), 1)
        state.history.append(
            {
                "epoch": state.epoch + 1,
                "step": state.global_step,
                "train_loss": mean_loss,
                "val": val,
                "seconds": time.perf_counter() - started,
            }
        )
        accelerator.log({f"val/{key}": value for key, value in val.items()}, step=state.global_step)
        accelerator.print(
            f"epoch {state.epoch + 1}: loss {mean_loss:.4f}, val R@1 i2t {val['i2t_R@1']:.1f} "
            f"t2i {val['t2i_R@1']:.1f}, rsum {val['rsum']:.1f}"
        )
        if val["rsum"] > state.best_rsum:
            state.best_rsum, state.best_epoch = val["rsum"], state.epoch + 1
            if accelerator.is_main_process:
                best_path.parent.mkdir(parents=True, exist_ok=True)
                save_model(unwrapped, str(best_path.with_suffix(".tmp")))
                best_path.with_suffix(".tmp").replace(best_path)
        state.epoch += 1
        state.batches_done = 0
        save(state)

    # 6. The best epoch's weights; the test split, once.
    accelerator.wait_for_everyone()
    if best_path.exists():
        load_model(unwrapped, str(best_path), device=safetensors_device(accelerator.device))
    best_val = next((entry["val"] for entry in state.history if entry["epoch"] == state.best_epoch), {})
    test_embeddings = encode_rows(accelerator, unwrapped, tokenizer, splits["test"], train_config.eval_batch_size)
    test = split_metrics(test_embeddings)
    accelerator.print(f"test (best epoch {state.best_epoch}): {format_metrics(test)}")
    return TrainResult(unwrapped, tokenizer, splits, state, {"val": best_val, "test": test}, test_embeddings)


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.1f}" for key, value in metrics.items())
