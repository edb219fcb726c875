"""A locked image tower (crossmodal/training/locked.py): untouched by training, its cached features equal to what the
tower computes on the eval pixels, and every embedding made from them equal to one made from the pixels."""

from __future__ import annotations

import dataclasses

import datasets
import torch

from crossmodal.data.dataset import DataSource
from crossmodal.encoding.embed import encode_images
from crossmodal.training.loop import run_epoch
from crossmodal.training.prepare import make_accelerator, setup_run
from tests.test_train import FAST, TINY

LOCKED = dataclasses.replace(FAST, lock_image_tower=True, epochs=1)
# tiny's towers with a grid and an MLP head: the demo's shape of head, on towers that need no download.
GRID_HEAD = dataclasses.replace(TINY.model, image_grid=2, image_head_width=64)


def test_a_locked_image_tower_trains_only_its_head_on_features_equal_to_the_towers(tmp_path, small_dataset):
    accelerator = make_accelerator(LOCKED, tmp_path)
    run = setup_run(accelerator, GRID_HEAD, LOCKED, DataSource(str(small_dataset)), tmp_path, None)
    model = run.unwrapped
    tower_before = {name: value.clone() for name, value in model.image_tower.state_dict().items()}
    head_before = {name: value.clone() for name, value in model.image_projection.state_dict().items()}
    assert not any(id(p) in {id(q) for g in run.optimizer.param_groups for q in g["params"]}
                   for p in model.image_tower.parameters())  # fmt: skip

    run_epoch(run, max_steps=None)
    assert run.state.global_step == 8
    assert all(torch.equal(value, tower_before[name]) for name, value in model.image_tower.state_dict().items())
    assert any(not torch.equal(value, head_before[name]) for name, value in model.image_projection.state_dict().items())

    # The cached features are the tower's own on the eval pixels; embeddings from them equal embeddings from pixels.
    splits = run.splits
    rows = datasets.concatenate_datasets([splits["val"], splits["train"].select(range(40))])
    cached = encode_images(accelerator, model, rows, batch_size=16)
    known, model.known_image_features = model.known_image_features, None
    fresh = encode_images(accelerator, model, rows, batch_size=16)
    features = encode_images(accelerator, model, rows, batch_size=16, pooled=True)
    assert known.of_rows(rows).shape == features.shape == (len(rows), 256 * 5)
    assert torch.allclose(known.of_rows(rows), features, atol=1e-5)
    assert torch.allclose(cached, fresh, atol=1e-5)
    # A picture the tower never saw (an upload, another dataset) has no cached features: it is encoded from pixels.
    assert known.rows(["0" * 64]) is None
