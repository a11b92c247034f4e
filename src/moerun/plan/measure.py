"""What the planner measures of one model on this host (``measure_for_planning``): reference distributions and
routing traces on the calibration text, each format's and skipping level's KL (formats emulated on a float
model), per-expert sensitivities, timed runs of the resident model in each format, the storage bandwidth, the
fixed memory of a fresh process, the cache replays.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..kernels import native, tuning
from ..layer import MoELayer
from ..models.loader import load
from ..models.mixed import expert_reference, output_errors
from ..models.quantized import QuantConfig, QuantLinear, dense_linears, model_nbytes, moe_layers
from ..models.run_plan import RunPlan, model_identity
from ..models.skipping import calibrate_skipping, set_skipping
from ..perf.model_bench import quantized_copy
from ..perf.predict import ModelShape, host_model
from ..perf.roofline import load_or_measure_roofline
from ..quant.formats import (
    QuantFormat,
    QuantizedWeight,
    int4pack_nbytes,
    matmul_transposed,
    quantize_weight,
    round_trip,
)
from ..routing import ExpertSkipping
from ..runtime.eval import KLResult, kl_divergence, reference_logprobs
from .predict import (
    DENSE_CHOICES,
    MIXED_CANDIDATES,
    POLICIES,
    RESIDENT_SHARES,
    SKIP_SHARES,
    Configuration,
    Facts,
    _bits,
    _cache_slots,
    _decode_ms,
    _format_name,
    _prefill_ms,
    _runtime_bytes,
)
from .trace import RoutingTrace, TraceRecorder, replay_cache

_TIMED_PROMPT_TOKENS = 64
_TIMED_DECODE_STEPS = 16  # decode steps of each resident configuration the planner runs to correct its model
_CHEAP_TIMING_S = 3.0  # a low-bit variant timed faster than this is timed at every thread count, not only the most


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
        quantized: low-bit weights already made (as ``lowbit_weights`` finds them) by (parameter name, format
            name), used instead of quantizing again; the whole matrices it lacks are added as they are made.
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


@dataclass
class PlanMeasurements:
    """What ``measure_for_planning`` found of one model on this host, for any number of ``choose_plan`` calls."""

    path: Path
    facts: Facts
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


def _measure(
    deployed: nn.Module, quality: nn.Module, path: Path, dtype: torch.dtype, ids: list[int], window: int,
    max_threads: int, prompt_tokens: int, decode_tokens: int, rss_probe: Callable[[], int], say,
) -> Facts:  # fmt: skip
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
    # count and skipping the most, the low-bit variants at the most threads (and at every count where that is
    # cheap: ``_CHEAP_TIMING_S``) (``_correction``, ``_skip_correction``)
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
        started = time.perf_counter()
        timed[(*formats, max_threads, 0.0)] = _timed(variant, max_threads, prompt_tokens)
        if time.perf_counter() - started < _CHEAP_TIMING_S:
            # A small model: a format's cost at fewer threads is not its cost at the most scaled by the float
            # model's (int4 at one thread ran 2x slower than that on the reference model), and is cheap to time.
            for t in thread_counts:
                if t != max_threads:
                    timed[(*formats, t, 0.0)] = _timed(variant, t, prompt_tokens)
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
    # The workload on the calibration text: its prompt fills the cache, its decode steps are counted.
    replayed = min(prompt_tokens + decode_tokens, len(ids))
    warmup = min(prompt_tokens, replayed // 2)
    for share, trace in traces.items():
        trace = trace.first(replayed)
        for resident in RESIDENT_SHARES[1:]:
            slots = _cache_slots(shape, resident)
            for policy in POLICIES:
                for prefetch in (False, True):
                    replays[(share, slots, policy, prefetch)] = replay_cache(trace, slots, policy, prefetch, warmup)
    torch.set_num_threads(max_threads)
    facts = Facts(
        shape=shape,
        dtype=dtype,
        layer_names=names,
        base_rss=base_rss,
        storage_gbps=storage,
        skip_ms=skip_ms,
        expert_bytes=expert_bytes,
        dense_bytes=dense_bytes,
        slot_bytes=slot_bytes,
        replays=replays,
        skip_shares=skip_shares,
        skip_thresholds=skip_thresholds,
        kl=kl,
        sensitivity=sensitivity,
        sensitivity_cost=cost,
        models=models,
        reference=reference,
        lowbit=lowbit,
        convert_ms=convert_ms,
        slot_extra=slot_extra,
    )
    _corrections(facts, timed, prompt_tokens)
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


def _corrections(facts: Facts, timed: dict, prompt_tokens: int) -> None:
    """Fill ``facts.corrections``: measured over predicted time of the resident configurations that were run (the
    float model at each thread count, each low-bit expert or dense format alone at the most threads, or at each
    count for a small model, the float model skipping), as factors on the predicted compute time."""
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


def _tune(model: nn.Module, threads: int, say) -> None:
    """Measure the kernel cases this model meets that the host's tuning table lacks (once per host)."""
    from ..perf.tune import missing_cases, model_cases, tune, tuning_enabled

    if not tuning_enabled():
        return
    missing = missing_cases(model_cases(model, threads))
    if missing:
        say(f"measuring {len(missing)} kernel case(s) at {threads} thread(s) on this host, once")
        tune(missing, on_case=lambda done, total, label: done < total and say(f"tuning ({done + 1}/{total}): {label}"))
