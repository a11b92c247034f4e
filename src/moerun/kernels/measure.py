"""Timing moerun's implementations of one case on this host, for the tuning table (``tuning``).

Each function times every implementation that can run the case, taking turns (round robin) so that noise
hits them alike, and returns median milliseconds per implementation. An implementation whose first call
is already far slower than the best one so far is left out rather than timed to the end (torch's
``_grouped_mm`` on a CPU without AVX-512 BF16 takes seconds where a GEMM per expert takes milliseconds).

Shape legend: E experts, G groups in a timed call, r rows per group, H hidden, I expert intermediate,
N output features, K input features.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..quant.formats import ExpertMatrices, QuantizedWeight, Weight, matmul_transposed, weight_nbytes
from ..routing import make_plan
from . import native
from .experts import IMPLEMENTATIONS, ExpertWeights, applicable_implementations
from .linear import as_stack

# Rows timed per call: groups enough to reach this many rows (at least one group, at most E).
_ROWS_PER_CALL = 1024
# A dense matrix at least this large is timed from memory, not from the last-level cache: in a model the
# other weights evict it between uses. Smaller ones (a tiny model's) stay cached in the model too.
_COLD_MATRIX_BYTES = 1 << 20
_COLD_WORKING_SET_BYTES = 256 << 20
_MAX_COPIES = 8
# Seconds a timed call of the experts may take at most (fewer groups than the layer has beyond that): a
# call has fixed costs of its own, so fewer groups than the layer has would overstate the cost per group.
_CALL_SECONDS = 0.5
# An implementation whose warm-up call takes this many times the best median so far is left out.
_HOPELESS_FACTOR = 8.0


def _time_round_robin(
    fns: dict[str, Callable[[int], object]], min_reps: int, budget_s: float, warmed: bool = False
) -> dict[str, float]:
    """Median seconds of each fn(call index), in turns after one warm-up each (none if ``warmed``);
    hopeless ones are dropped."""
    warm: dict[str, float] = dict.fromkeys(fns, 0.0)
    for name, fn in fns.items():
        if not warmed:
            t0 = time.perf_counter()
            fn(0)
            warm[name] = time.perf_counter() - t0
    # The first call pays one-off costs (page faults, oneDNN's JIT), so it only rules out the hopeless.
    best_warm = min(warm.values())
    live = {name: fn for name, fn in fns.items() if warm[name] <= _HOPELESS_FACTOR * max(best_warm, 1e-4)}
    times: dict[str, list[float]] = {name: [] for name in live}
    start = time.perf_counter()
    call = 1
    while True:
        for name, fn in live.items():
            t0 = time.perf_counter()
            fn(call)
            times[name].append(time.perf_counter() - t0)
        call += 1
        if call > min_reps and (time.perf_counter() - start > budget_s or call > 50):
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_experts(
    w: ExpertWeights,
    dtype: torch.dtype,
    rows: int,
    threads: int,
    *,
    impls: tuple[str, ...] | None = None,
    groups: int | None = None,
    min_reps: int = 5,
    budget_s: float = 0.3,
) -> dict[str, float]:
    """Milliseconds per group of ``rows`` rows of each expert implementation on the weights ``w``.

    A timed call runs G groups of ``rows`` rows, a different set of experts each call (cycling through
    all E), so weights come from wherever they would in the model. G is ``groups`` (the groups a layer has
    at this many rows per expert, so each group carries its share of the call's fixed cost), else as many
    as fill 1024 rows; at most E, and no more than fill ~0.5 s.

    Args:
        w: the experts, as a layer holds them.
        dtype: the hidden states' dtype (the float weights' own).
        rows: rows per group (>= 1).
        threads: torch threads to time with (restored afterwards).
        impls: implementations to time (default: every applicable one).
        groups: groups per timed call (default: 1024 / rows).
        min_reps, budget_s: at least ``min_reps`` timed calls each, more while ``budget_s`` seconds last.

    Returns:
        implementation -> ms per group.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    num_experts, hidden = w.num_experts, w.hidden_size
    generator = torch.Generator().manual_seed(rows)
    most = max(1, min(num_experts, groups if groups is not None else -(-_ROWS_PER_CALL // rows)))
    x_all = (torch.randn(most * rows, hidden, generator=generator) * 0.5).to(dtype)  # [G*r, H] at most

    def plans_of(groups: int) -> list:
        """Plans of ``groups`` groups of ``rows`` rows, each a different set of experts."""
        weights = torch.ones(groups * rows, 1)
        plans = []
        for rotation in range(max(1, num_experts // groups)):
            experts = [(rotation * groups + g) % num_experts for g in range(groups)]
            ids = torch.tensor(experts).repeat_interleave(rows)[:, None]  # [G*r, 1]
            plans.append(make_plan(ids, weights, num_experts))
        return plans

    for weight in (w.gate_up, w.down):
        _prime_conversions(weight, dtype)
    available = applicable_implementations(x_all[:rows], w)
    chosen = available if impls is None else tuple(i for i in impls if i in available)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            # One group first: how long a group takes decides how many a timed call runs (slow fallbacks
            # such as torch's int4 dequantization get one, fast kernels enough rows to hide call overheads).
            one = plans_of(1)
            single = _time_round_robin(
                {n: (lambda call, fn=IMPLEMENTATIONS[n]: fn(x_all[:rows], one[call % len(one)], w)) for n in chosen},
                min_reps=1,
                budget_s=0.0,
            )
            fastest = min(single.values())
            groups = max(1, min(most, int(_CALL_SECONDS / fastest)))
            plans = plans_of(groups)
            x = x_all[: groups * rows]  # [G*r, H]
            fns = {n: (lambda call, fn=IMPLEMENTATIONS[n]: fn(x, plans[call % len(plans)], w)) for n in single}
            seconds = _time_round_robin(fns, min_reps, budget_s, warmed=groups == 1)
    finally:
        torch.set_num_threads(previous)
    return {name: s * 1e3 / groups for name, s in seconds.items()}


def _native_linear(x: torch.Tensor, stack: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    zero = torch.zeros(1, dtype=torch.int64)
    return native.grouped_gemv(x, stack, zero, zero, torch.tensor([x.shape[0]]))


def measure_linear(
    weight: torch.Tensor | QuantizedWeight,
    dtype: torch.dtype,
    rows: int,
    threads: int,
    *,
    min_reps: int = 5,
    budget_s: float = 0.2,
) -> dict[str, float]:
    """Milliseconds per call of x [rows, K] @ weight [N, K].T for each implementation of a dense projection.

    A matrix of 1 MiB or more is timed over rotating copies (up to 8, 256 MiB in all) so that it is read
    from memory, as it is in a model whose other weights evict it.

    Returns:
        implementation (``native``, ``torch``) -> ms per call.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    nbytes = weight_nbytes(weight)
    copies = 1 if nbytes < _COLD_MATRIX_BYTES else max(1, min(_MAX_COPIES, _COLD_WORKING_SET_BYTES // nbytes))
    matrices = [weight] + [_copy(weight) for _ in range(copies - 1)]
    for m in matrices:
        _prime_conversions(m, dtype)
    x = (torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows)) * 0.5).to(dtype)
    fns: dict[str, Callable[[int], object]] = {}
    if isinstance(weight, QuantizedWeight):  # what ``linear`` runs off the native kernel
        fns["torch"] = lambda call: matmul_transposed(x, matrices[call % copies])
    else:
        fns["torch"] = lambda call: F.linear(x, matrices[call % copies])
    native_ok = native.is_available() and dtype in (torch.bfloat16, torch.float32)
    if native_ok and (isinstance(weight, QuantizedWeight) or weight.dtype == dtype):
        stacks = [as_stack(m) if isinstance(m, QuantizedWeight) else m.contiguous()[None] for m in matrices]
        fns["native"] = lambda call: _native_linear(x, stacks[call % copies])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            seconds = _time_round_robin(fns, min_reps, budget_s)
    finally:
        torch.set_num_threads(previous)
    return {name: s * 1e3 for name, s in seconds.items()}


def _prime_conversions(weight: Weight, dtype: torch.dtype) -> None:
    """Make the copies in torch's layouts that low-bit GEMMs read (``QuantizedWeight.conversions``): a model
    makes them once per weight, on first use, so they are not part of a call's time."""
    if isinstance(weight, ExpertMatrices):
        matrices = list(weight.matrices)
    elif isinstance(weight, QuantizedWeight) and weight.qweight.dim() == 3:
        matrices = [weight[e] for e in range(weight.shape[0])]
    else:
        matrices = [weight]
    for m in matrices:
        if isinstance(m, QuantizedWeight) and m.conversions is not None:
            matmul_transposed(torch.zeros(1, m.shape[-1], dtype=dtype), m)


def _copy(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    if isinstance(weight, QuantizedWeight):
        mins = None if weight.mins is None else weight.mins.clone()
        qweight, scales = weight.qweight.clone(), weight.scales.clone()
        return QuantizedWeight(weight.format, qweight, scales, mins, weight.in_features, {})
    return weight.detach().clone()
