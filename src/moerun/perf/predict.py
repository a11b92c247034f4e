"""The performance model: how long an MoE layer, a decode step or a prefill will take on this host.

Every term comes from a measurement on this host, none from a run of the thing predicted:

- **kernel times** from the tuning table (``moerun.kernels.tuning``): ms per expert group at a rows-per-
  expert bucket, ms per dense projection at a rows bucket, for the fastest implementation ``auto`` may use;
  interpolated between buckets. Where a case was not measured, the roofline bound of its bytes and FLOPs
  stands in (and the prediction says so).
- **the roofline** (``moerun.perf.roofline``): read bandwidth for the attention's KV reads and elementwise
  passes.
- **overheads** (:func:`measure_overheads`), fitted on a tiny model of the same code path whose kernels are
  timed separately: the fixed cost of an MoE layer call (routing, plan, combine), of a decoder layer
  outside its matrices (norms, RoPE, cache writes, attention ops), and of a step outside its layers;
  and the attention's GFLOP/s; and, on a tiny model read from disk, what an offloaded MoE layer call costs
  beyond a resident one (cache lookups, slot views) and what an expert cache miss costs beyond its read.

An MoE layer of E experts and top-k at T tokens routes each expert r ~ Binomial(T, k/E) rows (uniform
routing; E (1 - (1 - k/E)^T) experts receive any on average):

    layer(T) = moe_call + E * sum over r >= 1 of P(r) group(r) + router(T) + shared(T) + 3 T k H b / BW

A decode step at position p (``hit_rate`` < 1 with experts offloaded adds the reads that miss):

    step = sum over layers [qkv(1) + o(1) + layer(1) + layer_fixed + 2 p Hkv D b / BW
                            + offloaded_call + k (1 - hit) (expert_bytes / storage_BW + miss)]
           + head(1) + step_fixed

A prefill of T tokens: per layer qkv(T) + o(T) + layer(T) + layer_fixed + causal attention FLOPs / rate
+ elementwise passes over [T, H] / BW, plus the output head on one row; offloaded, each expert the prompt
touches that is not cached is read as a miss.

Shape legend: T tokens, k experts per token, E experts, G distinct experts, H hidden, I expert
intermediate, D head dim, b bytes per value.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import measure, native, tuning
from ..layer import MoELayer
from ..offload.cache import LayerCacheStats
from ..quant.formats import QuantFormat
from .roofline import Roofline

# Elementwise passes over a [T, H] activation per decoder layer in prefill (two norms, two residual adds,
# the attention output's transpose) and over [T, qkv] (split, q/k norms, RoPE, cache writes).
_HIDDEN_PASSES = 10
_QKV_PASSES = 6


@dataclass(frozen=True)
class ModelShape:
    """What the model's size terms need of a decoder-only MoE model (every layer MoE).

    Attributes:
        num_layers, hidden, intermediate (expert I), num_experts, top_k, num_heads, num_kv_heads, head_dim,
        vocab: the config's sizes.
        shared_intermediate: the shared expert's intermediate size (0 without one).
    """

    num_layers: int
    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    shared_intermediate: int = 0

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @classmethod
    def of_layer(cls, hidden: int, intermediate: int, num_experts: int, top_k: int, shared: int = 0) -> ModelShape:
        """The shape of a lone MoE layer (the layer bench's presets)."""
        return cls(1, hidden, intermediate, num_experts, top_k, 1, 1, 1, 1, shared)

    @classmethod
    def of_config(cls, config: object) -> ModelShape:
        """The shape a transformers MoE config describes (the names its families use for each size)."""

        def first(*names: str, default: int | None = None) -> int:
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return int(value)
            if default is None:
                raise ValueError(f"{type(config).__name__} has none of {', '.join(names)}")
            return default

        hidden = first("hidden_size")
        heads = first("num_attention_heads")
        intermediate = first("moe_intermediate_size", "intermediate_size")
        shared = first("shared_expert_intermediate_size", default=0)
        if not shared:
            shared = first("n_shared_experts", default=0) * intermediate
        return cls(
            num_layers=first("num_hidden_layers"),
            hidden=hidden,
            intermediate=intermediate,
            num_experts=first("num_experts", "num_local_experts", "n_routed_experts"),
            top_k=first("num_experts_per_tok"),
            num_heads=heads,
            num_kv_heads=first("num_key_value_heads", default=heads),
            head_dim=first("head_dim", default=hidden // heads),
            vocab=first("vocab_size"),
            shared_intermediate=shared,
        )

    @classmethod
    def of_model(cls, model: nn.Module) -> ModelShape:
        """A transformers MoE CausalLM's shape, patched or not; ValueError where it has no MoE layer."""
        from .tune import moe_layer_views

        layers = moe_layer_views(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no MoE layer the performance model knows")
        first = layers[0]
        config = model.config
        attn = model.model.layers[0].self_attn
        shared = 0 if first.shared_down is None else first.shared_down.shape[1]
        return cls(
            num_layers=len(model.model.layers),
            hidden=first.hidden_size,
            intermediate=first.intermediate_size,
            num_experts=first.num_experts,
            top_k=first.routing.top_k,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=attn.head_dim,
            vocab=model.lm_head.weight.shape[0],
            shared_intermediate=shared,
        )


@dataclass(frozen=True)
class MatrixFormats:
    """The weight formats of a run: format keys of the routed experts and of the dense matrices (attention,
    shared experts, head), as ``tuning.format_key`` names them, and the activations' dtype."""

    experts: str
    dense: str
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def of(cls, dtype: torch.dtype, bits: int = 16, group_size: int = 32) -> MatrixFormats:
        """Every large matrix at ``bits`` (16 = the dtype), as ``moerun quantize --bits`` makes them."""
        name = str(dtype).removeprefix("torch.") if bits == 16 else QuantFormat(bits, group_size).name
        return cls(name, name, dtype)

    def bytes_of(self, fmt: str, rows: int, cols: int) -> int:
        if fmt in ("bfloat16", "float32", "float16"):
            return rows * cols * getattr(torch, fmt).itemsize
        return QuantFormat.parse(fmt).nbytes(rows, cols)


@dataclass(frozen=True)
class Overheads:
    """Fixed costs on this host at one thread count, in ms, and the attention's rate (see the module doc).

    The per-layer costs are measured at two hidden sizes, ``NARROW`` and ``WIDE`` (their elementwise work and
    cache footprint grow with H); :meth:`at_hidden` interpolates between them and holds the wide value beyond.
    """

    moe_call_ms: float
    decode_layer_ms: float
    decode_step_ms: float
    prefill_layer_ms: float
    attention_gflops: float
    expert_miss_ms: float  # an expert cache miss beyond its read: lookup, eviction, slot and thread handoffs
    offloaded_call_ms: float  # an offloaded MoE layer's call beyond a resident one's, all experts cached
    moe_call_wide_ms: float
    decode_layer_wide_ms: float
    prefill_layer_wide_ms: float

    NARROW: ClassVar[int] = 64
    WIDE: ClassVar[int] = 512

    def at_hidden(self, hidden: int) -> tuple[float, float, float]:
        """(MoE call, decode layer, prefill layer) ms at hidden size ``hidden``."""
        share = min(max((hidden - self.NARROW) / (self.WIDE - self.NARROW), 0.0), 1.0)
        pairs = (
            (self.moe_call_ms, self.moe_call_wide_ms),
            (self.decode_layer_ms, self.decode_layer_wide_ms),
            (self.prefill_layer_ms, self.prefill_layer_wide_ms),
        )
        moe_call, decode_layer, prefill_layer = (narrow + share * (wide - narrow) for narrow, wide in pairs)
        return moe_call, decode_layer, prefill_layer

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Overheads:
        return cls(**{k: float(d[k]) for k in cls.__dataclass_fields__ if k not in ("NARROW", "WIDE")})


@dataclass
class Prediction:
    """A predicted time and its parts (ms), and the cases the tuning table lacked (estimated from the
    roofline instead)."""

    ms: float
    parts: dict[str, float] = field(default_factory=dict)
    estimated: set[str] = field(default_factory=set)

    def add(self, part: str, ms: float) -> None:
        self.ms += ms
        self.parts[part] = self.parts.get(part, 0.0) + ms


def expected_groups(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts among ``tokens`` tokens routing to ``top_k`` each, uniformly at random."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def rows_distribution(tokens: int, p: float, spread: float = 8.0) -> list[tuple[int, float]]:
    """(rows, probability) of an expert receiving ``rows`` >= 1 of ``tokens`` tokens, each with probability
    ``p``: Binomial(T, p) without r = 0, over mean +- ``spread`` standard deviations (the rest is negligible)."""
    if tokens <= 0 or p <= 0:
        return []
    if p >= 1:
        return [(tokens, 1.0)]
    mean, sd = tokens * p, math.sqrt(tokens * p * (1 - p))
    low, high = max(1, int(mean - spread * sd)), min(tokens, int(math.ceil(mean + spread * sd)) + 1)
    log_p, log_q = math.log(p), math.log1p(-p)
    log_norm = math.lgamma(tokens + 1)
    return [
        (r, math.exp(log_norm - math.lgamma(r + 1) - math.lgamma(tokens - r + 1) + r * log_p + (tokens - r) * log_q))
        for r in range(low, high + 1)
    ]


class PerfModel:
    """Predicts times from a roofline, a tuning table and the overheads, at ``threads`` threads.

    Args:
        roofline: this host's roofline at ``threads``.
        table: this host's tuning table.
        overheads: this host's overheads at ``threads``.
        threads: the thread count the run uses.
        native: whether the native kernel runs here (which dense implementations decode uses).
    """

    def __init__(
        self, roofline: Roofline, table: tuning.TuningTable, overheads: Overheads, threads: int, native: bool
    ) -> None:
        self.roofline, self.table, self.overheads = roofline, table, overheads
        self.threads, self.native = threads, native

    # ---- kernels
    def _bound_ms(self, nbytes: float, flops: float, formats: MatrixFormats, fmt: str) -> float:
        """The roofline bound of a case in format ``fmt`` (low-bit formats compute in the fastest arithmetic)."""
        low_bit = fmt not in ("bfloat16", "float32", "float16")
        dtype = self.roofline.fastest_dtype() if low_bit else formats.dtype
        return self.roofline.time_bound_s(nbytes, flops, dtype) * 1e3

    def linear_ms(self, fmt: str, out_features: int, in_features: int, rows: int, formats: MatrixFormats,
                  pred: Prediction, decode: bool = False) -> float:  # fmt: skip
        """One dense projection of ``rows`` rows (decode: the lean runner's matrix-vector path)."""
        if decode and self.native:
            allowed: tuple[str, ...] = ("native",)
        elif fmt in ("bfloat16", "float32", "float16"):
            allowed = ("torch",)
        else:
            allowed = tuning.LINEAR_IMPLS
        ms = self.table.time_ms("linear", fmt, (out_features, in_features), rows, self.threads, allowed)
        if ms is None:
            pred.estimated.add(f"linear {fmt} {out_features}x{in_features}")
            nbytes = formats.bytes_of(fmt, out_features, in_features)
            ms = self._bound_ms(nbytes, 2 * rows * out_features * in_features, formats, fmt)
        return ms

    def group_ms(self, shape: ModelShape, formats: MatrixFormats, rows: float, pred: Prediction) -> float:
        """One expert group of ``rows`` rows (gate/up, activation, down)."""
        allowed = tuple(i for i in tuning.EXPERT_IMPLS if i != "torch-packed")
        key_shape = (shape.hidden, shape.intermediate)
        ms = self.table.time_ms("experts", formats.experts, key_shape, rows, self.threads, allowed)
        if ms is None:
            pred.estimated.add(f"experts {formats.experts} H={shape.hidden} I={shape.intermediate}")
            nbytes = formats.bytes_of(formats.experts, 3 * shape.intermediate, shape.hidden)
            ms = self._bound_ms(nbytes, 6 * rows * shape.hidden * shape.intermediate, formats, formats.experts)
        return ms

    # ---- one MoE layer
    def moe_layer(
        self, shape: ModelShape, formats: MatrixFormats, tokens: int, pred: Prediction | None = None
    ) -> Prediction:
        """An MoE layer's forward on ``tokens`` tokens: router, routed experts, shared expert, combine."""
        pred = Prediction(0.0) if pred is None else pred
        pred.add("moe call", self.overheads.at_hidden(shape.hidden)[0])
        # Each expert's rows are Binomial(T, k/E); a group's time depends on its own rows, not on the mean.
        experts_ms = sum(
            shape.num_experts * probability * self.group_ms(shape, formats, rows, pred)
            for rows, probability in rows_distribution(tokens, shape.top_k / shape.num_experts)
        )
        pred.add("experts", experts_ms)
        itemsize = formats.dtype.itemsize
        router_bytes = shape.num_experts * shape.hidden * itemsize
        router_flops = 2 * tokens * shape.num_experts * shape.hidden
        float_format = str(formats.dtype).removeprefix("torch.")  # the router stays in the model dtype
        pred.add("router", self._bound_ms(router_bytes, router_flops, formats, float_format))
        # Gathering rows into expert order, and the combine: about three passes over [T k, H].
        slots_bytes = 3 * tokens * shape.top_k * shape.hidden * itemsize
        pred.add("gather and combine", slots_bytes / (self.roofline.read_gbps * 1e9) * 1e3)
        if shape.shared_intermediate:
            s = shape.shared_intermediate
            pred.add("shared expert", self.linear_ms(formats.dense, 2 * s, shape.hidden, tokens, formats, pred))
            pred.add("shared expert", self.linear_ms(formats.dense, shape.hidden, s, tokens, formats, pred))
        return pred

    # ---- whole model
    def decode_step(
        self,
        shape: ModelShape,
        formats: MatrixFormats,
        position: int = 0,
        hit_rate: float = 1.0,
        storage_gbps: float | None = None,
        offloaded: bool | None = None,
    ) -> Prediction:
        """One decode step at ``position`` (tokens already cached); with experts ``offloaded`` (default: when
        ``hit_rate`` < 1), ``hit_rate`` of them found in the cache and the misses read at ``storage_gbps``."""
        offloaded = hit_rate < 1.0 if offloaded is None else offloaded
        pred = Prediction(0.0)
        h, dtype = shape.hidden, formats.dtype
        for _ in range(shape.num_layers):
            pred.add("qkv", self.linear_ms(formats.dense, shape.qkv_rows, h, 1, formats, pred, decode=True))
            pred.add(
                "o", self.linear_ms(formats.dense, h, shape.num_heads * shape.head_dim, 1, formats, pred, decode=True)
            )
            self.moe_layer(shape, formats, 1, pred)
            pred.add("layer fixed", self.overheads.at_hidden(h)[1])
            kv_bytes = 2 * position * shape.num_kv_heads * shape.head_dim * dtype.itemsize
            pred.add("attention", kv_bytes / (self.roofline.read_gbps * 1e9) * 1e3)
            if offloaded:
                pred.add("offloaded call", self.overheads.offloaded_call_ms)
            if hit_rate < 1.0:
                if not storage_gbps:
                    raise ValueError("predicting offloaded experts needs the storage read bandwidth")
                expert_bytes = formats.bytes_of(formats.experts, 3 * shape.intermediate, h)
                misses = shape.top_k * (1.0 - hit_rate)
                pred.add("expert reads", misses * expert_bytes / (storage_gbps * 1e9) * 1e3)
                pred.add("expert misses", misses * self.overheads.expert_miss_ms)
        pred.add("head", self.linear_ms(formats.dense, shape.vocab, h, 1, formats, pred, decode=True))
        pred.add("step fixed", self.overheads.decode_step_ms)
        return pred

    def prefill(
        self,
        shape: ModelShape,
        formats: MatrixFormats,
        tokens: int,
        cached_experts: int | None = None,
        storage_gbps: float | None = None,
    ) -> Prediction:
        """A ``tokens``-token prompt from an empty sequence, up to the first token's logits. With experts
        offloaded, ``cached_experts`` of a layer's experts are in the cache when the prompt starts (0 right
        after a load) and the rest of those the prompt touches are read at ``storage_gbps``."""
        pred = Prediction(0.0)
        h, dtype = shape.hidden, formats.dtype
        for _ in range(shape.num_layers):
            pred.add("qkv", self.linear_ms(formats.dense, shape.qkv_rows, h, tokens, formats, pred))
            pred.add("o", self.linear_ms(formats.dense, h, shape.num_heads * shape.head_dim, tokens, formats, pred))
            self.moe_layer(shape, formats, tokens, pred)
            pred.add("layer fixed", self.overheads.at_hidden(h)[2])
            # Causal attention: QK^T and PV over half the [T, T] scores.
            flops = 2 * tokens * tokens * shape.num_heads * shape.head_dim
            pred.add("attention", flops / (self.overheads.attention_gflops * 1e9) * 1e3)
            passes = (_HIDDEN_PASSES * h + _QKV_PASSES * shape.qkv_rows) * tokens * dtype.itemsize
            pred.add("elementwise", passes / (self.roofline.read_gbps * 1e9) * 1e3)
            if cached_experts is not None and cached_experts < shape.num_experts:  # offloaded
                if not storage_gbps:
                    raise ValueError("predicting offloaded experts needs the storage read bandwidth")
                touched = expected_groups(shape.num_experts, shape.top_k, tokens)
                reads = touched * (1.0 - cached_experts / shape.num_experts)
                expert_bytes = formats.bytes_of(formats.experts, 3 * shape.intermediate, h)
                pred.add("expert reads", reads * expert_bytes / (storage_gbps * 1e9) * 1e3)
                pred.add("expert misses", reads * self.overheads.expert_miss_ms)
        pred.add("head", self.linear_ms(formats.dense, shape.vocab, h, 1, formats, pred))
        pred.add("step fixed", self.overheads.decode_step_ms)
        return pred


# ---- measuring the overheads

_TINY = dict(
    hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, num_experts=4,
    num_experts_per_tok=2, norm_topk_prob=False, vocab_size=256, max_position_embeddings=512,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip
_PROBE_PROMPT = 32
_PROBE_STEPS = 16
_PROBE_LAYERS = (1, 5)


def _tiny_model(layers: int, dtype: torch.dtype, hidden: int = _TINY["hidden_size"]) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.OlmoeConfig(num_hidden_layers=layers, **{**_TINY, "hidden_size": hidden})
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _runner_timers(model: nn.Module) -> dict[str, Callable[[], None]]:
    """Timed parts of the lean runner over a tiny OLMoE: a 32-token prefill, a 4-token prefill, and that
    followed by 16 decode steps."""
    from ..runtime.lean import LeanRunner

    runner = LeanRunner(model, 256)
    prompt = torch.arange(_PROBE_PROMPT) % _TINY["vocab_size"]

    def prefill() -> None:
        runner.reset()
        runner.prefill(prompt)

    def first() -> None:
        runner.reset()
        runner.prefill(prompt[:4])

    def decode_steps() -> None:
        first()
        for i in range(_PROBE_STEPS):
            runner.decode(i)

    return {"prefill": prefill, "first": first, "steps": decode_steps}


def _runner_times(
    hidden: int, dtype: torch.dtype, layer: MoELayer, rounds: int, reps: int
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """({layers: {"step": decode step ms, "prefill": 32-token prefill ms}} of the lean runner over tiny OLMoEs
    of ``_PROBE_LAYERS`` layers at ``hidden``, {"decode", "prefill": ms of ``layer`` alone on 1 and 32 rows}),
    timed in alternating rounds: the host's speed drifts, and a difference of two times measured minutes
    apart would be mostly drift."""
    timers = {layers: _runner_timers(_tiny_model(layers, dtype, hidden)) for layers in _PROBE_LAYERS}
    x1, xp = torch.randn(1, hidden).to(dtype), torch.randn(_PROBE_PROMPT, hidden).to(dtype)
    alone = {"decode": lambda: [layer(x1) for _ in range(10)], "prefill": lambda: layer(xp)}
    samples: dict[int, dict[str, list[float]]] = {n: {"prefill": [], "first": [], "steps": []} for n in timers}
    alone_samples: dict[str, list[float]] = {"decode": [], "prefill": []}
    for _ in range(rounds):
        for layers, parts in timers.items():
            for name, fn in parts.items():
                samples[layers][name].append(_median_ms(fn, reps))
        for name, fn in alone.items():
            alone_samples[name].append(_median_ms(fn, reps))
    times = {}
    for layers, parts in samples.items():
        med = {name: statistics.median(values) for name, values in parts.items()}
        times[layers] = {"step": (med["steps"] - med["first"]) / _PROBE_STEPS, "prefill": med["prefill"]}
    layer_ms = {name: statistics.median(values) for name, values in alone_samples.items()}
    layer_ms["decode"] /= 10
    return times, layer_ms


def _save_quietly(model: nn.Module, directory: str) -> None:
    """save_pretrained without transformers' progress bar (it would flash by inside a status line)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if enabled:
            logging.enable_progress_bar()


def _decode_ms_and_misses(runner, cache, ids: torch.Tensor) -> tuple[float, int, float]:
    """(ms, expert misses, seconds in reads) of decoding ``ids`` one token at a time after a reset (no cache:
    resident experts)."""
    runner.reset()
    runner.prefill(ids[:1])
    if cache is not None:
        cache.reset_stats()
        read_before = cache.store.stats.seconds
    start = time.perf_counter()
    for token in ids[1:].tolist():
        runner.decode(token)
    ms = (time.perf_counter() - start) * 1e3
    if cache is None:
        return ms, 0, 0.0
    total = LayerCacheStats.total(cache.stats)
    return ms, total.accesses - total.hits, cache.store.stats.seconds - read_before


def _offload_costs(dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """(ms an expert cache miss costs beyond its read, ms an offloaded MoE layer call costs beyond a resident
    one) on a tiny 2-layer OLMoE saved to disk, decoding with it resident, offloaded with every expert
    cached, and offloaded with a cache of one layer's selected experts (on-demand LRU, no prefetch): the
    second less the first per layer call; the third less the second, less the seconds spent in reads, per
    miss. The three take turns (the host's speed drifts)."""
    from ..files import cache_directory
    from ..models.loader import load
    from ..runtime.lean import LeanRunner

    steps = 64
    ids = torch.randint(_TINY["vocab_size"], (steps + 1,), generator=torch.Generator().manual_seed(0))
    directory = cache_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".miss-probe-", dir=directory) as tmp:
        _save_quietly(_tiny_model(2, dtype), tmp)
        budgets = {
            "resident": None,
            "all": "100%",
            "few": f"{_TINY['num_experts_per_tok'] / (2 * _TINY['num_experts']):.0%}",
        }
        runners = {}
        runs: dict[str, list[tuple[float, int, float]]] = {name: [] for name in budgets}
        try:
            for name, budget in budgets.items():
                loaded = load(tmp, dtype, None, budget, "lru", prefetch=False)
                runners[name] = (LeanRunner(loaded.model, 128), loaded.cache)
            for round_index in range(reps + 1):  # round 0 warms up (the full cache fills there)
                for name, (runner, cache) in runners.items():
                    run = _decode_ms_and_misses(runner, cache, ids)
                    if round_index:
                        runs[name].append(run)
        finally:
            for _, cache in runners.values():
                if cache is not None:
                    cache.close()
    resident_ms, all_ms = (statistics.median(ms for ms, _, _ in runs[name]) for name in ("resident", "all"))
    per_miss = [(ms - all_ms - read_s * 1e3) / misses for ms, misses, read_s in runs["few"] if misses]
    miss = max(statistics.median(per_miss), 0.0) if per_miss else 0.0
    call = max((all_ms - resident_ms) / (2 * steps), 0.0)
    return miss, call


def _layer_costs(hidden: int, dtype: torch.dtype, threads: int, rounds: int, reps: int) -> dict[str, float]:
    """The fixed costs of a layer at ``hidden`` (MoE call, decode layer, prefill layer) and of a step, fitted
    on tiny OLMoEs of 1 and 5 layers: a layer's is the per-layer slope of the runner's time less the tiny
    layer's own matrices (q/k/v, o and its MoE layer, each timed alone); the step's is the intercept less
    the tiny head."""
    from ..models.hf import layer_from_hf_block

    top_k = _TINY["num_experts_per_tok"]
    model = _tiny_model(1, dtype, hidden)
    block = model.model.layers[0]
    layer: MoELayer = layer_from_hf_block(block.mlp)
    times, layer_ms = _runner_times(hidden, dtype, layer, rounds, reps)
    attn = block.self_attn
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    dense = {"qkv": qkv, "o": attn.o_proj.weight.detach(), "head": model.lm_head.weight.detach()}
    decode_ms = {n: min(measure.measure_linear(w, dtype, 1, threads).values()) for n, w in dense.items()}
    prefill_ms = {n: measure.measure_linear(w, dtype, _PROBE_PROMPT, threads)["torch"] for n, w in dense.items()}
    moe_decode, moe_prefill = layer_ms["decode"], layer_ms["prefill"]
    groups = min(measure.measure_experts(layer.resident.weights(), dtype, 1, threads, groups=top_k).values())
    few, many = _PROBE_LAYERS
    decode_slope = (times[many]["step"] - times[few]["step"]) / (many - few)
    prefill_slope = (times[many]["prefill"] - times[few]["prefill"]) / (many - few)
    # A negative remainder is noise around zero: those costs are then too small to see at this size.
    return {
        "moe_call": max(moe_decode - top_k * groups, 0.0),
        "decode_layer": max(decode_slope - decode_ms["qkv"] - decode_ms["o"] - moe_decode, 0.0),
        "prefill_layer": max(prefill_slope - prefill_ms["qkv"] - prefill_ms["o"] - moe_prefill, 0.0),
        "step": max(times[few]["step"] - few * decode_slope - decode_ms["head"], 0.0),
    }


def measure_overheads(threads: int, dtype: torch.dtype = torch.bfloat16, reps: int = 5) -> Overheads:
    """Fit the fixed costs on tiny OLMoE models of 1 and 5 layers at hidden sizes ``Overheads.NARROW`` and
    ``Overheads.WIDE`` (``_layer_costs``), the attention's rate, and the costs of offloading on a 2-layer one
    read from disk (``_offload_costs``); about 20 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            narrow = _layer_costs(Overheads.NARROW, dtype, threads, rounds=5, reps=reps)
            wide = _layer_costs(Overheads.WIDE, dtype, threads, rounds=5, reps=reps)
            q = torch.randn(1, 8, 256, 64).to(dtype)
            attention_ms = _median_ms(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), 10)
            expert_miss, offloaded_call = _offload_costs(dtype, reps=5)
    finally:
        torch.set_num_threads(previous)
    return Overheads(
        moe_call_ms=narrow["moe_call"],
        decode_layer_ms=narrow["decode_layer"],
        decode_step_ms=narrow["step"],
        prefill_layer_ms=narrow["prefill_layer"],
        attention_gflops=2 * 256 * 256 * 8 * 64 / (attention_ms * 1e-3) / 1e9,
        expert_miss_ms=expert_miss,
        offloaded_call_ms=offloaded_call,
        moe_call_wide_ms=wide["moe_call"],
        decode_layer_wide_ms=wide["decode_layer"],
        prefill_layer_wide_ms=wide["prefill_layer"],
    )


def load_or_measure_overheads(threads: int, dtype: torch.dtype = torch.bfloat16, remeasure: bool = False) -> Overheads:
    """This host's overheads from the tuning cache, measured (and stored) when missing or corrupt."""
    if not remeasure:
        stored = tuning.load_overheads(threads)
        if stored is not None:
            try:
                return Overheads.from_dict(stored)
            except (KeyError, TypeError, ValueError):
                pass
    overheads = measure_overheads(threads, dtype)
    try:
        tuning.save_overheads(threads, overheads.to_dict())
    except OSError:
        pass  # the prediction still stands; it is measured again next time
    return overheads


def host_model(threads: int, roofline: Roofline, dtype: torch.dtype = torch.bfloat16) -> PerfModel:
    """The performance model of this host at ``threads``: its roofline, tuning table and overheads."""
    return PerfModel(
        roofline, tuning.load_table(), load_or_measure_overheads(threads, dtype), threads, native.is_available()
    )
