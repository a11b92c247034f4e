"""allocate_bits against brute force and dynamic programming, at byte magnitudes of real experts, and its errors.

Shape legend: n items, c choices per item.
"""

from __future__ import annotations

import itertools
import re
import time

import numpy as np
import pytest
import torch

import moerun.quant.allocate as allocate_module
from moerun.quant.allocate import allocate_bits
from moerun.sizes import format_size

BITS = np.array([2, 4, 8])  # [c]


def expert_instance(n: int, magnitude: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivities falling and costs rising with the bit width, as for quantized experts; [n, c] each."""
    rng = np.random.default_rng(seed)
    params = rng.integers(magnitude, 2 * magnitude, size=n)  # [n]
    # Odd per-choice overheads (scales, zero points) keep the gcd of the costs at 1.
    cost = params[:, None] * BITS[None, :] // 8 + rng.integers(0, 1000, size=(n, len(BITS)))  # [n, c]
    sens = rng.random(n)[:, None] * 4.0 ** -BITS[None, :] * rng.uniform(0.9, 1.1, size=(n, len(BITS)))  # [n, c]
    return sens, cost


def total(table: np.ndarray, choice: list[int]) -> float | int:
    return sum(table[i, j].item() for i, j in enumerate(choice))


def brute_force(sens: np.ndarray, cost: np.ndarray, budget: int) -> float:
    """The least total sensitivity over every allocation within the budget."""
    n, c = sens.shape
    feasible = (
        total(sens, list(choice))
        for choice in itertools.product(range(c), repeat=n)
        if total(cost, list(choice)) <= budget
    )
    return min(feasible)


def dynamic_program(sens: np.ndarray, cost: np.ndarray, budget: int) -> float:
    """The least total sensitivity within the budget, by the classic knapsack table over spent bytes."""
    best = np.full(budget + 1, np.inf)  # [budget + 1], least sensitivity spending exactly b bytes
    best[0] = 0.0
    for item_sens, item_cost in zip(sens, cost, strict=True):
        step = np.full(budget + 1, np.inf)
        for s, w in zip(item_sens, item_cost, strict=True):
            if w <= budget:
                step[w:] = np.minimum(step[w:], best[: budget + 1 - w] + s)
        best = step
    return float(best.min())


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_matches_brute_force(n: int, seed: int) -> None:
    rng = np.random.default_rng(1000 * n + seed)
    sens = rng.random((n, 3))  # [n, c], deliberately not monotone in cost
    cost = rng.integers(0, 100, size=(n, 3))  # [n, c]
    lowest, highest = int(cost.min(axis=1).sum()), int(cost.max(axis=1).sum())
    budget = int(rng.integers(lowest, highest + 1))

    choice = allocate_bits(sens, cost, budget)

    assert len(choice) == n and all(0 <= j < 3 for j in choice)
    assert total(cost, choice) <= budget
    assert total(sens, choice) == pytest.approx(brute_force(sens, cost, budget), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_matches_dynamic_program(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(20, 60)), int(rng.integers(2, 6))
    # Sensitivities from 1e-9 to 1e2 in scale: the solver's tolerances must not depend on it.
    sens = rng.random((n, c)) * 10.0 ** rng.integers(-9, 3)  # [n, c]
    cost = rng.integers(0, 300, size=(n, c))  # [n, c]
    lowest, highest = int(cost.min(axis=1).sum()), int(cost.max(axis=1).sum())
    budget = int(rng.integers(lowest, highest + 1))

    choice = allocate_bits(sens, cost, budget)

    assert total(cost, choice) <= budget
    assert total(sens, choice) == pytest.approx(dynamic_program(sens, cost, budget), rel=1e-9)


def test_budget_exactly_at_the_minimum_takes_the_cheapest_choices() -> None:
    sens, cost = expert_instance(50, 10**6, seed=1)
    budget = int(cost.min(axis=1).sum())
    assert allocate_bits(sens, cost, budget) == [0] * 50


def test_budget_at_the_maximum_takes_the_least_sensitive_choices() -> None:
    sens, cost = expert_instance(50, 10**6, seed=2)
    budget = int(cost.max(axis=1).sum())
    assert allocate_bits(sens, cost, budget) == [2] * 50


def test_one_byte_short_of_the_maximum_gives_up_one_step() -> None:
    sens, cost = expert_instance(20, 10**6, seed=3)
    choice = allocate_bits(sens, cost, int(cost.max(axis=1).sum()) - 1)
    assert sorted(choice) == [1] + [2] * 19


@pytest.mark.parametrize("seed", range(3))
def test_large_byte_counts_stay_within_budget_exactly(seed: int) -> None:
    # 1000 experts of 1e9 to 2e9 parameters, costs with gcd 1: far beyond exact float tolerances of bytes.
    sens, cost = expert_instance(1000, 10**9, seed=seed)
    lowest, highest = int(cost.min(axis=1).sum()), int(cost.max(axis=1).sum())
    budget = lowest + (highest - lowest) * (seed + 1) // 4 + 12345

    start = time.perf_counter()
    choice = allocate_bits(sens, cost, budget)
    seconds = time.perf_counter() - start

    used = sum(int(cost[i, j]) for i, j in enumerate(choice))
    assert used <= budget
    # No single step up in bits still fits, else the allocation would be wasting budget it could use.
    upgrades = [int(cost[i, j + 1] - cost[i, j]) for i, j in enumerate(choice) if j + 1 < len(BITS)]
    assert min(upgrades) > budget - used
    assert seconds < 30, f"allocation took {seconds:.1f} s"  # a few seconds normally; generous for shared machines


def test_large_costs_with_a_common_factor_match_dynamic_program() -> None:
    # Bytes in MiB-sized pages: dividing by the gcd makes the dynamic program small while the inputs stay huge.
    rng = np.random.default_rng(7)
    sens = rng.random((40, 3))  # [n, c]
    cost = rng.integers(1, 60, size=(40, 3)) * 2**20 * 1000  # [n, c], up to ~6e10 bytes
    budget = int(cost.min(axis=1).sum() + cost.max(axis=1).sum()) // 2
    choice = allocate_bits(sens, cost, budget)
    unit = 2**20 * 1000
    assert total(cost, choice) <= budget
    assert total(sens, choice) == pytest.approx(dynamic_program(sens, cost // unit, budget // unit), rel=1e-9)


def test_accepts_lists_arrays_and_tensors_alike() -> None:
    sens, cost = expert_instance(30, 10**5, seed=4)
    budget = int(cost.mean(axis=1).sum())
    expected = allocate_bits(sens, cost, budget)
    assert allocate_bits(sens.tolist(), cost.tolist(), budget) == expected
    assert allocate_bits(torch.from_numpy(sens).float(), torch.from_numpy(cost), budget) == expected
    assert allocate_bits(sens, cost.astype(np.float64), np.int64(budget)) == expected


def test_same_input_same_answer_with_ties() -> None:
    # Every step up costs one byte and saves one unit, so any allocation spending the whole budget is optimal.
    sens = np.tile([2.0, 1.0, 0.0], (12, 1))  # [n, c]
    cost = np.tile([1, 2, 3], (12, 1))  # [n, c]
    first = allocate_bits(sens, cost, 20)
    assert total(cost, first) == 20 and total(sens, first) == 16.0
    assert all(allocate_bits(sens, cost, 20) == first for _ in range(3))


def test_budget_below_minimum_names_the_minimum() -> None:
    cost = np.array([[2**20, 2**21], [2**19, 2**20]])  # cheapest allocation: 1.5 MiB
    budget = int(1.2 * 2**20)
    message = (
        f"memory budget {budget} bytes ({format_size(budget)}) is below the smallest possible allocation "
        f"{3 * 2**19} bytes (1.5 MiB) (every expert at its cheapest choice)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        allocate_bits(np.zeros((2, 2)), cost, budget)


def test_negative_budget_is_below_minimum() -> None:
    with pytest.raises(ValueError, match=r"memory budget -5 bytes is below the smallest possible allocation 0 bytes"):
        allocate_bits([[0.0]], [[0]], -5)


@pytest.mark.parametrize(
    ("sens", "cost", "message"),
    [
        ([[1.0, 0.5]], [[1, 2], [3, 4]], r"sensitivity has shape \[1, 2\] but cost has shape \[2, 2\]"),
        ([[1.0, 0.5]], [[1, 2, 3]], r"sensitivity has shape \[1, 2\] but cost has shape \[1, 3\]"),
        ([], [], r"sensitivity must be a non-empty \[n, c\] table, got shape \[0\]"),
        ([[]], [[]], r"sensitivity must be a non-empty \[n, c\] table, got shape \[1, 0\]"),
        ([1.0, 0.5], [1, 2], r"sensitivity must be a non-empty \[n, c\] table, got shape \[2\]"),
        ([[1.0, 0.5], [1.0]], [[1, 2], [1]], r"sensitivity must be an \[n, c\] table with the same number of choices"),
        ([["a", "b"]], [[1, 2]], r"sensitivity must hold numbers"),
        ([[1.0, float("nan")]], [[1, 2]], r"sensitivity contains NaN or infinite values"),
        ([[1.0, float("inf")]], [[1, 2]], r"sensitivity contains NaN or infinite values"),
        ([[1.0, 0.5]], [[1, -2]], r"cost must be non-negative, got a minimum of -2"),
        ([[1.0, 0.5]], [[1.0, 2.5]], r"cost must hold whole numbers of bytes"),
        ([[1.0, 0.5]], [[1.0, float("nan")]], r"cost must hold whole numbers of bytes"),
    ],
)
def test_invalid_input(sens: list, cost: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        allocate_bits(sens, cost, 100)


def test_solver_overshoot_is_caught_and_the_budget_tightened(monkeypatch: pytest.MonkeyPatch) -> None:
    # HiGHS works in floating point; stand in for a solution that breaks the budget by a few bytes once.
    real_solve = allocate_module._solve
    limits: list[int] = []

    def overshooting_solve(penalty: np.ndarray, extra: np.ndarray, limit: int) -> np.ndarray:
        limits.append(limit)
        if len(limits) == 1:
            return np.full(len(extra), extra.shape[1] - 1)  # everything at its most expensive choice
        return real_solve(penalty, extra, limit)

    monkeypatch.setattr(allocate_module, "_solve", overshooting_solve)
    sens, cost = expert_instance(10, 10**6, seed=5)
    budget = int(cost.max(axis=1).sum()) - 3
    choice = allocate_bits(sens, cost, budget)
    assert total(cost, choice) <= budget
    assert len(limits) == 2 and limits[1] < limits[0]


def test_persistent_overshoot_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocate_module, "_solve", lambda penalty, extra, limit: np.full(len(extra), 2))
    sens, cost = expert_instance(10, 10**6, seed=6)
    with pytest.raises(RuntimeError, match=r"exceeds the budget .* even after tightening"):
        allocate_bits(sens, cost, int(cost.max(axis=1).sum()) - 1)
