"""The serving engine: continuous batching of generation requests over a batch runner, on one thread.

Requests wait in a bounded queue; the engine thread admits them into free slots of a
:class:`~moerun.runtime.batch.BatchRunner` and steps all running sequences together. A step holds one decode
token of every sequence past its prompt, and at most one prompt chunk (``prefill_chunk`` tokens), so a long
prompt enters over several steps while the running streams keep flowing. After each step every sequence
samples its next token with its own seeded generator, and its new text goes out through the request's
``emit`` callback (the HTTP layer hands it to its event loop). A cancelled request (a client gone, a
timeout) frees its slot at the next step.

Text is released only once it cannot be the start of a stop string (:func:`release_text`), so streams
never show part of a stop sequence.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..runtime.batch import WorkItem
from ..runtime.generate import _IncrementalDecoder, sample_next

FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` requests already (answer 429)."""


class EngineStopped(Exception):
    """The engine no longer accepts requests (shutting down)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    Attributes:
        max_tokens: tokens to generate at most (the context may end it sooner).
        temperature: 0 for greedy.
        top_p: nucleus sampling's probability mass.
        seed: the request's own generator seed (None: drawn at random).
        stop: strings that end the output (not included in it).
        logprobs: how many top alternatives to report per token (None: no log probabilities; 0: only the
            chosen token's).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log probability under the model, and the ``top`` most likely tokens' (text, logprob)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Event:
    """What the engine tells a request: an event per generated token with the text it releases (empty while
    held back as a possible stop string) and the log probabilities of the tokens released, then one final
    event with ``finish_reason`` set and the token counts."""

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    tokens: int = 0  # tokens generated since the previous event
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation: ``prompt_ids`` and ``params`` in, ``Event`` s out through ``emit`` (called on the engine
    thread; it must not block)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() after which it stops with "timeout"
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop at the next step (thread-safe: a flag the engine reads)."""
        self.cancelled = True


def release_text(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split text not yet sent into (what can be sent, what is held back, whether a stop string was reached).

    The text before the earliest stop string is sent and the rest dropped; without a stop, the longest end of
    ``pending`` that begins some stop string is held back (it may still become one).
    """
    hits = [i for i in (pending.find(s) for s in stops if s) if i >= 0]
    if hits:
        return pending[: min(hits)], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(pending)), hold, -1):
            if pending.endswith(s[:n]):
                hold = n
                break
    return pending[: len(pending) - hold], pending[len(pending) - hold :], False


def token_logprobs(logits: torch.Tensor, chosen: int, top: int, token_text: Callable[[int], str]) -> TokenLogprob:
    """The chosen token's log probability under logits [V] (the model's, before temperature) and the ``top``
    most likely tokens'."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [V]
    best = torch.topk(logp, top) if top > 0 else None
    alternatives = () if best is None else tuple(
        (token_text(int(i)), float(v)) for v, i in zip(best.values, best.indices, strict=True))  # fmt: skip
    return TokenLogprob(token_text(chosen), float(logp[chosen]), alternatives)


@dataclass(eq=False)
class _Sequence:
    """A request admitted into a slot, and its progress."""

    request: Request
    slot: int
    max_new: int
    generator: torch.Generator
    decoder: _IncrementalDecoder | None
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    pending: str = ""  # text decoded but held back (a possible stop prefix)
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Engine:
    """Continuous batching over ``runner`` on a thread of its own (see the module docstring).

    Args:
        runner: a ``BatchRunner`` (or ``SequentialBatch``): its ``slots`` bound the running sequences.
        tokenizer: turns generated ids into text (None: texts are empty).
        eos_ids: token ids that end a sequence.
        max_queue: requests waiting for a slot at most (beyond those a free slot takes at the next step); more are
            refused with :class:`QueueFull`.
        prefill_chunk: prompt tokens entered per step at most.
        on_step: called after each step with (sequences stepped, tokens generated, seconds) (metrics).
    """

    def __init__(
        self, runner, tokenizer, eos_ids: set[int], max_queue: int = 64, prefill_chunk: int = 256,
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> None:  # fmt: skip
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.on_step = on_step
        self.waiting: deque[Request] = deque()
        self.running: list[_Sequence] = []
        self._free = list(range(runner.slots))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="moerun-engine", daemon=True)
        self._started = False

    @property
    def context(self) -> int:
        return self.runner.max_seq_len

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request. Raises QueueFull when ``max_queue`` wait already, EngineStopped when shutting down,
        ValueError when its prompt leaves no room in the context."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(request.prompt_ids) >= self.context:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; the context holds {self.context}")
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue + len(self._free):  # a free slot takes one at the next step
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(request)
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy(self) -> int:
        """Requests running or waiting."""
        return len(self.waiting) + len(self.running)

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self, deadline_s: float) -> None:
        """Stop accepting, let running and waiting requests finish for up to ``deadline_s``, cancel the rest,
        and stop the thread."""
        self.stop_accepting()
        end = time.monotonic() + deadline_s
        while self.busy and time.monotonic() < end:
            time.sleep(0.02)
        with self._lock:
            for request in [*self.waiting, *(s.request for s in self.running)]:
                request.cancel()
        self._wake.set()
        deadline = max(0.0, end - time.monotonic()) + 5.0
        while self.busy and self._started and self._thread.is_alive() and deadline > 0:
            time.sleep(0.02)
            deadline -= 0.02
        self._stop = True
        self._wake.set()
        if self._started:
            self._thread.join(timeout=5.0)

    # The engine thread.

    def _loop(self) -> None:
        while not self._stop:
            if not self.running and not self.waiting:
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as e:  # a failed step ends its sequences, not the server
                for seq in list(self.running):
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def _admit(self) -> None:
        now = time.monotonic()
        with self._lock:
            # Requests cancelled or out of time while they waited leave the queue now, not when a slot frees.
            for request in [r for r in self.waiting if r.cancelled or (r.deadline is not None and now > r.deadline)]:
                self.waiting.remove(request)
                self._finish_unadmitted(request, "cancelled" if request.cancelled else "timeout")
            while self.waiting and self._free:
                request = self.waiting.popleft()
                slot = self._free.pop()
                self.runner.reset(slot)
                params = request.params
                generator = torch.Generator()
                generator.manual_seed(params.seed if params.seed is not None else torch.seed())
                decoder = None if self.tokenizer is None else _IncrementalDecoder(self.tokenizer, request.prompt_ids)
                max_new = min(params.max_tokens, self.context - len(request.prompt_ids))
                self.running.append(_Sequence(request, slot, max_new, generator, decoder))

    def _step(self) -> None:
        self._admit()
        now = time.monotonic()
        for seq in list(self.running):
            request = seq.request
            if request.cancelled:
                self._finish(seq, "cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(seq, "timeout")
        items, stepped, chunk_given = [], [], False
        for seq in self.running:
            prompt = seq.request.prompt_ids
            if seq.prefilled < len(prompt):
                if chunk_given:
                    continue  # one prompt chunk a step: the others wait, decode tokens go on
                chunk_given = True
                ids = prompt[seq.prefilled : seq.prefilled + self.prefill_chunk]
            else:
                ids = seq.generated[-1:]
            items.append(WorkItem(seq.slot, torch.tensor(ids, dtype=torch.int64)))
            stepped.append((seq, len(ids)))
        if not items:
            return
        started = time.perf_counter()
        logits = self.runner.step(items)  # [B, V]
        generated = 0
        for row, (seq, n) in enumerate(stepped):
            if seq.prefilled < len(seq.request.prompt_ids):
                seq.prefilled += n
                if seq.prefilled < len(seq.request.prompt_ids):
                    continue  # more prompt to enter; its logits are not a prediction anyone asked for
            generated += 1
            self._next_token(seq, logits[row])
        if self.on_step is not None:
            self.on_step(len(items), generated, time.perf_counter() - started)

    def _next_token(self, seq: _Sequence, logits: torch.Tensor) -> None:
        request, params = seq.request, seq.request.params
        token = sample_next(logits, params.temperature, params.top_p, seq.generator)
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        seq.generated.append(token)
        eos = token in self.eos_ids
        done = eos or len(seq.generated) >= seq.max_new
        logprob = None
        if params.logprobs is not None:
            logprob = token_logprobs(logits, token, params.logprobs, self._token_text)
        text = "" if seq.decoder is None or eos else seq.decoder.push(token, final=done)
        released, seq.pending, stopped = release_text(seq.pending + text, params.stop)
        if logprob is not None:
            seq.logprobs.append(logprob)
        # One event a token (its text may be held back: then its log probabilities wait for it too).
        held = bool(seq.pending) and not stopped
        request.emit(Event(text=released, logprobs=() if held else tuple(seq.logprobs), tokens=1))
        if not held:
            seq.logprobs = []
        if stopped or eos:
            self._finish(seq, "stop")
        elif done:
            self._finish(seq, "length")

    def _token_text(self, token: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode([token])

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        request = seq.request
        if reason in ("length", "stop") and seq.pending:  # held back, and it never became a stop string
            request.emit(Event(text=seq.pending, logprobs=tuple(seq.logprobs)))
            seq.pending = ""
        if seq in self.running:
            self.running.remove(seq)
        self._free.append(seq.slot)
        request.emit(Event(finish_reason=reason, prompt_tokens=len(request.prompt_ids),
                           completion_tokens=len(seq.generated), error=error))  # fmt: skip

    def _finish_unadmitted(self, request: Request, reason: str) -> None:
        request.emit(Event(finish_reason=reason, prompt_tokens=len(request.prompt_ids)))


def events_of(engine: Engine, prompt_ids: list[int], params: SamplingParams, timeout_s: float | None = None):
    """Submit a request and iterate its events on this thread until the final one (tests, benchmarks)."""
    events: queue.Queue[Event] = queue.Queue()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    request = Request(prompt_ids, params, events.put, deadline)
    engine.submit(request)
    while True:
        event = events.get(timeout=None if timeout_s is None else max(1.0, timeout_s * 2))
        yield event
        if event.finish_reason is not None:
            return
