"""Perplexity of a model on texts, and how fast it reads them.

The texts are tokenized and joined with the EOS token between them, then cut into windows of the model's
context (or a shorter ``context``). Consecutive windows share one token, the last of one being the first
of the next, so every token but the very first is predicted exactly once, from the tokens before it in
its window.

Shape legend: L window length, H hidden, V vocabulary, C positions per logits chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.loader import LoadedModel, join_tokens

_LOGITS_CHUNK = 256  # positions per lm_head call: full-window fp32 logits would take L * V * 4 bytes


@dataclass(frozen=True)
class EvalResult:
    """Perplexity and speed over a set of texts."""

    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens
    seconds: float  # time in the model's forward passes
    tokens_per_s: float
    context: int  # window length used

    def to_dict(self) -> dict:
        return asdict(self)


def default_eval_files() -> list[Path]:
    """The reference model's held-out files (moerun.assets.REFERENCE_HELDOUT_DIR/*.py).

    Raises:
        ValueError: this installation of moerun has none.
    """
    try:
        from ..assets import REFERENCE_HELDOUT_DIR
    except ImportError:
        REFERENCE_HELDOUT_DIR = None
    files = [] if REFERENCE_HELDOUT_DIR is None else sorted(Path(REFERENCE_HELDOUT_DIR).glob("*.py"))
    if not files:
        raise ValueError("no texts given and moerun's reference held-out files are not installed")
    return files


def window_nll(model: nn.Module, window: torch.Tensor) -> float:
    """Summed negative log-likelihood of window[1:] given the tokens before each, window: [L] int64."""
    with torch.inference_mode():
        hidden = model.model(input_ids=window.view(1, -1), use_cache=False).last_hidden_state[0, :-1]  # [L-1, H]
        targets = window[1:]
        total = 0.0
        for start in range(0, hidden.shape[0], _LOGITS_CHUNK):
            logits = model.lm_head(hidden[start : start + _LOGITS_CHUNK]).float()  # [C, V]
            total += F.cross_entropy(logits, targets[start : start + _LOGITS_CHUNK], reduction="sum").item()
    return total


def evaluate(
    model: LoadedModel | nn.Module,
    texts: Sequence[str] | None = None,
    *,
    tokenizer=None,
    context: int | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``texts`` and the tokens per second it read them at.

    Args:
        model: a :class:`LoadedModel` (its tokenizer is used unless one is given) or a transformers CausalLM.
        texts: the texts; None for the reference model's held-out files.
        tokenizer: the model's tokenizer.
        context: window length, at least 2 (default: the model's context, max_position_embeddings).

    Raises:
        ValueError: no tokenizer, a context out of range, or texts with fewer than two tokens in all.
    """
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = model.model
    if tokenizer is None:
        raise ValueError("evaluation needs a tokenizer; the model directory has none")
    if texts is None:
        texts = [path.read_text() for path in default_eval_files()]
    max_context = int(model.config.max_position_embeddings)
    context = max_context if context is None else context
    if not 2 <= context <= max_context:
        raise ValueError(f"context must be between 2 and the model's context of {max_context} tokens, got {context}")
    ids = torch.tensor(join_tokens(texts, tokenizer), dtype=torch.int64)
    if ids.numel() < 2:
        raise ValueError(f"the texts hold {ids.numel()} token(s); perplexity needs at least 2")
    total_nll, start_time = 0.0, time.perf_counter()
    for start in range(0, ids.numel() - 1, context - 1):
        total_nll += window_nll(model, ids[start : start + context])
    seconds = time.perf_counter() - start_time
    tokens = ids.numel() - 1
    nll = total_nll / tokens
    return EvalResult(math.exp(nll), nll, tokens, seconds, tokens / seconds, context)
