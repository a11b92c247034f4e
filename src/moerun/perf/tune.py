"""`moerun tune` and tuning on first use: which cases a model meets, and measuring the missing ones.

A model meets the routed-experts case of each distinct (format, H, I) of its MoE layers at the rows per
expert its decode and prompts produce, and the dense-projection cases of the lean runner's matrices (the
stacked q/k/v, o, shared experts, the output head) at decode and prefill row counts. Each case is measured
once per host (``moerun.kernels.tuning``) and reused by every later run.

Shape legend: T prompt tokens, k experts per token, E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..experts import ResidentExperts
from ..kernels import measure, tuning
from ..layer import MoELayer
from ..quant.formats import QuantizedWeight, concat_rows
from .bench import DTYPES, PRESETS, build_block

# Prompt length the tuned row buckets cover by default (longer prompts extrapolate from the largest).
MAX_PROMPT_TOKENS = 512
# Row buckets of dense projections: decode (1) and a spread of prompt lengths; others are interpolated.
LINEAR_ROWS = (1, 8, 64, 512)


@dataclass(frozen=True)
class CaseSpec:
    """One case to measure: its table key, a label for people, and how to time it."""

    key: str
    label: str
    measure: Callable[[], dict[str, float]]


def expected_groups(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts among ``tokens`` tokens routing to ``top_k`` each, uniformly at random:
    E (1 - (1 - k/E)^T)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def groups_at_rows(num_experts: int, top_k: int, rows: int) -> int:
    """The distinct experts a layer routes to when its groups average ``rows`` rows: G(T) at the T where
    T k / G(T) reaches ``rows`` (k at one row, tending to E as rows grow)."""
    low, high = 1, 1 << 24
    while low < high:  # rows per group grows with T: the smallest T reaching ``rows``
        mid = (low + high) // 2
        if mid * top_k / expected_groups(num_experts, top_k, mid) >= rows:
            high = mid
        else:
            low = mid + 1
    return max(1, min(num_experts, round(expected_groups(num_experts, top_k, low))))


def expert_row_buckets(num_experts: int, top_k: int, max_tokens: int = MAX_PROMPT_TOKENS) -> tuple[int, ...]:
    """Row buckets a layer's groups reach, from decode (1 row) to a ``max_tokens`` prompt (T k / G rows),
    plus the next bucket so that interpolation has a point on each side."""
    top = max_tokens * top_k / expected_groups(num_experts, top_k, max_tokens)
    highest = tuning.rows_bucket(top)
    buckets = [b for b in tuning.ROW_BUCKETS if b <= highest]
    following = [b for b in tuning.ROW_BUCKETS if b > highest]
    return tuple(buckets + following[:1])


def _experts_cases(layer: MoELayer, threads: int, max_tokens: int) -> list[CaseSpec]:
    if not isinstance(layer.experts, ResidentExperts):  # offloaded: nothing resident to time
        return []
    w = layer.resident.weights()
    fmt = tuning.format_key(w.gate_up)
    if fmt is None:  # mixed formats
        return []
    shape = (w.hidden_size, w.intermediate_size)
    cases = []
    for rows in expert_row_buckets(layer.num_experts, layer.routing.top_k, max_tokens):
        cases.append(
            CaseSpec(
                tuning.case_key("experts", fmt, shape, rows, threads),
                f"experts {fmt} H={shape[0]} I={shape[1]} x{layer.num_experts}, {rows} rows/expert",
                lambda rows=rows: measure.measure_experts(
                    w, layer.dtype, rows, threads, groups=groups_at_rows(layer.num_experts, layer.routing.top_k, rows)
                ),
            )
        )
    return cases


def _linear_cases(
    weight: torch.Tensor | QuantizedWeight,
    dtype: torch.dtype,
    threads: int,
    rows_buckets: tuple[int, ...] = LINEAR_ROWS,
) -> list[CaseSpec]:
    fmt = tuning.format_key(weight)
    shape = tuple(weight.shape)
    return [
        CaseSpec(
            tuning.case_key("linear", fmt, shape, rows, threads),
            f"linear {fmt} {shape[0]}x{shape[1]}, {rows} rows",
            lambda rows=rows: measure.measure_linear(weight, dtype, rows, threads),
        )
        for rows in rows_buckets
    ]


def dense_matrices(model: nn.Module) -> list[torch.Tensor | QuantizedWeight]:
    """One matrix of each distinct (format, shape) the lean runner multiplies outside the routed experts:
    stacked q/k/v, o, shared-expert gate/up and down (the output head is ``output_head``)."""
    found: dict[tuple, torch.Tensor | QuantizedWeight] = {}

    def add(w: torch.Tensor | QuantizedWeight | Callable[[], torch.Tensor | QuantizedWeight]) -> None:
        if callable(w) and not isinstance(w, (torch.Tensor, QuantizedWeight)):
            w = w()
        key = (tuning.format_key(w), tuple(w.shape))
        if w.device.type != "meta":
            found.setdefault(key, w.detach() if isinstance(w, torch.Tensor) else w)

    decoder = getattr(model, "model", None)
    for layer in getattr(decoder, "layers", []):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
            shape = (sum(w.shape[0] for w in weights), weights[0].shape[1])
            if (tuning.format_key(weights[0]), shape) not in found:
                quantized = all(isinstance(w, QuantizedWeight) for w in weights)
                add(lambda weights=weights, q=quantized: concat_rows(weights) if q else torch.cat(weights))
            add(attn.o_proj.weight)
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoELayer) and mlp.shared_gate_up is not None:
            add(mlp.shared_gate_up)
            add(mlp.shared_down)
    return list(found.values())


def output_head(model: nn.Module) -> torch.Tensor | QuantizedWeight | None:
    """The output head's matrix, which prefill and decode alike run on one row."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None or weight.device.type == "meta":
        return None
    return weight.detach() if isinstance(weight, torch.Tensor) else weight


def moe_layer_views(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers: moerun's own where it is patched, else views of transformers' blocks (sharing
    their weights)."""
    from ..models.hf import SUPPORTED_BLOCKS, layer_from_hf_block

    layers = []
    for module in model.modules():
        if isinstance(module, MoELayer):
            layers.append(module)
        elif type(module).__name__ in SUPPORTED_BLOCKS:
            layers.append(layer_from_hf_block(module))
    return layers


def model_cases(model: nn.Module, threads: int, max_tokens: int = MAX_PROMPT_TOKENS) -> list[CaseSpec]:
    """Every case a model (moerun-patched or transformers' own) meets at ``threads`` threads, for prompts
    up to ``max_tokens``."""
    cases: list[CaseSpec] = []
    seen: set[tuple] = set()
    for layer in moe_layer_views(model):
        key = (tuning.format_key(layer.experts.gate_up), layer.hidden_size, layer.intermediate_size, layer.num_experts)
        if key not in seen:
            seen.add(key)
            cases += _experts_cases(layer, threads, max_tokens)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    for weight in dense_matrices(model):
        cases += _linear_cases(weight, dtype, threads)
    head = output_head(model)
    if head is not None:
        cases += _linear_cases(head, dtype, threads, rows_buckets=(1,))
    first_of_key: dict[str, CaseSpec] = {}
    for case in cases:  # a head shaped like a dense matrix is one case
        first_of_key.setdefault(case.key, case)
    return list(first_of_key.values())


def preset_cases(preset: str, dtype_name: str, bits: tuple[int, ...], group_size: int, threads: int) -> list[CaseSpec]:
    """The routed-experts cases of a layer preset (``moerun bench --preset``) at each of ``bits``.

    The preset's layer is built with seeded random weights when the first case is measured.
    """
    from ..models.hf import layer_from_hf_block
    from ..quant.formats import QuantFormat

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    dtype = DTYPES[dtype_name]
    layers: dict[int, MoELayer] = {}

    def layer_at(b: int) -> MoELayer:
        if b not in layers:
            layers.clear()  # one preset layer in memory at a time
            layer = layer_from_hf_block(build_block(p, dtype))
            if b != 16:
                layer.resident.quantize(QuantFormat(b, group_size))
            layers[b] = layer
        return layers[b]

    cases = []
    for b in bits:
        fmt = str(dtype).removeprefix("torch.") if b == 16 else QuantFormat(b, group_size).name
        shape = (p.hidden_size, p.intermediate_size)
        for rows in expert_row_buckets(p.num_experts, p.top_k):
            cases.append(
                CaseSpec(
                    tuning.case_key("experts", fmt, shape, rows, threads),
                    f"{preset} experts {fmt}, {rows} rows/expert",
                    lambda b=b, rows=rows: measure.measure_experts(
                        layer_at(b).resident.weights(),
                        dtype,
                        rows,
                        threads,
                        groups=groups_at_rows(p.num_experts, p.top_k, rows),
                    ),
                )
            )
    return cases


@dataclass(frozen=True)
class TunedCase:
    """A case's measured times and its winner, for the table ``moerun tune`` prints."""

    key: str
    label: str
    times_ms: dict[str, float]

    @property
    def winner(self) -> str:
        return min(self.times_ms, key=self.times_ms.__getitem__)

    @property
    def margin(self) -> float | None:
        """Runner-up time / winner time (None with a single implementation)."""
        ordered = sorted(self.times_ms.values())
        return ordered[1] / ordered[0] if len(ordered) > 1 else None


# A bucket whose best time is this many times a larger bucket's was disturbed (more rows never cost less
# per group or per call, beyond the shared fixed costs): it is measured again.
RECHECK_RATIO = 1.5
RECHECKS = 2


def suspect_keys(results: dict[str, dict[str, float]]) -> list[str]:
    """Cases whose best time exceeds ``RECHECK_RATIO`` x the best time of a larger rows bucket of the same
    kind, format, shape and threads: interference from another process, not the kernel (timing noise on a
    busy machine only ever adds time)."""
    series: dict[tuple, list[tuple[int, float, str]]] = {}
    for key, times in results.items():
        if not times:
            continue
        kind, fmt, shape, rows, threads = tuning.parse_case_key(key)
        series.setdefault((kind, fmt, shape, threads), []).append((rows, min(times.values()), key))
    suspects = []
    for points in series.values():
        points.sort()
        for i, (_, best, key) in enumerate(points):
            if any(best > RECHECK_RATIO * later for _, later, _ in points[i + 1 :]):
                suspects.append(key)
    return suspects


def _merge_min(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Per implementation, the lower of two measurements (noise only adds time)."""
    return {impl: min(a.get(impl, math.inf), b.get(impl, math.inf)) for impl in a.keys() | b.keys()}


def tune(
    cases: list[CaseSpec],
    *,
    path: Path | None = None,
    force: bool = False,
    on_case: Callable[[int, int, str], None] | None = None,
) -> list[TunedCase]:
    """Measure the cases not yet in this host's table (all of them with ``force``), save them, and return
    every case with its times.

    A measured case whose time a larger rows bucket beats by ``RECHECK_RATIO`` (``suspect_keys``) is
    measured again, up to ``RECHECKS`` times, keeping each implementation's lower time. ``on_case(done,
    total, label)`` is called before each measurement (a progress bar's hook). Measured cases are saved in
    one locked, whole-file update after the checks, and after every 8 cases before, so an interrupted run
    keeps most of its work.
    """
    table = tuning.load_table(path)
    todo = [c for c in cases if force or c.key not in table]
    pending: dict[str, dict[str, float]] = {}
    results: dict[str, dict[str, float]] = {c.key: table.cases[c.key] for c in cases if c.key in table}
    for i, case in enumerate(todo):
        if on_case is not None:
            on_case(i, len(todo), case.label)
        times = case.measure()
        pending[case.key] = results[case.key] = times
        if len(pending) >= 8:
            tuning.save_cases(pending, path)
            pending = {}
    measured = {c.key: c for c in todo}
    for _ in range(RECHECKS):
        again = [measured[key] for key in suspect_keys(results) if key in measured]
        for case in again:
            if on_case is not None:
                on_case(len(todo), len(todo), f"again: {case.label}")
            pending[case.key] = results[case.key] = _merge_min(results[case.key], case.measure())
    if pending:
        tuning.save_cases(pending, path)
    if on_case is not None and todo:
        on_case(len(todo), len(todo), "done")
    return [TunedCase(c.key, c.label, results[c.key]) for c in cases if c.key in results]


def missing_cases(cases: list[CaseSpec], path: Path | None = None) -> list[CaseSpec]:
    """The cases this host's table lacks."""
    table = tuning.load_table(path)
    return [c for c in cases if c.key not in table]


def tuning_enabled() -> bool:
    """False when ``MOERUN_TUNING=0`` (auto's fixed rules, no measurement on first use)."""
    return os.environ.get(tuning.DISABLE_ENV) != "0"
