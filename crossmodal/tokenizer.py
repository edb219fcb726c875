"""The text tower's tokenizer: the pretrained one from the Hub, or a WordPiece vocabulary fit on the captions.

Fitting our own is what lets random-init towers (the ``tiny`` preset, offline tests) train with no download; the
result is saved with ``save_pretrained`` so ``AutoTokenizer.from_pretrained`` reloads it from the artifact folder.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def fit_wordpiece(captions: Iterable[str], *, vocab_size: int, max_length: int) -> PreTrainedTokenizerBase:
    """A BERT-style uncased WordPiece tokenizer trained on ``captions`` (the training split only)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(captions, trainer=trainer)
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


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A pretrained tokenizer by Hub id, or one saved in a folder (the artifact's ``tokenizer/``)."""
    return AutoTokenizer.from_pretrained(name_or_path)
