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
    """ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ..., against one process: the plain
    loss, and caption negatives with HN-NCE."""
    output = tmp_path / "result.json"
    run_cli(
        *accelerate_command(processes), "tests/distributed/loss_and_gradients.py", output,
        env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["processes"] == processes
    for recipe in ("plain", "hard"):
        assert result[recipe]["loss"] == pytest.approx(result[recipe]["expected"], rel=1e-5), recipe
        assert result[recipe]["max_relative_gradient_error"] < 1e-4, (recipe, result)
    assert sys.executable  # the launcher ran under this interpreter


# ---------------------------------------------------------------- caption negatives and hard-negative weighting


def brute_force_loss(images, texts, scale, negatives, present, beta):
    """The loss written out one row at a time in float64: -log(e^pos / (e^pos + sum_j w_j e^neg_j)), with
    w_j = e^(beta neg_j) / mean_k e^(beta neg_k) over the row's negatives (HN-NCE, alpha = 1), not differentiated."""
    images, texts, negatives = images.double(), texts.double(), negatives.double()
    n = len(images)

    def row_loss(positive, wrong):
        wrong = torch.stack(wrong)
        weights = (torch.exp(beta * wrong) / torch.exp(beta * wrong).mean()).detach()  # weights, not a path
        return -torch.log(torch.exp(positive) / (torch.exp(positive) + (weights * torch.exp(wrong)).sum()))

    image_to_text = text_to_image = 0.0
    for i in range(n):
        wrong = [scale * images[i] @ texts[j] for j in range(n) if j != i]
        wrong += [
            scale * images[i] @ negatives[j, k] for j in range(n) for k in range(negatives.shape[1]) if present[j, k]
        ]
        image_to_text += row_loss(scale * images[i] @ texts[i], wrong)
        wrong = [scale * texts[i] @ images[j] for j in range(n) if j != i]  # a caption negative has no picture
        text_to_image += row_loss(scale * texts[i] @ images[i], wrong)
    return (image_to_text / n + text_to_image / n) / 2


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_loss_with_negatives_and_weighting_equals_the_brute_force_loop(beta, with_negatives):
    generator = torch.Generator().manual_seed(7)
    n, k, dim = 6, 3, 16
    images = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    negatives = F.normalize(torch.randn(n, k, dim, generator=generator), dim=-1)
    present = torch.rand(n, k, generator=generator) > 0.3  # some captions have fewer than k negatives
    present[0] = False  # and one has none
    if not with_negatives:
        present = torch.zeros(n, k, dtype=torch.bool)
    scale = torch.tensor(10.0)
    ours = clip_loss(
        images, texts, scale,
        negative_embeddings=negatives if with_negatives else None,
        negative_mask=present if with_negatives else None,
        hard_negative_beta=beta,
    )  # fmt: skip
    expected = brute_force_loss(images, texts, scale, negatives, present, beta)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_negatives_raise_the_loss_and_beta_raises_it_more_when_a_negative_looks_like_the_positive():
    embeddings = F.normalize(torch.randn(8, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    near_copies = F.normalize(embeddings + 0.3 * torch.randn(8, 32), dim=-1).unsqueeze(1)  # [8, 1, 32]
    present = torch.ones(8, 1, dtype=torch.bool)
    scale = torch.tensor(20.0)
    plain = clip_loss(embeddings, embeddings, scale)
    with_negatives = clip_loss(embeddings, embeddings, scale, negative_embeddings=near_copies, negative_mask=present)
    weighted = clip_loss(
        embeddings, embeddings, scale, negative_embeddings=near_copies, negative_mask=present, hard_negative_beta=1.0
    )
    assert plain < with_negatives < weighted


def test_absent_negatives_change_nothing_and_get_no_gradient():
    generator = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    negatives = torch.randn(5, 2, 8, generator=generator, requires_grad=True)
    absent = torch.zeros(5, 2, dtype=torch.bool)
    scale = torch.tensor(5.0)
    loss = clip_loss(images, texts, scale, negative_embeddings=negatives, negative_mask=absent)
    torch.testing.assert_close(loss, clip_loss(images, texts, scale))
    loss.backward()
    assert not negatives.grad.any()
