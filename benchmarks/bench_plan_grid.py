"""Is the plan really the best? `moerun plan`'s choice against a hand grid, measured, at several memory budgets.

The grid: weights at 16, 8 or 4 bits (experts, attention and head alike) x routed experts resident or read
through a cache of 50% or 25% of their bytes (LFU) x prefetching on or off (offloaded only) x expert skipping off
or on (25% of the pairs, calibrated). Every grid point and every planned configuration runs in a fresh process
(``moerun.plan.verify``: decode and prefill tokens/s, peak resident memory); quality is the KL divergence on the
calibration text with the formats emulated. For each budget, the fastest grid point whose measured peak memory
fits the budget and whose KL is within the limit is set against the planner's choice for that budget: the two
then run side by side, taking turns, ``--rounds`` times each, and their medians are compared.

Run: python benchmarks/bench_plan_grid.py --model olmoe-1b-7b-4l --budgets 0.6GB,1.2GB,2GB,4GB --max-kl 0.05
     [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from moerun.kernels.tuning import host_fingerprint
from moerun.models.convert import calibration_tokens
from moerun.models.loader import default_model_dir, load
from moerun.models.run_plan import RunPlan, model_identity
from moerun.models.skipping import set_skipping
from moerun.perf.model_bench import SYNTHETIC_MODELS
from moerun.perf.offload_bench import offload_checkpoint
from moerun.plan.measure import emulated_formats, measure_for_planning
from moerun.plan.search import choose_plan
from moerun.plan.verify import planned_checkpoint, verify_plan
from moerun.routing import ExpertSkipping
from moerun.runtime.eval import kl_divergence
from moerun.sizes import format_size, parse_size

BITS = {16: "float", 8: "int8", 4: "int4-g32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="olmoe-1b-7b-4l")
    parser.add_argument("--budgets", default="0.6GB,1.2GB,2GB,4GB")
    parser.add_argument("--max-kl", type=float, default=0.05)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="side-by-side runs of each choice and its best rival")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    path = offload_checkpoint(args.model, 16) if args.model in SYNTHETIC_MODELS else (
        default_model_dir() if args.model == "reference" else Path(args.model))  # fmt: skip
    tokenizer_source = load(default_model_dir(), "bf16")
    ids = calibration_tokens(tokenizer_source.tokenizer, None, args.tokens)
    measured = measure_for_planning(path, calibration_ids=ids, prompt_tokens=128,
                                    decode_tokens=args.decode_tokens, progress=say)  # fmt: skip
    facts = measured.facts
    thresholds = facts.skip_thresholds[0.25]

    say("quality of the grid's formats and skipping")
    quality = {}
    for bits, choice in BITS.items():
        for skip in (False, True):
            with emulated_formats(measured.quality, choice, choice, measured.source, facts.lowbit):
                set_skipping(measured.quality, {n: ExpertSkipping("threshold", b) for n, b in thresholds.items()}
                             if skip else None)  # fmt: skip
                quality[(bits, skip)] = kl_divergence(measured.quality, facts.reference).kl_mean
                set_skipping(measured.quality, None)

    base = RunPlan(model_identity(path), str(path), host_fingerprint().key(), torch.get_num_threads(), 16, None, 16,
                   workload={"prompt_tokens": 128, "decode_tokens": args.decode_tokens})  # fmt: skip
    grid = []
    for bits, choice in BITS.items():
        expert_bytes = facts.expert_bytes["bfloat16" if choice == "float" else choice]
        for share in (1.0, 0.5, 0.25):
            for prefetch in (False, True) if share < 1.0 else (False,):
                for skip in (False, True):
                    grid.append(replace(
                        base, expert_bits=bits, dense_bits=bits, prefetch=prefetch,
                        cache_bytes=None if share == 1.0 else int(share * expert_bytes),
                        skip_thresholds=thresholds if skip else None,
                        predicted={"label": f"{bits}-bit, {'resident' if share == 1.0 else f'cache {share:.0%}'}"
                                   f"{' +prefetch' if prefetch else ''}{', skip 25%' if skip else ''}",
                                   "kl": quality[(bits, skip)]},
                    ))  # fmt: skip
    results = []
    for i, plan in enumerate(grid):
        say(f"grid {i + 1}/{len(grid)}: {plan.predicted['label']}")
        checkpoint = planned_checkpoint(plan, path, say)
        results.append({"label": plan.predicted["label"], "kl": plan.predicted["kl"], **verify_plan(checkpoint, plan),
                        "plan": plan, "checkpoint": checkpoint})  # fmt: skip
    chosen = []
    for budget_text in args.budgets.split(","):
        budget = parse_size(budget_text)
        try:
            search = choose_plan(measured, budget, max_kl=args.max_kl, progress=say)
        except ValueError as e:
            chosen.append({"budget": budget_text, "error": str(e)})
            continue
        checkpoint = planned_checkpoint(search.plan, path, say)
        fits = [r for r in results if r["peak_bytes"] <= budget and r["kl"] <= args.max_kl]
        best = max(fits, key=lambda r: r["decode_tokens_per_s"]) if fits else None
        # The choice and the grid's best run side by side, taking turns: medians of fresh processes.
        contenders = [(search.plan, checkpoint)] + ([(best["plan"], best["checkpoint"])] if best else [])
        runs: list[list[dict]] = [[] for _ in contenders]
        for r in range(args.rounds):
            for i, (plan, ckpt) in enumerate(contenders):
                say(f"{budget_text}, round {r + 1}/{args.rounds}: {plan.predicted['label']}")
                runs[i].append(verify_plan(ckpt, plan))
        medians = [{key: statistics.median(run[key] for run in each) for key in ("decode_tokens_per_s",
                    "prefill_tokens_per_s", "peak_bytes")} for each in runs]  # fmt: skip
        if best:
            best = {"label": best["label"], "kl": best["kl"], **medians[1]}
        chosen.append({"budget": budget_text, "plan": search.plan.predicted, "measured": medians[0], "best_grid": best})

    print(f"\n{args.model}: grid of {len(results)} configurations, KL limit {args.max_kl}")
    print("| configuration | KL | decode tok/s | prefill tok/s | peak memory |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['kl']:.4f} | {r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
              f"{format_size(r['peak_bytes'])} |")  # fmt: skip
    print(
        "\n| budget | planner's choice (predicted decode tok/s) | measured decode, peak memory | best grid point "
        "| its decode, peak memory | planner / grid |"
    )
    print("|---|---|---|---|---|---|")
    for c in chosen:
        if "error" in c:
            print(f"| {c['budget']} | refused: {c['error']} | | | | |")
            continue
        best = c["best_grid"]
        ratio = c["measured"]["decode_tokens_per_s"] / best["decode_tokens_per_s"] if best else float("nan")
        mine = c["measured"]
        theirs = f"{best['decode_tokens_per_s']:.1f}, {format_size(best['peak_bytes'])}" if best else ""
        print(f"| {c['budget']} | {c['plan']['label']} ({c['plan']['decode_tokens_per_s']:.1f}) | "
              f"{mine['decode_tokens_per_s']:.1f}, {format_size(mine['peak_bytes'])} | "
              f"{best['label'] if best else 'none fits'} | {theirs} | {ratio:.2f} |")  # fmt: skip
    if args.json:
        grid_records = [{k: v for k, v in r.items() if k not in ("plan", "checkpoint")} for r in results]
        corrections = {" ".join(map(str, key)): factor for key, factor in facts.corrections.items()}
        args.json.write_text(json.dumps({"grid": grid_records, "chosen": chosen, "corrections": corrections},
                                        indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
