"""`moerun plan`: the fastest configuration of a model that fits a memory budget and keeps quality.

The search space, for one model on this host:

- routed experts: the model's float dtype, int8, int4-g32, or a format per expert chosen by the exact
  allocator (``choose``-style: least calibration sensitivity within the bytes the budget leaves);
- attention and output head: float, int8 or int4-g32;
- routed experts resident, or read from the checkpoint through a cache of 75/50/25% of their bytes or of the
  least it takes (one layer's selected experts), with LFU or LRU eviction, prefetching on or off;
- threshold expert skipping off, or calibrated to drop 10% or 25% of the (token, expert) pairs;
- threads: 1 to the cores (those the host's measurements cover, and the one asked for).

Every configuration gets a prediction:

- decode and prefill tokens/s from the performance model (``moerun.perf.predict``), with the experts per
  token that skipping leaves, the measured cost of the skipping path, and the cache's reads from replaying a
  routing trace of the calibration text through moerun's own cache (``moerun.plan.trace``); reads are timed at
  the storage bandwidth measured on the checkpoint;
- peak resident memory: a fresh moerun process's memory (measured), plus the weights in the configuration's
  formats, the cache, the lean runner's stacked q/k/v and the KV cache of the workload;
- quality: KL divergence against the unmodified model on the calibration text, as the sum of the measured KL
  of each knob alone (experts int8 and int4, dense int8 and int4, each skipping level); a per-expert mix
  scales int4's KL by the allocator's sensitivity of the mix over that of int4 everywhere. Points on the Pareto
  front are then measured, fastest first, until one within the limits is confirmed.

Shape legend: E experts, k experts per token, L MoE layers.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import MemoryBudgetError
from ..kernels import native, tuning
from ..layer import MoELayer
from ..models.loader import load
from ..models.mixed import expert_reference, output_errors
from ..models.quantized import QuantConfig, QuantLinear, dense_linears, model_nbytes, moe_layers
from ..models.run_plan import RunPlan, model_identity
from ..models.skipping import calibrate_skipping, set_skipping
from ..perf.model_bench import quantized_copy
from ..perf.predict import MatrixFormats, ModelShape, PerfModel, host_model
from ..perf.roofline import load_or_measure_roofline
from ..quant.allocate import allocate_bits
from ..quant.formats import (
    QuantFormat,
    QuantizedWeight,
    int4pack_nbytes,
    matmul_transposed,
    quantize_weight,
    round_trip,
)
from ..routing import ExpertSkipping
from ..runtime.eval import KLResult, ReferenceLogprobs, kl_divergence, reference_logprobs
from ..sizes import format_size
from .trace import CacheReplay, RoutingTrace, TraceRecorder, replay_cache

EXPERT_CHOICES = ("float", "int8", "int4-g32", "mixed")
DENSE_CHOICES = ("float", "int8", "int4-g32")
RESIDENT_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)  # 0.0: the least cache the model takes
POLICIES = ("lfu", "lru")
SKIP_SHARES = (0.0, 0.1, 0.25)
MIXED_CANDIDATES = ("int4-g32", "int8", "16")
# A plan's predicted peak memory stays this share below the budget: fresh runs of one configuration differ in
# peak resident memory by about this much.
MEMORY_MARGIN = 0.01
_MEASURED_FRONT_POINTS = 4  # quality measurements of front points before settling on predictions
_REPLAY_TOKENS = 256  # decoded tokens replayed through the cache: ~8k accesses of a 4-layer top-8 model
_TIMED_PROMPT_TOKENS = 64
_TIMED_DECODE_STEPS = 16  # decode steps of each resident configuration the planner runs to correct its model


@dataclass(frozen=True)
class Configuration:
    """One way to run the model (see the module docstring for the choices)."""

    experts: str
    dense: str
    resident_share: float  # 1.0: resident; else the cache holds this share of the experts' bytes (0.0: least)
    policy: str  # eviction policy when offloaded
    prefetch: bool
    skip_share: float
    threads: int

    @property
    def offloaded(self) -> bool:
        return self.resident_share < 1.0

    def label(self) -> str:
        where = "resident" if not self.offloaded else (
            f"cache {self.resident_share:.0%} {self.policy}{' +prefetch' if self.prefetch else ''}"
            if self.resident_share else f"least cache {self.policy}{' +prefetch' if self.prefetch else ''}"
        )  # fmt: skip
        skip = f", skip {self.skip_share:.0%}" if self.skip_share else ""
        return f"experts {self.experts}, dense {self.dense}, {where}{skip}, {self.threads} thr"


@dataclass
class Point:
    """A configuration and what was predicted (and measured) of it."""

    config: Configuration
    decode_tps: float
    prefill_tps: float
    peak_bytes: int
    kl: float  # predicted, or measured once ``kl_measured``
    nll_increase: float  # nats per token over the unmodified model, predicted or measured
    kl_measured: bool = False
    expert_formats: dict[str, list[str]] | None = None  # the allocation of a mixed configuration
    cache_bytes: int | None = None

    def speed(self, objective: str) -> float:
        return self.decode_tps if objective == "decode" else self.prefill_tps

    @property
    def ppl_increase(self) -> float:
        return math.expm1(self.nll_increase)


@dataclass
class PlanSearch:
    """The outcome of a search: every point, the Pareto front, the chosen point and the plan made of it."""

    points: list[Point]
    front: list[Point]
    chosen: Point
    plan: RunPlan
    facts: _Facts = field(repr=False, default=None)
    path: Path | None = None


@dataclass
class _Facts:
    """What the planner measured about the model on this host."""

    shape: ModelShape
    dtype: torch.dtype
    layer_names: list[str]
    base_rss: int
    storage_gbps: float
    skip_ms: float
    expert_bytes: dict[str, int]  # all experts, per uniform format (with what torch's int4 path adds)
    dense_bytes: dict[str, int]  # everything but the routed experts, per dense format
    slot_bytes: dict[str, int]  # a cache slot as read from storage, per format
    replays: dict[tuple, CacheReplay]
    skip_shares: dict[float, float]  # asked -> measured on the calibration text
    skip_thresholds: dict[float, dict[str, float]]
    kl: dict[tuple[str, str], KLResult]  # ("experts", fmt) / ("dense", fmt) / ("skip", share)
    sensitivity: list[list[float]]  # [all experts][MIXED_CANDIDATES]
    sensitivity_cost: list[list[int]]
    models: dict[int, PerfModel]
    reference: ReferenceLogprobs
    memo: dict = field(default_factory=dict)  # predicted step times by their inputs
    corrections: dict = field(default_factory=dict)  # measured over predicted compute times (_corrections)
    lowbit: dict = field(default_factory=dict)  # low-bit weights already made (lowbit_weights)
    convert_ms: dict = field(default_factory=dict)  # per expert read: making its torch-path conversions, by format
    slot_extra: dict = field(default_factory=dict)  # bytes a slot's torch-path conversions add, by format


def _format_name(choice: str, dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.") if choice in ("float", "16") else choice


def _bits(choice: str) -> int:
    return 16 if choice in ("float", "16") else QuantFormat.parse(choice).bits


# ---- measuring


def base_rss_probe(prompt_tokens: int, decode_tokens: int) -> Callable[[], int]:
    """What a run holds beyond its weights and KV cache (the interpreter, torch, transformers, the tokenizer,
    allocator pools): the peak resident bytes of the reference model's run in a fresh process (``verify``), less
    its weights and runner memory. The process starts at once; the returned function waits for it (memory is
    what it measures, so it can run beside other work)."""
    from ..models.loader import default_model_dir
    from .verify import start_plan_run

    path = default_model_dir()
    plan = RunPlan(model_identity(path), str(path), "", 1, 16, None, 16,
                   workload={"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens})  # fmt: skip
    result = start_plan_run(path, plan)
    probe = load(path, torch.bfloat16)
    shape = ModelShape.of_model(probe.model)
    own = model_nbytes(probe.model) + _runtime_bytes(shape, "float", torch.bfloat16, prompt_tokens + decode_tokens)
    del probe
    return lambda: int(result()["peak_bytes"]) - own


def measure_storage_gbps(path: Path, dtype: torch.dtype, reads: int = 24) -> float:
    """GB/s at which the expert store reads this checkpoint's experts (direct I/O, cold)."""
    probe = load(path, dtype, memory_budget="100%", prefetch=False)
    try:
        store = probe.cache.store
        store.drop_files_from_page_cache()
        slot = probe.cache._arena[0]
        layers = list(moe_layers(probe.model).values())
        for i in range(reads):
            layer = i % len(layers)
            store.read(layer, (i * 7) % layers[layer].num_experts, slot)
        return store.stats.bytes / store.stats.seconds / 1e9
    finally:
        probe.cache.close()


@torch.inference_mode()
def measure_convert_ms(lowbit: dict[tuple[str, str], QuantizedWeight], fmt: str, reps: int = 5) -> float:
    """What an expert read into the cache costs beyond its read where torch's path converts it for its low-bit
    GEMM on first use (int4 off the native kernel): the first call of each matrix minus a later one (ms)."""
    stacks = [w for (name, name_fmt), w in lowbit.items() if name_fmt == fmt and name.endswith(("gate_up", "down"))]
    if not stacks:
        return 0.0
    extra = []
    for e in range(min(reps, stacks[0].shape[0])):
        total = 0.0
        for stack in stacks[:2]:
            view = dataclasses.replace(stack[e], conversions={})
            x = torch.randn(1, view.in_features, dtype=torch.bfloat16)
            start = time.perf_counter()
            matmul_transposed(x, view)
            first = time.perf_counter() - start
            start = time.perf_counter()
            matmul_transposed(x, view)
            total += max(0.0, first - (time.perf_counter() - start))
        extra.append(total * 1e3)
    return statistics.median(extra)


@torch.inference_mode()
def measure_skip_ms(layer: nn.Module, reps: int = 40) -> float:
    """What routing one token through the skipping path costs beyond the plain one, per MoE layer call (ms)."""
    x = torch.randn(1, layer.hidden_size, generator=torch.Generator().manual_seed(0)).to(layer.dtype)
    saved = layer.skipping
    times = {False: [], True: []}
    try:
        for _ in range(reps):
            for skipping in (False, True):
                layer.skipping = ExpertSkipping("threshold", 0.0) if skipping else None
                start = time.perf_counter()
                layer(x)
                times[skipping].append(time.perf_counter() - start)
    finally:
        layer.skipping = saved
    return max(0.0, (statistics.median(times[True]) - statistics.median(times[False])) * 1e3)


def _variant(model: nn.Module, experts: str, dense: str, made: dict | None = None) -> nn.Module:
    """A copy of the float model with experts and dense matrices in these formats, sharing its float tensors
    (``made``: low-bit weights already made, by (parameter name, format name))."""
    return quantized_copy(model, _bits(experts), 32, _bits(dense), made)


@contextmanager
@torch.no_grad()
def emulated_formats(
    model: nn.Module,
    experts: str | dict[str, list[str]],
    dense: str,
    source: nn.Module | None = None,
    quantized: dict[tuple[str, str], QuantizedWeight] | None = None,
) -> Iterator[None]:
    """Within ``with``, ``model``'s routed experts and dense matrices hold the values their low-bit formats would
    give them (quantized then dequantized, in place), as torchao's emulated path computes: the model runs at its
    own float speed and memory, and its outputs are those of the low-bit model up to the activations' rounding.
    The float values are restored afterwards: from ``source``, the same model in another float dtype that holds
    them exactly (the checkpoint's bf16 beside an fp32 copy), else from copies of the changed rows.

    Args:
        model: a moerun-patched float model.
        experts: a uniform format choice ("float", "int8", "int4-g32") or format names per expert per MoE layer.
        dense: the attention's, shared experts' and output head's format choice.
        source: the same model (same parameter names) whose values restore ``model``'s exactly, or None.
        quantized: low-bit weights already made (``lowbit_weights``) by (parameter name, format name), used
            instead of quantizing again; the whole matrices it lacks are added as they are made.
    """
    saved: list[tuple[torch.Tensor, list[int] | None, torch.Tensor | None]] = []
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    param_names = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    originals = dict(source.named_parameters(remove_duplicate=False)) if source is not None else {}

    def emulate(weight: torch.Tensor, fmt: QuantFormat, rows: list[int] | None = None) -> None:
        if fmt.bits == 16:
            return
        chosen = weight if rows is None else weight[rows]
        name = param_names.get(id(weight), "")
        kept = originals.get(name)
        saved.append((weight, rows, chosen.detach().clone() if kept is None else kept))
        made = (quantized if quantized is not None else {}).get((name, fmt.name))
        if made is None and rows is None:  # quantized and emulated in one pass, in place
            made = quantize_weight(weight.detach(), fmt, dequantized=weight)
            if quantized is not None and name:
                quantized[(name, fmt.name)] = made
        elif made is None:
            weight[rows] = round_trip(chosen.detach(), fmt, weight.dtype)
        elif rows is None:
            weight.copy_(made.dequantize(weight.dtype))
        else:
            weight[rows] = torch.stack([made[e].dequantize(weight.dtype) for e in rows])

    def restore(weight: torch.Tensor, rows: list[int] | None, original: torch.Tensor) -> None:
        if original.shape != weight.shape:  # a copy of the changed rows
            weight[rows] = original
        elif rows is None:
            weight.copy_(original)
        else:
            weight[rows] = original[rows].to(weight.dtype)

    try:
        for name, layer in moe_layers(model).items():
            names = experts[name] if isinstance(experts, dict) else [experts] * layer.num_experts
            for fmt_name in dict.fromkeys(names):
                fmt = QuantFormat.parse("16" if fmt_name == "float" else fmt_name)
                rows = [e for e, n in enumerate(names) if n == fmt_name]
                for weight in (layer.resident.gate_up, layer.resident.down):
                    emulate(weight, fmt, None if len(rows) == layer.num_experts else rows)
        if dense != "float":
            config = QuantConfig(bits=_bits(dense), dense_bits=_bits(dense))
            if tied:  # the low-bit head is a copy; the embedding stays float
                head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
                param_names[id(head.weight)] = "lm_head.weight"
            weights = [lin.weight for lin in dense_linears(model).values()]
            weights += [w for layer in moe_layers(model).values() for w in (layer.shared_gate_up, layer.shared_down)
                        if isinstance(w, torch.Tensor)]  # fmt: skip
            for weight in weights:
                emulate(weight, config.dense_format(weight.shape[1]))
        yield
    finally:
        for weight, rows, original in reversed(saved):
            restore(weight, rows, original)
        if tied:
            head.weight = model.get_input_embeddings().weight


def lowbit_weights(model: nn.Module) -> dict[tuple[str, str], QuantizedWeight]:
    """A quantized model's low-bit weights by (the float model's parameter name, format name), for
    ``emulated_formats``: uniform expert stacks, dense matrices and shared experts."""
    found: dict[tuple[str, str], QuantizedWeight] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            experts = module.experts
            for proj in ("gate_up", "down"):
                weight = getattr(experts, proj, None)
                if isinstance(weight, QuantizedWeight):
                    found[(f"{name}.experts.{proj}", weight.format.name)] = weight
            for attr in ("shared_gate_up", "shared_down"):
                weight = getattr(module, attr)
                if isinstance(weight, QuantizedWeight):
                    found[(f"{name}.{attr}", weight.format.name)] = weight
        elif isinstance(module, QuantLinear):
            found[(f"{name}.weight", module.weight.format.name)] = module.weight
    return found


def _dense_bytes(model: nn.Module, dense: str) -> int:
    """Bytes of everything but the routed experts, with attention, shared experts and head in ``dense``."""
    experts = {id(t) for layer in moe_layers(model).values() for t in (layer.resident.gate_up, layer.resident.down)}
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in experts}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if dense == "float":
        return total
    fmt = QuantFormat.parse(dense)
    config = QuantConfig(bits=fmt.bits, dense_bits=fmt.bits)
    matrices = [lin.weight for lin in dense_linears(model).values()]
    matrices += [w for layer in moe_layers(model).values() for w in (layer.shared_gate_up, layer.shared_down) if
                 w is not None]  # fmt: skip
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for w in matrices:
        low = config.dense_format(w.shape[1])
        if id(w) not in embeddings:  # a tied head keeps the embedding and adds its low-bit copy
            total -= w.numel() * w.element_size()
        total += low.nbytes(*w.shape) + _converted_nbytes(low, *w.shape, w.dtype)
    return total


def _expert_bytes(model: nn.Module, choice: str) -> tuple[int, int, int]:
    """(all routed experts' bytes, one expert's cache slot bytes as read, what torch's int4 layout adds to a slot
    where the native kernel does not run) in a uniform format; the first counts that layout too."""
    total, slot, extra = 0, 0, 0
    for layer in moe_layers(model).values():
        gate_up, down = layer.resident.gate_up, layer.resident.down
        if choice == "float":
            one, added = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size(), 0
            parts = 2
        else:
            fmt = QuantFormat.parse(choice)
            one = fmt.nbytes(*gate_up.shape[1:]) + fmt.nbytes(*down.shape[1:])
            added = _converted_nbytes(fmt, *gate_up.shape[1:], layer.dtype) + _converted_nbytes(
                fmt, *down.shape[1:], layer.dtype
            )
            parts = 4  # values and scales of each matrix (and mins, where asymmetric: below the alignment)
        total += (one + added) * layer.num_experts
        slot = max(slot, one + 64 * parts)  # parts one after another, each 64-byte aligned
        extra = max(extra, added)
    return total, slot, extra


def _converted_nbytes(fmt: QuantFormat, n: int, k: int, dtype: torch.dtype) -> int:
    """What torch's path keeps beside a matrix [n, k] in ``fmt`` (its int4 GEMM layout) where the native kernel
    does not run."""
    return int4pack_nbytes(fmt, n, k, dtype) if not native.is_available() else 0


# ---- predicting


def _runtime_bytes(shape: ModelShape, dense: str, dtype: torch.dtype, positions: int) -> int:
    """The lean runner's own memory: its stacked q/k/v copy and the KV cache of ``positions`` positions."""
    formats = MatrixFormats(_format_name(dense, dtype), _format_name(dense, dtype), dtype)
    qkv = shape.num_layers * formats.bytes_of(formats.dense, shape.qkv_rows, shape.hidden)
    kv = shape.num_layers * 2 * positions * shape.num_kv_heads * shape.head_dim * dtype.itemsize
    return qkv + kv


def _decode_ms(facts: _Facts, config: Configuration, experts_fmt: str, position: int, cache_slots: int | None) -> float:
    perf = facts.models[config.threads]
    kept_k = facts.shape.top_k * (1.0 - facts.skip_shares[config.skip_share])
    shape = dataclasses.replace(facts.shape, top_k=kept_k)
    formats = MatrixFormats(experts_fmt, _format_name(config.dense, facts.dtype), facts.dtype)
    key = ("decode", config.threads, shape, formats, position, config.offloaded)
    if key not in facts.memo:  # the same step recurs across cache setups
        facts.memo[key] = perf.decode_step(shape, formats, position, offloaded=config.offloaded).ms
    step = facts.memo[key] * _correction(facts, "decode", config, experts_fmt)
    layers = facts.shape.num_layers
    if config.skip_share:
        step = (step + layers * facts.skip_ms) * _skip_correction(facts, "decode", config.skip_share)
    if not config.offloaded:
        return step
    read_ms = facts.slot_bytes[experts_fmt] / (facts.storage_gbps * 1e9) * 1e3
    miss_ms = perf.overheads.expert_miss_ms + facts.convert_ms.get(experts_fmt, 0.0)

    def with_replay(replay: CacheReplay, prefetching: bool) -> float:
        per_layer = replay.demand_reads * (read_ms + miss_ms)
        if prefetching:  # reads ahead overlap the layer before; what does not fit in its compute time stalls
            per_layer += replay.prefetch_reads * miss_ms
            per_layer += max(0.0, replay.prefetch_reads * read_ms - step / layers)
        return step + layers * per_layer

    plain = with_replay(facts.replays[(config.skip_share, cache_slots, config.policy, False)], False)
    if not config.prefetch:
        return plain
    # Prefetching runs only where measurement says it pays: at worst it is turned off.
    return min(plain, with_replay(facts.replays[(config.skip_share, cache_slots, config.policy, True)], True))


def _prefill_ms(facts: _Facts, config: Configuration, experts_fmt: str, prompt: int) -> float:
    perf = facts.models[config.threads]
    kept_k = facts.shape.top_k * (1.0 - facts.skip_shares[config.skip_share])
    shape = dataclasses.replace(facts.shape, top_k=kept_k)
    formats = MatrixFormats(experts_fmt, _format_name(config.dense, facts.dtype), facts.dtype)
    cached = 0 if config.offloaded else None
    key = ("prefill", config.threads, shape, formats, prompt, cached)
    if key not in facts.memo:
        facts.memo[key] = perf.prefill(
            shape, formats, prompt, cached_experts=cached, storage_gbps=facts.storage_gbps
        ).ms
    ms = facts.memo[key] * _correction(facts, "prefill", config, experts_fmt)
    if not config.skip_share:
        return ms
    return (ms + facts.shape.num_layers * facts.skip_ms) * _skip_correction(facts, "prefill", config.skip_share)


def _quality(facts: _Facts, config: Configuration, mixed_ratio: float | None) -> tuple[float, float]:
    """Predicted (KL, nll increase): the knobs' measured effects, added."""
    kl, nll = 0.0, 0.0
    parts = []
    if config.experts == "mixed":
        base = facts.kl[("experts", "int4-g32")]
        kl += base.kl_mean * mixed_ratio
        nll += _nll_increase(base) * mixed_ratio
    elif config.experts != "float":
        parts.append(("experts", config.experts))
    if config.dense != "float":
        parts.append(("dense", config.dense))
    if config.skip_share:
        parts.append(("skip", config.skip_share))
    for key in parts:
        kl += facts.kl[key].kl_mean
        nll += _nll_increase(facts.kl[key])
    return kl, nll


def _nll_increase(result: KLResult) -> float:
    return math.log(result.perplexity) - math.log(result.reference_perplexity)


def _slots(facts: _Facts, experts_fmt: str, share: float) -> tuple[int, int]:
    """(cache slots, cache bytes) of a cache holding ``share`` of the experts (0: the least it takes)."""
    slots = _cache_slots(facts.shape, share)
    return slots, slots * (facts.slot_bytes[experts_fmt] + facts.slot_extra.get(experts_fmt, 0))


def _cache_slots(shape: ModelShape, share: float) -> int:
    """Slots of a cache holding ``share`` of a model's experts; 0.0: the least it takes (k)."""
    total = shape.num_layers * shape.num_experts
    return shape.top_k if share == 0.0 else max(shape.top_k, min(total, round(share * total)))


def _points(facts: _Facts, budget: int, threads: list[int], positions: int, prompt: int, decode: int) -> list[Point]:
    """Predict every configuration (the mixed one sized to fill ``budget``)."""
    points = []
    mean_position = prompt + decode // 2
    int4_sensitivity = sum(row[0] for row in facts.sensitivity) or 1.0
    for dense in DENSE_CHOICES:
        fixed = facts.base_rss + facts.dense_bytes[dense] + _runtime_bytes(facts.shape, dense, facts.dtype, positions)
        mixed = _mixed_allocation(facts, budget - fixed)
        for experts in EXPERT_CHOICES:
            if experts == "mixed" and mixed is None:
                continue
            for share in RESIDENT_SHARES:
                if experts == "mixed" and share < 1.0:
                    continue  # the allocation is for resident experts; the cache reads one format's slots
                for policy, prefetch in _cache_setups(share):
                    for skip in SKIP_SHARES:
                        for t in threads:
                            config = Configuration(experts, dense, share, policy, prefetch, skip, t)
                            points.append(_point(facts, config, fixed, mixed, int4_sensitivity, mean_position, prompt))
    return points


def _cache_setups(share: float) -> list[tuple[str, bool]]:
    if share >= 1.0:
        return [("lfu", False)]
    return [(policy, prefetch) for policy in POLICIES for prefetch in (False, True)]


def _point(facts, config, fixed, mixed, int4_sensitivity, mean_position, prompt) -> Point:
    mixed_ratio, expert_formats = None, None
    if config.experts == "mixed":
        chosen, shares, sensitivity_sum, expert_bytes = mixed
        mixed_ratio = sensitivity_sum / int4_sensitivity
        expert_formats = chosen
        decode = sum(s * _decode_ms(facts, config, f, mean_position, None) for f, s in shares.items())
        prefill = sum(s * _prefill_ms(facts, config, f, prompt) for f, s in shares.items())
        peak, cache_bytes = fixed + expert_bytes, None
    else:
        fmt = _format_name(config.experts, facts.dtype)
        slots, cache_bytes = (None, None) if not config.offloaded else _slots(facts, fmt, config.resident_share)
        decode = _decode_ms(facts, config, fmt, mean_position, slots)
        prefill = _prefill_ms(facts, config, fmt, prompt)
        peak = fixed + (facts.expert_bytes[fmt] if cache_bytes is None else cache_bytes)
    kl, nll = _quality(facts, config, mixed_ratio)
    return Point(config, 1e3 / decode, prompt * 1e3 / prefill, int(peak), kl, nll, False, expert_formats, cache_bytes)


def _mixed_allocation(facts: _Facts, expert_budget: int):
    """Per-expert formats within ``expert_budget`` bytes: (formats per layer, share of experts per format,
    summed sensitivity, bytes), or None where even int4 everywhere does not fit or float everywhere does."""
    costs = facts.sensitivity_cost
    if expert_budget < sum(min(row) for row in costs) or expert_budget >= sum(max(row) for row in costs):
        return None
    try:
        choice = allocate_bits(facts.sensitivity, costs, expert_budget)
    except MemoryBudgetError:
        return None
    names = [_format_name(c, facts.dtype) for c in MIXED_CANDIDATES]
    per_layer: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for i, c in enumerate(choice):
        layer = facts.layer_names[i // facts.shape.num_experts]
        per_layer.setdefault(layer, []).append(QuantFormat.parse(MIXED_CANDIDATES[c]).name)
        counts[names[c]] = counts.get(names[c], 0) + 1
    total = len(choice)
    shares = {f: n / total for f, n in counts.items()}
    sensitivity = sum(facts.sensitivity[i][c] for i, c in enumerate(choice))
    nbytes = sum(costs[i][c] for i, c in enumerate(choice))
    return per_layer, shares, sensitivity, nbytes


# ---- the front and the choice


def pareto_front(points: list[Point], objective: str) -> list[Point]:
    """The points no other point beats on speed, memory and KL at once, fastest first."""
    ordered = sorted(points, key=lambda p: (-p.speed(objective), p.peak_bytes, p.kl))
    front: list[Point] = []
    for p in ordered:
        if not any(q.peak_bytes <= p.peak_bytes and q.kl <= p.kl for q in front):
            front.append(p)
    return front


def _within(point: Point, budget: int, max_kl: float | None, max_ppl_increase: float | None) -> bool:
    if point.peak_bytes > budget:
        return False
    if max_kl is not None and point.kl > max_kl:
        return False
    return max_ppl_increase is None or point.ppl_increase <= max_ppl_increase


@dataclass
class PlanMeasurements:
    """What ``measure_for_planning`` found of one model on this host, for any number of ``choose_plan`` calls."""

    path: Path
    facts: _Facts
    quality: nn.Module  # the float model calibration and quality runs use
    source: nn.Module | None  # the run-dtype model that restores ``quality`` exactly, where they differ
    prompt_tokens: int
    decode_tokens: int


def measure_for_planning(
    path: Path,
    *,
    calibration_ids: list[int],
    threads: int | None = None,
    window: int = 256,
    prompt_tokens: int = 128,
    decode_tokens: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    progress: Callable[[str], None] | None = None,
) -> PlanMeasurements:
    """Load the float checkpoint at ``path`` and measure what predictions need (see the module docstring).

    Args:
        path: a float checkpoint directory.
        calibration_ids: calibration tokens.
        threads: the most threads to use (default: torch's current count).
        window: tokens per calibration window.
        prompt_tokens, decode_tokens: the workload predicted for (and sized into the KV cache).
        dtype: the float dtype of the runs.
        progress: called with a line per step.
    """
    say = progress or (lambda _: None)
    max_threads = threads or torch.get_num_threads()
    torch.set_num_threads(max_threads)
    say(f"loading {path}")
    rss_probe = base_rss_probe(prompt_tokens, decode_tokens)  # a fresh process, measuring beside the loading
    loaded = load(path, dtype)
    # Calibration and quality runs compute in the dtype this host runs fastest (fp32 where bf16 GEMMs are slow):
    # they measure what formats and skipping change, not the float rounding of the run.
    quality_dtype = load_or_measure_roofline(max_threads).fastest_dtype()
    quality = loaded.model if quality_dtype == dtype else load(path, quality_dtype).model
    facts = _measure(
        loaded.model, quality, path, dtype, calibration_ids, window, max_threads, prompt_tokens, decode_tokens,
        rss_probe, say,
    )  # fmt: skip
    source = None if quality is loaded.model else loaded.model
    return PlanMeasurements(path, facts, quality, source, prompt_tokens, decode_tokens)


def choose_plan(
    measured: PlanMeasurements,
    memory_budget: int,
    *,
    max_kl: float | None = None,
    max_ppl_increase: float | None = None,
    objective: str = "decode",
    progress: Callable[[str], None] | None = None,
) -> PlanSearch:
    """Predict every configuration, find the Pareto front, confirm and choose the fastest within the limits.

    Args:
        measured: ``measure_for_planning``'s result.
        memory_budget: bytes of peak resident memory a run may take (plans keep ``MEMORY_MARGIN`` of it free).
        max_kl: most mean KL divergence (nats per token) against the unmodified model on the calibration text.
        max_ppl_increase: most relative perplexity increase (0.01 = 1%) on the calibration text.
        objective: ``decode`` or ``prefill`` tokens/s.
        progress: called with a line per step.

    Raises:
        MemoryBudgetError: a budget below the smallest configuration (the message names it) or a quality limit
            no configuration within the budget reaches (the message names the best reachable).
    """
    say = progress or (lambda _: None)
    if objective not in ("decode", "prefill"):
        raise ValueError(f"objective must be decode or prefill, got {objective!r}")
    facts, prompt_tokens, decode_tokens = measured.facts, measured.prompt_tokens, measured.decode_tokens
    say("predicting every configuration")
    usable = int(memory_budget * (1.0 - MEMORY_MARGIN))
    points = _points(facts, usable, sorted(facts.models), prompt_tokens + decode_tokens, prompt_tokens,
                     decode_tokens)  # fmt: skip
    smallest = min(points, key=lambda p: p.peak_bytes)
    if smallest.peak_bytes > usable:
        least = int(smallest.peak_bytes / (1.0 - MEMORY_MARGIN)) + 1
        raise MemoryBudgetError(
            f"memory budget {format_size(memory_budget)} is below the smallest configuration: it takes "
            f"{format_size(least)} ({smallest.config.label()}, {format_size(smallest.peak_bytes)} at its peak, and "
            f"{MEMORY_MARGIN:.0%} kept free)"
        )
    fitting = [p for p in points if p.peak_bytes <= usable]
    best_kl = min(fitting, key=lambda p: p.kl)
    best_ppl = min(fitting, key=lambda p: p.nll_increase)
    if max_kl is not None and best_kl.kl > max_kl:
        raise MemoryBudgetError(
            f"no configuration within {format_size(memory_budget)} reaches KL {max_kl:g}: the best predicted is "
            f"{best_kl.kl:.4g} ({best_kl.config.label()})"
        )
    if max_ppl_increase is not None and best_ppl.ppl_increase > max_ppl_increase:
        raise MemoryBudgetError(
            f"no configuration within {format_size(memory_budget)} keeps perplexity within +{max_ppl_increase:.2%}: "
            f"the best predicted is {best_ppl.ppl_increase:+.2%} ({best_ppl.config.label()})"
        )
    front = pareto_front(points, objective)
    chosen = _confirm(measured.quality, measured.source, facts, front, usable, max_kl, max_ppl_increase,
                      objective, say)  # fmt: skip
    plan = _run_plan(measured.path, facts, chosen, prompt_tokens, decode_tokens)
    return PlanSearch(points, front, chosen, plan, facts=facts, path=measured.path)


def search_plan(path: Path, memory_budget: int, *, calibration_ids: list[int], **options) -> PlanSearch:
    """``measure_for_planning`` then ``choose_plan``: the options of both, by name."""
    measure_options = {k: options.pop(k) for k in ("threads", "window", "prompt_tokens", "decode_tokens", "dtype",
                                                   "progress") if k in options}  # fmt: skip
    measured = measure_for_planning(path, calibration_ids=calibration_ids, **measure_options)
    return choose_plan(measured, memory_budget, progress=measure_options.get("progress"), **options)


def plan_of(search: PlanSearch, point: Point) -> RunPlan:
    """The run plan of any point of a search (``search.plan`` is the chosen one's)."""
    workload = search.plan.workload
    return _run_plan(search.path, search.facts, point, workload["prompt_tokens"], workload["decode_tokens"])


def _confirm(model, source, facts, front, budget, max_kl, max_ppl, objective, say) -> Point:
    """Measure the quality of the front's points within the limits, fastest first, until one is confirmed."""
    measured: dict[tuple, KLResult] = {}
    candidates = [p for p in front if _within(p, budget, max_kl, max_ppl)]
    for point in candidates:
        key = (point.config.experts, point.config.dense, point.config.skip_share, str(point.expert_formats))
        if key not in measured:
            if len(measured) >= _MEASURED_FRONT_POINTS:
                break
            say(f"measuring the quality of {point.config.label()}")
            measured[key] = _measure_quality(model, source, facts, point)
        result = measured[key]
        point.kl, point.nll_increase, point.kl_measured = result.kl_mean, _nll_increase(result), True
        if _within(point, budget, max_kl, max_ppl):
            return point
    remaining = [p for p in candidates if not p.kl_measured or _within(p, budget, max_kl, max_ppl)]
    if not remaining:
        raise MemoryBudgetError("no configuration on the front keeps the quality limit once measured")
    return max(remaining, key=lambda p: p.speed(objective))


def _measure_quality(model: nn.Module, source: nn.Module | None, facts: _Facts, point: Point) -> KLResult:
    """The KL of a configuration, its formats emulated on the float ``model`` (``emulated_formats``)."""
    config = point.config
    experts = point.expert_formats if config.experts == "mixed" else config.experts
    skipping = None
    if config.skip_share:
        skipping = {n: ExpertSkipping("threshold", b) for n, b in facts.skip_thresholds[config.skip_share].items()}
    with emulated_formats(model, experts, config.dense, source, facts.lowbit):
        set_skipping(model, skipping)
        try:
            return kl_divergence(model, facts.reference)
        finally:
            set_skipping(model, None)


def _measure(
    deployed: nn.Module, quality: nn.Module, path: Path, dtype: torch.dtype, ids: list[int], window: int,
    max_threads: int, prompt_tokens: int, decode_tokens: int, rss_probe: Callable[[], int], say,
) -> _Facts:  # fmt: skip
    """Measure what the predictions need: ``deployed`` is the model in the run's dtype (timed, tuned, sized),
    ``quality`` the same weights in the dtype the host computes fastest (calibration, KL, traces)."""
    model = quality
    layers = moe_layers(deployed)
    names = list(layers)
    shape = ModelShape.of_model(deployed)
    say(f"reference distributions and routing over {len(ids):,} calibration tokens")
    with TraceRecorder(model, keep_inputs=True) as recorder:  # one pass: distributions, routing, layer inputs
        reference = reference_logprobs(model, ids, window)
    inputs = recorder.inputs
    traces: dict[float, RoutingTrace] = {0.0: recorder.trace()}
    kl: dict[tuple, KLResult] = {}
    skip_thresholds: dict[float, dict[str, float]] = {}
    for share in SKIP_SHARES[1:]:
        say(f"expert skipping for {share:.0%} of the pairs: calibration, quality and routing")
        skipping = calibrate_skipping(model, ids, share, window)
        skip_thresholds[share] = {n: s.level for n, s in skipping.items()}
        set_skipping(model, skipping)
        with TraceRecorder(model) as recorder:
            kl[("skip", share)] = kl_divergence(model, reference)
        traces[share] = recorder.trace()
        set_skipping(model, None)
    skip_shares = {share: trace.skipped_share() for share, trace in traces.items()}
    thread_counts = [t for t in range(1, max_threads + 1) if t == max_threads or tuning.load_overheads(t) is not None]
    base_rss = rss_probe()  # before anything is timed
    # (experts, dense, threads, skip share) -> measured (prefill, decode) tok/s: the float model at each thread
    # count and skipping the most, the low-bit variants at the most threads (``_correction``, ``_skip_correction``)
    timed: dict[tuple, tuple[float, float]] = {}
    lowbit: dict[tuple[str, str], QuantizedWeight] = {}  # the variants' low-bit weights, kept for later emulation
    quality_layers = moe_layers(model)
    # Each expert's calibration tokens and float output, before any format is emulated: while one is, its
    # experts' output errors are that format's sensitivities for the per-expert allocation.
    experts_reference = {name: expert_reference(quality_layers[name], inputs[name]) for name in names}
    del inputs
    errors: dict[str, list[float]] = {"16": [0.0] * sum(layer.num_experts for layer in layers.values())}
    for kind, choice in (("experts", "int8"), ("experts", "int4-g32"), ("dense", "int8"), ("dense", "int4-g32")):
        say(f"measuring the quality and speed of {kind} in {choice}")
        formats = (choice, "float") if kind == "experts" else ("float", choice)
        # One pass per matrix quantizes it (into lowbit) and emulates the format on the quality model.
        with emulated_formats(model, *formats, None if quality is deployed else deployed, lowbit):
            kl[(kind, choice)] = kl_divergence(model, reference)
            if kind == "experts":
                errors[choice] = [err for name, layer in quality_layers.items() for err in output_errors(
                    layer, experts_reference[name], lambda e, w=layer.resident: (w.gate_up[e], w.down[e]))]  # fmt: skip
        variant = _variant(deployed, *formats, lowbit)
        for t in thread_counts:
            _tune(variant, t, say)
        timed[(*formats, max_threads, 0.0)] = _timed(variant, max_threads, prompt_tokens)
        del variant
    del experts_reference
    for t in thread_counts:
        _tune(deployed, t, say)
        timed[("float", "float", t, 0.0)] = _timed(deployed, t, prompt_tokens)
    most = SKIP_SHARES[-1]  # skipping costs and saves what the model cannot see: timed once, scaled to the others
    set_skipping(deployed, {n: ExpertSkipping("threshold", b) for n, b in skip_thresholds[most].items()})
    timed[("float", "float", max_threads, most)] = _timed(deployed, max_threads, prompt_tokens)
    set_skipping(deployed, None)
    candidates = [QuantFormat.parse(c) for c in MIXED_CANDIDATES]
    sensitivity = [list(row) for row in zip(*(errors[c] for c in MIXED_CANDIDATES), strict=True)]
    cost = []
    for layer in layers.values():
        float_bytes = layer.dtype.itemsize  # bytes in the run's dtype
        two_i, hidden = layer.resident.gate_up.shape[1:]
        shapes = ((two_i, hidden), (hidden, two_i // 2))
        one = [sum(f.nbytes(*nk, float_bytes) + _converted_nbytes(f, *nk, layer.dtype) for nk in shapes)
               for f in candidates]  # fmt: skip
        cost += [one] * layer.num_experts
    say("measuring this host: storage, the skipping path")
    storage = measure_storage_gbps(path, dtype)
    skip_ms = measure_skip_ms(next(iter(layers.values())))
    convert_ms = {name: measure_convert_ms(lowbit, name) for name in ("int4-g32",) if not native.is_available()}
    expert_bytes, slot_bytes, slot_extra = {}, {}, {}
    for choice in ("float", "int8", "int4-g32"):
        fmt = _format_name(choice, dtype)
        expert_bytes[fmt], slot_bytes[fmt], slot_extra[fmt] = _expert_bytes(deployed, choice)
    dense_bytes = {choice: _dense_bytes(deployed, choice) for choice in DENSE_CHOICES}
    models = {t: host_model(t, load_or_measure_roofline(t), dtype) for t in thread_counts}  # after the tuning
    say("replaying the routing traces through the expert cache")
    replays = {}
    for share, trace in traces.items():
        trace = trace.first(_REPLAY_TOKENS)
        for resident in RESIDENT_SHARES[1:]:
            slots = _cache_slots(shape, resident)
            for policy in POLICIES:
                for prefetch in (False, True):
                    replays[(share, slots, policy, prefetch)] = replay_cache(trace, slots, policy, prefetch)
    torch.set_num_threads(max_threads)
    facts = _Facts(
        shape, dtype, names, base_rss, storage, skip_ms, expert_bytes, dense_bytes, slot_bytes, replays,
        skip_shares, skip_thresholds, kl, sensitivity, cost, models, reference,
    )  # fmt: skip
    facts.corrections = _corrections(facts, timed, max_threads, prompt_tokens)
    facts.lowbit = lowbit
    facts.convert_ms = convert_ms
    facts.slot_extra = slot_extra
    return facts


def _timed(model: nn.Module, threads: int, prompt_tokens: int) -> tuple[float, float]:
    """Measured (prefill, decode) tokens/s of the resident model at ``threads``: the medians of short runs,
    repeated (at most 5) until they have taken a second, so that a small model's few milliseconds are not one
    noisy sample."""
    from .verify import time_run

    torch.set_num_threads(threads)
    prompt = min(prompt_tokens, _TIMED_PROMPT_TOKENS)
    runs = []
    started = time.perf_counter()
    while not runs or (len(runs) < 5 and time.perf_counter() - started < 1.0):
        runs.append(time_run(model, prompt, _TIMED_DECODE_STEPS, seed=len(runs)))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _corrections(facts: _Facts, timed: dict, max_threads: int, prompt_tokens: int) -> dict[tuple, float]:
    """Measured over predicted time of the resident configurations that were run (the float model at each thread
    count, each low-bit expert or dense format alone at the most threads, the float model skipping), as factors
    on the predicted compute time."""
    facts.corrections = corrections = {}
    prompt_tokens = min(prompt_tokens, _TIMED_PROMPT_TOKENS)
    position = prompt_tokens + _TIMED_DECODE_STEPS // 2
    # the formats first, then skipping on top of them (its prediction takes their corrections)
    for (experts, dense, t, skip), (prefill_tps, decode_tps) in sorted(timed.items(), key=lambda kv: kv[0][3]):
        config = Configuration(experts, dense, 1.0, "lfu", False, skip, t)
        fmt = _format_name(experts, facts.dtype)
        decode = (1e3 / decode_tps) / _decode_ms(facts, config, fmt, position, None)
        prefill = (prompt_tokens * 1e3 / prefill_tps) / _prefill_ms(facts, config, fmt, prompt_tokens)
        if skip:
            corrections[("decode skip", skip)], corrections[("prefill skip", skip)] = decode, prefill
        else:
            corrections[("decode", experts, dense, t)], corrections[("prefill", experts, dense, t)] = decode, prefill
    return corrections


def _skip_correction(facts: _Facts, kind: str, share: float) -> float:
    """The factor on a configuration's predicted time for its skipping: measured over predicted for the float
    model skipping the most (``_corrections``), scaled to this share; 1 where it was not run."""
    timed = [key[1] for key in facts.corrections if key[0] == f"{kind} skip"]
    if not share or not timed:
        return 1.0
    most = max(timed)
    return 1.0 + (facts.corrections[(f"{kind} skip", most)] - 1.0) * min(1.0, share / most)


def _correction(facts: _Facts, kind: str, config: Configuration, experts: str) -> float:
    """The factor on a configuration's predicted compute time (``_corrections``): the float model's at its thread
    count, times what its expert format and its dense format each change that by; 1 where nothing was run."""
    table, t = facts.corrections, config.threads
    top = max((key[3] for key in table if len(key) == 4), default=t)

    def relative(experts: str, dense: str) -> float:
        """A format's factor over the float model's, at these threads where it was run, else at the most."""
        at = t if (kind, experts, dense, t) in table else top
        return table.get((kind, experts, dense, at), 1.0) / table.get((kind, "float", "float", at), 1.0)

    choice = "float" if experts.startswith(("bfloat16", "float")) else experts
    return table.get((kind, "float", "float", t), 1.0) * relative(choice, "float") * relative("float", config.dense)


def _tune(model: nn.Module, threads: int, say) -> None:
    """Measure the kernel cases this model meets that the host's tuning table lacks (once per host)."""
    from ..perf.tune import missing_cases, model_cases, tune, tuning_enabled

    if not tuning_enabled():
        return
    missing = missing_cases(model_cases(model, threads))
    if missing:
        say(f"measuring {len(missing)} kernel case(s) at {threads} thread(s) on this host, once")
        tune(missing, on_case=lambda done, total, label: done < total and say(f"tuning ({done + 1}/{total}): {label}"))


def _run_plan(path: Path, facts: _Facts, point: Point, prompt: int, decode: int) -> RunPlan:
    config = point.config
    return RunPlan(
        model_identity=model_identity(path),
        model_path=str(path),
        host=tuning.host_fingerprint().key(),
        threads=config.threads,
        expert_bits=None if config.experts == "mixed" else _bits(config.experts),
        expert_formats=point.expert_formats,
        dense_bits=_bits(config.dense),
        cache_bytes=point.cache_bytes,
        cache_policy=config.policy,
        prefetch=config.prefetch and config.offloaded,
        skip_thresholds=facts.skip_thresholds.get(config.skip_share) if config.skip_share else None,
        predicted=point_record(point),
        workload={"prompt_tokens": prompt, "decode_tokens": decode},
        basis=_basis(facts, point),
    )


def _experts_shares(facts: _Facts, point: Point) -> dict[str, float]:
    """The share of experts in each format: one format, or a mixed allocation's."""
    if point.expert_formats is None:
        return {_format_name(point.config.experts, facts.dtype): 1.0}
    names = [n for formats in point.expert_formats.values() for n in formats]
    return {_format_name(n, facts.dtype): names.count(n) / len(names) for n in dict.fromkeys(names)}


def _basis(facts: _Facts, point: Point) -> dict:
    """What a plan's prediction rests on besides this host's kernels and overheads (see ``repredict``)."""
    config = point.config
    slots = _cache_slots(facts.shape, config.resident_share) if config.offloaded else None
    replays = {}
    if slots is not None:
        for prefetch in (False, True):
            replay = facts.replays[(config.skip_share, slots, config.policy, prefetch)]
            replays["prefetch" if prefetch else "plain"] = dataclasses.asdict(replay)
    return {
        "shape": dataclasses.asdict(facts.shape),
        "dtype": str(facts.dtype).removeprefix("torch."),
        "experts_shares": _experts_shares(facts, point),
        "skip_share_measured": facts.skip_shares[config.skip_share],
        "skip_ms": facts.skip_ms,
        "slot_bytes": facts.slot_bytes,
        "cache_slots": slots,
        "replays": replays,
        "storage_gbps": facts.storage_gbps,
        "convert_ms": facts.convert_ms,
    }


def repredict(plan: RunPlan) -> dict[str, float]:
    """A plan's decode and prefill tokens/s predicted on this host: its performance model with the plan's basis
    (cache replay, skipping, storage speed measured where it was planned). Without the planning host's timed
    corrections, and with its storage speed: a first estimate until ``moerun plan`` runs here."""
    basis = plan.basis
    if not basis:
        raise ValueError("this plan records no prediction basis; plan again with moerun plan")
    config = Configuration(**plan.predicted["configuration"])
    dtype = getattr(torch, basis["dtype"])
    slots = basis["cache_slots"]
    replays = {(config.skip_share, slots, config.policy, key == "prefetch"): CacheReplay(**value)
               for key, value in basis["replays"].items()}  # fmt: skip
    model = host_model(config.threads, load_or_measure_roofline(config.threads), dtype)
    facts = _Facts(
        ModelShape(**basis["shape"]), dtype, [], 0, basis["storage_gbps"], basis["skip_ms"], {}, {},
        basis["slot_bytes"], replays, {config.skip_share: basis["skip_share_measured"]}, {}, {}, [], [],
        {config.threads: model}, None, convert_ms=basis["convert_ms"],
    )  # fmt: skip
    prompt, decode = plan.workload["prompt_tokens"], plan.workload["decode_tokens"]
    shares = basis["experts_shares"]
    decode_ms = sum(s * _decode_ms(facts, config, f, prompt + decode // 2, slots) for f, s in shares.items())
    prefill_ms = sum(s * _prefill_ms(facts, config, f, prompt) for f, s in shares.items())
    return {"decode_tokens_per_s": 1e3 / decode_ms, "prefill_tokens_per_s": prompt * 1e3 / prefill_ms}


def point_record(point: Point) -> dict:
    """A point as JSON-ready numbers."""
    return {
        "configuration": dataclasses.asdict(point.config),
        "label": point.config.label(),
        "decode_tokens_per_s": point.decode_tps,
        "prefill_tokens_per_s": point.prefill_tps,
        "peak_bytes": point.peak_bytes,
        "kl": point.kl,
        "ppl_increase": point.ppl_increase,
        "kl_measured": point.kl_measured,
        "cache_bytes": point.cache_bytes,
    }
