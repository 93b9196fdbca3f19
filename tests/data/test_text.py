"""Tokenizers: a WordPiece vocabulary built from digit captions, CompVis-style tokenization, null prompt."""

import os

import numpy as np
import pytest

from lidiff.data import text
from lidiff.data.captions import DigitsCaptionSource


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return text.build_wordpiece_tokenizer(DigitsCaptionSource(seed=0).captions(), str(directory), vocab_size=300)


def test_vocabulary_from_digit_captions(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in text.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for word in ("seven", "handwritten", "digit", "7"):
        assert word in vocab, word
    assert len(tokenizer) <= 300
    # Words of the captions are whole tokens, and casing is folded.
    ids = text.tokenize(tokenizer, ["A Handwritten SEVEN"], max_length=8)[0]
    assert tokenizer.convert_ids_to_tokens(ids.tolist()) == [
        "[CLS]", "a", "handwritten", "seven", "[SEP]", "[PAD]", "[PAD]", "[PAD]"]


def test_tokenize_pads_and_truncates_like_compvis(tokenizer):
    prompts = ["the digit 7", "number 3", "a handwritten nine " * 30]
    ids = text.tokenize(tokenizer, prompts, max_length=77)
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert (ids[:, 0] == cls).all()
    n = len(tokenizer("the digit 7")["input_ids"])  # [CLS] the digit 7 [SEP]
    assert n == 5 and ids[0, n - 1] == sep and (ids[0, n:] == pad).all()
    assert ids[2, -1] == sep and (ids[2] != pad).all()  # truncated to 77 with [SEP] kept last
    # Matches the transformers call CompVis makes.
    ref = tokenizer(prompts, truncation=True, max_length=77, return_length=True, return_overflowing_tokens=False,
                    padding="max_length", return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, ref)
    with pytest.raises(TypeError, match="sequence of strings"):
        text.tokenize(tokenizer, "number 3")


def test_null_tokens_are_the_empty_prompt(tokenizer):
    null = text.null_tokens(tokenizer, 16)
    assert null.shape == (16,) and null.dtype == np.int32
    assert null.tolist() == [tokenizer.cls_token_id, tokenizer.sep_token_id] + [tokenizer.pad_token_id] * 14
    np.testing.assert_array_equal(null, text.tokenize(tokenizer, [""], 16)[0])


def test_saved_directory_loads_back(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    again = text.load_tokenizer(str(tmp_path))
    np.testing.assert_array_equal(text.tokenize(again, ["a picture of a 4"], 12),
                                  text.tokenize(tokenizer, ["a picture of a 4"], 12))


def test_missing_tokenizer_directory_says_what_is_expected(tmp_path):
    missing = str(tmp_path / "bert-base-uncased")
    with pytest.raises(FileNotFoundError) as err:
        text.load_tokenizer(missing)
    assert missing in str(err.value) and "vocab.txt" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no vocab\.txt nor tokenizer\.json.*notes\.md"):
        text.load_tokenizer(str(empty))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="Could not load a BERT tokenizer from .*corrupt"):
        text.load_tokenizer(str(corrupt))
    with pytest.raises(ValueError, match="at least one text"):
        text.build_wordpiece_tokenizer([], str(tmp_path / "t"))
    assert not os.path.exists(str(tmp_path / "t" / "vocab.txt"))
