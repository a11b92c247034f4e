"""Pictures of a plan search: speed against memory, quality as colour."""

from __future__ import annotations

from pathlib import Path

from ..files import file_written_whole
from .search import PlanSearch


def plot_front(search: PlanSearch, objective: str, budget: int, path: Path) -> None:
    """A PNG of every point's predicted speed against peak memory, coloured by KL, the front joined by a line,
    the budget as a vertical line and the chosen point ringed. Written whole or not at all."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no interactive backend

    figure = Figure(figsize=(9, 5.5), layout="constrained")
    ax = figure.subplots()
    gib = 2**30
    points = search.points
    kls = [max(p.kl, 1e-6) for p in points]
    from matplotlib.colors import LogNorm

    scatter = ax.scatter(
        [p.peak_bytes / gib for p in points], [p.speed(objective) for p in points], c=kls, s=14,
        cmap="viridis_r", norm=LogNorm(vmin=min(kls), vmax=max(kls)),
    )  # fmt: skip
    # The front is three-dimensional (speed, memory, KL): its points get a black edge, and the step line is its
    # speed-memory shadow, the fastest configuration at or below each memory.
    front = search.front
    ax.scatter([p.peak_bytes / gib for p in front], [p.speed(objective) for p in front], s=22, facecolors="none",
               edgecolors="black", linewidths=0.6, label="Pareto front (speed, memory, KL)")  # fmt: skip
    best, steps = 0.0, []
    for p in sorted(points, key=lambda p: p.peak_bytes):
        if p.speed(objective) > best:
            best = p.speed(objective)
            steps.append((p.peak_bytes / gib, best))
    ax.step([m for m, _ in steps], [v for _, v in steps], where="post", color="black", lw=0.8,
            label="fastest at or below each memory")  # fmt: skip
    chosen = search.chosen
    ax.scatter([chosen.peak_bytes / gib], [chosen.speed(objective)], s=160, facecolors="none", edgecolors="red",
               linewidths=2, label=f"chosen: {chosen.config.label()}")  # fmt: skip
    ax.axvline(budget / gib, color="red", ls="--", lw=1, label="memory budget")
    figure.colorbar(scatter, ax=ax, label="KL divergence vs unmodified model (nats/token)")
    ax.set_xlabel("predicted peak resident memory, GiB")
    ax.set_ylabel(f"predicted {objective} tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"moerun plan: {Path(search.plan.model_path).name}, {len(points)} configurations")
    with file_written_whole(path, "wb") as f:
        figure.savefig(f, format="png", dpi=110)
