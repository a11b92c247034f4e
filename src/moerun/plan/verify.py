"""Proof by measurement: run a plan in a fresh process and measure decode and prefill tokens/s and peak memory.

Each plan runs in its own Python process (``python -m moerun.plan.verify``), so its peak resident memory is its
own: it loads the checkpoint the plan describes (written once by ``quantize --plan`` into moerun's cache
directory where the plan has low-bit formats), prefills the workload's prompt, decodes its tokens with the lean
runner, and prints one JSON line.

Shape legend: P prompt tokens, N decode tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..files import cache_directory
from ..models.convert import quantize_checkpoint
from ..models.loader import load, peak_rss_bytes, reset_peak_rss
from ..models.quantized import make_int4_layouts
from ..models.run_plan import PLAN_FILE, RunPlan
from ..runtime.generate import default_runner


def planned_checkpoint(plan: RunPlan, source: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The checkpoint a plan runs from: ``source`` for float formats, else a quantized copy written once to
    moerun's cache directory (keyed by the plan's formats) and reused."""
    if not plan.quantized:
        return source
    formats = json.dumps([plan.model_identity, plan.quant_config().__dict__], sort_keys=True, default=str)
    dst = cache_directory() / "plans" / hashlib.sha1(formats.encode()).hexdigest()[:12]
    if (dst / PLAN_FILE).is_file():
        return dst
    if progress:
        progress(f"writing the checkpoint of {plan.predicted.get('label', 'the plan')} to {dst}")
    quantize_checkpoint(source, dst, plan.quant_config(), plan=plan)
    return dst


@torch.inference_mode()
def time_run(model: nn.Module, prompt_tokens: int, decode_tokens: int, seed: int = 0) -> tuple[float, float]:
    """(prefill, decode) tokens/s of the lean runner over ``model``: one prompt of random tokens, then decode steps.

    Torch's int4 layouts are made first (``make_int4_layouts``), then a short prompt and a few steps run: first
    calls make allocator pools, once per process. Decode samples at temperature 1 from a seeded generator: greedy
    decoding of a random model loops over a few tokens, whose experts any cache holds.
    """
    # Steady state: torch's int4 layouts made for every expert, not only for those the warm-up reaches (the first
    # uses of the others fell into the timed steps: a fresh one-thread run of the reference model decoded at half
    # its speed).
    make_int4_layouts(model)
    runner = default_runner(model, prompt_tokens + decode_tokens)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.lm_head.weight.shape[0]
    prompt = torch.randint(0, min(vocab, 4096), (prompt_tokens,), generator=generator)
    runner.reset()
    runner.prefill(prompt[:16])
    for token in prompt[16:20].tolist():
        runner.decode(token)
    runner.reset()
    start = time.perf_counter()
    logits = runner.prefill(prompt)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(torch.multinomial(torch.softmax(logits.float().view(-1), dim=-1), 1, generator=generator))
        logits = runner.decode(token)
    decode_s = time.perf_counter() - start
    return prompt_tokens / prefill_s, decode_tokens / decode_s


def measure_plan_run(path: Path, plan: RunPlan, prompt_tokens: int, decode_tokens: int) -> dict:
    """Load ``path`` with ``plan`` and time one prompt and its decode steps (``time_run``) in this process.

    Returns:
        prefill and decode tokens/s, the peak resident bytes of the process, the share of pairs skipped and the
        expert cache's hit rate.
    """
    from ..models.skipping import skipped_share

    reset_peak_rss()
    loaded = load(path, plan=plan)
    prefill_tps, decode_tps = time_run(loaded.model, prompt_tokens, decode_tokens)
    if loaded.cache is not None:
        loaded.cache.wait()
    return {
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps,
        "peak_bytes": peak_rss_bytes(),
        "skipped_share": skipped_share(loaded.model),
        "hit_rate": None if loaded.cache is None else loaded.cache.report()["hit_rate"],
    }


def verify_plan(path: Path, plan: RunPlan, timeout_s: float = 1800) -> dict:
    """``measure_plan_run`` in a fresh Python process; its JSON result."""
    return start_plan_run(path, plan, timeout_s)()


def start_plan_run(path: Path, plan: RunPlan, timeout_s: float = 1800) -> Callable[[], dict]:
    """Start ``verify_plan``'s process and return what waits for its result (other work can go on meanwhile)."""
    plan_file = (
        cache_directory()
        / "plans"
        / f"verify-{os.getpid()}-{hashlib.sha1(json.dumps(plan.to_dict()).encode()).hexdigest()[:12]}.json"
    )
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan.write(plan_file)
    workload = plan.workload
    command = [
        sys.executable, "-m", "moerun.plan.verify", str(path), str(plan_file),
        str(workload.get("prompt_tokens", 128)), str(workload.get("decode_tokens", 128)),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result() -> dict:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"measuring the plan took more than {timeout_s:.0f} s") from None
        finally:
            plan_file.unlink(missing_ok=True)
        if process.returncode != 0:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"measuring the plan failed: {last}")
        return json.loads(stdout.strip().splitlines()[-1])

    return result


if __name__ == "__main__":
    checkpoint, plan_path, prompt, decode = sys.argv[1:5]
    result = measure_plan_run(Path(checkpoint), RunPlan.read(plan_path), int(prompt), int(decode))
    print(json.dumps(result))
