"""An OpenAI-compatible HTTP API over the serving engine, on FastAPI (run by uvicorn: ``moerun serve``).

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template), ``/v1/models``,
``/health`` (503 while the model loads; no key needed) and ``/metrics`` (Prometheus text). Responses stream
as server-sent events when asked (with ``stream_options.include_usage``). Errors are OpenAI-style JSON
``{"error": {"message", "type", "param", "code"}}``: 400 naming the bad field, 401, 404 for an unknown model,
413 for a prompt the context cannot hold, 429 with ``Retry-After`` when the queue is full, 503 while loading
or shutting down.

The model loads on a thread of its own after the server starts listening; the engine steps on another
(:mod:`moerun.serve.engine`); events cross to the event loop through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineStopped, Event, QueueFull, SamplingParams
from .engine import Request as EngineRequest

log = logging.getLogger("moerun.serve")

MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take; unknown fields are ignored, as OpenAI's own server does for new ones."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Literal[False] = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


@dataclass
class ServerConfig:
    """What ``moerun serve`` sets: the name the model is served under, the API key (None: no key), per-request
    timeout in seconds (None: none), default ``max_tokens``, and the seconds a SIGTERM leaves running requests."""

    model_name: str
    api_key: str | None = None
    timeout_s: float | None = None
    default_max_tokens: int = 256
    shutdown_deadline_s: float = 30.0


@dataclass
class Loaded:
    """A loaded model ready to serve: its engine (not started), tokenizer and expert cache (or None)."""

    engine: Engine
    tokenizer: Any
    cache: Any = None


@dataclass
class _State:
    loaded: Loaded | None = None
    load_error: str | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may share a process)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("moerun_requests", "Requests answered, by endpoint and HTTP status.",
                                ["endpoint", "status"], registry=registry)  # fmt: skip
        self.prompt_tokens = Counter("moerun_prompt_tokens", "Prompt tokens of admitted requests.", registry=registry)
        self.generated_tokens = Counter("moerun_generation_tokens", "Tokens generated.", registry=registry)
        self.queue_depth = Gauge("moerun_queue_depth", "Requests waiting for a slot.", registry=registry)
        self.running = Gauge("moerun_running_sequences", "Sequences in the batch.", registry=registry)
        self.batch_size = Gauge("moerun_batch_size", "Sequences in the last engine step.", registry=registry)
        self.tokens_per_s = Gauge("moerun_generation_tokens_per_second",
                                  "Tokens generated per second over the last steps.", registry=registry)  # fmt: skip
        self.cache_hit_rate = Gauge("moerun_expert_cache_hit_rate", "Share of expert lookups the expert cache held "
                                    "(NaN without an expert cache).", registry=registry)  # fmt: skip
        self.ttft = Histogram("moerun_time_to_first_token_seconds", "Time to first token.", registry=registry)
        self.duration = Histogram("moerun_request_duration_seconds", "Request duration.", registry=registry)
        self._window: list[tuple[float, int]] = []  # (end time, tokens) of recent steps
        self._lock = threading.Lock()

    def on_step(self, sequences: int, tokens: int, seconds: float) -> None:
        """Called by the engine after each step."""
        now = time.monotonic()
        with self._lock:
            self._window = [(t, n) for t, n in self._window if now - t < 5.0] + [(now, tokens)]
            span = max(now - self._window[0][0] + seconds, 1e-9)
            self.tokens_per_s.set(sum(n for _, n in self._window) / span)
        self.batch_size.set(sequences)
        self.generated_tokens.inc(tokens)


def _check_key(request: Request, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                       code="invalid_api_key")  # fmt: skip


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4:
        raise APIError(400, "stop takes at most 4 sequences", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must not be empty", param="stop")
    return stops


def _prompt_ids(body: CompletionRequest | ChatRequest, tokenizer) -> list[int]:
    if isinstance(body, CompletionRequest):
        if isinstance(body.prompt, list):
            if not body.prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            return list(body.prompt)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        ids = list(tokenizer.encode(body.prompt))
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        return ids
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": _text_content(m.content)} for m in body.messages]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # templates raise their own errors (roles out of order, ...)
        raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _text_content(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(400, f"message content of type {part.get('type')!r} is not supported (text only)",
                           param="messages")  # fmt: skip
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def create_app(load: Callable[[], Loaded], config: ServerConfig) -> FastAPI:
    """The API over the model ``load`` returns (called on a thread once the server runs).

    Args:
        load: loads the model and builds its engine (not started); an exception makes /health report it.
        config: the server's settings.
    """
    state = _State()
    metrics = Metrics(state.registry)

    def load_in_background() -> None:
        try:
            loaded = load()
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", state.load_error)
            return
        loaded.engine.on_step = metrics.on_step
        metrics.queue_depth.set_function(lambda: loaded.engine.queue_depth)
        metrics.running.set_function(lambda: len(loaded.engine.running))
        if loaded.cache is not None:
            metrics.cache_hit_rate.set_function(lambda: loaded.cache.report().get("hit_rate") or 0.0)
        else:
            metrics.cache_hit_rate.set(float("nan"))
        loaded.engine.start()
        state.loaded = loaded
        log.info("model %s ready: %d slots, context %d", config.model_name, loaded.engine.runner.slots,
                 loaded.engine.context)  # fmt: skip

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_in_background, name="moerun-load", daemon=True)
        loader.start()
        yield
        if state.loaded is not None:
            await asyncio.to_thread(state.loaded.engine.shutdown, config.shutdown_deadline_s)

    app = FastAPI(title="moerun", lifespan=lifespan)
    app.state.moerun = state

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid body"))
        return APIError(400, message, param=param).response()

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def ready() -> Loaded:
        if state.load_error is not None:
            raise APIError(503, f"the model failed to load: {state.load_error}", "server_error")
        if state.loaded is None:
            raise APIError(503, "the model is still loading", "server_error", headers={"Retry-After": "1"})
        return state.loaded

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.loaded is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _check_key(request, config)
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "moerun"}
        return JSONResponse({"object": "list", "data": [card]})

    async def run(request: Request, body: CompletionRequest | ChatRequest, chat: bool):
        _check_key(request, config)
        loaded = ready()
        if body.model is not None and body.model != config.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        prompt_ids = _prompt_ids(body, loaded.tokenizer)
        engine = loaded.engine
        if len(prompt_ids) >= engine.context:
            raise APIError(413, f"the prompt has {len(prompt_ids)} tokens; the context holds {engine.context} "
                           "(one at least is left to generate)", param="messages" if chat else "prompt",
                           code="context_length_exceeded")  # fmt: skip
        max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        if chat:
            top = (body.top_logprobs or 0) if body.logprobs else None
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        else:
            top = body.logprobs
        params = SamplingParams(
            max_tokens=max_tokens or config.default_max_tokens, temperature=body.temperature, top_p=body.top_p,
            seed=body.seed, stop=_stops(body.stop), logprobs=top,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        deadline = None if config.timeout_s is None else time.monotonic() + config.timeout_s
        job = EngineRequest(prompt_ids, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), deadline)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error") from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        metrics.prompt_tokens.inc(len(prompt_ids))
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        reply = _Reply(ident, config.model_name, chat, job, metrics)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.stream(events, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        return await reply.whole(events, request)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await run(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await run(request, body, chat=True)

    return app


class _Reply:
    """One request's answer in OpenAI's shapes, whole or streamed, from its engine events."""

    def __init__(self, ident: str, model: str, chat: bool, job: EngineRequest, metrics: Metrics) -> None:
        self.ident, self.model, self.chat, self.job, self.metrics = ident, model, chat, job, metrics
        self.created = int(time.time())

    def _logprobs(self, event: Event) -> dict | None:
        if self.job.params.logprobs is None:
            return None
        if self.chat:
            return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                                  for t, v in lp.top]} for lp in event.logprobs]}  # fmt: skip
        return {"tokens": [lp.token for lp in event.logprobs],
                "token_logprobs": [lp.logprob for lp in event.logprobs],
                "top_logprobs": [dict(lp.top) for lp in event.logprobs], "text_offset": []}  # fmt: skip

    @staticmethod
    def _usage(final: Event) -> dict:
        return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
                "total_tokens": final.prompt_tokens + final.completion_tokens}  # fmt: skip

    def _failure(self, final: Event) -> APIError | None:
        if final.finish_reason == "timeout":
            return APIError(408, "the request timed out", "timeout_error", code="timeout")
        if final.finish_reason == "cancelled":
            return APIError(503, "the request was cancelled: the server is shutting down", "server_error")
        if final.finish_reason == "error":
            return APIError(500, f"generation failed: {final.error}", "server_error")
        return None

    def _log(self, final: Event, status: int) -> None:
        job = self.job
        elapsed = time.monotonic() - job.submitted
        ttft = None if job.first_token_at is None else job.first_token_at - job.submitted
        if ttft is not None:
            self.metrics.ttft.observe(ttft)
        self.metrics.duration.observe(elapsed)
        log.info("%s %s %d prompt=%d completion=%d finish=%s %.2fs ttft=%s", self.ident,
                 "chat" if self.chat else "completion", status, final.prompt_tokens, final.completion_tokens,
                 final.finish_reason, elapsed, "-" if ttft is None else f"{ttft:.2f}s")  # fmt: skip

    async def whole(self, events: asyncio.Queue[Event], request: Request) -> JSONResponse:
        texts, logprobs = [], []
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.job.cancel()  # the client is gone: free its slot at the next step
                continue
            texts.append(event.text)
            logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                break
        failure = self._failure(event)
        if failure is not None:
            self._log(event, failure.status)
            raise failure
        text = "".join(texts)
        merged = Event(text=text, logprobs=tuple(logprobs))
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self._logprobs(merged), "finish_reason": event.finish_reason}  # fmt: skip
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(merged),
                      "finish_reason": event.finish_reason}  # fmt: skip
            obj = "text_completion"
        self._log(event, 200)
        return JSONResponse({"id": self.ident, "object": obj, "created": self.created, "model": self.model,
                             "choices": [choice], "usage": self._usage(event)})  # fmt: skip

    def _chunk(self, delta: dict | None, text: str, event: Event | None, finish: str | None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None if event is None else
                      self._logprobs(event), "finish_reason": finish}  # fmt: skip
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None if event is None else self._logprobs(event),
                      "finish_reason": finish}  # fmt: skip
            obj = "text_completion"
        body = {"id": self.ident, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, events: asyncio.Queue[Event], include_usage: bool) -> AsyncIterator[str]:
        final = None
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""}, "", None, None)
            while True:
                event = await events.get()
                if event.finish_reason is not None:
                    final = event
                    break
                if event.text or event.logprobs or event.tokens:  # a chunk a token, its text possibly held back
                    yield self._chunk({"content": event.text}, event.text, event, None)
            failure = self._failure(final)
            if failure is not None:
                error = {"message": failure.message, "type": failure.type, "param": None, "code": failure.code}
                yield f"data: {json.dumps({'error': error})}\n\n"
            else:
                yield self._chunk({}, "", None, final.finish_reason)
                if include_usage:
                    body = {
                        "id": self.ident,
                        "object": "chat.completion.chunk" if self.chat else "text_completion",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": self._usage(final),
                    }
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if final is None:  # the client went away mid-stream: free its slot at the next step
                self.job.cancel()
            else:
                failure = self._failure(final)
                self._log(final, 200 if failure is None else failure.status)
