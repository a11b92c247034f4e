"""`moerun bench --model M --memory-budget SIZE` and `--sweep-memory`: decoding with the routed experts left in
the checkpoint and read through an expert cache (:mod:`moerun.offload`), on-demand LRU against a policy with
prefetching.

Honest I/O: every measured sequence starts from a fresh load (an empty cache), with the checkpoint's files
evicted from the OS page cache (``posix_fadvise(DONTNEED)``) before the prompt; the store reads with direct
I/O (or drops every range it reads), so each miss reads storage, and the storage bandwidth those reads
achieved is reported.

Memory: each load and its sequence are measured alone: the process's peak resident memory over what it held
just before loading is set against what offloading promises, the cache budget plus the non-expert weights.
Cache slots cost memory only once an expert is read into them, so the overhead stated is what remains after
the slots filled and the non-expert weights (the lean runner's stacked q/k/v and KV cache, activations,
allocator slack); resident memory stays within budget + non-expert weights + overhead.

Decode steps sample at temperature 1 from a seeded generator: greedy decoding of a randomly initialised model
falls into a loop of a few tokens (``olmoe-1b-7b-4l`` cycles through 2-4 tokens after a dozen steps), whose
experts a cache of half the experts holds 97% of the time under any policy. Offloading computes exactly what
the resident model does, so every setup decodes the same tokens. Setups take turns round by round and the
tables report medians.

A model to offload must be a checkpoint on disk: ``offload_checkpoint`` writes the synthetic model, or a
quantized copy of a directory, once into a cache directory and reuses it.

Shape legend: P prompt tokens, N decode tokens.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..files import cache_directory, directory_written_whole, file_written_whole
from ..models.convert import quantize_checkpoint, save_quantized
from ..models.hf import patch
from ..models.loader import (
    CheckpointError,
    load,
    peak_rss_bytes,
    read_config,
    read_quant_layout,
    reset_peak_rss,
    rss_bytes,
)
from ..models.quantized import QuantConfig, expert_nbytes, model_nbytes, quantize
from ..offload.cache import LayerCacheStats, summarize
from ..runtime.generate import default_runner
from .bench import DTYPES
from .model_bench import SYNTHETIC_MODELS, load_model, resolve_model_dir
from .predict import MatrixFormats, ModelShape, PerfModel

SWEEP_PERCENTS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)


@dataclass(frozen=True)
class Setup:
    """One way of running the expert cache."""

    policy: str  # "lru" or "lfu"
    prefetch: bool

    @property
    def label(self) -> str:
        if self == ON_DEMAND_LRU:
            return "on-demand LRU"
        return f"{self.policy.upper()} {'+ prefetch' if self.prefetch else 'on demand'}"


ON_DEMAND_LRU = Setup("lru", False)  # the baseline: read each miss when it is needed, evict the least recent


def checkpoint_cache_dir() -> Path:
    """Where converted checkpoints are kept: ``checkpoints`` in moerun's cache directory."""
    return cache_directory() / "checkpoints"


def _suffix(bits: int, group_size: int) -> str:
    return {16: "bf16", 8: "int8"}.get(bits, f"int4-g{group_size}")


def _is_current(path: Path, bits: int) -> bool:
    """Whether a cached checkpoint is complete and of this moerun's quantized format (16 bits: a float one)."""
    if not (path / "config.json").is_file():
        return False
    try:
        return (read_quant_layout(path) is None) == (bits == 16)
    except CheckpointError:  # an older format version
        return False


def _source_key(src: Path) -> str:
    """A short digest of a checkpoint directory's path and its weight files' sizes and times (a changed
    source gets a new cached copy)."""
    digest = hashlib.sha1(str(src.resolve()).encode())
    for file in sorted([src / "config.json", *src.glob("*.safetensors")]):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:8]


def offload_checkpoint(
    spec: str, bits: int = 16, group_size: int = 32, progress: Callable[[str], None] | None = None
) -> Path:
    """A checkpoint directory holding model ``spec`` at ``bits``, to load with a memory budget.

    Args:
        spec: a name in ``SYNTHETIC_MODELS``, ``reference``, or a checkpoint directory.
        bits: 16 (a directory as it is; the synthetic model in bf16), 8 or 4 (a quantized checkpoint).
        group_size: int4 values per scale.
        progress: called with a line of text per step of a conversion.

    Returns:
        ``spec``'s own directory, or one under ``checkpoint_cache_dir()`` written on first use (the synthetic
        model built with seeded weights, or a directory quantized by ``quantize_checkpoint``) and reused while
        its quantized format is current.

    Raises:
        ValueError: an unknown model, a directory that is already quantized with ``bits`` below 16, or too
            little memory to build the synthetic model.
    """
    step = progress or (lambda _: None)
    if spec in SYNTHETIC_MODELS:
        dst = checkpoint_cache_dir() / f"{spec}-{_suffix(bits, group_size)}"
        if _is_current(dst, bits):
            return dst
        shutil.rmtree(dst, ignore_errors=True)  # incomplete or of an older format
        step(f"building {spec} (written once to {dst})")
        model = load_model(spec, torch.bfloat16)
        if bits == 16:
            step(f"writing {spec}")
            with directory_written_whole(dst) as tmp:
                model.save_pretrained(tmp)
            return dst
        patch(model)
        layout = quantize(model, QuantConfig(bits, group_size), progress=lambda name: step(f"quantizing {name}"))
        save_quantized(model, layout, dst, progress=step)
        return dst
    src = resolve_model_dir(spec)
    if bits == 16:
        return src
    if read_quant_layout(src) is not None:
        raise ValueError(f"{src} is already a quantized checkpoint: run it as it is (bits 16)")
    dst = checkpoint_cache_dir() / f"{src.name}-{_source_key(src)}-{_suffix(bits, group_size)}"
    if _is_current(dst, bits):
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    step(f"quantizing {src} to {dst} (once)")
    quantize_checkpoint(src, dst, QuantConfig(bits, group_size), progress=step)
    return dst


@dataclass
class OffloadRecord:
    """One (budget, setup) measurement: medians over rounds (memory: the largest), as written to JSON."""

    model: str
    checkpoint: str
    bits: int
    dtype: str
    threads: int
    setup: str
    policy: str
    prefetch: bool
    budget: str  # as asked: "50%", "2GB"
    budget_bytes: int  # the cache: slots x slot bytes
    budget_fraction: float  # budget_bytes over expert_bytes
    slots: int
    expert_bytes: int  # every routed expert as a slot holds it
    non_expert_bytes: int  # the resident weights
    prompt_tokens: int
    decode_tokens: int
    rounds: int
    ttft_ms: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    hit_rate: float  # of the decode steps' expert accesses
    read_mb_per_token: float  # storage reads per decode step, prefetches included
    stall_ms_per_token: float  # decode time spent waiting for reads
    storage_gbps: float  # bytes read over the time the reads took
    prediction_accuracy: float | None  # predicted next-layer experts the layer then used (prefetch only)
    uncached_prediction_accuracy: float | None  # the same, of the predictions for experts not cached
    cache_filled_bytes: int  # slots an expert was read into, in bytes (at most budget_bytes)
    rss_added_bytes: int  # peak resident memory over what the process held before loading
    rss_expected_bytes: int  # the promise: budget_bytes + non_expert_bytes
    rss_overhead_bytes: int  # rss_added_bytes - cache_filled_bytes - non_expert_bytes (the largest of the runs)
    layers: list[dict]  # per MoE layer, the decode steps of all rounds: counters summed, rates of the sums
    # The performance model's predictions at this record's hit rate and storage bandwidth, and their errors
    # (predicted / measured - 1).
    predicted_prefill_tokens_per_s: float | None = None
    predicted_decode_tokens_per_s: float | None = None
    prefill_prediction_error: float | None = None
    decode_prediction_error: float | None = None

    def cache_report(self) -> dict:
        """The decode steps of all rounds as ``ExpertCache.report()`` gives one run (totals of ``layers``)."""
        layers = [LayerCacheStats.from_dict(layer) for layer in self.layers]
        return {
            "budget_bytes": self.budget_bytes,
            "slots": self.slots,
            "policy": self.policy,
            "prefetch": self.prefetch,
            "bytes_read": LayerCacheStats.total(layers).bytes_read,
            "storage_gbps": self.storage_gbps,
            **summarize(layers),
            "layers": self.layers,
        }


def _release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc ``malloc_trim``), so that memory
    a previous run freed neither hides in nor inflates the next run's resident memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: resident memory may then include freed pages
        pass


def _sample(logits: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from softmax(logits [V]) (temperature 1)."""
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def _run_once(
    path: Path, budget: str, setup: Setup, dtype: str, threads: int, prompt: torch.Tensor, decode_tokens: int, seed: int
) -> dict:
    """Load ``path`` with the budget, evict its files from the page cache, prefill ``prompt`` [P] and decode
    ``decode_tokens`` sampled tokens; seconds, the decode steps' cache report and memory."""
    _release_freed_memory()  # the previous run's model and cache
    rss_before = rss_bytes()
    reset_peak_rss()
    loaded = load(path, dtype, threads, budget, setup.policy, setup.prefetch)
    cache = loaded.cache
    try:
        runner = default_runner(loaded.model, prompt.numel() + decode_tokens)
        cache.store.drop_files_from_page_cache()
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        token = _sample(runner.prefill(prompt), generator)
        ttft = time.perf_counter() - start
        cache.wait()
        cache.reset_stats()
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = _sample(runner.decode(token), generator)
        decode = time.perf_counter() - start
        cache.wait()  # prefetches still in flight count in the bytes read, not in the decode time
        report = cache.report()
        peak = peak_rss_bytes()
        store = cache.store
        sizes = {
            "budget_bytes": cache.budget_bytes,
            "slots": cache.num_slots,
            # as budget percentages count them: slot bytes of every expert
            "expert_bytes": sum(
                store.expert_nbytes(li, e) for li, lay in enumerate(store.layouts) for e in range(len(lay))
            ),
            "non_expert_bytes": model_nbytes(loaded.model) - expert_nbytes(loaded.model),
            "filled_bytes": len(cache.resident()) * cache.slot_nbytes,  # slots are never emptied, only reused
        }
    finally:
        cache.close()
    return {"ttft": ttft, "decode": decode, "report": report, "rss_added": peak - rss_before, **sizes}


def _sum_layers(reports: list[dict]) -> list[dict]:
    """Per-layer counters summed over runs, with hit rate and prediction accuracy of the sums."""
    return [
        LayerCacheStats.total(LayerCacheStats.from_dict(layer) for layer in layers).to_dict()
        for layers in zip(*(r["layers"] for r in reports), strict=True)
    ]


def _record(common: dict, setup: Setup, budget: str, runs: list[dict]) -> OffloadRecord:
    """The record of one (budget, setup) from its runs; ``common``: the fields every record of a bench shares."""
    first = runs[0]
    reports = [r["report"] for r in runs]
    decode = statistics.median(r["decode"] for r in runs)
    decode_tokens = common["decode_tokens"]
    accuracy = [r["prediction_accuracy"] for r in reports if r["prediction_accuracy"] is not None]
    uncached = [r["uncached_prediction_accuracy"] for r in reports if r["uncached_prediction_accuracy"] is not None]
    return OffloadRecord(
        **common,
        setup=setup.label,
        policy=setup.policy,
        prefetch=setup.prefetch,
        budget=budget,
        budget_bytes=first["budget_bytes"],
        budget_fraction=first["budget_bytes"] / first["expert_bytes"],
        slots=first["slots"],
        expert_bytes=first["expert_bytes"],
        non_expert_bytes=first["non_expert_bytes"],
        rounds=len(runs),
        ttft_ms=statistics.median(r["ttft"] for r in runs) * 1e3,
        decode_tokens_per_s=decode_tokens / decode,
        decode_ms_per_token=decode / decode_tokens * 1e3,
        hit_rate=statistics.median(r["hit_rate"] for r in reports),
        read_mb_per_token=statistics.median(r["bytes_read"] for r in reports) / decode_tokens / 1e6,
        stall_ms_per_token=statistics.median(r["stall_s"] for r in reports) / decode_tokens * 1e3,
        storage_gbps=statistics.median(r["storage_gbps"] for r in reports),
        prediction_accuracy=statistics.median(accuracy) if accuracy else None,
        uncached_prediction_accuracy=statistics.median(uncached) if uncached else None,
        cache_filled_bytes=max(r["filled_bytes"] for r in runs),
        rss_added_bytes=max(r["rss_added"] for r in runs),
        rss_expected_bytes=first["budget_bytes"] + first["non_expert_bytes"],
        rss_overhead_bytes=max(r["rss_added"] - r["filled_bytes"] - r["non_expert_bytes"] for r in runs),
        layers=_sum_layers(reports),
    )


def run_offload_bench(
    model_spec: str,
    budgets: list[str],
    setups: list[Setup],
    dtype_name: str = "bf16",
    threads: int = 1,
    bits: int = 4,
    group_size: int = 32,
    prompt_tokens: int = 32,
    decode_tokens: int = 32,
    rounds: int = 3,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
    perf_model: PerfModel | None = None,
) -> list[OffloadRecord]:
    """Measure each setup at each budget, setups alternating round by round; one record per (budget, setup).

    Args:
        model_spec: a name in ``SYNTHETIC_MODELS``, ``reference``, or a checkpoint directory.
        budgets: memory budgets as ``load`` takes them ("50%", "2GB").
        setups: cache policies with or without prefetching, e.g. ``[ON_DEMAND_LRU, Setup("lfu", True)]``.
        dtype_name: "bf16" or "fp32".
        threads: torch (and native kernel) threads.
        bits: 16 (the checkpoint as it is), 8 or 4 (see ``offload_checkpoint``).
        group_size: int4 group size.
        prompt_tokens: P, the prompt (random token ids, seeded).
        decode_tokens: N, decode steps per run (sampled: see the module docstring).
        rounds: runs per (budget, setup), each from a fresh load; one uncounted warm-up run comes first.
        seed: seed of the prompt and of the sampling.
        on_step: called with a progress message before each step.
        perf_model: this host's performance model; its predictions join the records.

    Raises:
        ValueError / CheckpointError: an unknown model, a budget below one layer's selected experts, a
            sequence longer than the model's context.
    """
    step = on_step or (lambda _: None)
    torch.set_num_threads(threads)
    path = offload_checkpoint(model_spec, bits, group_size, step)
    config = read_config(path)
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + decode_tokens > context:
        raise ValueError(
            f"{prompt_tokens} prompt + {decode_tokens} decode tokens exceed the model's context of {context} positions"
        )
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(seed))
    step(f"{model_spec}: warm-up")
    _run_once(path, budgets[0], setups[0], dtype_name, threads, prompt, min(decode_tokens, 2), seed)
    common = dict(
        model=model_spec,
        checkpoint=str(path),
        bits=bits,
        dtype=dtype_name,
        threads=threads,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
    )
    records = []
    for budget in budgets:
        runs: dict[Setup, list[dict]] = {s: [] for s in setups}
        for round_index in range(rounds):
            for setup in setups:
                step(f"{model_spec} budget {budget}, round {round_index + 1}/{rounds}: {setup.label}")
                runs[setup].append(_run_once(path, budget, setup, dtype_name, threads, prompt, decode_tokens, seed))
        records += [_record(common, s, budget, runs[s]) for s in setups]
    if perf_model is not None:
        records = [_with_prediction(r, perf_model, ModelShape.of_config(config), group_size) for r in records]
    return records


def _with_prediction(record: OffloadRecord, perf_model: PerfModel, shape: ModelShape, group_size: int) -> OffloadRecord:
    """The record with the performance model's prediction at its measured hit rate and storage bandwidth."""
    formats = MatrixFormats.of(DTYPES[record.dtype], record.bits, group_size)
    storage = record.storage_gbps if record.storage_gbps > 0 else None
    position = record.prompt_tokens + record.decode_tokens // 2
    hit_rate = record.hit_rate if storage else 1.0
    step_ms = perf_model.decode_step(shape, formats, position, hit_rate, storage, offloaded=True).ms
    # Every round loads afresh: the prompt finds the cache empty.
    prefill_ms = perf_model.prefill(shape, formats, record.prompt_tokens, 0 if storage else None, storage).ms
    decode = 1e3 / step_ms
    prefill = record.prompt_tokens / prefill_ms * 1e3
    prefill_measured = record.prompt_tokens / record.ttft_ms * 1e3
    return replace(
        record,
        predicted_prefill_tokens_per_s=prefill,
        predicted_decode_tokens_per_s=decode,
        prefill_prediction_error=prefill / prefill_measured - 1,
        decode_prediction_error=decode / record.decode_tokens_per_s - 1,
    )


def run_memory_sweep(
    model_spec: str,
    setup: Setup = Setup("lfu", True),
    percents: tuple[int, ...] = SWEEP_PERCENTS,
    **kwargs,
) -> list[OffloadRecord]:
    """``run_offload_bench`` at budgets of ``percents`` of the expert bytes, smallest first, on-demand LRU
    against ``setup``; keyword arguments as ``run_offload_bench`` takes them."""
    setups = list(dict.fromkeys([ON_DEMAND_LRU, setup]))
    return run_offload_bench(model_spec, [f"{p}%" for p in sorted(percents)], setups, **kwargs)


def record_dicts(records: list[OffloadRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def plot_sweep(records: list[OffloadRecord], path: Path) -> None:
    """A PNG of decode tokens/s and hit rate against the budget (% of expert bytes), one line per setup.

    Written to a temporary name beside ``path`` and renamed into place when complete.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no interactive backend

    first = records[0]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    speed, hits = figure.subplots(1, 2)
    for label in dict.fromkeys(r.setup for r in records):
        mine = sorted((r for r in records if r.setup == label), key=lambda r: r.budget_fraction)
        x = [100 * r.budget_fraction for r in mine]
        speed.plot(x, [r.decode_tokens_per_s for r in mine], marker="o", label=label)
        hits.plot(x, [100 * r.hit_rate for r in mine], marker="o", label=label)
    for ax, ylabel in ((speed, "decode tokens/s"), (hits, "expert cache hit rate, %")):
        ax.set_xlabel("memory budget, % of expert bytes")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    bits = "bf16" if first.bits == 16 else f"int{first.bits}"
    figure.suptitle(
        f"{first.model} ({bits}), experts read from storage: {first.prompt_tokens}-token prompt, "
        f"{first.decode_tokens} decode steps, {first.threads} threads, median of {first.rounds} rounds"
    )
    with file_written_whole(path, "wb") as f:
        figure.savefig(f, format="png", dpi=120)
