"""Running the API: load a model for serving (batch runner and engine) and run uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading

from ..models.loader import LoadedModel
from ..models.quantized import make_int4_layouts
from ..runtime.batch import make_batch_runner
from ..runtime.generate import eos_token_ids
from .app import Loaded, ServerConfig, create_app
from .engine import Engine


def serving(loaded: LoadedModel, max_batch: int = 8, context: int | None = None, max_queue: int = 64,
            prefill_chunk: int = 256) -> Loaded:  # fmt: skip
    """A loaded model (``moerun.load``) behind an engine of ``max_batch`` slots of ``context`` positions each
    (default: the model's context, at most 4096); the engine is not started. Int4 layouts torch needs are made
    now, not during the first requests."""
    make_int4_layouts(loaded.model)
    runner = make_batch_runner(loaded.model, max_batch, context)
    engine = Engine(runner, loaded.tokenizer, eos_token_ids(loaded.model), max_queue, prefill_chunk)
    return Loaded(engine, loaded.tokenizer, loaded.cache)


def serve(load_model, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve until SIGINT/SIGTERM (then requests get ``config.shutdown_deadline_s`` to finish); returns the exit
    code: 0, or 1 when the model failed to load (the server stops then)."""
    import uvicorn

    failed = threading.Event()
    server: uvicorn.Server | None = None

    def load_or_stop() -> Loaded:
        try:
            return load_model()
        except Exception:
            failed.set()
            if server is not None:
                server.should_exit = True
            raise

    app = create_app(load_or_stop, config)
    uvicorn_config = uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=False,
        timeout_graceful_shutdown=max(1, int(config.shutdown_deadline_s)),
    )  # fmt: skip
    server = uvicorn.Server(uvicorn_config)
    # uvicorn raises the signal that stopped it again once it has shut down; answered by these, a SIGTERM or
    # Ctrl-C after a graceful shutdown ends the process with exit code 0 instead of killing it.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    if not logging.getLogger().handlers:  # one line per request on stderr, beside uvicorn's own
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed.is_set() else 0
