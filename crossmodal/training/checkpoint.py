"""Training checkpoints that are complete or ignored, with every tensor in safetensors and nothing pickled.

Accelerate's ``save_state`` pickles the optimizer and RNG states (and ``load_state`` unpickles them); we keep its
process orchestration (``wait_for_everyone``, ``unwrap_model``) but write tensors with safetensors and the rest as JSON.

A checkpoint is written to ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` only once every file is
on disk, with ``state.json`` (which lists each file's size) written last: a folder cut short is never picked up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model

from crossmodal.model.devices import safetensors_device

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_index, param_state in state["state"].items():
        for key, value in param_state.items():
            name = f"{param_index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        param_index, key = name.split(".", 1)
        state.setdefault(int(param_index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda_states = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(
    accelerator: Accelerator,
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``directory/step-N`` (N = run_state["global_step"]) from every process; returns its path."""
    final = directory / f"step-{run_state['global_step']:08d}"
    temporary = directory / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(_rng_tensors(), temporary / f"rng-{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(temporary / "model.safetensors"))
        optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(optimizer_tensors, temporary / "optimizer.safetensors")
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        extra = {"optimizer": optimizer_meta, "scheduler": scheduler.state_dict(), "scaler": scaler}
        (temporary / "training.json").write_text(json.dumps(extra, default=float))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {path.name: path.stat().st_size for path in sorted(temporary.iterdir())}
        state = {"run": run_state, "files": files, "num_processes": accelerator.num_processes}
        _write_synced(temporary / STATE_FILE, json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for stale in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def is_complete(path: Path) -> bool:
    """A checkpoint counts only if state.json exists and every file it lists is there at its recorded size."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        return all((path / name).stat().st_size == size for name, size in state["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first; partial or foreign folders are skipped."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(resume: str | None, directory: Path) -> Path | None:
    """``--resume latest`` -> newest complete checkpoint (or None: start fresh); a path must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (state.json missing or files cut short)")
    return path


def load_checkpoint(
    accelerator: Accelerator,
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore weights, optimizer, schedule, scaler and this process's RNG; return the saved run state."""
    state = json.loads((path / STATE_FILE).read_text())
    if state["num_processes"] != accelerator.num_processes:
        accelerator.print(
            f"note: {path.name} was written by {state['num_processes']} processes, resuming with "
            f"{accelerator.num_processes}; weights and optimizer resume exactly, augmentation RNG per process does not"
        )
    device = safetensors_device(accelerator.device)
    load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"), device=device)
    extra = json.loads((path / "training.json").read_text())
    optimizer_tensors = load_file(path / "optimizer.safetensors", device=device)
    optimizer.load_state_dict(_unflatten_optimizer(optimizer_tensors, extra["optimizer"]))
    scheduler.load_state_dict(extra["scheduler"])
    if accelerator.scaler is not None and extra["scaler"] is not None:
        accelerator.scaler.load_state_dict(extra["scaler"])
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if rng_file.exists():
        _restore_rng(load_file(rng_file))
    return state["run"]
