"""The serving engine: concurrent requests each get their solo output; stop strings are never leaked; limits,
cancellation, timeouts, queueing and shutdown."""

from __future__ import annotations

import queue
import time

import pytest

import moerun
from moerun.assets import REFERENCE_MODEL_DIR
from moerun.runtime.batch import BatchRunner
from moerun.runtime.generate import eos_token_ids, generate
from moerun.serve.engine import (
    Engine,
    EngineStopped,
    Event,
    QueueFull,
    Request,
    SamplingParams,
    events_of,
    release_text,
)


@pytest.mark.parametrize(
    ("pending", "stops", "expected"),
    [
        ("abc", (), ("abc", "", False)),
        ("hello", ("lo!",), ("hel", "lo", False)),
        ("hello world", ("wor",), ("hello ", "", True)),
        ("ab", ("abc", "b"), ("a", "", True)),  # the earliest stop wins
        ("xa", ("ab", "aab"), ("x", "a", False)),
        ("xaa", ("aab",), ("x", "aa", False)),  # the longest possible start is held
        ("stop", ("stop",), ("", "", True)),
        ("", ("x",), ("", "", False)),
    ],
)
def test_release_text(pending, stops, expected) -> None:
    assert release_text(pending, stops) == expected


@pytest.fixture(scope="module")
def reference():
    return moerun.load(REFERENCE_MODEL_DIR, "fp32")


def make_engine(reference, slots: int = 3, max_queue: int = 16, chunk: int = 4, context: int = 128) -> Engine:
    runner = BatchRunner(reference.model, slots, context)
    return Engine(runner, reference.tokenizer, eos_token_ids(reference.model), max_queue, chunk)


def collect(engine: Engine, prompts: list[str], params: list[SamplingParams]) -> list[list[Event]]:
    """Submit every prompt at once and return each request's events."""
    queues = [queue.Queue() for _ in prompts]
    for q, prompt, p in zip(queues, prompts, params, strict=True):
        engine.submit(Request(list(engine.tokenizer.encode(prompt)), p, q.put))
    out = []
    for q in queues:
        events = []
        while not events or events[-1].finish_reason is None:
            events.append(q.get(timeout=60))
        out.append(events)
    return out


PROMPTS = ["Once upon a time", "The", "In the beginning the", "A small dog", "She said that the weather"]


def test_concurrent_requests_each_get_their_solo_output(reference) -> None:
    """Five greedy requests on three slots (two wait for a slot), prompts entered 4 tokens a step beside the
    others' decoding: each text and token count equals a solo ``generate``."""
    engine = make_engine(reference)
    engine.start()
    try:
        results = collect(engine, PROMPTS, [SamplingParams(max_tokens=12, temperature=0.0)] * len(PROMPTS))
    finally:
        engine.shutdown(1.0)
    for prompt, events in zip(PROMPTS, results, strict=True):
        solo = generate(reference, prompt=prompt, max_new_tokens=12)
        assert "".join(e.text for e in events) == solo.text
        final = events[-1]
        assert final.completion_tokens == len(solo.token_ids) == sum(e.tokens for e in events)
        assert final.prompt_tokens == len(reference.tokenizer.encode(prompt))
        assert final.finish_reason == ("stop" if solo.stop_reason == "eos" else "length")


def test_stop_string_ends_the_output_and_never_leaks(reference) -> None:
    solo = generate(reference, prompt=PROMPTS[0], max_new_tokens=24).text
    stop = solo[len(solo) // 2 : len(solo) // 2 + 3]
    assert len(stop) == 3 and stop in solo
    engine = make_engine(reference)
    engine.start()
    try:
        (events,) = collect(engine, PROMPTS[:1], [SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,))])
    finally:
        engine.shutdown(1.0)
    assert events[-1].finish_reason == "stop"
    text = "".join(e.text for e in events)
    assert text == solo[: solo.index(stop)]
    sent = ""
    for e in events:  # no event ever sent a piece of the stop string that a later one takes back
        sent += e.text
        assert solo.startswith(sent) and stop not in sent


def test_seeded_sampling_repeats_and_logprobs_are_reported(reference) -> None:
    engine = make_engine(reference)
    engine.start()
    try:
        params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5, logprobs=3)
        a, b = collect(engine, PROMPTS[:2], [params, params])
        (again,) = collect(engine, PROMPTS[:1], [params])
    finally:
        engine.shutdown(1.0)
    assert "".join(e.text for e in a) == "".join(e.text for e in again)
    logprobs = [lp for e in a for lp in e.logprobs]
    assert len(logprobs) == a[-1].completion_tokens
    for lp in logprobs:
        values = [v for _, v in lp.top]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert lp.logprob <= values[0] + 1e-6 and all(v <= 0 for v in values)


def test_cancel_frees_the_slot_at_the_next_step(reference) -> None:
    engine = make_engine(reference, slots=1)
    engine.start()
    try:
        events: queue.Queue[Event] = queue.Queue()
        request = Request(list(reference.tokenizer.encode("The")), SamplingParams(max_tokens=100), events.put)
        engine.submit(request)
        events.get(timeout=30)
        request.cancel()
        while (event := events.get(timeout=30)).finish_reason is None:
            pass
        assert event.finish_reason == "cancelled" and event.completion_tokens < 100
        time.sleep(0.05)
        assert not engine.running and engine._free == [0]
    finally:
        engine.shutdown(1.0)


def test_queue_bound_and_refusals(reference) -> None:
    """Not started: one request takes the free slot's place, one the queue's, the third is refused."""
    engine = make_engine(reference, slots=1, max_queue=1)
    ids = list(reference.tokenizer.encode("The"))
    engine.submit(Request(ids, SamplingParams(), lambda e: None))
    engine.submit(Request(ids, SamplingParams(), lambda e: None))
    with pytest.raises(QueueFull):
        engine.submit(Request(ids, SamplingParams(), lambda e: None))
    with pytest.raises(ValueError, match="context holds 128"):
        engine.submit(Request(list(range(128)), SamplingParams(), lambda e: None))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], SamplingParams(), lambda e: None))
    engine.stop_accepting()
    with pytest.raises(EngineStopped):
        engine.submit(Request(ids, SamplingParams(), lambda e: None))


def test_timeouts_and_context_end_requests(reference) -> None:
    engine = make_engine(reference, context=16)
    engine.start()
    try:
        ids = list(reference.tokenizer.encode("The"))
        late = list(events_of(engine, ids, SamplingParams(max_tokens=5), timeout_s=-1.0))
        assert late[-1].finish_reason == "timeout"
        # max_tokens beyond the context: the context ends it
        events = list(events_of(engine, ids, SamplingParams(max_tokens=100, temperature=0.0)))
        assert events[-1].finish_reason in ("length", "stop")
        assert events[-1].completion_tokens <= 16 - len(ids)
    finally:
        engine.shutdown(1.0)


def test_shutdown_cancels_what_outlives_the_deadline(reference) -> None:
    engine = make_engine(reference, slots=1)
    engine.start()
    events: queue.Queue[Event] = queue.Queue()
    ids = list(reference.tokenizer.encode("The"))
    engine.submit(Request(ids, SamplingParams(max_tokens=110), events.put))
    engine.submit(Request(ids, SamplingParams(max_tokens=5), events.put))
    events.get(timeout=30)
    started = time.monotonic()
    engine.shutdown(0.0)
    assert time.monotonic() - started < 10
    finals = []
    while not events.empty():
        e = events.get()
        if e.finish_reason:
            finals.append(e.finish_reason)
    assert finals.count("cancelled") >= 1 and len(finals) == 2
    assert not engine._thread.is_alive()


def test_a_failing_step_ends_its_requests_with_an_error(reference, monkeypatch) -> None:
    engine = make_engine(reference)

    def broken(items):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.runner, "step", broken)
    engine.start()
    try:
        results = collect(engine, ["The", "A small", "Once"], [SamplingParams(max_tokens=3)] * 3)
    finally:
        engine.shutdown(1.0)
    for events in results:  # every sequence of the failed step ends, and the engine goes on
        assert events[-1].finish_reason == "error" and "boom" in events[-1].error
    assert not engine.running and sorted(engine._free) == [0, 1, 2]


def test_a_request_cancelled_while_queued_leaves_at_once(reference) -> None:
    """One slot busy with a long request: a queued request that is cancelled ends at the next step, not when
    the slot frees."""
    engine = make_engine(reference, slots=1)
    engine.eos_ids = set()
    engine.start()
    try:
        long_events: queue.Queue[Event] = queue.Queue()
        ids = list(reference.tokenizer.encode("The"))
        engine.submit(Request(ids, SamplingParams(max_tokens=100), long_events.put))
        long_events.get(timeout=30)
        waiting: queue.Queue[Event] = queue.Queue()
        queued = Request(ids, SamplingParams(max_tokens=5), waiting.put)
        engine.submit(queued)
        queued.cancel()
        final = waiting.get(timeout=30)
        assert final.finish_reason == "cancelled" and final.completion_tokens == 0
        assert engine.running and long_events.qsize() < 99  # the long one still runs
    finally:
        engine.shutdown(0.0)
