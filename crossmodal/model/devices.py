"""Device names as other libraries accept them.

Accelerate hands out ``torch.device`` objects: ``cpu:0`` in a multi-process CPU run, ``cuda:N`` per rank on GPUs.
safetensors parses its ``device`` argument itself and accepts neither a ``torch.device`` nor ``cpu:N`` ("device cpu:0
is invalid"), so every safetensors load in the project takes its device from here.
"""

from __future__ import annotations

import torch


def safetensors_device(device: torch.device | str) -> str:
    """``device`` spelt the way safetensors' ``load_file``/``load_model`` accept it: ``cpu``, ``cuda``, ``cuda:1``..."""
    device = torch.device(device)
    if device.type == "cpu" or device.index is None:  # the CPU has no index, and safetensors refuses one
        return device.type
    return f"{device.type}:{device.index}"
