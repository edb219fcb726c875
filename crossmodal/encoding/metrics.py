"""Recall@K for image<->text retrieval when each image has several captions (the Flickr30k protocol).

- image -> text: a hit at K if any of the image's captions is among the K best captions.
- text -> image: a hit at K if the caption's own image is among the K best images.
Ties count against the model: the true item's rank is the number of wrong items scoring at least as high, so a
model that scores everything equally gets 0, not 100. Results are in percent; RSUM adds the six recalls.
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)


def _image_to_text_ranks(similarity: torch.Tensor, caption_image: torch.Tensor, chunk: int) -> torch.Tensor:
    """similarity [I, C]; caption_image [C] -> for each image, how many other images' captions beat its best one."""
    num_images = similarity.shape[0]
    ranks = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, chunk):
        rows = similarity[start : start + chunk]  # [b, C]
        own = caption_image.unsqueeze(0) == torch.arange(start, start + rows.shape[0]).unsqueeze(1)  # [b, C]
        best_own = rows.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [b, 1]
        ranks[start : start + rows.shape[0]] = ((rows >= best_own) & ~own).sum(dim=1)
    return ranks


def _text_to_image_ranks(similarity: torch.Tensor, caption_image: torch.Tensor, chunk: int) -> torch.Tensor:
    """similarity [I, C] -> for each caption, how many other images score at least as high as its own image."""
    num_captions = similarity.shape[1]
    ranks = torch.empty(num_captions, dtype=torch.long)
    for start in range(0, num_captions, chunk):
        columns = similarity[:, start : start + chunk].T  # [b, I]
        own_image = caption_image[start : start + columns.shape[0]]
        own_score = columns.gather(1, own_image.unsqueeze(1))  # [b, 1]
        ranks[start : start + columns.shape[0]] = (columns >= own_score).sum(dim=1) - 1  # minus the image itself
    return ranks


def recall_at_k(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_image: torch.Tensor,
    ks: tuple[int, ...] = KS,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways, in percent, plus ``rsum``.

    image_embeddings [I, D] and text_embeddings [C, D] are L2-normalised; caption_image [C] gives each caption's
    image row. Every image needs at least one caption.
    """
    caption_image = caption_image.long().cpu()
    if caption_image.numel() != text_embeddings.shape[0]:
        raise ValueError(f"{caption_image.numel()} caption->image links for {text_embeddings.shape[0]} captions")
    if torch.bincount(caption_image, minlength=image_embeddings.shape[0]).min() == 0:
        raise ValueError("every image needs at least one caption to compute image->text recall")
    similarity = image_embeddings.float().cpu() @ text_embeddings.float().cpu().T  # [I, C]
    i2t = _image_to_text_ranks(similarity, caption_image, chunk)
    t2i = _text_to_image_ranks(similarity, caption_image, chunk)
    results: dict[str, float] = {}
    for k in ks:
        results[f"i2t_R@{k}"] = 100.0 * (i2t < k).double().mean().item()
    for k in ks:
        results[f"t2i_R@{k}"] = 100.0 * (t2i < k).double().mean().item()
    results["rsum"] = sum(results.values())
    return results


def twin_scores(image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor) -> dict[str, float]:
    """Winoground's scores (Thrush et al. 2022) over twins, in percent.

    image_embeddings [P, 2, D]: the two pictures of each twin pair; caption_embeddings [P, 2, J, D]: J captions of
    each, caption j of one holding the words of caption j of the other in another order. Each (pair, j) is one item
    of two pictures and two captions. ``caption_picks_image``: a caption scores its own picture above the twin
    (chance 50); ``image_picks_caption``: a picture scores its own caption above the twin's (50); ``text``: both
    pictures pick right, ``image``: both captions pick right (25 each); ``group``: all four (16.7). Ties count as
    wrong.
    """
    images, captions = image_embeddings.float().cpu(), caption_embeddings.float().cpu()
    if images.shape[:2] != captions.shape[:2] or images.shape[1] != 2:
        raise ValueError(f"twins need images [P, 2, D] and captions [P, 2, J, D], got {images.shape}, {captions.shape}")
    # score[p, j, c, i]: caption j of picture c against picture i
    score = torch.einsum("pcjd,pid->pjci", captions, images)
    own = score.diagonal(dim1=2, dim2=3)  # [P, J, 2]: each caption with its own picture
    crossed = score.flip(3).diagonal(dim1=2, dim2=3)  # [P, J, 2]: caption c with picture 1 - c
    other_caption = score.flip(2).diagonal(dim1=2, dim2=3)  # [P, J, 2]: picture i with caption 1 - i
    caption_right = own > crossed  # caption c picks picture c
    image_right = own > other_caption  # picture i picks caption i
    return {
        "caption_picks_image": 100 * caption_right.float().mean().item(),
        "image_picks_caption": 100 * image_right.float().mean().item(),
        "text": 100 * image_right.all(dim=2).float().mean().item(),
        "image": 100 * caption_right.all(dim=2).float().mean().item(),
        "group": 100 * (image_right.all(dim=2) & caption_right.all(dim=2)).float().mean().item(),
    }
