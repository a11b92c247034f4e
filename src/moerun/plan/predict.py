"""The planner's predictions: each configuration's decode and prefill tokens/s, peak resident memory and quality
from what ``moerun.plan.measure`` measured (``Facts``).

- decode and prefill tokens/s from the performance model (``moerun.perf.predict``), with the experts per
  token that skipping leaves, the measured cost of the skipping path, and the cache's reads from replaying a
  routing trace of the calibration text through moerun's own cache (``moerun.plan.trace``); reads are timed at
  the storage bandwidth measured on the checkpoint; the compute time is scaled by measured over predicted time
  of the configurations that were run (``Facts.corrections``);
- peak resident memory: a fresh moerun process's memory (measured), plus the weights in the configuration's
  formats, the cache, the lean runner's stacked q/k/v and the KV cache of the workload;
- quality: KL divergence against the unmodified model on the calibration text, as the sum of the measured KL
  of each knob alone (experts int8 and int4, dense int8 and int4, each skipping level); a per-expert mix
  scales int4's KL by the allocator's sensitivity of the mix over that of int4 everywhere.

The search space, for one model on this host:

- routed experts: the model's float dtype, int8, int4-g32, or a format per expert chosen by the exact
  allocator (least calibration sensitivity within the bytes the budget leaves);
- attention and output head: float, int8 or int4-g32;
- routed experts resident, or read from the checkpoint through a cache of 75/50/25% of their bytes or of the
  least it takes (one layer's selected experts), with LFU or LRU eviction, prefetching on or off;
- threshold expert skipping off, or calibrated to drop 10% or 25% of the (token, expert) pairs;
- threads: 1 to the cores (those the host's measurements cover, and the one asked for).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..errors import MemoryBudgetError
from ..models.run_plan import RunPlan
from ..perf.predict import MatrixFormats, ModelShape, PerfModel, host_model
from ..perf.roofline import load_or_measure_roofline
from ..quant.allocate import allocate_bits
from ..quant.formats import (
    QuantFormat,
)
from ..runtime.eval import KLResult, ReferenceLogprobs
from .trace import CacheReplay

EXPERT_CHOICES = ("float", "int8", "int4-g32", "mixed")
DENSE_CHOICES = ("float", "int8", "int4-g32")
RESIDENT_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)  # 0.0: the least cache the model takes
POLICIES = ("lfu", "lru")
SKIP_SHARES = (0.0, 0.1, 0.25)
MIXED_CANDIDATES = ("int4-g32", "int8", "16")


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
class Facts:
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
    lowbit: dict = field(default_factory=dict)  # low-bit weights made while emulating (emulated_formats)
    convert_ms: dict = field(default_factory=dict)  # per expert read: making its torch-path conversions, by format
    slot_extra: dict = field(default_factory=dict)  # bytes a slot's torch-path conversions add, by format


def _format_name(choice: str, dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.") if choice in ("float", "16") else choice


def _bits(choice: str) -> int:
    return 16 if choice in ("float", "16") else QuantFormat.parse(choice).bits


def _runtime_bytes(shape: ModelShape, dense: str, dtype: torch.dtype, positions: int) -> int:
    """The lean runner's own memory: its stacked q/k/v copy and the KV cache of ``positions`` positions."""
    formats = MatrixFormats(_format_name(dense, dtype), _format_name(dense, dtype), dtype)
    qkv = shape.num_layers * formats.bytes_of(formats.dense, shape.qkv_rows, shape.hidden)
    kv = shape.num_layers * 2 * positions * shape.num_kv_heads * shape.head_dim * dtype.itemsize
    return qkv + kv


def _decode_ms(facts: Facts, config: Configuration, experts_fmt: str, position: int, cache_slots: int | None) -> float:
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


def _prefill_ms(facts: Facts, config: Configuration, experts_fmt: str, prompt: int) -> float:
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


def _quality(facts: Facts, config: Configuration, mixed_ratio: float | None) -> tuple[float, float]:
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


def _slots(facts: Facts, experts_fmt: str, share: float) -> tuple[int, int]:
    """(cache slots, cache bytes) of a cache holding ``share`` of the experts (0: the least it takes)."""
    slots = _cache_slots(facts.shape, share)
    return slots, slots * (facts.slot_bytes[experts_fmt] + facts.slot_extra.get(experts_fmt, 0))


def _cache_slots(shape: ModelShape, share: float) -> int:
    """Slots of a cache holding ``share`` of a model's experts; 0.0: the least it takes (k)."""
    total = shape.num_layers * shape.num_experts
    return shape.top_k if share == 0.0 else max(shape.top_k, min(total, round(share * total)))


def _points(facts: Facts, budget: int, threads: list[int], positions: int, prompt: int, decode: int) -> list[Point]:
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
        expert_formats, sensitivity_sum, expert_bytes = mixed
        mixed_ratio = sensitivity_sum / int4_sensitivity
        shares = _format_shares(expert_formats, facts.dtype)
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


def _mixed_allocation(facts: Facts, expert_budget: int):
    """Per-expert formats within ``expert_budget`` bytes: (format names per layer, summed sensitivity, bytes), or
    None where even int4 everywhere does not fit or float everywhere does."""
    costs = facts.sensitivity_cost
    if expert_budget < sum(min(row) for row in costs) or expert_budget >= sum(max(row) for row in costs):
        return None
    try:
        choice = allocate_bits(facts.sensitivity, costs, expert_budget)
    except MemoryBudgetError:
        return None
    per_layer: dict[str, list[str]] = {}
    for i, c in enumerate(choice):
        layer = facts.layer_names[i // facts.shape.num_experts]
        per_layer.setdefault(layer, []).append(QuantFormat.parse(MIXED_CANDIDATES[c]).name)
    sensitivity = sum(facts.sensitivity[i][c] for i, c in enumerate(choice))
    nbytes = sum(costs[i][c] for i, c in enumerate(choice))
    return per_layer, sensitivity, nbytes


def _format_shares(expert_formats: dict[str, list[str]], dtype: torch.dtype) -> dict[str, float]:
    """The share of experts in each format of a per-expert allocation (format names per layer)."""
    names = [_format_name(n, dtype) for formats in expert_formats.values() for n in formats]
    return {n: names.count(n) / len(names) for n in dict.fromkeys(names)}


def _skip_correction(facts: Facts, kind: str, share: float) -> float:
    """The factor on a configuration's predicted time for its skipping: measured over predicted for the float
    model skipping the most (``_corrections``), scaled to this share; 1 where it was not run."""
    timed = [key[1] for key in facts.corrections if key[0] == f"{kind} skip"]
    if not share or not timed:
        return 1.0
    most = max(timed)
    return 1.0 + (facts.corrections[(f"{kind} skip", most)] - 1.0) * min(1.0, share / most)


def _correction(facts: Facts, kind: str, config: Configuration, experts: str) -> float:
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


def _experts_shares(facts: Facts, point: Point) -> dict[str, float]:
    """The share of experts in each format: one format, or a mixed allocation's."""
    if point.expert_formats is None:
        return {_format_name(point.config.experts, facts.dtype): 1.0}
    return _format_shares(point.expert_formats, facts.dtype)


def _basis(facts: Facts, point: Point) -> dict:
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
    facts = Facts(
        shape=ModelShape(**basis["shape"]), dtype=dtype, layer_names=[], base_rss=0,
        storage_gbps=basis["storage_gbps"], skip_ms=basis["skip_ms"], expert_bytes={}, dense_bytes={},
        slot_bytes=basis["slot_bytes"], replays=replays,
        skip_shares={config.skip_share: basis["skip_share_measured"]}, skip_thresholds={}, kl={}, sensitivity=[],
        sensitivity_cost=[], models={config.threads: model}, reference=None, convert_ms=basis["convert_ms"],
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
