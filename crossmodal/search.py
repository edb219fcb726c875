"""The search core: queries in, ranked results out, over verified artifacts loaded once.

Queries take exactly the training-time eval preprocessing (``crossmodal.preprocess``) and the same encoders; ranking
is one float16 matrix product and ``topk`` over the stored L2-normalised embeddings, then an exact float32 re-ranking
of the few rows that can make the top k. Nothing is allocated per request in proportion to the corpus except the
score vector itself.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import torch

from crossmodal.artifacts import LoadedArtifacts
from crossmodal.images import ImageDecodeError
from crossmodal.preprocess import decode_for_eval, image_batch, tokenize

MAX_K = 50
MAX_QUERY_CHARS = 2000  # far beyond any caption; keeps tokenizing a hostile megabyte of text cheap
# How far a float16 score may sit below the exact one, twice over. A float16 product of unit vectors is off by at most
# ~1e-3: 2^-11 from rounding the query, 2^-11 from rounding the score (torch accumulates in float32). Every row of the
# exact top k then scores at least (k-th best float16 score - 2 x 1e-3); 4e-3 leaves room for a kernel that sums in
# pieces. Rows that close to the k-th are a handful at Flickr scale (tests/test_search.py builds near-ties on purpose).
COARSE_SLACK = 4e-3
_WHITESPACE = re.compile(r"\s+")


class QueryError(ValueError):
    """A query we cannot answer; the message is meant for the person who typed or uploaded it."""


@dataclass(frozen=True)
class ImageHit:
    rank: int
    score: float
    image_index: int  # row in images.parquet and image_embeddings
    image_id: str
    filename: str
    split: str
    captions: list[str]

    def as_json(self) -> dict:
        return {
            "rank": self.rank,
            "score": round(self.score, 4),
            "image_id": self.image_id,
            "filename": self.filename,
            "split": self.split,
            "captions": self.captions,
        }


@dataclass(frozen=True)
class CaptionHit:
    rank: int
    score: float
    caption_index: int  # row in captions.parquet and text_embeddings
    caption: str
    image_index: int
    image_id: str

    def as_json(self) -> dict:
        return {
            "rank": self.rank,
            "score": round(self.score, 4),
            "caption": self.caption,
            "image_id": self.image_id,
        }


@dataclass(frozen=True)
class TextQuery:
    text: str  # what was searched, after cleaning
    truncated: bool  # longer than the model reads: only the first max_text_length word pieces count


def clean_text(text: object) -> str:
    """Printable text only: control and format characters and lone surrogates removed, whitespace collapsed."""
    if not isinstance(text, str):
        raise QueryError("the query must be text")
    text = text[:MAX_QUERY_CHARS]
    kept = (
        char
        for char in text
        if not ("\ud800" <= char <= "\udfff") and (char.isspace() or unicodedata.category(char)[0] != "C")
    )
    return _WHITESPACE.sub(" ", "".join(kept)).strip()


def check_k(k: object) -> int:
    # The range test comes first: it is False for NaN and inf, which int() below cannot convert.
    if isinstance(k, bool) or not isinstance(k, int | float) or not 1 <= k <= MAX_K or k != int(k):
        raise QueryError(f"the number of results (k) must be a whole number from 1 to {MAX_K} (got {k!r})")
    return int(k)


def top_k(
    matrix: torch.Tensor, query: torch.Tensor, k: int, exclude: int | None = None
) -> tuple[list[float], list[int]]:
    """Scores and rows of the k rows of ``matrix`` (unit rows, float16 as stored) nearest to ``query``, best first,
    exactly as a float32 product over the stored rows ranks and scores them.

    One pass in the matrix's dtype finds every row that can be among the k best (``COARSE_SLACK`` says why that is
    safe); only those few are scored again in float32.
    """
    coarse = matrix @ query.to(matrix.dtype)  # [N]: cosine similarity, both sides unit-norm
    if exclude is not None:
        coarse[exclude] = float("-inf")  # "more like this" should not return the image itself
    k = min(k, coarse.numel() - (exclude is not None))
    kth_best = torch.topk(coarse, k).values[-1]
    candidates = torch.nonzero(coarse >= kth_best - COARSE_SLACK).squeeze(1)
    exact = matrix[candidates].float() @ query.float()
    top = torch.topk(exact, k)
    return top.values.tolist(), candidates[top.indices].tolist()


class Searcher:
    """Built once from verified artifacts; every method is safe to call from several threads at once."""

    def __init__(self, artifacts: LoadedArtifacts) -> None:
        self.artifacts = artifacts
        self.config = artifacts.config
        self.model = artifacts.model.eval()
        self.tokenizer = artifacts.tokenizer
        self.image_embeddings = artifacts.image_embeddings.contiguous()  # [N_images, D]
        self.text_embeddings = artifacts.text_embeddings.contiguous()  # [N_captions, D]
        images, captions = artifacts.images, artifacts.captions
        self.image_ids: list[str] = images.column("image_id").to_pylist()
        self.filenames: list[str] = images.column("filename").to_pylist()
        self.splits: list[str] = images.column("split").to_pylist()
        self.thumbnails = artifacts.thumbnails  # Arrow row groups: bytes are copied out only for shown results
        self.captions: list[str] = captions.column("caption").to_pylist()
        self.caption_image: list[int] = captions.column("image_index").to_pylist()
        self.row_of_id = {image_id: row for row, image_id in enumerate(self.image_ids)}
        self.captions_of: list[list[str]] = [[] for _ in self.image_ids]
        for caption, image in zip(self.captions, self.caption_image, strict=True):
            self.captions_of[image].append(caption)

    # --- encoding queries -----------------------------------------------------------------------------------------

    def text_query(self, text: object) -> TextQuery:
        cleaned = clean_text(text)
        if not cleaned:
            raise QueryError("type a description to search for, e.g. 'a dog running through the snow'")
        limit = self.config.max_text_length
        # One piece past the limit is enough to know the model will not read it all (and keeps the tokenizer quiet).
        pieces = len(self.tokenizer(cleaned, truncation=True, max_length=limit + 1)["input_ids"])
        return TextQuery(cleaned, truncated=pieces > limit)

    @torch.inference_mode()
    def encode_text(self, query: TextQuery) -> torch.Tensor:
        return self.model.encode_text(**tokenize(self.tokenizer, [query.text], self.config))[0].float()  # [D]

    @torch.inference_mode()
    def encode_image(self, data: bytes) -> torch.Tensor:
        try:
            image = decode_for_eval(data, self.config)
        except ImageDecodeError as error:
            raise QueryError(f"this image cannot be used: {error}") from error
        return self.model.encode_image(image_batch([image], self.config))[0].float()  # [D]

    # --- ranking --------------------------------------------------------------------------------------------------

    def _image_hits(self, scores: list[float], rows: list[int]) -> list[ImageHit]:
        return [
            ImageHit(
                rank, score, row, self.image_ids[row], self.filenames[row], self.splits[row], self.captions_of[row]
            )
            for rank, (score, row) in enumerate(zip(scores, rows, strict=True), start=1)
        ]

    def text_to_image(self, query: TextQuery, k: int) -> list[ImageHit]:
        return self._image_hits(*top_k(self.image_embeddings, self.encode_text(query), check_k(k)))

    def image_to_image(self, data: bytes, k: int) -> list[ImageHit]:
        return self._image_hits(*top_k(self.image_embeddings, self.encode_image(data), check_k(k)))

    def row(self, image_id: str) -> int:
        """The index row of a stored image, by its id."""
        if image_id not in self.row_of_id:
            raise QueryError(f"no image {image_id!r} in the index")
        return self.row_of_id[image_id]

    def more_like(self, image_index: int, k: int) -> list[ImageHit]:
        """Images nearest to a stored image, from its stored embedding (no re-encoding), itself excluded."""
        if not 0 <= image_index < len(self.image_ids):
            raise QueryError("pick one of the results first")
        query = self.image_embeddings[image_index]
        return self._image_hits(*top_k(self.image_embeddings, query, check_k(k), exclude=image_index))

    def image_to_text(self, data: bytes, k: int) -> list[CaptionHit]:
        scores, rows = top_k(self.text_embeddings, self.encode_image(data), check_k(k))
        return [
            CaptionHit(
                rank, score, row, self.captions[row], self.caption_image[row], self.image_ids[self.caption_image[row]]
            )
            for rank, (score, row) in enumerate(zip(scores, rows, strict=True), start=1)
        ]

    def thumbnail(self, image_index: int) -> bytes:
        return self.thumbnails[image_index]
