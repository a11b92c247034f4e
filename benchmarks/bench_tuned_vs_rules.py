"""What kernel tuning buys on this host: one MoE layer preset, `auto` with this host's tuning table against
`auto` with the fixed rules (what it does where nothing was measured), alternating call by call.

The preset's cases are tuned first where the table lacks them. Prints median ms per token count, the ratio
(> 1: tuning is faster) and the implementation the table picked.

Run: python benchmarks/bench_tuned_vs_rules.py [--preset olmoe-1b-7b] [--tokens 1,16,128,512] [--bits 16]
     [--threads 2] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moerun.kernels import experts, tuning
from moerun.models.hf import layer_from_hf_block
from moerun.perf.bench import PRESETS, build_block
from moerun.perf.tune import preset_cases, tune
from moerun.quant.formats import QuantFormat
from moerun.routing import make_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="olmoe-1b-7b", choices=list(PRESETS))
    parser.add_argument("--tokens", default="1,16,128,512")
    parser.add_argument("--bits", type=int, default=16, choices=(16, 8, 4))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune(preset_cases(args.preset, "bf16", (args.bits,), 32, args.threads))
    layer = layer_from_hf_block(build_block(PRESETS[args.preset], torch.bfloat16))
    if args.bits != 16:
        layer.resident.quantize(QuantFormat(args.bits, 32))
    w = layer.resident.weights()
    print(f"{torch.get_num_threads()} threads, {args.preset}, bits {args.bits}, {tuning.host_fingerprint().cpu}")
    print(f"{'tokens':>6} {'tuned ms':>10} {'rules ms':>10} {'ratio':>7}  tuned pick")
    for count in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(count, layer.hidden_size, generator=torch.Generator().manual_seed(count)).bfloat16()
        with torch.inference_mode():
            weights, ids = layer.select_experts(x)
            plan = make_plan(ids, weights, layer.num_experts)
            rules = experts.rules_backend(x, plan, w)
            tuned = experts.select_backend(x, plan, w)
            pick = next((n for n, f in experts.IMPLEMENTATIONS.items() if f is tuned), tuned.__name__)
            times: dict[str, list[float]] = {"tuned": [], "rules": []}
            for fn in (tuned, rules):
                fn(x, plan, w)  # warm-up
            for _ in range(args.reps):
                for name, fn in (("tuned", tuned), ("rules", rules)):
                    t0 = time.perf_counter()
                    fn(x, plan, w)
                    times[name].append(time.perf_counter() - t0)
        tuned_ms, rules_ms = (statistics.median(times[k]) * 1e3 for k in ("tuned", "rules"))
        print(f"{count:>6} {tuned_ms:>10.2f} {rules_ms:>10.2f} {rules_ms / tuned_ms:>6.2f}x  {pick}")


if __name__ == "__main__":
    main()
