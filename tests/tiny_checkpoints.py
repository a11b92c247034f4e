"""Tiny checkpoint directories for the loader, generation, eval and CLI tests, built offline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from families import tiny_model

EOS = "<|endoftext|>"
BYTE_VOCAB = 260  # 256 byte tokens, EOS (id 256), and spare rows


def byte_level_char(byte: int) -> str:
    """The character byte-level BPE writes for a byte: printable Latin-1 bytes stand for themselves, the others
    (controls, space, ...) for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: token id = UTF-8 byte value (0-255), EOS = 256."""
    vocab = {byte_level_char(b): b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)


def save_checkpoint(family: str, path: Path, *, tokenizer: bool = False, **save_kwargs) -> Path:
    """Save the tiny random ``family`` model (fp32) to ``path``; with ``tokenizer``, the vocabulary grows to
    BYTE_VOCAB and the byte tokenizer is saved beside it, with EOS as the model's EOS."""
    model = tiny_model(family)
    if tokenizer:
        model.resize_token_embeddings(BYTE_VOCAB, mean_resizing=False)
        model.config.eos_token_id = model.generation_config.eos_token_id = 256
        byte_tokenizer().save_pretrained(path)
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Run a test module on one thread: tiny models gain nothing from more, and on a busy machine OpenMP
    threads waiting for each other made their forward passes 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
