"""moerun.evaluate: perplexity over windows that predict every token once, against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moerun
from moerun.runtime.eval import join_tokens
from tiny_checkpoints import EOS, one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld, " * 3, "z"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> moerun.LoadedModel:
    return moerun.load(save_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), tokenizer=True), dtype="fp32")


def direct_nll(model, ids: list[int], context: int) -> tuple[float, int]:
    """Summed NLL and count of the tokens after the first, each predicted from up to ``context - 1``
    tokens before it, with windows restarting every ``context - 1`` tokens: the full forward, no chunking."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, context - 1):
        window = torch.tensor(ids[start : start + context])
        with torch.inference_mode():
            logits = model(window[None]).logits[0, :-1].float()
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return total, count


def test_texts_are_joined_with_eos(loaded) -> None:
    ids = join_tokens(["ab", "c"], loaded.tokenizer)
    assert ids == [*b"ab", loaded.tokenizer.convert_tokens_to_ids(EOS), *b"c"]


@pytest.mark.parametrize("context", [None, 3, 17])
def test_perplexity_matches_a_direct_computation(loaded, context: int | None) -> None:
    ids = join_tokens(TEXTS, loaded.tokenizer)
    result = moerun.evaluate(loaded, TEXTS, context=context)
    window = context or loaded.max_seq_len
    total, count = direct_nll(loaded.model, ids, window)
    assert result.tokens == count == len(ids) - 1 and result.context == window
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.seconds > 0 and result.tokens_per_s == pytest.approx(result.tokens / result.seconds)
    assert set(result.to_dict()) == {"perplexity", "nll", "tokens", "seconds", "tokens_per_s", "context"}


def test_bad_input(loaded) -> None:
    with pytest.raises(ValueError, match="context must be between 2 and the model's context of 512"):
        moerun.evaluate(loaded, TEXTS, context=513)
    with pytest.raises(ValueError, match="context must be between 2"):
        moerun.evaluate(loaded, TEXTS, context=1)
    with pytest.raises(ValueError, match="perplexity needs at least 2"):
        moerun.evaluate(loaded, ["x"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        moerun.evaluate(loaded.model, TEXTS)
