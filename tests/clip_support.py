"""Tiny Stable-Diffusion-style text parts written to folders, as a real repository ships them: a CLIP BPE tokenizer
(``tokenizer/``) and a randomly initialised transformers ``CLIPTextModel`` (``text_encoder/``). Nothing is
downloaded; every test that needs a CLIP text encoder builds these.

Import as ``from tests.clip_support import ...``.
"""

from __future__ import annotations

import os
import string

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

_CHARS = list(string.ascii_lowercase) + list(string.digits) + list(".,!?'-")
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("r", "e"), ("re", "d</w>")]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE tokenizer with CLIP's special tokens: one token per character (and per word-final
    character, ``x</w>``), a few merges ("the", "and", "red"), ``<|startoftext|>`` and ``<|endoftext|>`` (also the
    pad token, as in SD v1's tokenizer). 92 tokens."""
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in _CHARS:
            vocab[c + suffix] = len(vocab)
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES))


def write_tiny_clip_tokenizer(folder: str) -> str:
    """``tiny_clip_tokenizer()`` saved with ``save_pretrained`` into ``folder``; returns ``folder``."""
    tiny_clip_tokenizer().save_pretrained(folder)
    return folder


def tiny_clip_text_model(hidden: int = 32, layers: int = 2, heads: int = 2, act: str = "quick_gelu",
                         max_positions: int = 77, seed: int = 0) -> CLIPTextModel:
    """A random ``CLIPTextModel`` over the tiny tokenizer's vocabulary (eval mode, float32)."""
    tokenizer = tiny_clip_tokenizer()
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
                            hidden_act=act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def write_tiny_clip_text_encoder(folder: str, **kwargs) -> str:
    """``tiny_clip_text_model(**kwargs)`` saved as a Hugging Face folder (config.json + model.safetensors)."""
    tiny_clip_text_model(**kwargs).save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "model.safetensors")), os.listdir(folder)
    return folder
