"""`moerun bench`: one MoE layer of a real model's shape, moerun vs transformers, side by side.

Every preset is built as transformers' own MoE block with seeded random weights; moerun's layer is
made from that block and shares its weights, so all implementations compute the same function.
Implementations are timed alternately within one run so that machine noise hits them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..kernels import onednn
from ..layer import MoELayer
from ..models.hf import layer_from_hf_block
from ..quant.formats import QuantFormat, weight_nbytes
from ..routing import make_plan, route
from .predict import MatrixFormats, ModelShape, PerfModel
from .roofline import Roofline

# moerun-prepacked: moerun with a second, oneDNN-packed copy of the expert weights for prefill GEMMs.
IMPLS = ("moerun", "moerun-prepacked", "hf-eager", "hf-grouped_mm")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_READ_PROBE = "_read_probe"
_READ_PROBE_BYTES = 256 << 20  # far beyond the last-level cache


@dataclass(frozen=True)
class Preset:
    """The MoE layer shape of a published model."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    shared_intermediate_size: int = 0

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return 3 * self.hidden_size * self.intermediate_size * dtype.itemsize

    def layer_bytes(self, dtype: torch.dtype) -> int:
        shared = 3 * self.hidden_size * self.shared_intermediate_size * dtype.itemsize
        return self.num_experts * self.expert_bytes(dtype) + shared


PRESETS = {
    "olmoe-1b-7b": Preset("olmoe", 2048, 1024, 64, 8),
    "qwen3-30b-a3b": Preset("qwen3_moe", 2048, 768, 128, 8),
    "mixtral-8x7b": Preset("mixtral", 4096, 14336, 8, 2),
    "deepseek-v2-lite": Preset("deepseek_v2", 2048, 1408, 64, 6, shared_intermediate_size=2816),
    "gpt-oss-20b": Preset("gpt_oss", 2880, 2880, 32, 4),
}


def _hf_block(preset: Preset) -> nn.Module:
    """transformers' MoE block for the preset's family and shape, on the meta device (no memory)."""
    import importlib

    import transformers

    p = preset
    routed = {"hidden_size": p.hidden_size, "num_experts_per_tok": p.top_k}
    # family -> (config class, modeling module, block class, family-specific config fields)
    specs = {
        "olmoe": ("OlmoeConfig", "olmoe", "OlmoeSparseMoeBlock",
                  {"intermediate_size": p.intermediate_size, "num_experts": p.num_experts, "norm_topk_prob": False}),
        "qwen3_moe": ("Qwen3MoeConfig", "qwen3_moe", "Qwen3MoeSparseMoeBlock",
                      {"moe_intermediate_size": p.intermediate_size, "num_experts": p.num_experts,
                       "norm_topk_prob": True}),
        "mixtral": ("MixtralConfig", "mixtral", "MixtralSparseMoeBlock",
                    {"intermediate_size": p.intermediate_size, "num_local_experts": p.num_experts}),
        "deepseek_v2": ("DeepseekV2Config", "deepseek_v2", "DeepseekV2Moe",
                        {"moe_intermediate_size": p.intermediate_size, "n_routed_experts": p.num_experts,
                         "n_shared_experts": p.shared_intermediate_size // p.intermediate_size,
                         "topk_method": "greedy", "routed_scaling_factor": 1.0}),
        "gpt_oss": ("GptOssConfig", "gpt_oss", "GptOssMLP",
                    {"intermediate_size": p.intermediate_size, "num_local_experts": p.num_experts}),
    }  # fmt: skip
    config_name, module, block_name, fields = specs[p.family]
    config = getattr(transformers, config_name)(**routed, **fields)
    block_cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), block_name)
    with torch.device("meta"):
        return block_cls(config)


def build_block(preset: Preset, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """transformers' block for the preset, with seeded random weights of ``dtype``."""
    block = _hf_block(preset).to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "bias" in name:
                p.zero_()
            else:
                # Generate in chunks of float32 to keep the peak memory at one expert's worth.
                for chunk in p.view(-1, p.shape[-1]).split(4096):
                    chunk.copy_(torch.randn(chunk.shape, generator=generator) * 0.02)
        for buffer in block.buffers():
            if buffer.is_floating_point() and buffer.dim() == 1:
                buffer.zero_()
    return block


def fit_to_memory(
    preset: Preset, dtype: torch.dtype, available_bytes: int, copies: int = 1
) -> tuple[Preset, str | None]:
    """Scale the expert count down (keeping top-k) until ``copies`` of the layer fit in half the free memory."""
    budget = available_bytes // 2 // copies
    if preset.layer_bytes(dtype) <= budget:
        return preset, None
    experts = preset.num_experts
    while experts > preset.top_k and replace(preset, num_experts=experts).layer_bytes(dtype) > budget:
        experts //= 2
    experts = max(experts, preset.top_k)
    note = (
        f"scaled from {preset.num_experts} to {experts} experts: the full layer needs "
        f"{copies} x {preset.layer_bytes(dtype) / 2**30:.1f} GiB, more than half the "
        f"{available_bytes / 2**30:.1f} GiB free"
    )
    return replace(preset, num_experts=experts), note


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (or a 8 GiB guess where it does not exist)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def unavailable_impls(impls: tuple[str, ...], dtype_name: str) -> dict[str, str]:
    """The implementations of ``impls`` that cannot run on this host at ``dtype_name``, each with the reason."""
    if "moerun-prepacked" in impls and not onednn.is_available(DTYPES[dtype_name]):
        return {"moerun-prepacked": f"oneDNN cannot pack {dtype_name} weights with this torch build on this CPU"}
    return {}


def work_of(layer: MoELayer, x: torch.Tensor) -> tuple[int, int]:
    """(bytes of weights touched, FLOPs) of one forward of ``layer`` on x [T, H].

    Bytes count each selected expert once (distinct experts of this batch), plus the router and the
    shared expert; FLOPs count 2 per multiply-add of the router, routed and shared expert GEMMs.
    """
    tokens, hidden = x.shape
    weights, ids = route(layer.router_logits(x), layer.routing, layer.score_bias)
    plan = make_plan(ids, weights, layer.num_experts)
    itemsize = layer.dtype.itemsize
    per_expert = 3 * hidden * layer.intermediate_size
    expert_bytes = (
        weight_nbytes(layer.experts.gate_up) + weight_nbytes(layer.experts.down)
    ) / layer.num_experts  # packed if low-bit
    shared = 0 if layer.shared_down is None else 3 * hidden * layer.shared_down.shape[1]
    router = layer.router_weight.numel()
    touched = int(plan.num_groups * expert_bytes) + (shared + router) * itemsize
    flops = 2 * (plan.num_slots * per_expert + tokens * (shared + router))
    return touched, flops


@dataclass
class Record:
    """One (preset, dtype, tokens, impl) measurement, as written to JSON."""

    preset: str
    dtype: str
    bits: int
    tokens: int
    impl: str
    threads: int
    median_ms: float
    tokens_per_s: float
    gbps: float
    gflops: float
    roofline_fraction: float
    bound: str  # which roofline bound applies: "bandwidth" or "compute"
    predicted_ms: float | None  # the performance model's prediction (moerun's own implementations)
    prediction_error: float | None  # (predicted - measured) / measured
    num_experts: int
    note: str | None
    machine: dict


def _time_alternating(fns: dict[str, Callable[[], object]], min_reps: int, budget_s: float) -> dict[str, float]:
    """Median seconds of each fn, running them in turn (round robin) after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        reps = len(next(iter(times.values())))
        if reps >= min_reps and (time.perf_counter() - start > budget_s or reps >= 50):
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_bench(
    presets: list[str],
    tokens: list[int],
    dtype_name: str,
    threads: int,
    roofline: Roofline,
    impls: tuple[str, ...] = IMPLS,
    bits: tuple[int, ...] = (16,),
    group_size: int = 32,
    min_reps: int = 5,
    budget_s: float = 3.0,
    on_step: Callable[[str], None] | None = None,
    perf_model: PerfModel | None = None,
) -> Iterator[Record]:
    """Measure every (preset, tokens) case with each impl, alternating; yields records as they finish.

    ``bits`` 8 and 4 add moerun on the same experts quantized (``moerun-int8``, ``moerun-int4`` with groups
    of ``group_size``). ``impls`` must all run on this host (leave out ``unavailable_impls``): packing the
    weights for ``moerun-prepacked`` raises ValueError where oneDNN cannot pack the dtype.
    """
    dtype = DTYPES[dtype_name]
    torch.set_num_threads(threads)
    read_buffer = torch.ones(_READ_PROBE_BYTES // 4, dtype=torch.float32)
    read = read_buffer.sum
    prepacked = "moerun-prepacked" in impls
    for name in presets:
        preset, note = fit_to_memory(PRESETS[name], dtype, available_memory_bytes(), copies=1 + prepacked)
        block = build_block(preset, dtype)
        layer = layer_from_hf_block(block)
        packed_layer = None
        if prepacked:
            packed_layer = layer_from_hf_block(block)  # shares the plain weights with `layer`
            packed_layer.resident.prepack()
        quantized = {}
        for b in (b for b in bits if b != 16):
            quantized[f"moerun-int{b}"] = layer_from_hf_block(block)
            quantized[f"moerun-int{b}"].resident.quantize(QuantFormat(b, group_size))
        for count in tokens:
            if on_step:
                on_step(f"{name} {dtype_name} {count} tokens")
            x = torch.randn(1, count, preset.hidden_size, generator=torch.Generator().manual_seed(count)).to(dtype)

            def run_hf(implementation: str, x: torch.Tensor = x, block: nn.Module = block) -> object:
                block.experts.config._experts_implementation = implementation
                return block(x)

            fns = {
                "moerun": lambda x=x, layer=layer: layer(x),
                "moerun-prepacked": lambda x=x, layer=packed_layer: layer(x),
                "hf-eager": lambda: run_hf("eager"),
                "hf-grouped_mm": lambda: run_hf("grouped_mm"),
                **{k: (lambda x=x, layer=q: layer(x)) for k, q in quantized.items()},
            }
            with torch.inference_mode():
                work = {k: work_of(quantized.get(k, layer), x.reshape(count, -1)) for k in (*impls, *quantized)}
                timed = {k: fns[k] for k in (*impls, *quantized)}
                medians = _time_alternating({**timed, _READ_PROBE: read}, min_reps, budget_s)
            # The host's bandwidth drifts by tens of percent over minutes, so the bandwidth roofline of
            # this case is the read probe timed in the same round robin as the implementations.
            case_roofline = replace(roofline, read_gbps=read_buffer.numel() * 4 / medians.pop(_READ_PROBE) / 1e9)
            for impl, seconds in medians.items():
                touched, flops = work[impl]
                predicted = None
                arithmetic = case_roofline.fastest_dtype() if impl in quantized else dtype
                if perf_model is not None and (impl == "moerun" or impl in quantized):
                    impl_bits = int(impl.removeprefix("moerun-int")) if impl in quantized else 16
                    shape = ModelShape.of_layer(
                        preset.hidden_size, preset.intermediate_size, preset.num_experts, preset.top_k,
                        preset.shared_intermediate_size,
                    )  # fmt: skip
                    formats = MatrixFormats.of(dtype, impl_bits, group_size)
                    predicted = perf_model.moe_layer(shape, formats, count).ms
                yield Record(
                    preset=name,
                    dtype=dtype_name,
                    bits=int(impl.removeprefix("moerun-int")) if impl in quantized else dtype.itemsize * 8,
                    tokens=count,
                    impl=impl,
                    threads=threads,
                    median_ms=seconds * 1e3,
                    tokens_per_s=count / seconds,
                    gbps=touched / seconds / 1e9,
                    gflops=flops / seconds / 1e9,
                    roofline_fraction=case_roofline.fraction(seconds, touched, flops, arithmetic),
                    bound=case_roofline.bound(touched, flops, arithmetic),
                    predicted_ms=predicted,
                    prediction_error=None if predicted is None else predicted / (seconds * 1e3) - 1,
                    num_experts=preset.num_experts,
                    note=note,
                    machine=case_roofline.to_dict(),
                )


def record_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]
