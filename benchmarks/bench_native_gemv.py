"""GB/s of weight bytes the native grouped GEMV reads on decode shapes, next to a torch linear loop.

Each timed call uses a different set of experts than the call before, cycling through disjoint sets
of the E experts, so the weights come from memory rather than the 32 MB L3 a repeat would hit.

Run: python benchmarks/bench_native_gemv.py [--threads 2] [--reps 40]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moerun.kernels import native

EXPERTS = 64
SHAPES = ((2048, 2048), (2048, 1024))  # (N, K): gate/up-like and down-like projections
GROUPINGS = ((8, 1), (8, 2), (16, 4))  # (groups, rows per group)


def median_seconds(fn: Callable[[int], None], reps: int) -> float:
    """Median wall time of fn(rep) over reps calls, after two warm-up calls."""
    fn(0)
    fn(1)
    times = []
    for rep in range(reps):
        t0 = time.perf_counter()
        fn(rep)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stream_read_gbs(reps: int) -> float:
    """torch's own read bandwidth (float32 sum over 1 GiB), as a rough roofline."""
    buf = torch.ones(1 << 28, dtype=torch.float32)
    return buf.numel() * 4 / median_seconds(lambda _: buf.sum(), max(reps // 4, 3)) / 1e9


def bench_case(weight: torch.Tensor, groups: int, rows: int, threads: int, reps: int) -> tuple[float, float]:
    """Seconds per call (median) of the native kernel and of a torch linear loop, on cold experts."""
    num_experts, _, k = weight.shape
    expert_sets = torch.randperm(num_experts).view(-1, groups).sort(dim=1).values  # disjoint sets
    x = torch.randn(groups * rows, k).to(weight.dtype)
    starts = torch.arange(groups) * rows
    counts = torch.full((groups,), rows)

    def run_native(rep: int) -> None:
        native.grouped_gemv(x, weight, expert_sets[rep % len(expert_sets)], starts, counts, num_threads=threads)

    def run_torch(rep: int) -> None:
        for g, e in enumerate(expert_sets[rep % len(expert_sets)].tolist()):
            torch.nn.functional.linear(x[g * rows : (g + 1) * rows], weight[e])

    return median_seconds(run_native, reps), median_seconds(run_torch, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    if not native.is_available():
        raise SystemExit("native kernel not available (not built, disabled, or no AVX-512 BF16)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads}, E={EXPERTS}, bf16, median of {args.reps} calls")
    print(f"torch float32 sum read bandwidth: {stream_read_gbs(args.reps):.1f} GB/s")
    header = ("N", "K", "groups", "rows/g", "native GB/s", "torch loop GB/s", "native ms")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 5, 6, 6, 12, 16, 10), strict=True)))
    for n_out, k in SHAPES:
        weight = torch.randn(EXPERTS, n_out, k).to(torch.bfloat16)
        for groups, rows in GROUPINGS:
            t_native, t_torch = bench_case(weight, groups, rows, args.threads, args.reps)
            nbytes = groups * n_out * k * weight.element_size()
            print(
                f"{n_out:>5} {k:>5} {groups:>6} {rows:>6} {nbytes / t_native / 1e9:>12.1f} "
                f"{nbytes / t_torch / 1e9:>16.1f} {t_native * 1e3:>10.2f}"
            )


if __name__ == "__main__":
    main()
