"""Verification fails closed: each fault in an artifact folder is refused with its own clear message.

Most faults are planted together with a re-signed manifest (as a buggy writer would produce), so that the check
under test, not the sha256 check, is what catches them.
"""

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from crossmodal.artifacts.contract import INDEX_DTYPE, ArtifactError, LoadedArtifacts, load_verified
from crossmodal.artifacts.integrity import sha256_of
from crossmodal.model.dual_encoder import build_model


@pytest.fixture
def artifacts(tiny_run, tmp_path):
    copy = tmp_path / "artifacts"
    shutil.copytree(tiny_run, copy)
    return copy


def resign(folder):
    """Recompute every file's size and sha256 in manifest.json, leaving everything else as it was."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {
        path.relative_to(folder).as_posix(): {"sha256": sha256_of(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def refused(folder, message):
    with pytest.raises(ArtifactError, match=message):
        load_verified(folder)


def test_a_good_folder_loads_with_everything_checked(artifacts):
    loaded = load_verified(artifacts)
    assert isinstance(loaded, LoadedArtifacts)
    assert loaded.image_embeddings.shape == (1200, 128) and loaded.text_embeddings.shape == (6000, 128)
    assert loaded.image_embeddings.dtype == loaded.text_embeddings.dtype == INDEX_DTYPE == torch.float16
    assert loaded.images.num_rows == 1200 and loaded.captions.num_rows == 6000
    assert not loaded.model.training
    assert len(loaded.manifest["golden"]["image_rows"]) == 4


def test_embedding_file_missing_a_row(artifacts):
    path = artifacts / "image_embeddings.safetensors"
    save_file({"embeddings": load_file(path)["embeddings"][:-1].contiguous()}, path)
    resign(artifacts)
    refused(artifacts, r"image_embeddings\.safetensors: shape \[1199, 128\], manifest\.json says \[1200, 128\]")


def test_float32_embeddings_of_older_folders_load_as_float16(artifacts):
    path = artifacts / "text_embeddings.safetensors"
    stored = load_file(path)["embeddings"]
    save_file({"embeddings": stored.float()}, path)  # as folders were written before the switch to float16
    resign(artifacts)
    loaded = load_verified(artifacts)
    assert loaded.text_embeddings.dtype == torch.float16 and torch.equal(loaded.text_embeddings, stored)


def test_embeddings_of_another_dtype_are_refused(artifacts):
    path = artifacts / "image_embeddings.safetensors"
    save_file({"embeddings": load_file(path)["embeddings"].double()}, path)
    resign(artifacts)
    refused(artifacts, r"image_embeddings\.safetensors: dtype torch\.float64, expected float16 \(or float32")


def test_embeddings_from_another_checkpoint_are_caught_by_the_golden_self_test(artifacts):
    loaded = load_verified(artifacts)
    torch.manual_seed(123)
    other, _ = build_model(loaded.config, loaded.tokenizer, pretrained=False)  # same shapes, other weights
    from crossmodal.artifacts.contract import encode_thumbnails

    thumbnails = [loaded.thumbnails[row] for row in range(len(loaded.thumbnails))]
    save_file(
        {"embeddings": encode_thumbnails(other, thumbnails).contiguous()}, artifacts / "image_embeddings.safetensors"
    )
    resign(artifacts)
    refused(artifacts, r"image_embeddings\.safetensors: row 0 does not belong to this model.*another checkpoint")


def test_text_embeddings_from_another_checkpoint(artifacts):
    path = artifacts / "text_embeddings.safetensors"
    embeddings = load_file(path)["embeddings"]
    save_file({"embeddings": embeddings.roll(1, dims=0).contiguous()}, path)  # right shape, wrong rows
    resign(artifacts)
    refused(artifacts, r"text_embeddings\.safetensors: caption \d+ re-encodes at cosine -?0\.\d+ to its stored")


def test_preprocessing_drift_is_caught_by_the_golden_self_test(artifacts):
    config = json.loads((artifacts / "config.json").read_text())
    # Serving at another resolution than training (96 px instead of 64). A changed normalisation would be a gentler
    # plant: the tiny CNN's GroupNorm absorbs most of it (golden cosine stays above 0.99), EfficientNet's BN would not.
    config["model"]["image_size"], config["model"]["resize_size"] = 96, 108
    (artifacts / "config.json").write_text(json.dumps(config))
    resign(artifacts)
    refused(artifacts, "golden self-test failed: stored image 0 now embeds at cosine")


def test_caption_pointing_past_the_last_image(artifacts):
    table = pq.read_table(artifacts / "captions.parquet")
    index = table.column("image_index").to_pylist()
    index[7] = 1200
    table = table.set_column(1, "image_index", pa.array(index, pa.int32()))
    pq.write_table(table, artifacts / "captions.parquet")
    resign(artifacts)
    refused(artifacts, r"captions\.parquet: caption 7 points at image 1200, but images\.parquet has 1200 rows")


def damage_embeddings(artifacts, damage) -> None:
    path = artifacts / "image_embeddings.safetensors"
    embeddings = load_file(path)["embeddings"]
    damage(embeddings)
    save_file({"embeddings": embeddings}, path)
    resign(artifacts)


def test_nan_embeddings(artifacts):
    damage_embeddings(artifacts, lambda e: e.index_fill_(0, torch.tensor([5]), float("nan")))
    refused(artifacts, r"row 5 is not finite")


@pytest.mark.parametrize("factor", [1.5, 0.5], ids=["too-long", "too-short"])
def test_non_unit_embeddings_name_the_row_and_its_norm(artifacts, factor):
    damage_embeddings(artifacts, lambda e: e[9].mul_(factor))
    with pytest.raises(ArtifactError, match=r"row 9 has norm \d\.\d{4}, expected unit norm") as refusal:
        load_verified(artifacts)
    # The stored row is float16 and its norm only close to 1, so the damaged norm is the factor up to rounding (the
    # 4th decimal depends on the trained weights, hence the machine).
    reported = float(re.search(r"has norm (\d\.\d{4})", str(refusal.value)).group(1))
    assert reported == pytest.approx(factor, abs=2e-3)


def test_one_flipped_byte_in_the_weights(artifacts):
    path = artifacts / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused(artifacts, r"model\.safetensors: sha256 differs from manifest\.json")


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_weight_key(artifacts, change):
    path = artifacts / "model.safetensors"
    weights = load_file(path)
    if change == "missing":
        del weights["text_projection.weight"]
        message = r"missing \['text_projection\.weight'\], unexpected \[\]"
    else:
        weights["surprise.weight"] = torch.zeros(2)
        message = r"missing \[\], unexpected \['surprise\.weight'\]"
    save_file(weights, path)
    resign(artifacts)
    refused(artifacts, message)


@pytest.mark.parametrize("name", ["model.bin", "model.pt"])
def test_pickle_file_in_place_of_safetensors(artifacts, name):
    (artifacts / "model.safetensors").rename(artifacts / name)
    refused(artifacts, rf"{name.replace('.', chr(92) + '.')}: pickle-format file; artifacts hold safetensors only")


def test_truncated_manifest(artifacts):
    text = (artifacts / "manifest.json").read_text()
    (artifacts / "manifest.json").write_text(text[: len(text) // 2])
    refused(artifacts, r"manifest\.json: unreadable or truncated")


def test_missing_file_and_missing_folder(artifacts, tmp_path):
    (artifacts / "captions.parquet").unlink()
    refused(artifacts, r"captions\.parquet: missing \(listed in manifest\.json\)")
    refused(tmp_path / "nowhere", "no artifact folder there")
