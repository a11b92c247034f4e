"""Text generation: greedy or temperature / top-p sampling, streamed token by token through a Runner.

A :class:`~moerun.runtime.lean.Runner` owns the model's state between calls (its KV cache): ``prefill`` the
prompt, then ``decode`` one token at a time, each returning the logits of the last position. :class:`HFRunner`
runs a transformers model with its ``DynamicCache``; :func:`default_runner` prefers moerun's lean decode
path (:func:`~moerun.runtime.lean.make_lean_runner`) for the families it covers.

Shape legend: T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models.loader import LoadedModel, peak_rss_bytes, reset_peak_rss
from .lean import Runner, make_lean_runner

STOP_REASONS = ("eos", "max_new_tokens", "context")
_DECODE_CONTEXT_TOKENS = 4  # prompt tokens decoded ahead of the output so its first word keeps its leading space


def default_runner(model: nn.Module, max_seq_len: int | None = None) -> Runner:
    """The lean runner where it covers the model's family and configuration (its KV cache sized for
    ``max_seq_len`` tokens, default the model's context), else :class:`HFRunner`."""
    try:
        return make_lean_runner(model, max_seq_len)
    except NotImplementedError:
        return HFRunner(model)


class HFRunner:
    """A :class:`Runner` over a transformers CausalLM and the cache its first forward makes (a ``DynamicCache``
    for most families; MiniMax's own for MiniMax).

    DynamicCache rather than StaticCache: without torch.compile, StaticCache attends over its whole
    preallocated length at every step. Decoding a 224 MiB (fp32) OLMoE in bf16 on one thread, best of 5
    alternating rounds of 32 tokens: DynamicCache 47.1 / 46.6 tokens/s after a 32 / 256-token prompt,
    StaticCache 45.3 / 43.5.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.max_seq_len = int(model.config.max_position_embeddings)
        self.reset()

    def reset(self) -> None:
        # The model's first forward makes the cache its family needs (a DynamicCache, or MiniMax's own).
        self._cache = None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids.view(1, -1))

    def decode(self, token_id: int) -> torch.Tensor:
        return self._forward(torch.tensor([[token_id]]))

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [1, t] -> logits [V] fp32 of the last position."""
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = out.past_key_values
        return out.logits[0, -1].float()


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token and the text it completes.

    ``text`` is empty while the token ends inside a multi-byte character (its bytes come out with the token
    that completes it), and always empty without a tokenizer; the texts of a whole stream concatenate to
    the decoded output.
    """

    id: int
    text: str


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation and what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    stop_reason: str  # one of STOP_REASONS
    time_to_first_token_ms: float  # from the call (tokenizing included) to the first token
    decode_tokens_per_s: float  # tokens after the first, per second; 0 with fewer than two tokens
    peak_memory_bytes: int  # the process's peak resident memory during the generation (resets the peak counter)


class _IncrementalDecoder:
    """Turns a growing list of generated ids into text deltas that never split a UTF-8 character.

    Decodes the whole output (after a few prompt tokens) at every step and hands out the new suffix,
    holding it back while it ends in U+FFFD, the mark of a character whose bytes are still incomplete.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._context = prompt_ids[-_DECODE_CONTEXT_TOKENS:]
        self._context_text = self._decode(self._context)
        if self._context_text.endswith("\ufffd"):  # the prompt ends inside a character the output may complete
            self._context, self._context_text = [], ""
        self._ids: list[int] = []
        self._emitted = 0  # characters of the output already handed out

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int, final: bool) -> str:
        """Add one token; returns the text now complete (everything left when ``final``)."""
        self._ids.append(token_id)
        text = self._decode(self._context + self._ids)[len(self._context_text) :]
        if text.endswith("\ufffd") and not final:
            return ""
        delta, self._emitted = text[self._emitted :], len(text)
        return delta


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """Pick the next token from logits [V]: argmax when ``temperature`` is 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of tokens whose probability reaches ``top_p``.
    """
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)  # [V] each
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # mass before each token; the top token always stays
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _model_and_tokenizer(model: LoadedModel | nn.Module, tokenizer) -> tuple[nn.Module, object | None]:
    if isinstance(model, LoadedModel):
        return model.model, tokenizer if tokenizer is not None else model.tokenizer
    return model, tokenizer


def eos_token_ids(model: nn.Module) -> set[int]:
    """The ids that end generation: the generation config's EOS (as transformers' generate uses), else the config's."""
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


def encode_prompt(prompt: str | Sequence[int] | torch.Tensor, tokenizer) -> list[int]:
    """Token ids of a prompt given as text (needs a tokenizer) or as ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; this model has none, so pass token ids")
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, torch.Tensor):
        return [int(t) for t in prompt.reshape(-1)]
    return [int(t) for t in prompt]


def generate_stream(
    model: LoadedModel | nn.Module,
    tokenizer=None,
    prompt: str | Sequence[int] | torch.Tensor = "",
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    runner: Runner | None = None,
) -> Iterator[GeneratedToken]:
    """Generate from ``prompt``, yielding each token as it is produced.

    Stops after an EOS token (which is yielded), after ``max_new_tokens``, or when the sequence fills the
    model's context. Sampling draws from a ``torch.Generator`` seeded with ``seed``, so equal arguments give
    equal outputs.

    Args:
        model: a :class:`LoadedModel` (its tokenizer is used unless one is given) or a transformers CausalLM.
        tokenizer: turns a text prompt into ids and ids into text; optional when the prompt is ids.
        prompt: text, or token ids (a sequence of ints or an int64 tensor [T]).
        max_new_tokens: at most this many tokens.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling mass, in (0, 1].
        seed: sampling seed.
        runner: the model runner (default: :func:`default_runner` over ``model``; pass one to reuse it
            across calls).

    Raises:
        ValueError: an empty prompt or one longer than the model's context, a text prompt without a
            tokenizer, or out-of-range sampling settings. Raised by this call, before any generation.
    """
    hf_model, tokenizer = _model_and_tokenizer(model, tokenizer)
    runner = runner if runner is not None else default_runner(hf_model)
    prompt_ids = encode_prompt(prompt, tokenizer)
    if not prompt_ids:
        raise ValueError("the prompt is empty; it needs at least one token")
    if len(prompt_ids) > runner.max_seq_len:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the model's context of {runner.max_seq_len} tokens"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    decoder = _IncrementalDecoder(tokenizer, prompt_ids) if tokenizer is not None else None
    budget = min(max_new_tokens, runner.max_seq_len - len(prompt_ids))
    return _stream(runner, prompt_ids, budget, eos_token_ids(hf_model), decoder, temperature, top_p, seed)


def _stream(
    runner: Runner,
    prompt_ids: list[int],
    budget: int,
    eos: set[int],
    decoder: _IncrementalDecoder | None,
    temperature: float,
    top_p: float,
    seed: int,
) -> Iterator[GeneratedToken]:
    if budget <= 0:
        return
    generator = torch.Generator().manual_seed(seed)
    runner.reset()
    logits = runner.prefill(torch.tensor(prompt_ids, dtype=torch.int64))  # [V]
    for step in range(budget):
        token = sample_next(logits, temperature, top_p, generator)
        final = token in eos or step == budget - 1
        yield GeneratedToken(token, decoder.push(token, final) if decoder is not None else "")
        if final:
            return
        logits = runner.decode(token)


def generate(
    model: LoadedModel | nn.Module,
    tokenizer=None,
    prompt: str | Sequence[int] | torch.Tensor = "",
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    runner: Runner | None = None,
    on_token: Callable[[GeneratedToken], None] | None = None,
) -> GenerationResult:
    """Generate to the end and return the text, the ids and timings.

    Arguments as :func:`generate_stream`; ``on_token`` is called with each token as it is produced
    (to stream it while still getting the timings).
    """
    start = time.perf_counter()
    reset_peak_rss()
    hf_model, tokenizer = _model_and_tokenizer(model, tokenizer)
    prompt_ids = encode_prompt(prompt, tokenizer)
    stream = generate_stream(
        hf_model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, runner=runner,
    )  # fmt: skip
    ids, texts, times = [], [], []
    for token in stream:
        if on_token is not None:
            on_token(token)
        ids.append(token.id)
        texts.append(token.text)
        times.append(time.perf_counter())
    if ids and ids[-1] in eos_token_ids(hf_model):
        stop_reason = "eos"
    elif len(ids) == max_new_tokens:
        stop_reason = "max_new_tokens"
    else:
        stop_reason = "context"
    decode_seconds = times[-1] - times[0] if len(times) > 1 else 0.0
    return GenerationResult(
        text="".join(texts),
        token_ids=ids,
        prompt_tokens=len(prompt_ids),
        stop_reason=stop_reason,
        time_to_first_token_ms=(times[0] - start) * 1e3 if times else 0.0,
        decode_tokens_per_s=(len(ids) - 1) / decode_seconds if decode_seconds > 0 else 0.0,
        peak_memory_bytes=peak_rss_bytes(),
    )
