"""The text tower's tokenizer: the pretrained one from the Hub, or a WordPiece vocabulary fit on the captions.

Fitting our own is what lets random-init towers (the ``tiny`` preset, offline tests) train with no download; the
result is saved with ``save_pretrained`` so ``AutoTokenizer.from_pretrained`` reloads it from the artifact folder.

The vocabulary is fit by counting, not by the library's WordPiece trainer: that trainer breaks ties between equally
frequent merges differently from one call to the next, so two runs with the same seed on the same data got different
token ids and trained different models.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from crossmodal.config import KNOWN_TEXT_ARCHITECTURES, ModelConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def run_tokenizer(
    config: ModelConfig, train_captions: Callable[[], Iterable[str]], output_dir: Path, accelerator: Accelerator
) -> PreTrainedTokenizerBase:
    """A training run's tokenizer: the pretrained one, or one fit on ``train_captions()`` (called only then), by the
    main process, saved under ``output_dir/tokenizer`` and read back by every process."""
    if config.text_init == "pretrained":
        return load_tokenizer(config.text_tower, config.text_revision)
    saved = output_dir / "tokenizer"
    if accelerator.is_main_process and not (saved / "tokenizer.json").exists():
        vocab_size = KNOWN_TEXT_ARCHITECTURES.get(config.text_tower, {}).get("vocab_size", 30522)
        fit_wordpiece(train_captions(), vocab_size=vocab_size, max_length=config.max_text_length).save_pretrained(saved)
    accelerator.wait_for_everyone()
    return load_tokenizer(str(saved))


def fit_wordpiece(captions: Iterable[str], *, vocab_size: int, max_length: int) -> PreTrainedTokenizerBase:
    """A BERT-style uncased WordPiece tokenizer fit on ``captions`` (the training split only); deterministic.

    The vocabulary: the special tokens, every character seen (alone and as a ``##`` continuation, most frequent
    first), then whole words, most frequent first (ties in alphabetical order), up to ``vocab_size``. A word left out
    is spelt with its longest known prefix and then characters: while every character seen fits in the vocabulary,
    no training word becomes ``[UNK]``.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for caption in captions:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    characters: Counter[str] = Counter()
    for word, count in words.items():
        for character in word:
            characters[character] += count
    pieces = [piece for character in _by_frequency(characters) for piece in (character, f"##{character}")]
    candidates = dict.fromkeys([*SPECIAL_TOKENS, *pieces, *_by_frequency(words)])  # in order, each once
    vocab = {piece: index for index, piece in enumerate(list(candidates)[:vocab_size])}

    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def _by_frequency(counts: Counter[str]) -> list[str]:
    """Most frequent first; equally frequent ones alphabetically, so the order never depends on hashing."""
    return sorted(counts, key=lambda key: (-counts[key], key))


def load_tokenizer(name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """A pretrained tokenizer by Hub id (at ``revision``), or one saved in a folder (the artifact's ``tokenizer/``)."""
    return AutoTokenizer.from_pretrained(name_or_path, revision=revision)
