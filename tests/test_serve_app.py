"""The OpenAI-compatible server, started on 127.0.0.1 inside the tests and called with the real ``openai``
client (sync and async, streaming and not): outputs equal solo runs, 16 concurrent streams, disconnects,
bad requests and their statuses, the API key, loading, the queue bound, timeouts, SIGTERM and a short soak."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

import moerun
from moerun.assets import REFERENCE_MODEL_DIR
from moerun.runtime.generate import generate
from moerun.serve.app import Loaded, ServerConfig, create_app
from moerun.serve.server import serving

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"
MODEL = "reference"


@pytest.fixture(scope="module")
def reference():
    return moerun.load(REFERENCE_MODEL_DIR, "fp32")


@contextmanager
def running_server(load: Callable[[], Loaded], config: ServerConfig, wait_ready: bool = True) -> Iterator[tuple]:
    """A uvicorn server on 127.0.0.1 and a free port, on a thread; yields (base URL, app)."""
    app = create_app(load, config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    while wait_ready and httpx.get(f"{base}/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.02)
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(reference):
    config = ServerConfig(MODEL, api_key=KEY, default_max_tokens=16)
    with running_server(lambda: serving(reference, max_batch=4, context=256, max_queue=64), config) as (base, app):
        yield base, app


def client(base: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def solo(reference, prompt: str | list[int], tokens: int) -> str:
    return generate(reference, prompt=prompt, max_new_tokens=tokens).text


PROMPTS = [f"{start} the" for start in ("Once upon a time", "The old man said", "In the morning", "She looked at")]


def test_completions_and_chat_match_solo_runs(server, reference) -> None:
    base, _ = server
    c = client(base)
    done = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert done.choices[0].text == solo(reference, PROMPTS[0], 10)
    assert done.usage.completion_tokens == 10 and done.usage.total_tokens == done.usage.prompt_tokens + 10
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    prompt = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert prompt["input_ids"][0] == reference.tokenizer.bos_token_id  # the template starts as encode() does
    assert chat.choices[0].message.content == solo(reference, prompt["input_ids"], 8)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_streams_with_usage_equal_whole_answers(server, reference) -> None:
    base, _ = server
    c = client(base)
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == solo(reference, PROMPTS[1], 10)
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                       temperature=0, stream=True)  # fmt: skip
    deltas = [ch.choices[0].delta for ch in stream]
    assert deltas[0].role == "assistant"
    whole = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                      temperature=0)  # fmt: skip
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content


def test_sixteen_concurrent_streams_each_equal_their_solo_run(server, reference) -> None:
    base, _ = server
    prompts = [f"{PROMPTS[i % 4]} {word}" for i, word in enumerate("abcdefghijklmnop")]
    expected = [solo(reference, p, 12) for p in prompts]

    async def one(c, prompt: str) -> str:
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def all_of() -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(all_of()) == expected


def test_stop_logprobs_and_seed(server, reference) -> None:
    base, _ = server
    c = client(base)
    full = solo(reference, PROMPTS[2], 16)
    stop = full[6:9]
    stream = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop],
                                  stream=True)  # fmt: skip
    streamed = "".join(ch.choices[0].text for ch in stream if ch.choices)
    assert streamed == full[: full.index(stop)]
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 for t in content)
    legacy = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.token_logprobs) == 3
    a, b = (c.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, temperature=1.0, seed=11)
            for _ in range(2))  # fmt: skip
    assert a.choices[0].text == b.choices[0].text


def test_models_health_metrics_and_the_key(server) -> None:
    base, _ = server
    assert [m.id for m in client(base).models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong").models.list()
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    client(base).completions.create(model=MODEL, prompt="The", max_tokens=2)
    metrics = httpx.get(f"{base}/metrics").text
    for name in ("moerun_requests_total", "moerun_prompt_tokens_total", "moerun_generation_tokens_total",
                 "moerun_queue_depth", "moerun_batch_size", "moerun_generation_tokens_per_second",
                 "moerun_expert_cache_hit_rate", "moerun_time_to_first_token_seconds"):  # fmt: skip
        assert name in metrics
    assert 'moerun_requests_total{endpoint="/v1/completions",status="200"}' in metrics


BAD_REQUESTS = [
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("completions", {"model": MODEL, "prompt": list(range(300))}, 413, "prompt"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages"),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, endpoint, body, status, param) -> None:
    base, _ = server
    response = httpx.post(f"{base}/v1/{endpoint}", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_unparsable_body_and_unknown_path(server) -> None:
    base, _ = server
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{base}/v1/completions", content=b"{not json", headers=auth)
    assert response.status_code == 400 and "error" in response.json()
    assert httpx.get(f"{base}/v1/nothing", headers=auth).json()["error"]["type"] == "not_found_error"


def test_a_client_that_disconnects_frees_its_sequence(reference) -> None:
    load = lambda: without_eos(serving(reference, max_batch=2, context=512))  # noqa: E731
    with running_server(load, ServerConfig(MODEL)) as (base, app):
        engine = app.state.moerun.loaded.engine
        body = {"model": MODEL, "prompt": "The", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            assert engine.running  # running until the client goes: the block closes the connection
        deadline = time.monotonic() + 10
        while engine.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.busy
        generated = [line for line in httpx.get(f"{base}/metrics").text.splitlines()
                     if line.startswith("moerun_generation_tokens_total")]  # fmt: skip
        assert float(generated[0].split()[-1]) < 400  # stopped early, not run to max_tokens


def test_health_answers_503_while_loading(reference) -> None:
    gate = threading.Event()

    def slow_load() -> Loaded:
        gate.wait(30)
        return serving(reference, max_batch=1, context=64)

    with running_server(slow_load, ServerConfig(MODEL), wait_ready=False) as (base, _):
        assert httpx.get(f"{base}/health").status_code == 503
        response = httpx.post(f"{base}/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def without_eos(loaded: Loaded) -> Loaded:
    """Requests then end at max_tokens only (a long request stays running however the model continues)."""
    loaded.engine.eos_ids = set()
    return loaded


def test_a_full_queue_answers_429_and_timeouts_408(reference) -> None:
    config = ServerConfig(MODEL, timeout_s=60)
    load = lambda: without_eos(serving(reference, max_batch=1, context=256, max_queue=0))  # noqa: E731
    with running_server(load, config) as (base, app):
        engine = app.state.moerun.loaded.engine
        body = {"model": MODEL, "prompt": "The", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            busy = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
        deadline = time.monotonic() + 10
        while engine.busy and time.monotonic() < deadline:
            time.sleep(0.02)
    load = lambda: without_eos(serving(reference, max_batch=1, context=256))  # noqa: E731
    with running_server(load, ServerConfig(MODEL, timeout_s=0.05)) as (base, _):
        response = httpx.post(f"{base}/v1/completions", json={"prompt": "The", "max_tokens": 200})
        assert response.status_code == 408 and response.json()["error"]["code"] == "timeout"


def test_soak_many_short_requests_from_threads(server) -> None:
    base, app = server
    c = client(base)
    errors, texts = [], []

    def worker(i: int) -> None:
        for j in range(4):
            try:
                r = c.completions.create(model=MODEL, prompt=PROMPTS[(i + j) % 4], max_tokens=4 + j, temperature=0)
                texts.append(r.choices[0].text)
            except Exception as e:  # collected: the test fails on any
                errors.append(e)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(texts) == 32
    assert time.monotonic() - started < 120
    assert not app.state.moerun.loaded.engine.busy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_running_requests_and_exits_0(tmp_path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moerun.cli", "serve", "--port", str(port), "--max-batch", "2", "--context", "128",
         "--dtype", "fp32", "--shutdown-deadline", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = {"prompt": "The", "max_tokens": 40, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not lines:
                    process.send_signal(signal.SIGTERM)
                lines.append(line)
        payloads = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert lines[-1] == "data: [DONE]" if lines[-1] else lines[-2] == "data: [DONE]"
        assert payloads[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
