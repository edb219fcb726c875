"""What a training run carries from step to step: the run's parts (:class:`Run`), the state a checkpoint restores
(:class:`RunState`), the SIGTERM flag, what a finished run returns, and the two ways a run stops early.
"""

from __future__ import annotations

import math
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from crossmodal.config import TrainConfig
from crossmodal.encoding.embed import SplitEmbeddings
from crossmodal.model.dual_encoder import DualEncoder
from crossmodal.training import checkpoint
from crossmodal.training.pairs import DeviceBatch, TrainPairs
from crossmodal.training.streamed import StreamedPairs, StreamLoader


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
    # Streamed pairs (training/streamed.py): each slot's place in its epoch and the run's skipped samples by reason,
    # and per finished epoch what it did with its samples (pairs trained on, bad, dropped).
    stream: dict[str, Any] | None = None
    stream_epochs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    model: DualEncoder  # the best epoch's weights; model.config is the completed ModelConfig
    tokenizer: Any
    splits: datasets.DatasetDict  # after the bad-row checks
    state: RunState
    metrics: dict[str, dict[str, Any]]  # val and test Recall@K; with --train-data, what the stream skipped
    test_embeddings: SplitEmbeddings  # what the test metrics were computed on: the artifact reuses them


class StopFlag:
    """Set by SIGTERM; checked between steps so the checkpoint is written at a clean boundary."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "requested", True))


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
    dataset: TrainPairs | StreamedPairs
    loader: DataLoader | StreamLoader
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
        """Every process calls it (the stream's place is gathered from all of them)."""
        if isinstance(self.loader, StreamLoader):
            self.state.stream = self.loader.position()
        return checkpoint.save_checkpoint(
            self.accelerator, self.checkpoints, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            run_state=asdict(self.state), keep=self.train_config.keep_checkpoints,
        )  # fmt: skip
