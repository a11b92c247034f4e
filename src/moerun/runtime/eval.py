"""Perplexity of a model on texts, how fast it reads them, and how far its next-token distributions are from a
reference model's (mean KL divergence, as llama.cpp's ``perplexity --kl-divergence`` reports it).

The texts are tokenized and joined with the EOS token between them, then cut into windows of the model's
context (or a shorter ``context``). Consecutive windows share one token, the last of one being the first
of the next, so every token but the very first is predicted exactly once, from the tokens before it in
its window.

Shape legend: N predicted tokens, L window length, H hidden, V vocabulary, C positions per logits chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.loader import LoadedModel, join_tokens

_LOGITS_CHUNK = 256  # positions per lm_head call: full-window fp32 logits would take L * V * 4 bytes

# Reference log-probs are kept in 16 bits the way llama.cpp's --kl-divergence-base file keeps them: per row, a code
# on a uniform grid from the row's largest log-prob down _REFERENCE_RANGE nats (llama.cpp: 16), so every stored
# log-prob is within 2.4e-4 nats of its value. float16's error grows with the magnitude instead: 2e-3 nats near -5,
# where flat distributions hold much of their mass (bfloat16: 1.6e-2). A log-prob more than _REFERENCE_RANGE nats
# below its row's largest is stored as probability 0: with a vocabulary of a million, under 2e-8 of the mass.
_REFERENCE_RANGE = 32.0
_CODES = 65534  # grid steps: codes -32767..32767; -32768 is probability 0
_ZERO_CODE = -32768


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


@dataclass(frozen=True, eq=False)
class ReferenceLogprobs:
    """A reference model's next-token distributions over one token sequence: computed once by
    :func:`reference_logprobs`, then compared with any number of models by :func:`kl_divergence`.

    Attributes:
        codes: [N, V] int16, each log-prob as ``low + (code + 32767) * step`` of its row; -32768 for
            probability 0 (N * V * 2 bytes).
        low: [N] float32, each row's lowest representable log-prob.
        step: [N] float32, each row's grid step, at most 32 / 65534 nats.
        top1: [N] int64, the reference's most likely next token, taken from its float32 logits so that ties
            made by the 16-bit rounding do not count as disagreements.
        nll: the reference's mean negative log-likelihood of the N tokens, in nats (from float32).
        token_ids: [N + 1] int64, the sequence.
        context: window length.
    """

    codes: torch.Tensor
    low: torch.Tensor
    step: torch.Tensor
    top1: torch.Tensor
    nll: float
    token_ids: torch.Tensor
    context: int

    @property
    def tokens(self) -> int:
        """Predicted tokens, N."""
        return self.codes.shape[0]

    def logprobs(self, rows: slice = slice(None)) -> torch.Tensor:
        """The stored log-probs of ``rows`` as float32 [C, V], renormalised so that each row's probabilities sum
        to 1: the rounding then enters a KL divergence at second order for a model close to the reference."""
        codes = self.codes[rows]  # [C, V]
        log_p = (codes.float() + (_CODES // 2)).mul_(self.step[rows, None]).add_(self.low[rows, None])  # [C, V]
        log_p.masked_fill_(codes == _ZERO_CODE, -math.inf)
        return log_p.sub_(log_p.logsumexp(dim=-1, keepdim=True))


def _encode(log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 log-probs [C, V] -> (codes [C, V] int16, low [C], step [C]) of :class:`ReferenceLogprobs`."""
    high = log_p.amax(dim=-1)  # [C]
    if not torch.isfinite(high).all():
        raise ValueError("the reference model's logits are not finite (NaN or infinity) at some position")
    low = torch.maximum(log_p.amin(dim=-1), high - _REFERENCE_RANGE)  # [C]
    step = ((high - low) / _CODES).clamp_min(torch.finfo(torch.float32).tiny)  # [C]; a flat row has high == low
    grid = ((log_p - low[:, None]) / step[:, None]).round_().clamp_(-1, _CODES)  # [C, V]; -1: below the range
    codes = grid.sub_(_CODES // 2).to(torch.int16)  # [C, V]; -1 - 32767 = -32768, probability 0
    return codes, low, step


@dataclass(frozen=True)
class KLResult:
    """How far a model's next-token distributions are from a reference's, over the same tokens.

    KL values are KL(reference || model) per predicted token, in nats.
    """

    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float  # share of tokens whose most likely next token is the reference's (llama.cpp's "same top p")
    perplexity: float  # the model's, on the same tokens
    reference_perplexity: float
    tokens: int  # predicted tokens
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


def _check_context(model: nn.Module, context: int | None) -> int:
    """``context``, or the model's own when None, checked to be a window the model can read."""
    max_context = int(model.config.max_position_embeddings)
    context = max_context if context is None else context
    if not 2 <= context <= max_context:
        raise ValueError(f"context must be between 2 and the model's context of {max_context} tokens, got {context}")
    return context


def _check_ids(token_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The token ids as a [N + 1] int64 tensor, with N >= 1."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    if ids.dim() != 1:
        raise ValueError(f"token ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
    if ids.numel() < 2:
        raise ValueError(f"the texts hold {ids.numel()} token(s); perplexity needs at least 2")
    return ids


@torch.inference_mode()
def _next_token_logits(
    model: nn.Module, ids: torch.Tensor, context: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The float32 logits that predict every token of ``ids`` but the first, in order, a chunk at a time.

    Args:
        model: a transformers CausalLM (``model.model`` the decoder, ``model.lm_head`` the output head).
        ids: [N + 1] int64.
        context: window length, checked by the caller.

    Yields:
        (logits [C, V] float32, targets [C] int64): the next chunk of predicted tokens and their logits, each
        from the tokens before it in its window. The chunks together cover the N tokens once, in order.
    """
    for start in range(0, ids.numel() - 1, context - 1):
        window = ids[start : start + context]  # [L]
        hidden = model.model(input_ids=window.view(1, -1), use_cache=False).last_hidden_state[0, :-1]  # [L-1, H]
        for chunk in range(0, hidden.shape[0], _LOGITS_CHUNK):
            logits = model.lm_head(hidden[chunk : chunk + _LOGITS_CHUNK]).float()  # [C, V]
            yield logits, window[1 + chunk : 1 + chunk + _LOGITS_CHUNK]


def _causal_lm(model: LoadedModel | nn.Module) -> nn.Module:
    return model.model if isinstance(model, LoadedModel) else model


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
    context = _check_context(model, context)
    ids = _check_ids(join_tokens(texts, tokenizer))
    total_nll, start_time = 0.0, time.perf_counter()
    with torch.inference_mode():
        for logits, targets in _next_token_logits(model, ids, context):
            total_nll += F.cross_entropy(logits, targets, reduction="sum").item()
    seconds = time.perf_counter() - start_time
    tokens = ids.numel() - 1
    nll = total_nll / tokens
    return EvalResult(math.exp(nll), nll, tokens, seconds, tokens / seconds, context)


def reference_logprobs(
    model: LoadedModel | nn.Module, token_ids: torch.Tensor | Sequence[int], context: int | None = None
) -> ReferenceLogprobs:
    """The reference model's next-token distributions over ``token_ids``, for :func:`kl_divergence`.

    The windows are those of :func:`evaluate`: every token but the first is predicted once.

    Args:
        model: a :class:`LoadedModel` or a transformers CausalLM, typically the unmodified float model.
        token_ids: [N + 1] token ids (``join_tokens(texts, tokenizer)``).
        context: window length, at least 2 (default: the model's context, max_position_embeddings).

    Returns:
        the distributions as 16-bit log-probs [N, V] (N * V * 2 bytes), with the reference's top-1 tokens and
        perplexity.

    Raises:
        ValueError: a context out of range, fewer than two tokens, or logits that are not finite.
    """
    model = _causal_lm(model)
    context = _check_context(model, context)
    ids = _check_ids(token_ids)
    n = ids.numel() - 1
    codes, low, step = None, torch.empty(n), torch.empty(n)  # [N, V] int16 once V is known, [N], [N]
    top1, total_nll, row = torch.empty(n, dtype=torch.int64), 0.0, 0
    with torch.inference_mode():
        for logits, targets in _next_token_logits(model, ids, context):
            if codes is None:
                codes = torch.empty(n, logits.shape[1], dtype=torch.int16)
            rows = slice(row, row + targets.numel())
            log_p = F.log_softmax(logits, dim=-1)  # [C, V]
            total_nll -= log_p.gather(1, targets[:, None]).sum().item()
            top1[rows] = logits.argmax(dim=-1)
            codes[rows], low[rows], step[rows] = _encode(log_p)
            row = rows.stop
    return ReferenceLogprobs(codes, low, step, top1, total_nll / n, ids, context)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in float32, from the reference's log-probs [C, V] (overwritten) and the model's -> [C]."""
    p = log_p.exp()  # [C, V]
    terms = log_p.sub_(log_q).mul_(p)  # [C, V] p * (log p - log q)
    terms.masked_fill_(p == 0, 0.0)  # tokens the reference rules out add nothing (not 0 * -inf - -inf = nan)
    return terms.sum(dim=-1)


def kl_divergence(model: LoadedModel | nn.Module, reference: ReferenceLogprobs) -> KLResult:
    """Mean KL divergence of ``model``'s next-token distributions from ``reference``'s, over its tokens.

    Args:
        model: a :class:`LoadedModel` or a transformers CausalLM, e.g. a quantized copy of the reference.
        reference: :func:`reference_logprobs` of the reference model; reusable for any number of models.

    Returns:
        KL(reference || model) per token in nats (mean, median, 99th percentile, max), the share of tokens whose
        top-1 agrees, and both models' perplexities on the tokens. Computed in float32.

    Raises:
        ValueError: the reference's context is longer than the model's, or their vocabularies differ in size.
    """
    model = _causal_lm(model)
    _check_context(model, reference.context)
    n, vocab = reference.codes.shape
    model_vocab = model.lm_head.out_features  # nn.Linear or moerun's QuantLinear
    if model_vocab != vocab:
        raise ValueError(
            f"the model's vocabulary has {model_vocab} tokens and the reference's {vocab}; "
            "KL divergence needs distributions over the same tokens"
        )
    kl = torch.empty(n, dtype=torch.float32)  # [N]
    total_nll, agree, row = 0.0, 0, 0
    with torch.inference_mode():
        for logits, targets in _next_token_logits(model, reference.token_ids, reference.context):
            rows = slice(row, row + targets.numel())
            log_q = F.log_softmax(logits, dim=-1)  # [C, V]
            total_nll -= log_q.gather(1, targets[:, None]).sum().item()
            agree += (logits.argmax(dim=-1) == reference.top1[rows]).sum().item()
            kl[rows] = _kl_rows(reference.logprobs(rows), log_q)
            row = rows.stop
    median, p99 = torch.quantile(kl.double(), torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    return KLResult(
        kl_mean=kl.double().mean().item(),
        kl_median=median,
        kl_p99=p99,
        kl_max=kl.max().item(),
        top1_agreement=agree / n,
        perplexity=math.exp(total_nll / n),
        reference_perplexity=math.exp(reference.nll),
        tokens=n,
        context=reference.context,
    )
