"""Load on `moerun serve`: N concurrent streaming clients for T seconds (or R requests), through HTTP.

Each client sends streaming completions one after another (random prompts from a fixed word list, fixed
max_tokens, sampled at temperature 1 so no two are alike) until the time or the request count is spent.
Reported per client count: requests completed and failed, generated tokens/s over the run, time to first
token and inter-token latency (p50, p99), as the clients saw them.

With ``--model`` the benchmark starts the server itself (``moerun serve`` on 127.0.0.1 and a free port, with
``--serve-args``) and stops it after; with ``--url`` it loads a running one.

Run: python benchmarks/bench_serve_load.py --model reference --clients 1,4,16 --seconds 30
     python benchmarks/bench_serve_load.py --model olmoe-1b-7b-4l --bits 4 --serve-args "--max-batch 16" ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

WORDS = "the a of and to in is was it for on with as he she they at by from his her that this time day".split()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def client_loop(http: httpx.AsyncClient, url: str, end: float, budget: list[int], max_tokens: int,
                      rng: random.Random, out: dict, token_prompts: bool) -> None:  # fmt: skip
    while time.monotonic() < end and budget[0] > 0:
        budget[0] -= 1
        length = rng.randint(4, 24)
        prompt = ([rng.randrange(4096) for _ in range(length)] if token_prompts
                  else " ".join(rng.choice(WORDS) for _ in range(length)))  # fmt: skip
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        started = time.monotonic()
        stamps: list[float] = []
        try:
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    out["errors"].append(f"HTTP {response.status_code}")
                    await response.aread()
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["errors"].append(chunk["error"]["message"])
                    elif chunk.get("usage"):
                        out["tokens"] += chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                        stamps.append(time.monotonic())  # a chunk a token
        except httpx.HTTPError as e:
            out["errors"].append(type(e).__name__)
            continue
        out["done"] += 1
        if stamps:
            out["ttft"].append((stamps[0] - started) * 1e3)
            out["itl"].extend((b - a) * 1e3 for a, b in zip(stamps, stamps[1:], strict=False))


async def load(url: str, clients: int, seconds: float, requests: int, max_tokens: int, seed: int,
               token_prompts: bool) -> dict:  # fmt: skip
    out = {"done": 0, "tokens": 0, "errors": [], "ttft": [], "itl": []}
    budget = [requests]
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=clients)) as http:
        loops = [client_loop(http, url, started + seconds, budget, max_tokens, random.Random(seed + i), out,
                             token_prompts) for i in range(clients)]  # fmt: skip
        await asyncio.gather(*loops)
    elapsed = time.monotonic() - started
    return {
        "clients": clients, "seconds": elapsed, "requests": out["done"], "errors": len(out["errors"]),
        "error_examples": sorted(set(out["errors"]))[:3], "tokens_per_s": out["tokens"] / elapsed,
        "ttft_p50_ms": percentile(out["ttft"], 0.5), "ttft_p99_ms": percentile(out["ttft"], 0.99),
        "itl_p50_ms": percentile(out["itl"], 0.5), "itl_p99_ms": percentile(out["itl"], 0.99),
        "itl_mean_ms": statistics.mean(out["itl"]) if out["itl"] else float("nan"),
    }  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, bits: int, serve_args: str) -> tuple[subprocess.Popen, str]:
    """``moerun serve`` for ``model`` (a directory, 'reference' or a synthetic model at ``bits``) on a free port."""
    args = [] if model == "reference" else ["--model", model]
    if model != "reference" and not Path(model).exists():
        from moerun.perf.offload_bench import offload_checkpoint  # synthetic models are written once, then cached

        args = ["--model", str(offload_checkpoint(model, bits))]
    port = free_port()
    command = [sys.executable, "-m", "moerun.cli", "serve", "--port", str(port), *args, *shlex.split(serve_args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready in 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="start `moerun serve` for this model: a directory, 'reference', or a "
                       "synthetic model such as olmoe-1b-7b-4l")  # fmt: skip
    parser.add_argument("--bits", type=int, default=16, help="with a synthetic --model: its weights' bits")
    parser.add_argument("--serve-args", default="", help='more `moerun serve` options, e.g. "--max-batch 16"')
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--requests", type=int, default=1000, help="requests at most per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--token-prompts", action="store_true",
                        help="send prompts as token ids (for a model without a tokenizer)")  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    process = None
    if args.model:
        process, url = start_server(args.model, args.bits, args.serve_args)
    else:
        url = args.url.rstrip("/")
    try:
        results = []
        for n in (int(c) for c in args.clients.split(",")):
            results.append(asyncio.run(load(url, n, args.seconds, args.requests, args.max_tokens, n,
                                            args.token_prompts)))  # fmt: skip
            r = results[-1]
            print(f"{n} clients: {r['requests']} requests, {r['errors']} errors, {r['tokens_per_s']:.1f} tok/s, "
                  f"TTFT p50 {r['ttft_p50_ms']:.0f} ms p99 {r['ttft_p99_ms']:.0f} ms, ITL p50 {r['itl_p50_ms']:.0f} ms "
                  f"p99 {r['itl_p99_ms']:.0f} ms", flush=True)  # fmt: skip
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    print("\n| clients | requests | errors | generated tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
