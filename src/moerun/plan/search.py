"""`moerun plan`: the fastest configuration of a model that fits a memory budget and keeps quality.

``measure_for_planning`` (``moerun.plan.measure``) measures the model on this host once; ``choose_plan`` predicts
every configuration (``moerun.plan.predict``), finds the Pareto front, measures the quality of its points within
the limits, fastest first, until one is confirmed, and makes the chosen one a ``RunPlan``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import MemoryBudgetError
from ..kernels import tuning
from ..models.run_plan import RunPlan, model_identity
from ..models.skipping import set_skipping
from ..routing import ExpertSkipping
from ..runtime.eval import KLResult, kl_divergence
from ..sizes import format_size
from .measure import PlanMeasurements, emulated_formats, measure_for_planning
from .predict import Facts, Point, _basis, _bits, _nll_increase, _points, point_record

# A plan's predicted peak memory stays this share below the budget: fresh runs of one configuration differ in
# peak resident memory by about this much.
MEMORY_MARGIN = 0.01
_MEASURED_FRONT_POINTS = 4  # quality measurements of front points before settling on predictions


@dataclass
class PlanSearch:
    """The outcome of a search: every point, the Pareto front, the chosen point and the plan made of it."""

    points: list[Point]
    front: list[Point]
    chosen: Point
    plan: RunPlan
    facts: Facts = field(repr=False, default=None)
    path: Path | None = None


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


def _measure_quality(model: nn.Module, source: nn.Module | None, facts: Facts, point: Point) -> KLResult:
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


def _run_plan(path: Path, facts: Facts, point: Point, prompt: int, decode: int) -> RunPlan:
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
