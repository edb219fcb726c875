"""The loss against transformers' CLIP loss, on one process and across two processes."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from crossmodal.training.loss import clip_loss, gather_features
from tests.conftest import SUBPROCESS_ENV, accelerate_command, run_cli


@pytest.mark.parametrize("batch,dim,scale", [(1, 4, 1.0), (8, 16, 1 / 0.07), (33, 64, 100.0)])
def test_loss_equals_transformers_clip_loss(batch, dim, scale):
    generator = torch.Generator().manual_seed(batch)
    images = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    scale = torch.tensor(scale)
    expected = image_text_contrastive_loss(scale * texts @ images.T)
    torch.testing.assert_close(clip_loss(images, texts, scale), expected)


def test_loss_is_low_for_matching_pairs_and_high_for_shuffled():
    embeddings = F.normalize(torch.randn(16, 32), dim=-1)
    scale = torch.tensor(100.0)
    assert clip_loss(embeddings, embeddings, scale) < 0.01
    assert clip_loss(embeddings, embeddings.roll(1, dims=0), scale) > 5


def test_gather_is_identity_on_one_process():
    features = torch.randn(4, 8, requires_grad=True)
    assert gather_features(features) is features


@pytest.mark.parametrize("processes", [1, 2])
def test_distributed_loss_and_gradients_match_one_process(tmp_path, processes):
    """ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ..., against one process."""
    output = tmp_path / "result.json"
    run_cli(
        *accelerate_command(processes), "tests/distributed/loss_and_gradients.py", output,
        env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["processes"] == processes
    assert result["loss"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["max_relative_gradient_error"] < 1e-4, result
    assert sys.executable  # the launcher ran under this interpreter
