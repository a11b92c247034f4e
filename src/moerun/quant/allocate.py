"""Per-expert bit-width allocation under a memory budget, as an exact multiple-choice knapsack.

Shape legend: n items (experts, or expert matrices), c choices per item (candidate bit widths).

Mixed precision per expert spends bits where they matter: rarely-routed or insensitive experts get fewer bits,
the rest more, so that the model fits a memory budget with the least damage. MC-MoE poses the same choice as a
linear program; because every item takes exactly one choice, we solve the integer program itself with
``scipy.optimize.milp`` (HiGHS branch and bound) with binary variables ``x[i, j]``:

    minimise  sum_ij sensitivity[i, j] * x[i, j]
    such that sum_j x[i, j] = 1 for every item i,   sum_ij cost[i, j] * x[i, j] <= budget.

Byte counts reach ~1e10 per item, where HiGHS's floating-point tolerances can amount to whole bytes. So the costs
are first reduced exactly (each item's cheapest cost is moved into the budget, then everything is divided by the
gcd), the chosen allocation is re-checked in exact integer arithmetic, and should it exceed the budget, the budget
is tightened by the overshoot and the problem solved again (never needed in our trials; an allocation found that
way is feasible but could miss an optimum within the overshoot). "Exact" means optimal to HiGHS's gap tolerance
(relative gap 0, absolute gap 1e-6) on sensitivities rescaled to [0, 1] per problem; it matches brute force and
dynamic programming on every instance we tried.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from ..errors import MemoryBudgetError
from ..sizes import format_size

# A tightened budget is re-solved at most this often; each pass removes at least the previous overshoot.
_MAX_TIGHTENINGS = 8


def allocate_bits(sensitivity: Any, cost: Any, budget: int) -> list[int]:
    """Choose one option (e.g. a bit width) per item so the total sensitivity is least within a memory budget.

    Args:
        sensitivity: ``[n, c]`` floats, the penalty of item i at choice j (lower is better): a list of lists, a
            numpy array or a torch tensor.
        cost: ``[n, c]`` non-negative integer bytes of item i at choice j, same forms as ``sensitivity``.
        budget: the memory budget in bytes.

    Returns:
        ``n`` choice indices in ``[0, c)``, one per item, whose summed cost is at most ``budget`` and whose summed
        sensitivity is least. Among equally good allocations the result is deterministic for a given input.

    Raises:
        ValueError: mismatched or empty shapes, negative or fractional costs, non-finite sensitivities, or a
            budget below the cheapest allocation (the message names that minimum).
        RuntimeError: the solver fails, or its allocations keep exceeding the budget after re-solving.
    """
    sens = _as_table(sensitivity, "sensitivity").astype(np.float64)  # [n, c]
    costs = _costs_table(cost)  # [n, c]
    if sens.shape != costs.shape:
        raise ValueError(f"sensitivity has shape {list(sens.shape)} but cost has shape {list(costs.shape)}")
    if not np.isfinite(sens).all():
        raise ValueError("sensitivity contains NaN or infinite values")
    budget = operator.index(budget)

    cheapest = costs.min(axis=1)  # [n]
    min_total = sum(int(b) for b in cheapest)
    if budget < min_total:
        shown = f" ({format_size(budget)})" if budget >= 0 else ""
        raise MemoryBudgetError(
            f"memory budget {budget} bytes{shown} is below the smallest possible allocation "
            f"{min_total} bytes ({format_size(min_total)}) (every expert at its cheapest choice)"
        )

    # When the best choice of every item fits together, the constraint is slack and no solver is needed.
    best = np.argmin(sens, axis=1)  # [n]
    if _total_cost(costs, best) <= budget:
        return [int(j) for j in best]

    # Exact reductions: each item's cheapest cost is paid anyway, and a common factor changes nothing.
    extra = costs - cheapest[:, None]  # [n, c], >= 0
    spare = budget - min_total
    step = math.gcd(*(int(v) for v in np.unique(extra))) or 1
    extra //= step
    spare //= step
    # Shift and scale the objective so HiGHS's absolute tolerances mean the same for tiny or huge sensitivities.
    penalty = sens - sens.min(axis=1, keepdims=True)  # [n, c]
    penalty /= penalty.max() or 1.0

    limit = spare
    for _ in range(_MAX_TIGHTENINGS):
        choice = _solve(penalty, extra, limit)
        overshoot = _total_cost(extra, choice) - spare
        if overshoot <= 0:
            break
        limit = max(0, limit - overshoot)
    else:
        raise RuntimeError(f"the solver's allocation exceeds the budget {budget} bytes even after tightening")
    return [int(j) for j in choice]


def _as_table(values: Any, name: str) -> np.ndarray:
    """A ``[n, c]`` numpy array from a nested sequence, array or (possibly GPU) tensor, with n, c >= 1."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    try:
        table = np.asarray(values)
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"{name} must be an [n, c] table with the same number of choices per item: {err}") from None
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [n, c] table, got shape {list(table.shape)}")
    if not np.issubdtype(table.dtype, np.number):
        raise ValueError(f"{name} must hold numbers, got dtype {table.dtype}")
    return table


def _costs_table(cost: Any) -> np.ndarray:
    """``[n, c]`` int64 byte counts; whole-valued floats are accepted, fractions and negatives are not."""
    table = _as_table(cost, "cost")
    if not np.issubdtype(table.dtype, np.integer):
        if not np.isfinite(table).all() or (table != np.floor(table)).any():
            raise ValueError("cost must hold whole numbers of bytes")
        if np.abs(table).max() >= 2**63:
            raise ValueError("cost values are too large for 64-bit integers")
    if (table < 0).any():
        raise ValueError(f"cost must be non-negative, got a minimum of {table.min()}")
    return table.astype(np.int64)


def _total_cost(costs: np.ndarray, choice: np.ndarray) -> int:
    """The exact (Python int) sum of ``costs[i, choice[i]]``; [n, c], [n] -> int."""
    return sum(int(v) for v in costs[np.arange(len(choice)), choice])


def _solve(penalty: np.ndarray, extra: np.ndarray, limit: int) -> np.ndarray:
    """The multiple-choice knapsack via HiGHS: [n, c] penalties, [n, c] costs, a budget -> [n] choice indices."""
    n, c = penalty.shape
    # Each item's choices are consecutive variables, so row i of the equality is ones on columns [i*c, (i+1)*c).
    one_each = csr_array((np.ones(n * c), np.arange(n * c), np.arange(0, n * c + 1, c)), shape=(n, n * c))
    # The budget row stays in (reduced) bytes: HiGHS scales rows itself, and dividing the row by a large number
    # here turned its absolute feasibility tolerance into hundreds of bytes of overshoot in trials.
    weights = extra.reshape(1, -1).astype(np.float64)  # [1, n*c]
    # A choice that alone exceeds the remaining budget can never be taken.
    upper = (extra <= limit).reshape(-1).astype(np.float64)
    result = milp(
        penalty.reshape(-1),
        integrality=np.ones(n * c),
        bounds=Bounds(0.0, upper),
        constraints=[LinearConstraint(one_each, 1.0, 1.0), LinearConstraint(weights, -np.inf, limit)],
        options={"mip_rel_gap": 0.0},
    )
    if result.status != 0 or result.x is None:
        raise RuntimeError(f"the MILP solver found no allocation: {result.message}")
    # Rounding by the largest value per item turns HiGHS's near-0/1 values into one choice each.
    return np.argmax(result.x.reshape(n, c), axis=1)
