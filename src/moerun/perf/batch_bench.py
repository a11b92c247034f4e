"""Concurrent sequences through the serving engine: throughput, latency, and the bytes each decode step reads.

For each concurrency C, C requests with random prompts go to an :class:`~moerun.serve.engine.Engine` of C
slots at once (prompts enter a chunk per step, as a server admits them) and each generates a fixed number
of tokens (no EOS). Reported per C:

- aggregate decode tokens/s: tokens generated while all C sequences decode together, over that time; per
  sequence: the same over C;
- time to first token and inter-token latency (p50, p99) as the requests saw them;
- per decode step of all C sequences, the bytes it must read: the distinct experts the batch selected in
  each MoE layer (counted by the layers' own routers), every other weight once (embedding rows aside), and
  the sequences' KV caches; the time that takes at the host's measured read bandwidth (the bound), and the
  measured step time's share of it.

Shape legend: C concurrent sequences, E experts of a layer.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models.quantized import make_int4_layouts, moe_layers
from ..quant.formats import weight_nbytes
from ..runtime.batch import BatchRunner, make_batch_runner
from ..serve.engine import Engine, Event, Request, SamplingParams


@dataclass
class ConcurrencyRecord:
    """One concurrency's measurements (see the module docstring); times in ms, bytes per decode step."""

    concurrency: int
    aggregate_tokens_per_s: float
    per_sequence_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    distinct_experts_per_layer: float
    expert_bytes: int
    shared_bytes: int
    kv_bytes: int
    step_ms: float
    bound_ms: float

    @property
    def share_of_bound(self) -> float:
        return self.bound_ms / self.step_ms if self.step_ms > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "share_of_bound": self.share_of_bound}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _ExpertCounter:
    """Counts, per call of each MoE layer with ``tokens`` rows, the distinct experts its router selects."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = list(moe_layers(model).values())
        self.counts: list[tuple[int, int, int]] = []  # (layer, tokens, distinct experts)
        self._handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(layer, inputs) -> None:
            x = inputs[0].reshape(-1, layer.hidden_size)
            _, ids = layer.select_experts(x)
            self.counts.append((index, x.shape[0], int(ids[ids < layer.num_experts].unique().numel())))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _expert_nbytes(model: nn.Module) -> list[int]:
    """Bytes of one routed expert (gate_up and down) of each MoE layer, in its stored format."""
    sizes = []
    for layer in moe_layers(model).values():
        experts = layer.experts
        total = weight_nbytes(experts.gate_up) + weight_nbytes(experts.down)
        sizes.append(total // layer.num_experts)
    return sizes


def _shared_nbytes(model: nn.Module) -> int:
    """Bytes a step reads once whatever the batch: every weight but the routed experts and the embedding table."""
    from ..models.quantized import model_nbytes

    routed = sum(weight_nbytes(layer.experts.gate_up) + weight_nbytes(layer.experts.down)
                 for layer in moe_layers(model).values())  # fmt: skip
    embedding = model.get_input_embeddings().weight
    tied = model.lm_head.weight is embedding
    return model_nbytes(model) - routed - (0 if tied else embedding.numel() * embedding.element_size())


def run_concurrency(
    model: nn.Module, concurrency: int, prompt_tokens: int, decode_tokens: int, read_gbps: float, seed: int = 0
) -> ConcurrencyRecord:
    """Measure one concurrency (see the module docstring) on a fresh engine of ``concurrency`` slots."""
    runner = make_batch_runner(model, concurrency, prompt_tokens + decode_tokens + 1)
    engine = Engine(runner, None, set(), max_queue=concurrency, prefill_chunk=prompt_tokens)
    vocab = model.lm_head.weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, min(vocab, 4096), (prompt_tokens,), generator=generator).tolist()
               for _ in range(concurrency)]  # fmt: skip
    step_times: list[tuple[int, float]] = []  # (sequences, seconds) of each step
    engine.on_step = lambda sequences, tokens, seconds: step_times.append((sequences, seconds))
    engine.start()
    try:
        make_int4_layouts(model)  # as a server does at load
        _run(engine, [prompts[0]], 4)  # warm-up: first calls make allocator pools and the runner's own layouts
        step_times.clear()
        counter = _ExpertCounter(model)
        try:
            stamps = _run(engine, prompts, decode_tokens)
        finally:
            counter.remove()
    finally:
        engine.shutdown(0.0)
    firsts = [s[1][0] for s in stamps]
    ttft = [(s[1][0] - s[0]) * 1e3 for s in stamps]
    itl = [(b - a) * 1e3 for s in stamps for a, b in zip(s[1], s[1][1:], strict=False)]
    # The window where every sequence decodes: from the last first token to the first last token.
    start, end = max(firsts), min(s[1][-1] for s in stamps)
    together = sum(sum(1 for t in s[1] if start < t <= end) for s in stamps)
    aggregate = together / (end - start) if end > start else float("nan")
    decode_steps = [seconds for sequences, seconds in step_times if sequences == concurrency]
    counts = [c for c in counter.counts if c[1] == concurrency]  # decode steps of all C sequences
    layers = len(counter.layers)
    distinct = [0.0] * layers
    for layer in range(layers):
        mine = [c[2] for c in counts if c[0] == layer]
        distinct[layer] = statistics.mean(mine) if mine else float("nan")
    per_expert = _expert_nbytes(model)
    expert_bytes = int(sum(d * b for d, b in zip(distinct, per_expert, strict=True)))
    lean = runner.lean if isinstance(runner, BatchRunner) else None
    kv_bytes = 0
    if lean is not None:
        mean_position = prompt_tokens + decode_tokens // 2
        kv_bytes = (concurrency * mean_position * len(lean.layers) * 2 * lean.num_kv_heads * lean.head_dim
                    * lean.dtype.itemsize)  # fmt: skip
    shared = _shared_nbytes(model)
    step_s = statistics.median(decode_steps) if decode_steps else float("nan")
    bound_s = (expert_bytes + shared + kv_bytes) / (read_gbps * 1e9)
    return ConcurrencyRecord(
        concurrency, aggregate, aggregate / concurrency, _percentile(ttft, 0.5), _percentile(ttft, 0.99),
        _percentile(itl, 0.5), _percentile(itl, 0.99), statistics.mean(distinct), expert_bytes, shared, kv_bytes,
        step_s * 1e3, bound_s * 1e3,
    )  # fmt: skip


def _run(engine: Engine, prompts: list[list[int]], tokens: int) -> list[tuple[float, list[float]]]:
    """Submit every prompt at once; (submit time, token times) of each request once all have finished."""
    done = threading.Semaphore(0)
    stamps: list[tuple[float, list[float]]] = []

    def emit_into(times: list[float]):
        def emit(event: Event) -> None:
            if event.finish_reason is not None:
                done.release()
            elif event.tokens:
                times.append(time.monotonic())

        return emit

    for prompt in prompts:
        times: list[float] = []
        request = Request(prompt, SamplingParams(max_tokens=tokens, temperature=1.0, seed=len(stamps)),
                          emit_into(times))  # fmt: skip
        stamps.append((request.submitted, times))
        engine.submit(request)
    for _ in prompts:
        done.acquire()
    return stamps
