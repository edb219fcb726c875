"""The tokenizer fit on captions: deterministic, lossless for what it saw, reloadable from its folder."""

from transformers import AutoTokenizer

from crossmodal.model.tokenizer import SPECIAL_TOKENS, fit_wordpiece
from crossmodal.synthetic.dataset import sample_captions

CAPTIONS = [caption for five in sample_captions(300, seed=0) for caption in five]


def test_the_same_captions_give_the_same_ids_every_time():
    """Seeded runs repeat only if the vocabulary does (the library's trainer broke merge ties at random)."""
    fits = [fit_wordpiece(CAPTIONS, vocab_size=size, max_length=32) for size in (90, 90, 4096, 4096)]
    assert fits[0].get_vocab() == fits[1].get_vocab() and fits[2].get_vocab() == fits[3].get_vocab()
    assert fits[0](CAPTIONS[:50])["input_ids"] == fits[1](CAPTIONS[:50])["input_ids"]
    assert fits[1](CAPTIONS[:50])["input_ids"] != fits[2](CAPTIONS[:50])["input_ids"]  # the sizes differ


def test_vocabulary_holds_specials_characters_then_the_most_frequent_words():
    tokenizer = fit_wordpiece(["a dog", "a dog runs", "a cat"], vocab_size=64, max_length=16)
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 1
    assert {"d", "##d", "s", "##s", "dog", "runs", "cat"} <= set(vocab)
    assert vocab["dog"] < vocab["cat"]  # two uses before one


def spelt_words(tokenizer, caption: str) -> list[str]:
    """The words the tokenizer's pieces spell, continuation pieces (##) glued back on."""
    words: list[str] = []
    for piece in tokenizer.tokenize(caption):
        if piece.startswith("##"):
            words[-1] += piece[2:]
        else:
            words.append(piece)
    return words


def test_a_small_vocabulary_is_cut_at_its_size_and_still_spells_every_seen_word():
    tokenizer = fit_wordpiece(CAPTIONS, vocab_size=90, max_length=64)
    whole = fit_wordpiece(CAPTIONS, vocab_size=4096, max_length=64)
    assert len(tokenizer.get_vocab()) == 90 < len(whole.get_vocab())
    for caption in CAPTIONS[:200]:
        assert tokenizer.unk_token_id not in tokenizer(caption)["input_ids"]
        assert spelt_words(tokenizer, caption) == whole.tokenize(caption)  # the larger vocabulary: whole words
    pieces = sum(len(tokenizer.tokenize(caption)) for caption in CAPTIONS[:200])
    assert pieces > sum(len(whole.tokenize(caption)) for caption in CAPTIONS[:200])  # rare words were spelt out


def test_unseen_characters_become_unk_and_the_folder_reloads_the_same_tokenizer(tmp_path):
    tokenizer = fit_wordpiece(CAPTIONS, vocab_size=4096, max_length=32)
    assert tokenizer.unk_token_id in tokenizer("a red ☃")["input_ids"]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(CAPTIONS[:20])["input_ids"] == tokenizer(CAPTIONS[:20])["input_ids"]
    assert reloaded.model_max_length == 32
