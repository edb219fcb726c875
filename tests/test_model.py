"""Model construction from config, the logit scale, and strict weight loading."""

import dataclasses
import json
import math

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from crossmodal.artifacts.contract import ArtifactError, rebuild_model
from crossmodal.config import PRESETS, ModelConfig
from crossmodal.encoding.embed import encode_captions
from crossmodal.model.dual_encoder import build_model, tokenize
from crossmodal.model.tokenizer import fit_wordpiece
from crossmodal.training.locked import LockedCaptionBatcher
from crossmodal.training.optimizer import parameter_groups

CAPTIONS = ["a red circle on the left", "a blue star at the top", "two dogs run in the snow"]


@pytest.fixture
def tiny():
    tokenizer = fit_wordpiece(CAPTIONS, vocab_size=100, max_length=16)
    model, config = build_model(PRESETS["tiny"].model, tokenizer, pretrained=False)
    return model.eval(), config, tokenizer


def test_encoders_return_unit_vectors_of_the_embedding_width(tiny):
    model, config, tokenizer = tiny
    tokens = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        images, texts, scale = model(torch.randn(3, 3, 64, 64), tokens["input_ids"], tokens["attention_mask"])
    assert images.shape == texts.shape == (3, config.embed_dim)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07)


def test_padding_does_not_change_a_caption_embedding(tiny):
    model, _, tokenizer = tiny
    alone = tokenizer(CAPTIONS[:1], return_tensors="pt")
    padded = tokenizer(CAPTIONS[:1], padding="max_length", max_length=16, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_text(**alone), model.encode_text(**padded), atol=1e-5, rtol=0)


def test_logit_scale_is_clamped_at_100(tiny):
    model, _, _ = tiny
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(100.0)


def test_config_round_trips_through_json(tiny):
    _, config, _ = tiny
    assert ModelConfig.from_dict(json.loads(config.to_json())).to_json() == config.to_json()
    with pytest.raises(ValueError, match="unknown model keys"):
        ModelConfig.from_dict({**dataclasses.asdict(config), "surprise": 1})


def test_a_config_from_before_per_tower_init_still_loads(tiny):
    _, config, _ = tiny
    written = {
        key: value for key, value in dataclasses.asdict(config).items() if key not in ("image_init", "text_init")
    }
    for init in ("random", "pretrained"):
        old = ModelConfig.from_dict({**written, "init": init})
        assert (old.image_init, old.text_init) == (init, init)
        assert "init" not in json.loads(old.to_json())  # written back in today's keys


def test_weights_that_do_not_match_the_config_are_refused(tiny, tmp_path):
    model, config, tokenizer = tiny
    (tmp_path / "config.json").write_text('{"model": ' + config.to_json() + "}")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    weights.pop("image_projection.weight")
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"missing \['image_projection.weight'\], unexpected \['extra.weight'\]"):
        rebuild_model(tmp_path)


def test_the_text_tower_can_have_its_own_learning_rate(tiny):
    model, _, _ = tiny
    trainable = [p for p in model.parameters() if p.requires_grad]
    recipe = PRESETS["flickr30k"].train  # towers at 0.1 x lr
    lr, wd = recipe.lr, recipe.weight_decay
    # Without a text ratio: the four groups, in the order older checkpoints' optimizer states hold them.
    groups = parameter_groups(model, recipe)
    assert [g["lr"] for g in groups] == pytest.approx([lr, lr, lr * 0.1, lr * 0.1])
    assert [g["weight_decay"] for g in groups] == [0, wd, 0, wd]
    own = parameter_groups(model, dataclasses.replace(recipe, tower_lr_ratio=1.0, text_tower_lr_ratio=0.05))
    for grouping in (groups, own):
        assert sorted(id(p) for g in grouping for p in g["params"]) == sorted(id(p) for p in trainable)
    lr_of = {id(p): g["lr"] for g in own for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(lr * 0.05) for p in model.text_tower.parameters())
    assert {lr_of[id(p)] for p in model.image_tower.parameters()} == {lr}
    assert {lr_of[id(p)] for p in [*model.text_projection.parameters(), model.logit_scale]} == {lr}


@pytest.fixture
def locked():
    """The tiny towers with the demo's locked text tower and adapter, built from config."""
    tokenizer = fit_wordpiece(CAPTIONS, vocab_size=100, max_length=16)
    config = dataclasses.replace(PRESETS["tiny"].model, text_adapter_width=32)
    model, _ = build_model(config, tokenizer, pretrained=False)
    model.lock(text=True)
    return model, tokenizer


def test_a_locked_tower_trains_nothing_of_itself_and_stays_in_eval_mode(locked):
    model, _ = locked
    trained = {id(p) for group in parameter_groups(model, PRESETS["demo"].train) for p in group["params"]}
    assert trained and not trained & {id(p) for p in model.text_tower.parameters()}
    assert {id(p) for p in model.text_adapter.parameters()} <= trained  # the adapter learns
    assert not model.train().text_tower.training and model.image_tower.training


def test_the_adapter_starts_as_the_identity(locked):
    model, _ = locked
    features = torch.randn(4, model.text_tower.config.hidden_size)
    with torch.inference_mode():
        plain = torch.nn.functional.normalize(model.text_projection(features), dim=-1)
        torch.testing.assert_close(model.project_text(features), plain)


def test_precomputed_caption_features_give_what_the_tower_gives(locked):
    """Training on cached features, validation on known captions and search on tokens: one embedding."""
    model, tokenizer = locked
    with torch.inference_mode():
        model.text_adapter[-1].weight.normal_()  # a trained adapter, not the identity
    accelerator = Accelerator(cpu=True)
    known = LockedCaptionBatcher.for_captions(accelerator, model, tokenizer, CAPTIONS + CAPTIONS[:1], batch_size=2)
    pixels = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        _, cached, _ = model(pixels, **known(CAPTIONS))
        _, from_tokens, _ = model(pixels, **tokenize(tokenizer, CAPTIONS, model.config))
    torch.testing.assert_close(cached, from_tokens, atol=1e-5, rtol=0)
    model.known_text_features = known
    projected = encode_captions(accelerator, model, tokenizer, CAPTIONS, batch_size=2)
    model.known_text_features = None
    encoded = encode_captions(accelerator, model, tokenizer, CAPTIONS, batch_size=2)
    torch.testing.assert_close(projected, encoded, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoded, from_tokens, atol=1e-5, rtol=0)
