"""The artifact folder (docs/architecture.md, "Artifact folder"): its contract, and reading it back verified (fail
closed).

crossmodal/artifacts/export.py writes it; this side is all the app imports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file

from crossmodal.artifacts.integrity import DIGESTS
from crossmodal.artifacts.thumbnails import Thumbnails
from crossmodal.config import ModelConfig
from crossmodal.model.devices import safetensors_device
from crossmodal.model.dual_encoder import DualEncoder, build_model, tokenize
from crossmodal.model.preprocess import decode_for_eval, image_batch
from crossmodal.model.tokenizer import load_tokenizer

FORMAT_VERSION = 1
CONTRACT_FILES = (
    "config.json",
    "model.safetensors",
    "image_embeddings.safetensors",
    "text_embeddings.safetensors",
    "images.parquet",
    "captions.parquet",
    "metrics.json",
    "manifest.json",
    "README.md",
)
IMAGE_COLUMNS = ["image_id", "filename", "split", "thumbnail"]
# An index of your own pictures (crossmodal/index/cli.py): the path relative to the indexed folder is image_id and
# filename; what the next run needs to tell a changed file; the first row of each picture's near-duplicate group.
FOLDER_IMAGE_COLUMNS = [*IMAGE_COLUMNS, "size", "mtime_ns", "sha256", "duplicate_of"]
INDEX_SPLIT = "index"  # the split of every picture of an index: none of them was seen in training
NO_IMAGE = -1  # image_index of a caption with no picture in the index (an index's captions are the model's)
INDEX_REPORT = "skipped.json"  # the files an index of your own pictures left out, and why: local, never published
UNLISTED_FILES = ("manifest.json", INDEX_REPORT)  # files the manifest does not list
ALLOW_PATTERNS = [*CONTRACT_FILES, "tokenizer/*", "plots/*"]  # what a Hub pull fetches: the contract, nothing else
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".pth.tar")
HEATMAP_PAIRS = 32
GOLDEN_IMAGES = 4
GOLDEN_CAPTIONS = 4
GOLDEN_MIN_COSINE = 0.99  # serving path vs training-time path on the same bytes: equal up to float noise
GOLDEN_INDEX_TOLERANCE = 0.02  # recorded thumbnail-to-index cosine must be reproduced this closely
UNIT_NORM_TOLERANCE = 1e-3
# The embeddings are stored and searched in float16: half the download and memory of float32, and on CPU torch's
# float16 matrix-vector product runs at memory speed (6 ms over Flickr30k's 158,915 captions on 2 cores, against
# 37 ms in float32, whose BLAS path runs on one core). Rounding moves a score by ~1e-4 (at most ~1e-3), inside the
# noise of Recall@K (docs/benchmarks.md); crossmodal/serving/search.py re-ranks its candidates in float32: results
# stay exact.
INDEX_DTYPE = torch.float16
STORED_DTYPES = (torch.float16, torch.float32)  # float32: folders written before the switch, converted at load
_NORM_CHUNK_ROWS = 16_384  # rows upcast at a time to check norms, so the check never holds a float32 copy
THUMBNAIL_ROW_GROUP = 1024  # ~16 MB of Flickr-size thumbnails per row group


class ArtifactError(RuntimeError):
    """The artifact folder is missing, incomplete or inconsistent; the message names the file and what is wrong."""


# --- shared with the writer (crossmodal/artifacts/export.py) --------------------------------------------------


def golden_rows(num_rows: int, count: int = GOLDEN_IMAGES) -> list[int]:
    """A few rows spread over the index (all splits) for the load-time self-test."""
    count = min(count, num_rows)
    return sorted({round(i * (num_rows - 1) / max(count - 1, 1)) for i in range(count)})


def encode_thumbnails(model: DualEncoder, thumbnails: list[bytes]) -> torch.Tensor:
    """The serving path: decode the stored thumbnail, eval preprocessing, image encoder."""
    model.eval()
    with torch.inference_mode():
        batch = image_batch([decode_for_eval(data, model.config) for data in thumbnails], model.config)
        return model.encode_image(batch.to(next(model.parameters()).device)).float().cpu()


# --- reading: fail closed -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedArtifacts:
    """A verified artifact folder, loaded: nothing in here was taken on trust."""

    folder: Path
    manifest: dict[str, Any]
    config: ModelConfig
    model: DualEncoder
    tokenizer: Any
    image_embeddings: torch.Tensor  # [N_images, D], INDEX_DTYPE
    text_embeddings: torch.Tensor  # [N_captions, D], INDEX_DTYPE
    images: pa.Table  # image_id, filename, split (and an index's columns: FOLDER_IMAGE_COLUMNS)
    thumbnails: Thumbnails  # the thumbnail column, by row
    captions: pa.Table  # caption, image_index
    metrics: dict[str, dict[str, float]]
    training: dict[str, Any] = field(default_factory=dict)  # config.json's recipe (TrainConfig); {} for an index

    @property
    def index(self) -> dict[str, Any] | None:
        """What an index of your own pictures holds (folder name, counts, duplicate threshold); None for a model
        trained on its pictures."""
        return self.manifest.get("index")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path}: unreadable or truncated ({error})") from error
    return manifest


def _check_listing(folder: Path) -> dict[str, Any]:
    """Everything but the digests: the folder, no pickle-format file, the manifest, every file at its size.

    Starts hashing the files on a background thread, so the caller can load them meanwhile.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no artifact folder there")
    pickles = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ArtifactError(
            f"{folder / pickles[0]}: pickle-format file; artifacts hold safetensors only and nothing is unpickled"
        )
    manifest = _read_manifest(folder)
    files = manifest["files"]
    for name in CONTRACT_FILES:
        if name != "manifest.json" and name not in files:
            raise ArtifactError(f"{folder / 'manifest.json'}: does not list {name}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in manifest.json)")
        if path.stat().st_size != expected["size"]:
            raise ArtifactError(f"{path}: {path.stat().st_size} bytes, manifest.json says {expected['size']}")
    DIGESTS.prefetch([folder / name for name in files])
    return manifest


def _check_digests(folder: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest["files"].items():
        path = Path(folder) / name
        if DIGESTS.sha256(path) != expected["sha256"]:  # hashed here, or by the prefetch coming from the other end
            raise ArtifactError(f"{path}: sha256 differs from manifest.json (the file was changed or corrupted)")


def verify_files(folder: Path) -> dict[str, Any]:
    """Every file present, at its manifest size and sha256; no pickle-format file anywhere. Returns the manifest."""
    manifest = _check_listing(folder)
    _check_digests(folder, manifest)
    return manifest


def load_model_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        return ModelConfig.from_dict(json.loads(path.read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path}: not a crossmodal model config ({error})") from error


def rebuild_model(folder: Path, device: str | torch.device = "cpu") -> tuple[DualEncoder, Any]:
    """Rebuild the dual encoder from config.json with no download and load its weights strictly (eval mode)."""
    folder = Path(folder)
    config = load_model_config(folder)
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    # Parameters on the meta device: random initialisation that the weights would overwrite costs ~0.5 s at start-up.
    with init_empty_weights(include_buffers=False):
        model, _ = build_model(config, tokenizer, pretrained=False)
    path = folder / "model.safetensors"
    try:
        weights = load_file(path, device=safetensors_device(device))
    except (OSError, SafetensorError) as error:
        raise ArtifactError(f"{path}: unreadable weights ({error})") from error
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise ArtifactError(f"{path}: weights do not fit config.json ({error})") from error
    return model.to(device).eval(), tokenizer


def _load_embeddings(folder: Path, name: str, manifest: dict[str, Any], rows: int, width: int) -> torch.Tensor:
    path = folder / name
    tensors = load_file(path)
    if set(tensors) != {"embeddings"}:
        raise ArtifactError(f"{path}: holds tensors {sorted(tensors)}, expected exactly ['embeddings']")
    embeddings = tensors["embeddings"]
    expected_shape = manifest.get("tensors", {}).get(name, {}).get("embeddings")
    if list(embeddings.shape) != expected_shape:
        raise ArtifactError(f"{path}: shape {list(embeddings.shape)}, manifest.json says {expected_shape}")
    if embeddings.ndim != 2 or embeddings.shape != (rows, width):
        raise ArtifactError(f"{path}: shape {list(embeddings.shape)}, expected [{rows}, {width}] (rows of the table)")
    if embeddings.dtype not in STORED_DTYPES:
        raise ArtifactError(f"{path}: dtype {embeddings.dtype}, expected float16 (or float32 from older folders)")
    # NaN or inf anywhere in a row makes its norm non-finite.
    norms = torch.cat(
        [torch.linalg.vector_norm(chunk, dim=1, dtype=torch.float32) for chunk in embeddings.split(_NORM_CHUNK_ROWS)]
    )
    if not torch.isfinite(norms).all():
        row = int((~torch.isfinite(norms)).nonzero()[0])
        raise ArtifactError(f"{path}: row {row} is not finite (NaN or inf)")
    deviation = (norms - 1).abs()
    if deviation.max() > UNIT_NORM_TOLERANCE:
        row = int(deviation.argmax())
        raise ArtifactError(f"{path}: row {row} has norm {float(norms[row]):.4f}, expected unit norm")
    return embeddings.to(INDEX_DTYPE)


def _read_table(path: Path, columns: list[str], skip: tuple[str, ...] = ()) -> pa.Table:
    """The table, if its columns are exactly ``columns``; those in ``skip`` are checked but not read."""
    try:
        names = pq.read_schema(path).names
        if names != columns:
            raise ArtifactError(f"{path}: columns {names}, expected {columns}")
        return pq.read_table(path, columns=[name for name in columns if name not in skip])
    except (OSError, pa.ArrowException) as error:
        raise ArtifactError(f"{path}: unreadable Parquet ({error})") from error


def _check_thumbnails(thumbnails: Thumbnails, path: Path, rows: int) -> Thumbnails:
    try:
        thumbnails.wait()
    except (OSError, ValueError, pa.ArrowException) as error:
        raise ArtifactError(f"{path}: unreadable thumbnails ({error})") from error
    if len(thumbnails) != rows:
        raise ArtifactError(f"{path}: {len(thumbnails)} thumbnails for {rows} rows")
    return thumbnails


def _self_test(loaded: LoadedArtifacts) -> None:
    """Re-encode a few stored thumbnails and captions through the serving path; they must give back the index."""
    golden = loaded.manifest.get("golden")
    if not golden:
        raise ArtifactError(f"{loaded.folder / 'manifest.json'}: no golden self-test record")
    rows = golden["image_rows"]
    thumbnails = [loaded.thumbnails[row] for row in rows]
    fresh = encode_thumbnails(loaded.model, thumbnails)
    recorded = torch.tensor(golden["thumbnail_embeddings"])
    for position, row in enumerate(rows):
        drift = float(fresh[position] @ recorded[position])
        if drift < GOLDEN_MIN_COSINE:
            raise ArtifactError(
                f"{loaded.folder}: golden self-test failed: stored image {row} now embeds at cosine {drift:.4f} to its "
                f"training-time embedding (expected > {GOLDEN_MIN_COSINE}); preprocessing or weights differ"
            )
        to_index = float(fresh[position] @ loaded.image_embeddings[row].float())
        if abs(to_index - golden["cosine_to_index"][position]) > GOLDEN_INDEX_TOLERANCE:
            raise ArtifactError(
                f"{loaded.folder / 'image_embeddings.safetensors'}: row {row} does not belong to this model (cosine "
                f"{to_index:.4f} to the model's embedding, {golden['cosine_to_index'][position]:.4f} at training "
                "time); embeddings from another checkpoint?"
            )
    caption_rows = golden_rows(loaded.captions.num_rows, GOLDEN_CAPTIONS)
    captions = [loaded.captions.column("caption")[row].as_py() for row in caption_rows]
    with torch.inference_mode():
        texts = loaded.model.encode_text(**tokenize(loaded.tokenizer, captions, loaded.config)).float()
    cosines = (texts * loaded.text_embeddings[caption_rows].float()).sum(dim=1)
    if cosines.min() < GOLDEN_MIN_COSINE:
        row = caption_rows[int(cosines.argmin())]
        raise ArtifactError(
            f"{loaded.folder / 'text_embeddings.safetensors'}: caption {row} re-encodes at cosine "
            f"{float(cosines.min()):.4f} to its stored embedding; embeddings from another checkpoint?"
        )


def _check_caption_images(captions: pa.Table, num_images: int, path: Path, *, is_index: bool) -> None:
    image_index = torch.from_numpy(captions.column("image_index").to_numpy().astype("int64"))
    if is_index:  # the model's captions, beside pictures none of them describes
        if image_index.numel() and (image_index != NO_IMAGE).any():
            row = int((image_index != NO_IMAGE).nonzero()[0])
            raise ArtifactError(f"{path}: caption {row} points at image {int(image_index[row])}; an index's are all -1")
        return
    if image_index.numel() and (image_index.min() < 0 or image_index.max() >= num_images):
        row = int(((image_index < 0) | (image_index >= num_images)).nonzero()[0])
        raise ArtifactError(
            f"{path}: caption {row} points at image {int(image_index[row])}, but images.parquet has {num_images} rows"
        )


def _check_duplicate_groups(images: pa.Table, path: Path) -> None:
    """Each picture's ``duplicate_of`` is the first row of its group: a row at or before it, and a group's own."""
    groups = images.column("duplicate_of").to_pylist()
    for row, first in enumerate(groups):
        if first is None or not 0 <= first <= row or groups[first] != first:
            raise ArtifactError(f"{path}: row {row} has duplicate_of {first}, not the first row of a group")


def _read_metrics(path: Path) -> dict[str, dict[str, float]]:
    try:
        metrics = json.loads(path.read_text())
        float(metrics["test"]["t2i_R@1"])  # the figure the app's header shows must be there
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path}: unreadable ({error})") from error
    return metrics


def _load_parts(folder: Path, manifest: dict[str, Any]) -> LoadedArtifacts:
    """Parse every part, each checked against config.json, the manifest and the other parts, in this order."""
    is_index = "index" in manifest
    columns = FOLDER_IMAGE_COLUMNS if is_index else IMAGE_COLUMNS
    images = _read_table(folder / "images.parquet", columns, skip=("thumbnail",))
    thumbnails = Thumbnails(folder / "images.parquet")  # read on another thread while the model loads
    model, tokenizer = rebuild_model(folder)  # weights strictly against config.json
    captions = _read_table(folder / "captions.parquet", ["caption", "image_index"])
    dim = model.config.embed_dim
    # Keys, shape (manifest and table rows), dtype, finite, unit norm.
    image_embeddings = _load_embeddings(folder, "image_embeddings.safetensors", manifest, images.num_rows, dim)
    text_embeddings = _load_embeddings(folder, "text_embeddings.safetensors", manifest, captions.num_rows, dim)
    _check_caption_images(captions, images.num_rows, folder / "captions.parquet", is_index=is_index)  # image exists
    if is_index:
        _check_duplicate_groups(images, folder / "images.parquet")
    _check_thumbnails(thumbnails, folder / "images.parquet", images.num_rows)  # readable, one per image
    metrics = _read_metrics(folder / "metrics.json")
    training = json.loads((folder / "config.json").read_text()).get("training") or {}  # parsed by rebuild_model
    return LoadedArtifacts(
        folder, manifest, model.config, model, tokenizer, image_embeddings, text_embeddings, images, thumbnails,
        captions, metrics, training,
    )  # fmt: skip


def load_verified(folder: Path) -> LoadedArtifacts:
    """Load an artifact folder only if every check passes; otherwise raise ArtifactError naming file and values.

    The checks, in the order they run:
    1. the listing: the folder exists, holds no pickle-format file, and has a readable manifest that lists every
       contract file, each present at its recorded size (then the files start hashing on another thread);
    2. the parts, parsed and checked against each other while they hash: the tables' columns, the weights strictly
       against config.json, the embeddings (keys, shapes, dtype, finite, unit norm) against the tables, every
       caption's image in range, one thumbnail per image, the metrics the app shows;
    3. every file's sha256 against the manifest;
    4. the golden self-test: stored thumbnails and captions, re-encoded by the serving path, give back the index.

    Parsing comes before the digests are compared so the hashing overlaps the loading. That is safe because nothing
    here runs code from a file (safetensors, Parquet and JSON only; pickles are refused in step 1) and every size is
    already checked; nothing is returned before every digest matched.
    """
    folder = Path(folder)
    manifest = _check_listing(folder)  # 1.
    try:
        loaded = _load_parts(folder, manifest)  # 2.
    except ArtifactError:
        _check_digests(folder, manifest)  # a corrupted file explains a failure better than its symptom does
        raise
    _check_digests(folder, manifest)  # 3.
    _self_test(loaded)  # 4.
    return loaded
