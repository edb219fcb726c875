"""Device names handed to safetensors: every spelling Accelerate produces, and what safetensors makes of them."""

import pytest
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from crossmodal.model.devices import safetensors_device


@pytest.mark.parametrize(
    "device,expected",
    [
        ("cpu", "cpu"),
        (torch.device("cpu"), "cpu"),
        (torch.device("cpu", 0), "cpu"),  # a multi-process CPU run under Accelerate
        ("cpu:1", "cpu"),
        (torch.device("cuda", 3), "cuda:3"),  # rank 3 of a multi-GPU run
        ("cuda:0", "cuda:0"),
        ("cuda", "cuda"),
        (torch.device("mps"), "mps"),
    ],
)
def test_every_spelling_becomes_one_safetensors_accepts(device, expected):
    assert safetensors_device(device) == expected


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), torch.device("cpu", 0)])
def test_safetensors_loads_on_the_cpu_devices_accelerate_hands_out(tmp_path, device):
    path = tmp_path / "weights.safetensors"
    model = torch.nn.Linear(3, 2)
    save_model(model, str(path))
    save_file({"step": torch.arange(4)}, tmp_path / "state.safetensors")
    with pytest.raises(Exception, match="invalid"):  # the reason for the helper: safetensors' own parsing
        load_file(tmp_path / "state.safetensors", device="cpu:0")
    assert load_file(tmp_path / "state.safetensors", device=safetensors_device(device))["step"].tolist() == [0, 1, 2, 3]
    fresh = torch.nn.Linear(3, 2)
    load_model(fresh, str(path), device=safetensors_device(device))
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)


def test_an_artifact_folder_loads_on_the_device_of_a_multi_process_cpu_run(tiny_run):
    from crossmodal.artifacts.contract import rebuild_model

    model, _ = rebuild_model(tiny_run, device=torch.device("cpu", 0))
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}
