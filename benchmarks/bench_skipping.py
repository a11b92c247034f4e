"""Dynamic expert skipping: quality and decode speed against the share of (token, expert) pairs skipped.

For each target share, threshold skipping is calibrated on calibration text (a beta per MoE layer), then on
held-out text (the reference model's held-out files; for a synthetic model, the same calibration text after the
tokens used to calibrate) it measures the KL divergence against the model without skipping, the perplexity, the
share actually skipped, and decode tokens/s of the lean runner (median of rounds, shares taking turns), resident
at each weight format asked for; and the expert reads per decoded token and MoE layer an offloaded run with a
cache of a quarter of the experts makes (replayed through moerun's cache). Prints a table, writes JSON and a PNG.

Run: python benchmarks/bench_skipping.py --model reference|olmoe-1b-7b-4l|DIR [--shares 0,0.1,0.2,0.3,0.4]
     [--bits 16,4] [--threads 2] [--rounds 3] [--json F] [--plot F.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from moerun.models.convert import calibration_tokens
from moerun.models.loader import default_model_dir, join_tokens, load
from moerun.models.skipping import calibrate_skipping, set_skipping, skipped_share
from moerun.perf.model_bench import SYNTHETIC_MODELS, quantized_copy
from moerun.perf.offload_bench import offload_checkpoint
from moerun.plan.trace import record_trace, replay_cache
from moerun.plan.verify import time_run
from moerun.runtime.eval import default_eval_files, kl_divergence, reference_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--shares", default="0,0.1,0.2,0.3,0.4")
    parser.add_argument("--bits", default="16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1024, help="calibration and held-out tokens each")
    parser.add_argument("--decode", type=int, default=32, help="decode steps per timed run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shares = [float(s) for s in args.shares.split(",")]
    bits = [int(b) for b in args.bits.split(",")]

    path = offload_checkpoint(args.model, 16) if args.model in SYNTHETIC_MODELS else (
        default_model_dir() if args.model == "reference" else Path(args.model))  # fmt: skip
    loaded = load(path, "bf16")
    tokenizer_source = loaded if loaded.tokenizer is not None else load(default_model_dir(), "bf16")
    vocab = loaded.model.lm_head.weight.shape[0]
    calibration = [i % vocab for i in calibration_tokens(tokenizer_source.tokenizer, None, 2 * args.tokens)]
    if args.model == "reference":
        texts = [f.read_text() for f in default_eval_files()]
        heldout = join_tokens(texts, loaded.tokenizer)[: args.tokens]
    else:
        heldout = calibration[args.tokens :]
    calibration = calibration[: args.tokens]
    window = min(256, loaded.max_seq_len)
    model = loaded.model
    reference = reference_logprobs(model, heldout, window)
    models = {16: model, **{b: quantized_copy(model, b) for b in bits if b != 16}}
    settings = {s: calibrate_skipping(model, calibration, s, window) if s else None for s in shares}

    rows = {s: {"target_share": s} for s in shares}
    num_slots = 0
    for s in shares:
        set_skipping(model, settings[s])
        result = kl_divergence(model, reference)
        rows[s].update(kl=result.kl_mean, kl_p99=result.kl_p99, top1=result.top1_agreement,
                       perplexity=result.perplexity, reference_perplexity=result.reference_perplexity,
                       skipped_share=skipped_share(model) or 0.0)  # fmt: skip
        trace = record_trace(model, heldout[:512], window)
        experts = len(trace.selected) * trace.num_experts
        num_slots = max(max(trace.top_ks), round(0.25 * experts))
        replay = replay_cache(trace, num_slots, "lfu", prefetch=False)
        rows[s].update(reads_per_layer_token=replay.demand_reads, hit_rate=replay.hit_rate)
        set_skipping(model, None)
    times: dict[tuple[int, float], list[float]] = {}
    for _ in range(args.rounds):
        for b, m in models.items():
            for s in shares:
                set_skipping(m, settings[s])
                _, decode_tps = time_run(m, 64, args.decode)
                times.setdefault((b, s), []).append(decode_tps)
                set_skipping(m, None)
    for (b, s), values in times.items():
        rows[s][f"decode_tps_{b}bit"] = statistics.median(values)

    print(f"{args.model}: threshold skipping, {args.threads} threads, median of {args.rounds} rounds; "
          f"expert reads with a cache of {num_slots} experts (a quarter), LFU")  # fmt: skip
    header = ["target", "skipped", "KL mean", "KL p99", "top-1", "ppl", *[f"decode {b}-bit" for b in bits],
              "reads/layer/token"]  # fmt: skip
    print(" | ".join(header))
    base = {b: rows[shares[0]][f"decode_tps_{b}bit"] for b in bits}
    for s in shares:
        r = rows[s]
        speeds = [f"{r[f'decode_tps_{b}bit']:.1f} ({r[f'decode_tps_{b}bit'] / base[b]:.2f}x)" for b in bits]
        print(f"{s:.0%} | {r['skipped_share']:.1%} | {r['kl']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.1%} | "
              f"{r['perplexity']:.3f} | " + " | ".join(speeds) + f" | {r['reads_per_layer_token']:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "rows": list(rows.values())}, indent=1))
    if args.plot:
        plot(args.model, list(rows.values()), bits, args.plot)


def plot(model: str, rows: list[dict], bits: list[int], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    quality, speed = figure.subplots(1, 2)
    x = [100 * r["skipped_share"] for r in rows]
    quality.plot(x, [r["kl"] for r in rows], marker="o", label="mean KL vs no skipping")
    quality.set_xlabel("(token, expert) pairs skipped, %")
    quality.set_ylabel("KL divergence, nats/token")
    quality.grid(alpha=0.3)
    for b in bits:
        speed.plot(x, [r[f"decode_tps_{b}bit"] for r in rows], marker="o", label=f"{b}-bit experts, resident")
    speed.set_xlabel("(token, expert) pairs skipped, %")
    speed.set_ylabel("decode tokens/s")
    speed.set_ylim(bottom=0)
    speed.grid(alpha=0.3)
    speed.legend()
    figure.suptitle(f"{model}: threshold expert skipping")
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
