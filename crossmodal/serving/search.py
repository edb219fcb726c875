"""The search core: queries in, ranked results out, over verified artifacts loaded once.

Every query and its k are checked before any tower runs. Queries then take exactly the training-time preprocessing
(``model.dual_encoder.tokenize`` for text, ``model.preprocess`` for images) and the same encoders; ranking
is one float16 matrix-vector product and ``topk`` over the stored L2-normalised embeddings, then an exact float32
re-ranking of the few rows that can make the top k. Nothing is allocated per request in proportion to the corpus
except the score vector itself.

The app searches in batches (``search_texts``, ``search_images``): the queries that arrived together share one tower
forward, then each is ranked by the same ``top_k`` a lone search uses, so batching changes only how fast an answer
comes. One query we cannot answer gets its ``QueryError`` in its place and the others are answered.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from PIL import Image

from crossmodal.artifacts.contract import INDEX_SPLIT, NO_IMAGE, LoadedArtifacts
from crossmodal.data.images import ImageDecodeError
from crossmodal.model.dual_encoder import tokenize
from crossmodal.model.preprocess import decode_for_eval, image_batch

Checked = TypeVar("Checked")
MAX_K = 50
# Queries per image-tower forward. On 2 cores EfficientNet-B0 costs 34 ms for one image, 19.5 ms per image in fours
# and 28.5 ms per image in eights (its activations outgrow the caches): docs/benchmarks.md.
IMAGE_CHUNK = 4
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
    duplicates: list[str] = field(default_factory=list)  # an index's near-duplicates of this picture, by path

    def as_json(self) -> dict:
        answer = {
            "rank": self.rank,
            "score": round(self.score, 4),
            "image_id": self.image_id,
            "filename": self.filename,
            "split": self.split,
            "captions": self.captions,
        }
        if self.split == INDEX_SPLIT:  # a picture of your own: its path in the indexed folder, its near-duplicates
            answer["file_path"] = self.filename  # not "path": gradio_client takes {"path": ...} for a file to fetch
            answer["duplicates"] = self.duplicates
        return answer

    @property
    def label(self) -> str:
        """What the gallery shows under the picture: one of its captions, or its path and how many copies it has."""
        described = self.captions[0] if self.captions else self.filename
        count = len(self.duplicates)
        copies = f" (+{count} near-duplicate{'s' * (count > 1)})" if count else ""
        return f"#{self.rank} · {self.score:.3f} · {described}{copies}"


@dataclass(frozen=True)
class CaptionHit:
    rank: int
    score: float
    caption_index: int  # row in captions.parquet and text_embeddings
    caption: str
    image_index: int  # NO_IMAGE in an index of your own pictures: the captions are the model's
    image_id: str | None

    def as_json(self) -> dict:
        return {
            "rank": self.rank,
            "score": round(self.score, 4),
            "caption": self.caption,
            "image_id": self.image_id,
        }


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


def searchable_text(text: object) -> str:
    """The query as searched (``clean_text``), or a QueryError when nothing is left to search for."""
    cleaned = clean_text(text)
    if not cleaned:
        raise QueryError("type a description to search for, e.g. 'a dog running through the snow'")
    return cleaned


def check_k(k: object) -> int:
    # The range test comes first: it is False for NaN and inf, which int() below cannot convert.
    if isinstance(k, bool) or not isinstance(k, int | float) or not 1 <= k <= MAX_K or k != int(k):
        raise QueryError(f"the number of results (k) must be a whole number from 1 to {MAX_K} (got {k!r})")
    return int(k)


def top_k(
    matrix: torch.Tensor, query: torch.Tensor, k: int, exclude: int | Sequence[int] | None = None
) -> tuple[list[float], list[int]]:
    """Scores and rows of the k rows of ``matrix`` (unit rows, float16 as stored) nearest to ``query``, best first,
    exactly as a float32 product over the stored rows ranks and scores them.

    One pass in the matrix's dtype finds every row that can be among the k best (``COARSE_SLACK`` says why that is
    safe); only those few are scored again in float32.
    """
    coarse = matrix @ query.to(matrix.dtype)  # [N]: cosine similarity, both sides unit-norm
    excluded = [] if exclude is None else [exclude] if isinstance(exclude, int) else list(exclude)
    coarse[excluded] = float("-inf")  # "more like this" should not return the image itself (nor its copies)
    k = min(k, coarse.numel() - len(set(excluded)))
    kth_best = torch.topk(coarse, k).values[-1]
    candidates = torch.nonzero(coarse >= kth_best - COARSE_SLACK).squeeze(1)
    exact = matrix[candidates].float() @ query.float()
    top = torch.topk(exact, k)
    return top.values.tolist(), candidates[top.indices].tolist()


def checked_each(items: Sequence, check: Callable[..., Checked]) -> tuple[list, dict[int, Checked]]:
    """``check(*item)`` for each item: a list with each refused item's QueryError in its slot (None elsewhere), and
    the checked values of the others by slot."""
    answers: list = [None] * len(items)
    valid: dict[int, Checked] = {}
    for slot, item in enumerate(items):
        try:
            valid[slot] = check(*item)
        except QueryError as error:
            answers[slot] = error
    return answers, valid


def only(answers: list) -> list:
    """The answer of a batch of one, or its QueryError raised."""
    if isinstance(answers[0], QueryError):
        raise answers[0]
    return answers[0]


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
            if image != NO_IMAGE:
                self.captions_of[image].append(caption)
        # An index of your own pictures shows each group of near-duplicates once (crossmodal/index/write.py).
        self.group_of: list[int] | None = None
        self.members: dict[int, list[int]] = {}
        if "duplicate_of" in images.column_names:
            self.group_of = images.column("duplicate_of").to_pylist()
            for row, group in enumerate(self.group_of):
                self.members.setdefault(group, []).append(row)
        self.hidden_duplicates = len(self.image_ids) - len(self.members) if self.group_of is not None else 0

    # --- encoding queries -----------------------------------------------------------------------------------------

    def is_truncated(self, text: str) -> bool:
        """Whether ``text`` is longer than the model reads (only its first max_text_length word pieces count). For the
        page's warning only: the search itself tokenizes each text once, in :func:`tokenize`."""
        limit = self.config.max_text_length
        # One piece past the limit is enough to know the model will not read it all (and keeps the tokenizer quiet).
        return len(self.tokenizer(text, truncation=True, max_length=limit + 1)["input_ids"]) > limit

    @torch.inference_mode()
    def encode_image(self, data: bytes) -> torch.Tensor:
        return self.encode_images([self.decode(data)])[0]  # [D]

    def decode(self, data: bytes | None) -> Image.Image:
        """An upload's bytes -> the RGB image the eval transform takes, or a QueryError that says why not."""
        if data is None:
            raise QueryError("upload an image first")
        try:
            return decode_for_eval(data, self.config)
        except ImageDecodeError as error:
            raise QueryError(f"this image cannot be used: {error}") from error

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Decoded images -> [B, D] float32, in forwards of at most IMAGE_CHUNK images."""
        chunks = [images[start : start + IMAGE_CHUNK] for start in range(0, len(images), IMAGE_CHUNK)]
        return torch.cat([self.model.encode_image(image_batch(chunk, self.config)).float() for chunk in chunks])

    # --- ranking --------------------------------------------------------------------------------------------------

    def _image_hits(self, scores: list[float], rows: list[int]) -> list[ImageHit]:
        return [
            ImageHit(
                rank,
                score,
                row,
                self.image_ids[row],
                self.filenames[row],
                self.splits[row],
                self.captions_of[row],
                self._duplicates(row),
            )
            for rank, (score, row) in enumerate(zip(scores, rows, strict=True), start=1)
        ]

    def _duplicates(self, row: int) -> list[str]:
        if self.group_of is None:
            return []
        return [self.filenames[other] for other in self.members[self.group_of[row]] if other != row]

    def rank_images(self, query: torch.Tensor, k: int, exclude: int | None = None) -> list[ImageHit]:
        """The k best pictures for ``query``; in an index with near-duplicate groups, the k best groups, each shown
        by its best-scoring picture (``exclude``'s whole group is left out)."""
        if self.group_of is None:
            return self._image_hits(*top_k(self.image_embeddings, query, k, exclude=exclude))
        excluded = self.members[self.group_of[exclude]] if exclude is not None else []
        # At most ``hidden_duplicates`` of the best rows repeat a group already seen: this many hold the k best groups.
        wanted = min(k + self.hidden_duplicates, len(self.image_ids) - len(excluded))
        if wanted <= 0:
            return []
        scores, rows = top_k(self.image_embeddings, query, wanted, exclude=excluded)
        best: dict[int, tuple[float, int]] = {}  # group -> its best picture; dicts keep the order groups came in
        for score, row in zip(scores, rows, strict=True):
            best.setdefault(self.group_of[row], (score, row))
        kept = list(best.values())[:k]
        return self._image_hits([score for score, _ in kept], [row for _, row in kept])

    # One query: a batch of one, so a lone search and the app's batches run the same code.

    def text_to_image(self, text: str, k: int) -> list[ImageHit]:
        return only(self.search_texts([text], [k]))

    def image_to_image(self, data: bytes, k: int) -> list[ImageHit]:
        return only(self.search_images([data], [k], "image"))

    def row(self, image_id: str) -> int:
        """The index row of a stored image, by its id."""
        if image_id not in self.row_of_id:
            raise QueryError(f"no image {image_id!r} in the index")
        return self.row_of_id[image_id]

    def more_like(self, image_index: int, k: int) -> list[ImageHit]:
        """Images nearest to a stored image, from its stored embedding (no re-encoding), itself excluded."""
        if not 0 <= image_index < len(self.image_ids):
            raise QueryError("pick one of the results first")
        return self.rank_images(self.image_embeddings[image_index], check_k(k), exclude=image_index)

    def image_to_text(self, data: bytes, k: int) -> list[CaptionHit]:
        return only(self.search_images([data], [k], "text"))

    def _caption_hits(self, scores: list[float], rows: list[int]) -> list[CaptionHit]:
        return [
            CaptionHit(rank, score, row, self.captions[row], self.caption_image[row], self._image_id(row))
            for rank, (score, row) in enumerate(zip(scores, rows, strict=True), start=1)
        ]

    # --- batches of queries ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def search_texts(self, texts: Sequence[object], ks: Sequence[object]) -> list[list[ImageHit] | QueryError]:
        """Text -> image for queries that arrived together: every text and k checked first, then one tokenization
        and one tower forward for all that can be answered."""
        answers, valid = checked_each(
            list(zip(texts, ks, strict=True)), lambda text, k: (searchable_text(text), check_k(k))
        )
        if valid:
            tokens = tokenize(self.tokenizer, [text for text, _ in valid.values()], self.config)
            vectors = self.model.encode_text(**tokens).float()  # padding is masked: each row is what it is alone
            for (slot, (_, k)), vector in zip(valid.items(), vectors, strict=True):
                answers[slot] = self.rank_images(vector, k)
        return answers

    def search_images(
        self, uploads: Sequence[bytes | None], ks: Sequence[object], target: str
    ) -> list[list[ImageHit] | list[CaptionHit] | QueryError]:
        """Image -> ``target`` ("text" or "image") for uploads that arrived together: one decode each, then shared
        tower forwards. An upload that is not an image we accept is refused alone."""
        answers, valid = checked_each(
            list(zip(uploads, ks, strict=True)), lambda data, k: (self.decode(data), check_k(k))
        )
        if valid:
            vectors = self.encode_images([image for image, _ in valid.values()])
            for (slot, (_, k)), vector in zip(valid.items(), vectors, strict=True):
                if target == "text":
                    answers[slot] = self._caption_hits(*top_k(self.text_embeddings, vector, k))
                else:
                    answers[slot] = self.rank_images(vector, k)
        return answers

    def _image_id(self, caption_row: int) -> str | None:
        image = self.caption_image[caption_row]
        return None if image == NO_IMAGE else self.image_ids[image]

    def thumbnail(self, image_index: int) -> bytes:
        return self.thumbnails[image_index]
