"""Run under `accelerate launch` with any number of CPU processes.

Every process builds the same tiny dual encoder and the same global batch of 8 pairs, then takes its shard. Under DDP,
our loss over the gathered features must equal transformers' reference loss computed by one process on the whole
batch, and the averaged gradients must equal that single process's gradients.

The same launch then checks the hard-negative recipe: each caption also brings two caption negatives
(crossmodal/training/negatives.py) and HN-NCE weights the negatives (beta 0.5); its reference is the loss written out
row by row (tests/test_loss.py), on one process over the whole batch. One launch for both keeps the suite's time.
"""

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from crossmodal.config import PRESETS
from crossmodal.encoding.batches import CaptionBatcher
from crossmodal.model.dual_encoder import build_model
from crossmodal.model.tokenizer import fit_wordpiece, load_tokenizer
from crossmodal.training.loss import clip_loss
from crossmodal.training.negatives import negatives_of
from crossmodal.training.pairs import WithCaptionNegatives
from tests.test_loss import brute_force_loss

GLOBAL_BATCH = 8


def main(output: str) -> None:
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    config = PRESETS["tiny"].model
    captions = [f"a {c} {s} on the {p}" for c in ("red", "blue") for s in ("circle", "star") for p in ("left", "right")]
    # Fit once and share through disk, as training does: WordPiece ids of equally frequent tokens vary by process.
    saved = Path(output).with_name("tokenizer")
    if accelerator.is_main_process:
        fit_wordpiece(captions, vocab_size=200, max_length=16).save_pretrained(saved)
    accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(str(saved))
    model, _ = build_model(config, tokenizer, pretrained=False)
    pixels = torch.randn(GLOBAL_BATCH, 3, config.image_size, config.image_size)
    plain = tokenizer(captions, padding=True, return_tensors="pt")
    hard = WithCaptionNegatives(CaptionBatcher(tokenizer, config), negatives_of(captions, 2, seed=0), 2)(captions)
    assert hard["negative_mask"].all()
    results = {
        "plain": compare(accelerator, copy.deepcopy(model), pixels, plain, hard=False),
        "hard": compare(accelerator, model, pixels, hard, hard=True),
    }
    if accelerator.is_main_process:
        with open(output, "w") as handle:
            json.dump({"processes": accelerator.num_processes, **results}, handle)


def compare(accelerator: Accelerator, model, pixels: torch.Tensor, tokens: dict, hard: bool) -> dict:
    """Loss and gradients of N processes under DDP against one process on the whole batch."""

    def loss_of(model, shard: slice, gathered: bool) -> torch.Tensor:
        batch = {key: value[shard] for key, value in tokens.items() if key != "negative_mask"}
        images, texts, scale, *negatives = model(pixels[shard], **batch)
        if not hard:
            if gathered:
                return clip_loss(images, texts, scale)
            return image_text_contrastive_loss(scale * texts @ images.T)  # logits_per_text, as CLIPModel passes it
        mask = tokens["negative_mask"][shard]
        if gathered:
            return clip_loss(
                images, texts, scale, negative_embeddings=negatives[0], negative_mask=mask, hard_negative_beta=0.5
            )
        return brute_force_loss(images, texts, scale, negatives[0], mask, beta=0.5)

    # One process, whole batch: the reference loss from transformers (with --hard, the row-by-row loop).
    reference = copy.deepcopy(model)
    expected = loss_of(reference, slice(None), gathered=False)
    expected.backward()

    # N processes under DDP, each with its shard.
    ddp = accelerator.prepare(model)
    shard = slice(
        accelerator.process_index * GLOBAL_BATCH // accelerator.num_processes,
        (accelerator.process_index + 1) * GLOBAL_BATCH // accelerator.num_processes,
    )
    loss = loss_of(ddp, shard, gathered=True)
    accelerator.backward(loss)

    ours = dict(accelerator.unwrap_model(ddp).named_parameters())
    # Compare each gradient relative to the largest gradient of the model: float32 sums taken in another order
    # differ by ~1e-7 of the scale, a missing or double-counted term by far more.
    scale_of_gradients = max(parameter.grad.abs().max().item() for parameter in reference.parameters())
    gradient_error = max(
        (ours[name].grad - parameter.grad).abs().max().item() / scale_of_gradients
        for name, parameter in reference.named_parameters()
    )
    return {"loss": loss.item(), "expected": expected.item(), "max_relative_gradient_error": gradient_error}


if __name__ == "__main__":
    main(sys.argv[1])
