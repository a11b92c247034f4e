"""GB/s of weight bytes the native grouped GEMV reads on decode shapes, next to torch's read bandwidth.

Run: python benchmarks/bench_native_gemv.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moerun.kernels import native


def median_s(fn, reps: int = 30) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.is_available():
        raise SystemExit("native kernel not available")
    buf = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    print(f"torch float32 sum read: {buf.numel() * 4 / median_s(buf.sum, 7) / 1e9:.1f} GB/s")
    del buf
    experts = 64
    for n_rows, k in ((2048, 2048), (2048, 1024)):
        weight = torch.randn(experts, n_rows, k).to(torch.bfloat16)
        for groups, rows in ((8, 1), (8, 2), (16, 4)):
            chosen = torch.randperm(experts)[:groups].sort().values
            x = torch.randn(groups * rows, k).to(torch.bfloat16)
            starts = torch.arange(groups) * rows
            counts = torch.full((groups,), rows)
            loop_w = [weight[e] for e in chosen.tolist()]

            def run_native() -> None:
                native.grouped_gemv(x, weight, chosen, starts, counts, num_threads=args.threads)

            def run_torch() -> None:
                for g, w in enumerate(loop_w):
                    torch.nn.functional.linear(x[g * rows:(g + 1) * rows], w)

            nbytes = groups * n_rows * k * 2
            print(
                f"N={n_rows} K={k} groups={groups} rows/group={rows}: native "
                f"{nbytes / median_s(run_native) / 1e9:.1f} GB/s, torch linear loop "
                f"{nbytes / median_s(run_torch) / 1e9:.1f} GB/s"
            )


if __name__ == "__main__":
    main()
