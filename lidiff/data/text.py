"""Text tokenization for text-conditioned LDMs: BERT WordPiece tokens as CompVis's ``BERTTokenizer`` makes them.

CompVis tokenizes prompts with HF ``bert-base-uncased`` (vocab 30522): ``[CLS] words [SEP] [PAD]...``, truncated and
padded to 77 ids, no attention mask passed on. Nothing here downloads: ``load_tokenizer`` reads a local directory
(e.g. one saved with ``BertTokenizerFast.from_pretrained('bert-base-uncased').save_pretrained(dir)`` on a machine
with network access), and ``build_wordpiece_tokenizer`` trains a small BERT-style vocabulary from the captions of
a dataset, for models trained from scratch. Stable Diffusion's frozen CLIP text encoder comes with its own BPE
tokenizer (``load_clip_tokenizer``); ``tokenize`` and ``null_tokens`` serve both.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from lidiff.errors import ConfigError, MissingInputError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] gets id 0, as in BERT


def load_tokenizer(path: str):
    """A ``transformers.BertTokenizerFast`` from the local directory ``path`` (never the network).

    Raises:
      MissingInputError (a FileNotFoundError): ``path`` is not a directory or holds neither ``vocab.txt`` nor
        ``tokenizer.json``.
      ConfigError (a ValueError): transformers cannot load the directory as a BERT tokenizer.
    """
    from transformers import BertTokenizerFast

    path = os.fspath(path)
    expected = (
        "a BERT tokenizer directory holding vocab.txt (WordPiece, one token per line) or the tokenizer.json that "
        "transformers 5 saves, plus usually tokenizer_config.json; e.g. "
        "made by BertTokenizerFast.from_pretrained('bert-base-uncased').save_pretrained(dir) on a machine with "
        "network access, or by lidiff.data.text.build_wordpiece_tokenizer"
    )
    if not os.path.isdir(path):
        raise MissingInputError(f"Tokenizer directory {path!r} does not exist. Expected {expected}.")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.txt", "tokenizer.json")):
        raise MissingInputError(
            f"Tokenizer directory {path!r} has no vocab.txt nor tokenizer.json (it holds "
            f"{sorted(os.listdir(path))}). Expected {expected}."
        )
    try:
        return BertTokenizerFast.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"Could not load a BERT tokenizer from {path!r}: {type(e).__name__}: {e}. Expected {expected}."
        ) from e


def load_clip_tokenizer(path: str):
    """A ``transformers.CLIPTokenizer`` (Stable Diffusion's byte-level BPE) from the local directory ``path``, e.g.
    a Stable Diffusion repository's ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``).

    Raises:
      MissingInputError (a FileNotFoundError): ``path`` is not a directory or holds none of those files.
      ConfigError (a ValueError): transformers cannot load the directory as a CLIP tokenizer.
    """
    from transformers import CLIPTokenizer

    path = os.fspath(path)
    expected = ("a CLIP tokenizer directory holding vocab.json and merges.txt, or tokenizer.json (a Stable "
                "Diffusion repository's tokenizer/ folder)")
    if not os.path.isdir(path):
        raise MissingInputError(f"Tokenizer directory {path!r} does not exist. Expected {expected}.")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "tokenizer.json")):
        raise MissingInputError(f"Tokenizer directory {path!r} has no vocab.json nor tokenizer.json (it holds "
                                f"{sorted(os.listdir(path))}). Expected {expected}.")
    try:
        return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"Could not load a CLIP tokenizer from {path!r}: {type(e).__name__}: {e}. "
                         f"Expected {expected}.") from e


def build_wordpiece_tokenizer(
    texts: Iterable[str], directory: str, vocab_size: int = 1000, min_frequency: int = 1
):
    """Trains a lower-casing BERT WordPiece vocabulary on ``texts`` and saves it as a tokenizer directory.

    Args:
      texts: training captions.
      directory: created if needed; receives ``vocab.txt`` and the transformers tokenizer files.
      vocab_size: the most tokens in the vocabulary, special tokens included (fewer when the texts are small).
      min_frequency: the least count of a merged piece.

    Returns:
      the tokenizer loaded back with ``load_tokenizer(directory)``; ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
      [MASK]=4. Its ``len()`` is the ``vocab_size`` to give ``TransformerEmbedder``.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("build_wordpiece_tokenizer needs at least one text to learn a vocabulary from.")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    wordpiece.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    wordpiece.save_model(directory)  # vocab.txt, one token per line in id order
    # Let transformers build its tokenizer from vocab.txt, then write its config files next to it (casing, special
    # tokens), so the directory loads the same way as a saved bert-base-uncased.
    BertTokenizerFast.from_pretrained(directory, local_files_only=True, do_lower_case=True).save_pretrained(directory)
    return load_tokenizer(directory)


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 77) -> np.ndarray:
    """Prompts -> token ids exactly as CompVis's ``BERTTokenizer``: [CLS] ... [SEP], truncated, padded with [PAD]
    (a CLIP tokenizer: ``<|startoftext|> ... <|endoftext|>`` and its pad token, as Stable Diffusion).

    texts: N strings -> int32 [N, max_length].
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a sequence of strings; wrap a single prompt in a list.")
    encoding = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="np"
    )
    return np.asarray(encoding["input_ids"], dtype=np.int32)


def null_tokens(tokenizer, max_length: int = 77) -> np.ndarray:
    """The empty prompt ``""`` (``[CLS] [SEP] [PAD]...``; CLIP: ``<|startoftext|> <|endoftext|> <pad>...``), the null
    input of classifier-free guidance: int32 [L]."""
    return tokenize(tokenizer, [""], max_length)[0]
