"""Recall@K against a brute-force loop, including ties and images with several captions."""

import pytest
import torch
import torch.nn.functional as F

from crossmodal.encoding.metrics import recall_at_k


def brute_force_recall(similarity: torch.Tensor, caption_image: list[int], k: int) -> tuple[float, float]:
    """The definition, one query at a time: a wrong item scoring >= the best true one pushes it down a rank."""
    num_images, num_captions = similarity.shape
    i2t_hits = 0
    for image in range(num_images):
        own = [c for c in range(num_captions) if caption_image[c] == image]
        best = max(similarity[image, c].item() for c in own)
        better_wrong = sum(1 for c in range(num_captions) if caption_image[c] != image and similarity[image, c] >= best)
        i2t_hits += better_wrong < k
    t2i_hits = 0
    for caption in range(num_captions):
        true_score = similarity[caption_image[caption], caption].item()
        better_wrong = sum(
            1
            for image in range(num_images)
            if image != caption_image[caption] and similarity[image, caption] >= true_score
        )
        t2i_hits += better_wrong < k
    return 100.0 * i2t_hits / num_images, 100.0 * t2i_hits / num_captions


def random_problem(seed: int, num_images: int, dim: int, quantise: bool):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 6, (num_images,), generator=generator)  # 1 to 5 captions per image
    caption_image = torch.repeat_interleave(torch.arange(num_images), counts)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=generator)]  # captions in any order
    images = F.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
    texts = F.normalize(images[caption_image] + 0.8 * torch.randn(len(caption_image), dim, generator=generator), dim=-1)
    if quantise:  # coarse values make many exact ties in the similarity matrix
        images, texts = torch.sign(images), torch.sign(texts)
    return images, texts, caption_image


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantise", [False, True])
def test_recall_matches_brute_force(seed, quantise):
    images, texts, caption_image = random_problem(seed, num_images=23, dim=4 if quantise else 8, quantise=quantise)
    result = recall_at_k(images, texts, caption_image, chunk=5)  # small chunks exercise the chunk boundaries
    similarity = images @ texts.T
    for k in (1, 5, 10):
        i2t, t2i = brute_force_recall(similarity, caption_image.tolist(), k)
        assert result[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert result[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert result["rsum"] == pytest.approx(sum(v for key, v in result.items() if key != "rsum"))


def test_perfect_embeddings_score_100_and_constant_ones_score_0():
    images = torch.eye(4)
    texts = torch.eye(4).repeat_interleave(5, dim=0)  # 5 identical captions per image
    caption_image = torch.arange(4).repeat_interleave(5)
    assert recall_at_k(images, texts, caption_image)["rsum"] == pytest.approx(600.0)
    constant = recall_at_k(torch.ones(4, 3), torch.ones(20, 3), caption_image)
    assert constant["i2t_R@1"] == 0.0 and constant["t2i_R@1"] == 0.0  # ties count against the model


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
