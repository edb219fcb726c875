"""The floor of a query: the bare tower forward on an already-prepared input, then ``topk`` over the stored matrix.

What no search can go below: no tokenizing, no decoding, no answer built. The query benchmark times it in-process
(``query_latency.Floor``) and inside the served app (``noop_app``'s floor twins), from the same three functions.
"""

from __future__ import annotations

import torch

from crossmodal.serving.search import Searcher


def top(matrix: torch.Tensor, query: torch.Tensor, k: int) -> list[int]:
    """The bare scan: one matrix-vector product in the matrix's dtype, then ``topk``."""
    return torch.topk(matrix @ query.to(matrix.dtype), k).indices.tolist()


@torch.inference_mode()
def text_to_image(searcher: Searcher, tokens: dict[str, torch.Tensor], k: int) -> list[int]:
    """``tokens``: ``preprocess.tokenize`` of one caption."""
    return top(searcher.image_embeddings, searcher.model.encode_text(**tokens)[0], k)


@torch.inference_mode()
def image_to_text(searcher: Searcher, pixels: torch.Tensor, k: int) -> list[int]:
    """``pixels``: ``preprocess.image_batch`` of one decoded image, [1, 3, S, S]."""
    return top(searcher.text_embeddings, searcher.model.encode_image(pixels)[0], k)


@torch.inference_mode()
def image_to_image(searcher: Searcher, pixels: torch.Tensor, k: int) -> list[int]:
    return top(searcher.image_embeddings, searcher.model.encode_image(pixels)[0], k)


def tokens_from_ids(ids: str) -> dict[str, torch.Tensor]:
    """One caption's token ids, sent as text ("101 1037 ... 102"), as ``preprocess.tokenize`` returns them: a lone
    caption has no padding, so its attention mask is all ones."""
    try:
        input_ids = torch.tensor([[int(piece) for piece in ids.split()]])
    except ValueError as error:
        raise ValueError(f"expected token ids separated by spaces, got {ids[:80]!r}") from error
    if input_ids.numel() == 0:
        raise ValueError("expected at least one token id")
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def ids_text(tokens: dict[str, torch.Tensor]) -> str:
    """The inverse of ``tokens_from_ids`` for one unpadded caption."""
    return " ".join(map(str, tokens["input_ids"][0].tolist()))
