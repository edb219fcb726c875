"""Where the locked text tower keeps binding: its pooled vector, or its token states? (issue 38, second approach)

    python -m benchmarks.binding_probe

The demo's text tower (the pinned all-MiniLM-L6-v2) is locked; today a head reads its mean-pooled vector. This probe
asks, text alone, whether "which colour and place goes with which shape" can be read back from the locked tower at
all, and from which of its outputs: captions of generated two-figure scenes (crossmodal/synthetic, ``pair_captions``)
are encoded once, and two probes of the same width learn, for every shape, the colour and the place the caption gives
it (or that it is absent):

- ``mean``: an MLP on the mean-pooled vector the demo's head reads today;
- ``attention``: learned queries attending over the locked token states (attention pooling), then the same MLP;
- ``fine-tune``: the tower's top ``--tune-layers`` layers trained at a low rate (the bottom layers' states computed
  once), then the mean pool and the same MLP: what a fine-tuned tower's pooled vector can carry.

They are scored on captions of held-out scenes and of their twins (the same words in another order, colours or places
exchanged, ``twin_of``): a caption is read right when both its figures' colour and place are, and a twin pair when
both captions are (a reader of the words alone, blind to their order, gets at most half of the twin pairs).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.config import PRESETS
from crossmodal.model.dual_encoder import build_text_tower, tokenize
from crossmodal.model.pinned_text import pin_text_tower
from crossmodal.model.tokenizer import load_tokenizer
from crossmodal.synthetic.captions import CAPTIONS_PER_IMAGE, pair_captions
from crossmodal.synthetic.scenes import COLOURS, PAIR_PLACES, SHAPES, PairScene, sample_pair_scenes, twin_of

PLACES = tuple(place for pair in PAIR_PLACES for place in pair)


def labels_of(scene: PairScene) -> tuple[list[int], list[int]]:
    """Per shape, its colour and its place index, or the last class (absent)."""
    colours, places = [len(COLOURS)] * len(SHAPES), [len(PLACES)] * len(SHAPES)
    for figure in scene.figures:
        colours[SHAPES.index(figure.shape)] = COLOURS.index(figure.colour)
        places[SHAPES.index(figure.shape)] = PLACES.index(figure.position)
    return colours, places


@torch.inference_mode()
def token_states(
    captions: list[str], layers: tuple[int, ...], batch_size: int = 256
) -> tuple[list[torch.Tensor], torch.Tensor, nn.Module]:
    """The locked tower's hidden states [N, T, H] after each of ``layers`` (0: the embeddings; -1: its output),
    padded to the longest caption, their mask [N, T], and the tower."""
    config = pin_text_tower(PRESETS["demo"].model)
    tokenizer = load_tokenizer(config.text_tower, config.text_revision)
    tower = build_text_tower(config, tokenizer, pretrained=True).eval()
    encoded = tokenize(tokenizer, captions, config)  # one padding for all, so batches stack
    states = [[] for _ in layers]
    for start in range(0, len(captions), batch_size):
        rows = slice(start, start + batch_size)
        output = tower(input_ids=encoded["input_ids"][rows], attention_mask=encoded["attention_mask"][rows],
                       output_hidden_states=True)  # fmt: skip
        for kept, layer in zip(states, layers, strict=True):
            kept.append(output.hidden_states[layer])
    return [torch.cat(kept) for kept in states], encoded["attention_mask"].bool(), tower


class TunedLayers(nn.Module):
    """A copy of the tower's top layers, run on the states the layers below them gave (computed once, locked)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in layers)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        additive = (~mask)[:, None, None, :].float() * torch.finfo(states.dtype).min  # what BertModel builds
        for layer in self.layers:
            states = layer(states, attention_mask=additive)
            states = states[0] if isinstance(states, tuple) else states
        return states


class Probe(nn.Module):
    """Tower output -> per shape, colour logits and place logits. ``queries`` 0 reads the masked mean."""

    def __init__(self, width: int, queries: int, hidden: int = 512, tuned: TunedLayers | None = None) -> None:
        super().__init__()
        self.tuned = tuned
        self.queries = nn.Parameter(torch.randn(queries, width) * width**-0.5) if queries else None
        self.attend = nn.MultiheadAttention(width, 4, batch_first=True) if queries else None
        inputs = width * max(queries, 1)
        classes = len(SHAPES) * (len(COLOURS) + 1 + len(PLACES) + 1)
        self.mlp = nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, classes))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tuned is not None:
            states = self.tuned(states, mask)
        if self.queries is None:
            weights = mask.unsqueeze(-1).float()
            pooled = (states * weights).sum(1) / weights.sum(1)
        else:
            queries = self.queries.expand(len(states), -1, -1)
            pooled = self.attend(queries, states, states, key_padding_mask=~mask, need_weights=False)[0].flatten(1)
        logits = self.mlp(pooled).view(len(states), len(SHAPES), -1)
        return logits[..., : len(COLOURS) + 1], logits[..., len(COLOURS) + 1 :]


def fit(probe: Probe, states, mask, colours, places, epochs: int, seed: int, tower_lr: float = 2e-5) -> Probe:
    """AdamW, 1e-3 for the probe's own layers and the low ``tower_lr`` for the tower's tuned layers."""
    generator = torch.Generator().manual_seed(seed)
    tuned = set(probe.tuned.parameters()) if probe.tuned is not None else set()
    groups = [{"params": [p for p in probe.parameters() if p not in tuned]}, {"params": list(tuned), "lr": tower_lr}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        probe.train()
        for batch in torch.randperm(len(states), generator=generator).split(128):
            colour_logits, place_logits = probe(states[batch], mask[batch])
            loss = F.cross_entropy(colour_logits.flatten(0, 1), colours[batch].flatten()) + F.cross_entropy(
                place_logits.flatten(0, 1), places[batch].flatten()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe


@torch.inference_mode()
def read_right(probe: Probe, states, mask, colours, places) -> torch.Tensor:
    """[N] bool: every shape's colour and place (present or absent) read right."""
    colour_logits, place_logits = probe.eval()(states, mask)
    return ((colour_logits.argmax(-1) == colours) & (place_logits.argmax(-1) == places)).all(-1)


def captioned(scenes: list[PairScene], seeds: list[int]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    captions, colours, places = [], [], []
    for scene, seed in zip(scenes, seeds, strict=True):
        scene_colours, scene_places = labels_of(scene)
        for caption in pair_captions(scene, seed):
            captions.append(caption)
            colours.append(scene_colours)
            places.append(scene_places)
    return captions, torch.tensor(colours), torch.tensor(places)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--test-pairs", type=int, default=300, help="held-out scenes, each with a twin")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--tune-layers", type=int, default=2, help="the tower's top layers the fine-tune trains")
    parser.add_argument("--tune-epochs", type=int, default=10, help="a tuned layer costs ~50 s an epoch on 2 cores")
    parser.add_argument("--tower-lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_scenes = sample_pair_scenes(args.train_scenes, rng)
    held_out = sample_pair_scenes(args.test_pairs, rng)
    kinds = ["colour" if i % 2 == 0 else "place" for i in range(len(held_out))]
    twins = [twin_of(scene, kind) for scene, kind in zip(held_out, kinds, strict=True)]
    seeds = [int(s) for s in rng.integers(2**31, size=args.train_scenes + args.test_pairs)]
    train_text, train_colours, train_places = captioned(train_scenes, seeds[: args.train_scenes])
    test_seeds = seeds[args.train_scenes :]  # a scene and its twin share a seed: the same words, reordered
    test_text, test_colours, test_places = captioned(held_out + twins, test_seeds + test_seeds)
    (below, states), mask, tower = token_states(train_text + test_text, (-1 - args.tune_layers, -1))
    train, test = slice(0, len(train_text)), slice(len(train_text), None)
    print(f"{len(train_text)} training captions, {len(test_text)} held-out (half of them twins); tower output "
          f"{tuple(states.shape)}")  # fmt: skip
    print("| probe | training captions read right | held-out captions | held-out twin pairs (colour, place) |")
    print("|---|---|---|---|")
    per_scene = CAPTIONS_PER_IMAGE * args.test_pairs
    width, top = states.shape[-1], list(tower.encoder.layer[-args.tune_layers :])
    probes = (
        ("mean", Probe(width, 0), states, args.epochs),
        ("attention", Probe(width, args.queries), states, args.epochs),
        (f"fine-tune top {args.tune_layers}", Probe(width, 0, tuned=TunedLayers(top)), below, args.tune_epochs),
    )
    for name, probe, inputs, epochs in probes:
        fit(probe, inputs[train], mask[train], train_colours, train_places, epochs, args.seed, args.tower_lr)
        seen = read_right(probe, inputs[train], mask[train], train_colours, train_places).float().mean()
        right = read_right(probe, inputs[test], mask[test], test_colours, test_places)
        pairs = right[:per_scene] & right[per_scene:]  # caption i of a scene and caption i of its twin
        by_scene = pairs.view(args.test_pairs, CAPTIONS_PER_IMAGE).float()  # held_out alternates colour, place
        colour, place = by_scene[0::2].mean(), by_scene[1::2].mean()
        print(f"| {name} | {100 * seen:.1f} | {100 * right.float().mean():.1f} | "
              f"{100 * pairs.float().mean():.1f} ({100 * colour:.1f}, {100 * place:.1f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
