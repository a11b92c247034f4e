"""The `moerun` command line. ``main(argv) -> int`` is the console script's entry point."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import MemoryBudgetError
from .files import file_written_whole

app = typer.Typer(
    name="moerun",
    help="Run Mixture-of-Experts models fast on the hardware you have.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


# Options shared by several commands.
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
DType = Annotated[str, typer.Option(help="bf16 or fp32.")]
Threads = Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")]
ModelDir = Annotated[Path | None, typer.Option(help="Checkpoint directory (default: moerun's reference model).")]
MemoryBudget = Annotated[
    str | None,
    typer.Option(
        help="Keep routed experts in the checkpoint and cache at most this much of them: '6GB', '512MiB' "
        "or '40%' of their bytes."
    ),
]
CachePolicy = Annotated[str, typer.Option(help="With --memory-budget: expert eviction policy, lfu or lru.")]
Prefetch = Annotated[
    bool, typer.Option(help="With --memory-budget: read each next layer's predicted experts in the background.")
]
PlanFile = Annotated[
    Path | None,
    typer.Option(help="A run plan (moerun plan): sets formats, expert cache, skipping and threads."),
]


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def _say(text: str) -> None:
    """One line on stderr as plain text: paths and user text in it are never read as Rich markup."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _parse_tokens(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--tokens must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--tokens needs token counts >= 1, got {text!r}")
    return values


def _parse_bits(text: str) -> tuple[int, ...]:
    try:
        values = tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise UserError(f"--bits must be comma-separated values among 16, 8, 4, got {text!r}") from None
    if not values or any(v not in (16, 8, 4) for v in values):
        raise UserError(f"--bits must be comma-separated values among 16, 8, 4, got {text!r}")
    return values


def _text_files(text: list[Path] | None) -> list[Path]:
    """The --text files, each checked to exist, or the reference held-out files."""
    from .runtime.eval import default_eval_files

    for file in text or []:
        if not file.is_file():
            raise UserError(f"text file {file} {'is not a regular file' if file.exists() else 'does not exist'}")
    return text or default_eval_files()


def _read_texts(files: list[Path], what: str = "text file") -> list[str]:
    """The files' text, decoded as strict UTF-8: a file that is not is refused rather than read with U+FFFD."""
    texts = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {what} {file}: {e.strerror}") from None
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(
                f"{what} {file} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
            ) from None
    return texts


def _check_model_dir(model: Path | None) -> None:
    """Refuse a model path that names something other than a directory (load() reports a missing one)."""
    if model is not None and model.expanduser().exists() and not model.expanduser().is_dir():
        raise UserError(f"model {model} is not a directory; give the checkpoint's directory")


def _check_memory_budget(memory_budget: str | None) -> None:
    """The --memory-budget syntax, checked before any loading; its size against the experts is checked at load."""
    from .sizes import parse_size

    if memory_budget is None:
        return
    try:
        parse_size(memory_budget, 1 << 50)
    except ValueError as e:
        raise UserError(f"--memory-budget: {e}") from None


def _check_destination(path: Path | None, option: str = "--json") -> None:
    """Refuse an output path whose directory does not exist, or that exists and is not a regular file (a
    directory, a device such as /dev/null, a symbolic link), before any work is done: the file is replaced whole."""
    if path is None:
        return
    full = path.expanduser()
    if full.is_symlink():
        raise UserError(f"{option} {path} is a symbolic link; give the path of a regular file or a new one")
    if full.exists() and not full.is_file():
        raise UserError(f"{option} {path} exists and is not a regular file; give a regular file or a new path")
    if not full.parent.is_dir():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist")


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place when complete."""
    _check_destination(path)
    with file_written_whole(path.expanduser()) as f:
        json.dump(data, f, indent=2)


@app.command()
def bench(
    preset: Annotated[
        list[str] | None,
        typer.Option(help="Model shape preset, repeat for several, or 'all'. Default: olmoe-1b-7b."),
    ] = None,
    tokens: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "1,16,128,512",
    dtype: DType = "bf16",
    threads: Threads = None,
    impl: Annotated[
        list[str] | None,
        typer.Option(help="Implementation(s): moerun, moerun-prepacked, hf-eager, hf-grouped_mm. Default: all."),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the records as JSON here.")] = None,
    budget: Annotated[float, typer.Option(help="Seconds of timing per case (at least 5 runs each).")] = 3.0,
    remeasure: Annotated[bool, typer.Option(help="Measure the machine's roofline again, ignoring the cache.")] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="Time a whole model instead of one layer: a checkpoint directory, 'reference', or a synthetic "
            "model: 'olmoe-1b-7b-4l', 'deepseek-v2-lite-4l', 'gpt-oss-20b-4l'."
        ),
    ] = None,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(help="With --model: prompt length (prefill); default 512, 32 with an expert memory budget."),
    ] = None,
    decode_tokens: Annotated[
        int, typer.Option(help="With --model: decode steps per round (greedy; sampled with an expert memory budget).")
    ] = 32,
    rounds: Annotated[int, typer.Option(help="With --model: timed rounds, implementations alternating.")] = 3,
    bits: Annotated[
        str, typer.Option(help="Comma-separated weight bits moerun also runs at: 16 (the dtype), 8, 4 (int4 g32).")
    ] = "16",
    group_size: Annotated[int, typer.Option(help="With --bits 4: int4 values per scale (32, 64 or 128).")] = 32,
    memory_budget: MemoryBudget = None,
    cache_policy: CachePolicy = "lfu",
    prefetch: Prefetch = True,
    sweep_memory: Annotated[
        bool,
        typer.Option(
            "--sweep-memory",
            help="With --model: decode with budgets of 10% to 100% of the expert bytes, on-demand LRU vs "
            "--cache-policy with --prefetch; a table, --json and a --plot.",
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="With --sweep-memory: PNG of decode tokens/s and hit rate against the budget "
            "(default: --json's path as .png, else memory-sweep.png)."
        ),
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option(help="With --model: run this plan (moerun plan) in fresh processes: measured vs predicted."),
    ] = None,
    concurrency: Annotated[
        str | None,
        typer.Option(
            help="With --model: comma-separated numbers of sequences decoded together through the serving engine "
            "(throughput, latency, bytes read per step against the bandwidth bound)."
        ),
    ] = None,
) -> None:
    """Time one MoE layer of real model shapes (or a whole model with --model): moerun vs transformers.

    With --model and --memory-budget (or --sweep-memory) the routed experts stay in the checkpoint: decode
    speed, cache hit rate, storage reads and resident memory, on-demand LRU vs --cache-policy with prefetch.
    """
    from .perf.bench import DTYPES, IMPLS, PRESETS, record_dicts, run_bench, unavailable_impls
    from .perf.roofline import load_or_measure_roofline

    bit_widths = _parse_bits(bits)
    if group_size not in (32, 64, 128):
        raise UserError(f"--group-size must be 32, 64 or 128, got {group_size}")
    if threads is not None and threads < 1:  # before `threads or cpu_count`, which would read 0 as all cores
        raise UserError(f"--threads must be >= 1, got {threads}")
    if not math.isfinite(budget) or budget <= 0:
        raise UserError(f"--budget must be a positive number of seconds, got {budget}")
    offload = memory_budget is not None or sweep_memory
    if model is None and (offload or plot is not None):
        raise UserError("--memory-budget, --sweep-memory and --plot need --model")
    if memory_budget is not None and sweep_memory:
        raise UserError("--memory-budget measures one budget and --sweep-memory ten; give one of them")
    if plot is not None and not sweep_memory:
        raise UserError("--plot goes with --sweep-memory")
    if not offload and (cache_policy != "lfu" or not prefetch):
        raise UserError("--cache-policy and --no-prefetch apply with --memory-budget or --sweep-memory")
    if concurrency is not None and model is None:
        raise UserError("--concurrency needs --model")
    if model is not None:
        if preset:
            raise UserError("--preset times one layer and --model a whole model; give one of them")
        if concurrency is not None:
            if offload and sweep_memory:
                raise UserError("--concurrency runs one configuration: leave out --sweep-memory")
            _bench_concurrency(
                model, concurrency, dtype, threads, json_path, 32 if prompt_tokens is None else prompt_tokens,
                64 if decode_tokens == 32 else decode_tokens, bit_widths, group_size, memory_budget, cache_policy,
                prefetch, plan,
            )  # fmt: skip
            return
        if plan is not None:
            if offload or threads is not None:
                raise UserError("--plan sets the formats, the expert cache and the threads: leave out those options")
            _bench_plan(model, plan, json_path, prompt_tokens, decode_tokens, rounds)
            return
        if offload:
            _bench_offload(
                model, dtype, threads, impl, json_path, plot, 32 if prompt_tokens is None else prompt_tokens,
                decode_tokens, rounds, bit_widths, group_size, memory_budget, cache_policy, prefetch,
            )  # fmt: skip
            return
        _bench_model(
            model, dtype, threads, impl, json_path, 512 if prompt_tokens is None else prompt_tokens, decode_tokens,
            rounds, bit_widths, group_size,
        )  # fmt: skip
        return
    presets = list(PRESETS) if preset == ["all"] else preset or ["olmoe-1b-7b"]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise UserError(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    impls = tuple(impl or IMPLS)
    bad_impl = [i for i in impls if i not in IMPLS]
    if bad_impl:
        raise UserError(f"unknown implementation {bad_impl[0]!r}; choose from {', '.join(IMPLS)}")
    unavailable = unavailable_impls(impls, dtype)
    if unavailable and len(unavailable) == len(impls):
        raise UserError("; ".join(f"{name} cannot run here: {why}" for name, why in unavailable.items()))
    impls = tuple(i for i in impls if i not in unavailable)
    token_counts = _parse_tokens(tokens)
    threads = threads or os.cpu_count() or 1
    _check_destination(json_path)
    for name, why in unavailable.items():
        console.print(f"[yellow]note[/] {escape(f'{name} left out: {why}')}")

    with console.status(f"measuring this machine's roofline ({threads} threads)..."):
        roofline = load_or_measure_roofline(threads, remeasure=remeasure)
    console.print(
        f"roofline, {threads} threads: read {roofline.read_gbps:.1f} GB/s, "
        + ", ".join(f"{k} GEMM {v:.0f} GFLOP/s" for k, v in roofline.gemm_gflops.items())
    )
    perf_model = _layer_perf_model(presets, dtype, bit_widths, group_size, threads, roofline)
    records = []
    total = len(presets) * len(token_counts)
    with Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("building layer", total=total)
        done_cases: set[tuple[str, int]] = set()
        for record in run_bench(
            presets, token_counts, dtype, threads, roofline, impls, bits=bit_widths, group_size=group_size,
            budget_s=budget, perf_model=perf_model,
            on_step=lambda text: progress.update(task, description=text),
        ):  # fmt: skip
            records.append(record)
            if (record.preset, record.tokens) not in done_cases:
                done_cases.add((record.preset, record.tokens))
                progress.advance(task)
    for note in dict.fromkeys(f"{r.preset}: {r.note}" for r in records if r.note):
        console.print(f"[yellow]note[/] {escape(note)}")
    print_bench_table(records)
    if json_path is not None:
        write_json_atomic(json_path, record_dicts(records))
        _say(f"wrote {len(records)} records to {json_path}")


def _layer_perf_model(presets: list[str], dtype: str, bits: tuple[int, ...], group_size: int, threads: int, roofline):
    """The host's performance model for the layer bench, tuning the presets' cases first where missing."""
    from .perf.bench import DTYPES
    from .perf.predict import host_model
    from .perf.tune import missing_cases, preset_cases, tuning_enabled

    if tuning_enabled():
        cases = [c for name in presets for c in preset_cases(name, dtype, bits, group_size, threads)]
        missing = missing_cases(cases)
        if missing:
            console.print(f"measuring {len(missing)} kernel case(s) on this host, once", highlight=False)
            _run_tune(missing)
    with console.status("measuring fixed overheads (once per host)..."):
        return host_model(threads, roofline, DTYPES[dtype])


def _error_cell(error: float | None) -> str:
    return "" if error is None else f"{error:+.0%}"


def print_bench_table(records: list) -> None:
    """The bench table on stdout, with speed-up over transformers' grouped_mm where both ran."""
    base = {(r.preset, r.tokens): r.median_ms for r in records if r.impl == "hf-grouped_mm"}
    ours = {(r.preset, r.tokens): r.median_ms for r in records if r.impl == "moerun"}
    low_bit = any(r.impl.startswith("moerun-int") for r in records)
    table = Table(title="MoE layer, median of alternating runs")
    columns = (
        "preset", "dtype", "tokens", "impl", "ms", "predicted", "error", "tokens/s", "GB/s", "GFLOP/s", "roofline",
        "bound", "vs grouped_mm",
    )  # fmt: skip
    columns += ("vs moerun",) if low_bit else ()
    for column in columns:
        table.add_column(column, justify="left" if column in ("preset", "impl", "dtype") else "right")
    for r in records:
        ref = base.get((r.preset, r.tokens))
        mine = ours.get((r.preset, r.tokens))
        vs_moerun = ("" if mine is None else f"{mine / r.median_ms:.2f}x",) if low_bit else ()
        table.add_row(
            r.preset, r.dtype, str(r.tokens), r.impl, f"{r.median_ms:.2f}",
            "" if r.predicted_ms is None else f"{r.predicted_ms:.2f}", _error_cell(r.prediction_error),
            f"{r.tokens_per_s:,.0f}", f"{r.gbps:.1f}", f"{r.gflops:.0f}", f"{r.roofline_fraction:.0%}", r.bound,
            "" if ref is None else f"{ref / r.median_ms:.2f}x",
            *vs_moerun,
        )  # fmt: skip
    out = Console()
    if not out.is_terminal:  # redirected output: never wrap the table's cells
        out.width = 200
    out.print(table)


def _bench_model(
    model: str,
    dtype: str,
    threads: int | None,
    impl: list[str] | None,
    json_path: Path | None,
    prompt_tokens: int,
    decode_tokens: int,
    rounds: int,
    bits: tuple[int, ...] = (16,),
    group_size: int = 32,
) -> None:
    """`moerun bench --model`: validate the options, run the whole-model bench with progress, report."""
    from .perf.bench import DTYPES
    from .perf.model_bench import IMPLS, record_dicts, run_model_bench

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    impls = tuple(impl or IMPLS)
    bad_impl = [i for i in impls if i not in IMPLS]
    if bad_impl:
        raise UserError(f"unknown implementation {bad_impl[0]!r} for --model; choose from {', '.join(IMPLS)}")
    threads = threads or os.cpu_count() or 1
    for name, value in (("--threads", threads), ("--prompt-tokens", prompt_tokens), ("--rounds", rounds)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if decode_tokens < 1:
        raise UserError(f"--decode-tokens must be >= 1, got {decode_tokens}")
    _check_destination(json_path)
    with Progress(
        TextColumn("{task.description}", markup=False), TimeElapsedColumn(), console=console, transient=True
    ) as progress:  # fmt: skip
        task = progress.add_task("starting")
        records = list(
            run_model_bench(
                model, dtype, threads, impls, prompt_tokens, decode_tokens, rounds, bits=bits,
                group_size=group_size,
                prepare=lambda m: tune_on_first_use(m, threads, lambda text: progress.update(task, description=text)),
                perf_model=lambda: _whole_model_perf(threads, dtype),
                on_step=lambda text: progress.update(task, description=text),
            )
        )  # fmt: skip
    for r in records:
        if r.note:
            console.print(f"[yellow]note[/] {escape(f'{r.impl}: {r.note}')}")
    print_model_table(records)
    if json_path is not None:
        write_json_atomic(json_path, record_dicts(records))
        _say(f"wrote {len(records)} records to {json_path}")


def _bench_concurrency(
    model: str, concurrency: str, dtype: str, threads: int | None, json_path: Path | None, prompt_tokens: int,
    decode_tokens: int, bits: tuple[int, ...], group_size: int, memory_budget: str | None, cache_policy: str,
    prefetch: bool, plan: Path | None,
) -> None:  # fmt: skip
    """`moerun bench --model M --concurrency 1,2,4,8`: sequences decoded together through the serving engine."""
    from .models.quantized import QuantConfig, quantize
    from .perf.batch_bench import run_concurrency
    from .perf.model_bench import SYNTHETIC_MODELS, resolve_model_dir
    from .perf.offload_bench import offload_checkpoint
    from .perf.roofline import load_or_measure_roofline

    try:
        counts = [int(v) for v in concurrency.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--concurrency needs comma-separated numbers of sequences >= 1, got {concurrency!r}")
    if len(bits) != 1:
        raise UserError("--concurrency runs one format: give --bits 16, 8 or 4")
    if prompt_tokens < 1 or decode_tokens < 2:
        raise UserError("--prompt-tokens must be >= 1 and --decode-tokens >= 2")
    _check_destination(json_path)
    with console.status("preparing the model..."):
        path = offload_checkpoint(model, 16) if model in SYNTHETIC_MODELS else resolve_model_dir(model)
    loaded = _load_model(path, dtype, threads, needs_tokenizer_for="", memory_budget=memory_budget,
                         cache_policy=cache_policy, prefetch=prefetch, plan=plan)  # fmt: skip
    if bits[0] != 16 and plan is None:
        quantize(loaded.model, QuantConfig(bits=bits[0], group_size=group_size))
    threads = torch_threads()
    roofline = load_or_measure_roofline(threads)
    records = []
    with Progress(TextColumn("{task.description}", markup=False), TimeElapsedColumn(), console=console,
                  transient=True) as progress:  # fmt: skip
        task = progress.add_task("starting")
        for c in counts:
            progress.update(task, description=f"{c} concurrent sequence(s): {prompt_tokens} + {decode_tokens} tokens")
            records.append(run_concurrency(loaded.model, c, prompt_tokens, decode_tokens, roofline.read_gbps))
    table = Table(title=f"{model}, {bits[0]}-bit, {threads} thread(s), read bandwidth {roofline.read_gbps:.1f} GB/s")
    for column in ("sequences", "aggregate tok/s", "per sequence", "TTFT p50/p99 ms", "ITL p50/p99 ms",
                   "experts/layer", "bytes/step", "step ms", "bound ms", "of bound"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            str(r.concurrency), f"{r.aggregate_tokens_per_s:.1f}", f"{r.per_sequence_tokens_per_s:.1f}",
            f"{r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f}", f"{r.itl_p50_ms:.0f} / {r.itl_p99_ms:.0f}",
            f"{r.distinct_experts_per_layer:.1f}", _format_bytes(r.expert_bytes + r.shared_bytes + r.kv_bytes),
            f"{r.step_ms:.1f}", f"{r.bound_ms:.1f}", f"{r.share_of_bound:.0%}",
        )  # fmt: skip
    # Ten columns: wider than the 80 a console takes off a terminal.
    Console(stderr=True, width=max(console.width, 160)).print(table)
    if json_path is not None:
        write_json_atomic(json_path, [r.to_dict() for r in records])
        _say(f"wrote {len(records)} records to {json_path}")


def _bench_plan(
    model: str, plan_path: Path, json_path: Path | None, prompt_tokens: int | None, decode_tokens: int, rounds: int
) -> None:
    """`moerun bench --model M --plan P`: the plan run in fresh processes, ``rounds`` times, against its prediction."""
    from .models.run_plan import RunPlan
    from .perf.model_bench import SYNTHETIC_MODELS, resolve_model_dir
    from .perf.offload_bench import offload_checkpoint
    from .plan.verify import planned_checkpoint, verify_plan

    if rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {rounds}")
    _check_destination(json_path)
    run_plan = RunPlan.read(plan_path)
    workload = {"prompt_tokens": prompt_tokens or run_plan.workload.get("prompt_tokens", 128),
                "decode_tokens": decode_tokens}  # fmt: skip
    run_plan = replace(run_plan, workload=workload)
    source = offload_checkpoint(model, 16) if model in SYNTHETIC_MODELS else resolve_model_dir(model)
    run_plan.check_model(source)
    with console.status("writing the plan's checkpoint (once)..."):
        checkpoint = planned_checkpoint(run_plan, source)
    runs = []
    for r in range(rounds):
        with console.status(f"running the plan in a fresh process, round {r + 1}/{rounds}..."):
            runs.append(verify_plan(checkpoint, run_plan))
    measured = _median_record(runs)
    predicted = run_plan.predicted
    table = Table(title=f"{predicted.get('label', 'plan')}: median of {rounds} fresh runs, "
                  f"{workload['prompt_tokens']}-token prompt, {decode_tokens} decode steps")  # fmt: skip
    for column in ("", "decode tok/s", "prefill tok/s", "peak memory"):
        table.add_column(column, justify="left" if not column else "right")
    from .sizes import format_size

    table.add_row("measured", f"{measured['decode_tokens_per_s']:,.1f}", f"{measured['prefill_tokens_per_s']:,.0f}",
                  format_size(measured["peak_bytes"]))  # fmt: skip
    if predicted:
        table.add_row("predicted", f"{predicted['decode_tokens_per_s']:,.1f}",
                      f"{predicted['prefill_tokens_per_s']:,.0f}", format_size(predicted["peak_bytes"]))  # fmt: skip
    Console().print(table)
    if json_path is not None:
        write_json_atomic(json_path, {"plan": run_plan.to_dict(), "runs": runs, "measured": measured})
        _say(f"wrote {json_path}")


def _whole_model_perf(threads: int, dtype: str):
    from .perf.bench import DTYPES
    from .perf.predict import host_model
    from .perf.roofline import load_or_measure_roofline

    return host_model(threads, load_or_measure_roofline(threads), DTYPES[dtype])


def print_model_table(records: list) -> None:
    """The whole-model bench table on stdout, with speed-ups over transformers' grouped_mm."""
    base = next((r for r in records if r.impl == "hf-grouped_mm"), None)
    first = records[0]
    table = Table(
        title=f"{escape(first.model)}, {first.dtype}, {first.threads} threads: {first.prompt_tokens}-token prompt, "
        f"{first.decode_tokens} decode steps, median of {first.rounds} alternating rounds"
    )
    columns = (
        "impl", "TTFT ms", "prefill tok/s", "predicted", "error", "decode tok/s", "predicted", "error", "decode GB/s",
        "roofline", "outside MoE", "vs grouped_mm",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "impl" else "right")
    for r in records:
        speedup = ""
        if base is not None:
            speedup = (
                f"prefill {r.prefill_tokens_per_s / base.prefill_tokens_per_s:.2f}x, "
                f"decode {r.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x"
            )
        table.add_row(
            r.impl, f"{r.ttft_ms:,.1f}", f"{r.prefill_tokens_per_s:,.1f}",
            "" if r.predicted_prefill_tokens_per_s is None else f"{r.predicted_prefill_tokens_per_s:,.1f}",
            _error_cell(r.prefill_prediction_error), f"{r.decode_tokens_per_s:.1f}",
            "" if r.predicted_decode_tokens_per_s is None else f"{r.predicted_decode_tokens_per_s:.1f}",
            _error_cell(r.decode_prediction_error),
            f"{r.decode_gbps:.1f}", f"{r.decode_roofline_fraction:.0%}", f"{r.decode_non_moe_share:.0%}", speedup,
        )  # fmt: skip
    out = Console()
    if not out.is_terminal:  # redirected output: never wrap the table's cells
        out.width = 240
    out.print(table)


def _bench_offload(
    model: str,
    dtype: str,
    threads: int | None,
    impl: list[str] | None,
    json_path: Path | None,
    plot: Path | None,
    prompt_tokens: int,
    decode_tokens: int,
    rounds: int,
    bits: tuple[int, ...],
    group_size: int,
    memory_budget: str | None,
    cache_policy: str,
    prefetch: bool,
) -> None:
    """`moerun bench --model M --memory-budget SIZE | --sweep-memory`: validate, run with progress, report."""
    from .offload.cache import POLICIES
    from .perf.bench import DTYPES
    from .perf.offload_bench import ON_DEMAND_LRU, Setup, plot_sweep, record_dicts, run_memory_sweep, run_offload_bench

    sweep = memory_budget is None
    if impl:
        raise UserError("--impl does not apply with --memory-budget or --sweep-memory (moerun's lean runner runs)")
    if len(bits) != 1:
        raise UserError(f"--memory-budget and --sweep-memory take one --bits value, got {','.join(map(str, bits))}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if cache_policy not in POLICIES:
        raise UserError(f"unknown --cache-policy {cache_policy!r}; choose from {', '.join(POLICIES)}")
    _check_memory_budget(memory_budget)  # the syntax, before a long conversion; the size is checked at load
    threads = threads or os.cpu_count() or 1
    for name, value in (("--threads", threads), ("--prompt-tokens", prompt_tokens), ("--decode-tokens", decode_tokens),
                        ("--rounds", rounds)):  # fmt: skip
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if sweep:
        plot = plot or (json_path.with_suffix(".png") if json_path is not None else Path("memory-sweep.png"))
    _check_destination(json_path)
    _check_destination(plot, "--plot")
    setup = Setup(cache_policy, prefetch)
    options = dict(
        dtype_name=dtype, threads=threads, bits=bits[0], group_size=group_size, prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens, rounds=rounds,
    )  # fmt: skip
    with console.status("measuring fixed overheads (once per host)..."):
        options["perf_model"] = _whole_model_perf(threads, dtype)
    with Progress(
        TextColumn("{task.description}", markup=False), TimeElapsedColumn(), console=console, transient=True
    ) as progress:  # fmt: skip
        task = progress.add_task("starting")

        def step(text: str) -> None:
            progress.update(task, description=text)

        if sweep:
            records = run_memory_sweep(model, setup, on_step=step, **options)
        else:
            setups = list(dict.fromkeys([ON_DEMAND_LRU, setup]))
            try:
                records = run_offload_bench(model, [memory_budget], setups, on_step=step, **options)
            except MemoryBudgetError as e:
                raise UserError(f"--memory-budget {memory_budget}: {e}") from None
    print_offload_table(records)
    if not sweep:
        for r in records:
            _say(f"{r.setup} at {r.budget}, decode steps of all {r.rounds} rounds:")
            print_cache_report(r.cache_report())
    if json_path is not None:
        write_json_atomic(json_path, record_dicts(records))
        _say(f"wrote {len(records)} records to {json_path}")
    if sweep:
        plot_sweep(records, plot.expanduser())
        _say(f"wrote {plot}")


def print_offload_table(records: list) -> None:
    """The expert offload bench table on stdout: one row per (budget, setup), speed-up over on-demand LRU."""
    from .perf.offload_bench import ON_DEMAND_LRU

    first = records[0]
    base = {r.budget: r.decode_tokens_per_s for r in records if r.setup == ON_DEMAND_LRU.label}
    weights = "bf16" if first.bits == 16 else f"int{first.bits}"
    table = Table(
        title=f"{escape(first.model)} ({weights}), experts read from storage: "
        f"{first.prompt_tokens}-token prompt, {first.decode_tokens} decode steps, {first.threads} threads, "
        f"median of {first.rounds} alternating rounds"
    )
    columns = (
        "budget", "setup", "slots", "decode tok/s", "predicted", "error", "vs LRU", "hit rate", "read MB/tok",
        "stall ms/tok", "storage GB/s", "prediction (uncached)", "TTFT ms", "prefill error", "cache filled",
        "RSS added", "budget+weights", "overhead",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("budget", "setup") else "right", no_wrap=True)
    for r in records:
        accuracy = _accuracy(r.prediction_accuracy, r.uncached_prediction_accuracy)
        ratio = f"{r.decode_tokens_per_s / base[r.budget]:.2f}x" if r.budget in base else ""
        table.add_row(
            f"{r.budget} ({_format_bytes(r.budget_bytes)})", r.setup, str(r.slots), f"{r.decode_tokens_per_s:.2f}",
            "" if r.predicted_decode_tokens_per_s is None else f"{r.predicted_decode_tokens_per_s:.2f}",
            _error_cell(r.decode_prediction_error), ratio, f"{r.hit_rate:.1%}", f"{r.read_mb_per_token:.1f}",
            f"{r.stall_ms_per_token:.1f}", f"{r.storage_gbps:.2f}", accuracy, f"{r.ttft_ms:,.0f}",
            _error_cell(r.prefill_prediction_error), _format_bytes(r.cache_filled_bytes),
            _format_bytes(r.rss_added_bytes), _format_bytes(r.rss_expected_bytes), _format_bytes(r.rss_overhead_bytes),
        )  # fmt: skip
    out = Console()
    if not out.is_terminal:  # redirected output: never wrap the table's cells
        out.width = 240
    out.print(table)
    console.print(
        f"experts {_format_bytes(first.expert_bytes)}, other weights {_format_bytes(first.non_expert_bytes)}; "
        "each round loads afresh and evicts the checkpoint from the page cache before the prompt; "
        "RSS added: the peak resident memory of a load and its sequence over what the process held before; "
        "overhead: RSS added - cache filled - other weights (the lean runner's q/k/v copy and KV cache, "
        "activations)",
        highlight=False,
        soft_wrap=True,
    )


@app.callback()
def _root(
    debug: Debug = False,
) -> None:
    """Run Mixture-of-Experts models fast on the hardware you have."""


@app.command()
def tune(
    model: Annotated[
        str | None,
        typer.Option(help="Tune for a whole model: a checkpoint directory, 'reference', or a synthetic model (bench)."),
    ] = None,
    preset: Annotated[
        list[str] | None, typer.Option(help="Tune for a layer preset (as in bench), repeat for several, or 'all'.")
    ] = None,
    dtype: DType = "bf16",
    threads: Threads = None,
    bits: Annotated[str, typer.Option(help="Comma-separated weight bits to tune: 16 (the dtype), 8, 4.")] = "16",
    group_size: Annotated[int, typer.Option(help="With --bits 4: int4 values per scale (32, 64 or 128).")] = 32,
    force: Annotated[bool, typer.Option(help="Measure every case again, replacing what the cache holds.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the cases as JSON here.")] = None,
    debug: Debug = False,
) -> None:
    """Measure which kernel is fastest for each case a model meets on this host, and cache it.

    Without options: the reference model. Results go to tuning.json in moerun's cache directory, keyed by
    this host's fingerprint; `auto` uses them from then on. Prints each case's winner and its margin.
    """
    import torch

    from .perf.bench import DTYPES, PRESETS
    from .perf.tune import model_cases, preset_cases

    bit_widths = _parse_bits(bits)
    if group_size not in (32, 64, 128):
        raise UserError(f"--group-size must be 32, 64 or 128, got {group_size}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if model is not None and preset:
        raise UserError("--model tunes a whole model and --preset one layer shape; give one of them")
    _check_destination(json_path)
    threads = threads or torch.get_num_threads()
    cases = []
    if preset:
        presets = list(PRESETS) if preset == ["all"] else preset
        unknown = [p for p in presets if p not in PRESETS]
        if unknown:
            raise UserError(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
        for name in presets:
            cases += preset_cases(name, dtype, bit_widths, group_size, threads)
    else:
        from .perf.model_bench import load_model, quantized_copy

        with console.status("loading the model..."):
            loaded = load_model(model or "reference", DTYPES[dtype])
        for b in bit_widths:
            cases += model_cases(loaded if b == 16 else quantized_copy(loaded, b, group_size), threads)
    results = _run_tune(cases, force=force)
    print_tune_table(results)
    if json_path is not None:
        records = [{"case": r.key, "label": r.label, "times_ms": r.times_ms, "winner": r.winner} for r in results]
        write_json_atomic(json_path, records)
        _say(f"wrote {len(records)} cases to {json_path}")


def print_tune_table(results: list) -> None:
    """Each case's winner, its time and its margin over the runner-up."""
    from .kernels.tuning import default_table_path

    table = Table(title=f"fastest implementation per case on this host (cached in {escape(str(default_table_path()))})")
    for column in ("case", "winner", "ms", "runner-up", "margin"):
        table.add_column(column, justify="left" if column in ("case", "winner", "runner-up") else "right")
    for r in results:
        ordered = sorted(r.times_ms, key=r.times_ms.__getitem__)
        runner_up = ordered[1] if len(ordered) > 1 else ""
        margin = "" if r.margin is None else f"{r.margin:.2f}x"
        table.add_row(escape(r.label), r.winner, f"{r.times_ms[r.winner]:.3f}", runner_up, margin)
    out = Console()
    if not out.is_terminal:
        out.width = 160
    out.print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    model: ModelDir = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generate at most this many tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding, else the sampling temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the most likely tokens up to this mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    dtype: DType = "bf16",
    threads: Threads = None,
    memory_budget: MemoryBudget = None,
    cache_policy: CachePolicy = "lfu",
    prefetch: Prefetch = True,
    plan: PlanFile = None,
    debug: Debug = False,
) -> None:
    """Generate text from a prompt, streamed to stdout; timings and memory go to stderr."""
    from .runtime.generate import generate as run_generation

    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 for greedy decoding), got {temperature}")
    if not 0 < top_p <= 1:  # nan fails both comparisons
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes the shell's locale could not decode arrive as lone surrogates
        raise UserError(f"--prompt is not valid UTF-8 text: undecodable bytes at character {e.start}") from None
    loaded = _load_model(
        model, dtype, threads, needs_tokenizer_for="a text prompt", memory_budget=memory_budget,
        cache_policy=cache_policy, prefetch=prefetch, plan=plan,
    )  # fmt: skip

    def write(token) -> None:
        sys.stdout.write(token.text)
        sys.stdout.flush()

    result = run_generation(
        loaded, prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        on_token=write,
    )  # fmt: skip
    sys.stdout.write("\n")
    console.print(
        f"prompt tokens {result.prompt_tokens} · generated {len(result.token_ids)} (stop: {result.stop_reason}) · "
        f"time to first token {result.time_to_first_token_ms:,.0f} ms · "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s · peak memory {_format_bytes(result.peak_memory_bytes)}",
        highlight=False,
        soft_wrap=True,
    )
    if loaded.cache is not None:
        print_cache_report(loaded.cache.report())


@app.command()
def serve(
    model: ModelDir = None,
    plan: PlanFile = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together (each holds a KV cache).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond those running; more get 429.")] = 64,
    context: Annotated[
        int | None, typer.Option(help="Positions per sequence, prompt and output (default: the model's, at most 4096).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY' on /v1/.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="Read the API key from this file.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds a request may take; then it ends (408).")] = None,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of requests that give none.")] = 256,
    prefill_chunk: Annotated[int, typer.Option(help="Prompt tokens entered per engine step at most.")] = 256,
    shutdown_deadline: Annotated[
        float, typer.Option(help="On SIGTERM, seconds running requests get to finish before they are cancelled.")
    ] = 30.0,
    model_name: Annotated[str | None, typer.Option(help="The name clients ask for (default: the directory's).")] = None,
    dtype: DType = "bf16",
    threads: Threads = None,
    memory_budget: MemoryBudget = None,
    cache_policy: CachePolicy = "lfu",
    prefetch: Prefetch = True,
    debug: Debug = False,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API with continuous batching (until SIGINT/SIGTERM)."""
    from .models.loader import default_model_dir
    from .serve.app import ServerConfig
    from .serve.server import serve as run_server

    for name, value, least in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                               ("--prefill-chunk", prefill_chunk, 1), ("--max-tokens", max_tokens, 1)):  # fmt: skip
        if value < least:
            raise UserError(f"{name} must be >= {least}, got {value}")
    if context is not None and context < 2:
        raise UserError(f"--context must be >= 2 (a prompt token and one to generate), got {context}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"--timeout must be a number of seconds > 0, got {timeout}")
    if not (math.isfinite(shutdown_deadline) and shutdown_deadline >= 0):
        raise UserError(f"--shutdown-deadline must be a number of seconds >= 0, got {shutdown_deadline}")
    if api_key is not None and api_key_file is not None:
        raise UserError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api-key-file {api_key_file}: cannot read it ({e})") from None
    if api_key is not None and not api_key:
        raise UserError("the API key is empty")
    _check_model_dir(model)
    path = default_model_dir() if model is None else model.expanduser()
    if not path.is_dir():  # before the server starts: loading happens after it listens
        raise UserError(f"model directory {path} does not exist")
    if plan is not None:
        from .models.run_plan import RunPlan

        RunPlan.read(plan)  # a bad plan file is refused now, not after the server starts
    config = ServerConfig(model_name or path.name, api_key, timeout, max_tokens, shutdown_deadline)

    def load_model():
        from .serve.server import serving

        # A model without a tokenizer is served too: prompts as token ids, outputs as tokens without text.
        loaded = _load_model(model, dtype, threads, needs_tokenizer_for="", memory_budget=memory_budget,
                             cache_policy=cache_policy, prefetch=prefetch, plan=plan)  # fmt: skip
        return serving(loaded, max_batch, context, max_queue, prefill_chunk)

    _say(f"serving {config.model_name} on http://{host}:{port}/v1 ({max_batch} sequences at once); loading the model")
    code = run_server(load_model, config, host, port)
    if code:
        raise typer.Exit(code)


@app.command("eval")
def eval_(
    model: ModelDir = None,
    text: Annotated[
        list[Path] | None,
        typer.Option(help="Text file to score, repeat for several (default: the reference held-out files)."),
    ] = None,
    dtype: DType = "bf16",
    threads: Threads = None,
    context: Annotated[int | None, typer.Option(help="Window length in tokens (default: the model's context).")] = None,
    kl_against: Annotated[
        str | None,
        typer.Option(
            "--kl-against",
            help="Report instead the KL divergence of the next-token distributions from a reference's: bf16 or "
            "fp32 (this float checkpoint, unmodified, in that dtype) or the directory of the unmodified checkpoint "
            "(e.g. a quantized one's float source, loaded in --dtype).",
        ),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")] = None,
    memory_budget: MemoryBudget = None,
    cache_policy: CachePolicy = "lfu",
    prefetch: Prefetch = True,
    plan: PlanFile = None,
    debug: Debug = False,
) -> None:
    """Perplexity and tokens/s of a model on text files, or its KL divergence from a reference (--kl-against)."""
    from .models.loader import join_tokens
    from .runtime.eval import evaluate, kl_divergence

    files = _text_files(text)
    texts = _read_texts(files)
    _check_destination(json_path)
    options = dict(threads=threads, memory_budget=memory_budget, cache_policy=cache_policy, prefetch=prefetch)
    record: dict = {}
    if kl_against is not None:  # the reference first, freed before the model under test is loaded
        reference, record = _kl_reference(kl_against, model, dtype, texts, context, **options)
    loaded = _load_model(model, dtype, needs_tokenizer_for="evaluation", **options)
    if kl_against is None:
        with console.status(f"scoring {len(files)} file(s)..."):
            result = evaluate(loaded, texts, context=context)
        print(
            f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f} nats/token) over {result.tokens:,} tokens "
            f"in {len(files)} file(s), context {result.context}; "
            f"{result.seconds:.2f} s, {result.tokens_per_s:,.0f} tokens/s"
        )
    else:
        if join_tokens(texts, loaded.tokenizer) != reference.token_ids.tolist():
            raise UserError(f"the model's tokenizer splits the text differently from that of --kl-against {kl_against}")
        with console.status(f"scoring {len(files)} file(s) against the reference..."):
            result = kl_divergence(loaded, reference)
        change = result.perplexity / result.reference_perplexity - 1
        print(
            f"KL divergence vs {kl_against}: mean {result.kl_mean:.6f} nats (median {result.kl_median:.6f}, "
            f"p99 {result.kl_p99:.6f}, max {result.kl_max:.6f}), top-1 agreement {result.top1_agreement:.2%}; "
            f"perplexity {result.perplexity:.4f} (reference {result.reference_perplexity:.4f}, {change:+.2%}) "
            f"over {result.tokens:,} tokens, context {result.context}"
        )
        record["perplexity_change"] = change
    if loaded.cache is not None:
        print_cache_report(loaded.cache.report())
    if json_path is not None:
        record = {
            **result.to_dict(), **record, "model": str(loaded.path), "dtype": dtype, "files": [str(f) for f in files],
        }  # fmt: skip
        if loaded.cache is not None:
            record["expert_cache"] = loaded.cache.report()
        write_json_atomic(json_path, record)
        _say(f"wrote {json_path}")


def _kl_reference(kl_against: str, model: Path | None, dtype: str, texts: list[str], context: int | None, **options):
    """eval --kl-against: load the reference, compute its log-probs on the texts, free it.

    Returns:
        the :class:`ReferenceLogprobs` and the JSON fields that name the reference.
    """
    import gc

    from .models.loader import DTYPES, default_model_dir, join_tokens
    from .models.quantized import QUANT_FILE
    from .runtime.eval import reference_logprobs

    if dtype not in DTYPES:  # checked before the reference's load, not after it
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if kl_against in ("bf16", "fp32"):
        _check_model_dir(model)
        path, ref_dtype = (default_model_dir() if model is None else model.expanduser()), kl_against
        if (path / QUANT_FILE).is_file():
            raise UserError(
                f"--kl-against {kl_against}: {path} is a quantized checkpoint, with no unmodified weights to load in "
                f"{kl_against}; give its float source checkpoint's directory instead"
            )
    else:
        path, ref_dtype = Path(kl_against).expanduser(), dtype
        if not path.is_dir():
            state = "is not a directory" if path.exists() else "does not exist"
            raise UserError(f"--kl-against takes bf16, fp32 or a checkpoint directory; {kl_against} {state}")
    loaded = _load_model(path, ref_dtype, needs_tokenizer_for="--kl-against", **options)
    with console.status("computing the reference's next-token distributions..."):
        reference = reference_logprobs(loaded, join_tokens(texts, loaded.tokenizer), context)
    del loaded
    gc.collect()
    return reference, {"kl_against": kl_against, "reference": str(path), "reference_dtype": ref_dtype}


@app.command("routing-stats")
def routing_stats_(
    model: ModelDir = None,
    text: Annotated[
        list[Path] | None,
        typer.Option(help="Text file to route, repeat for several (default: the reference held-out files)."),
    ] = None,
    cache_size: Annotated[
        list[int] | None,
        typer.Option(help="Experts cached per layer, repeat for several (default: top_k, 2x and 4x, at most E)."),
    ] = None,
    segment: Annotated[int, typer.Option(help="Tokens of routing the cache sees ahead (SCH's m).")] = 16,
    max_tokens: Annotated[int | None, typer.Option(help="Route at most this many tokens of the text.")] = None,
    dtype: DType = "bf16",
    threads: Threads = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the statistics as JSON here.")] = None,
    memory_budget: MemoryBudget = None,
    cache_policy: CachePolicy = "lfu",
    prefetch: Prefetch = True,
    debug: Debug = False,
) -> None:
    """Per-layer expert activation shares and the best hit rate of an expert cache (SCH, arXiv 2505.16056).

    With --memory-budget, the text is also decoded token by token through moerun's own expert cache, whose
    measured hit rates follow."""
    from .models.quantized import moe_layers
    from .runtime.eval import join_tokens
    from .runtime.generate import default_runner
    from .runtime.routing_stats import collect_routing, default_cache_sizes, replay_decode, routing_stats

    files = _text_files(text)
    texts = _read_texts(files)
    if cache_size and min(cache_size) < 1:
        raise UserError(f"--cache-size must be >= 1 expert, got {min(cache_size)}")
    for name, value in (("--segment", segment), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    _check_destination(json_path)
    loaded = _load_model(
        model, dtype, threads, needs_tokenizer_for="routing statistics", memory_budget=memory_budget,
        cache_policy=cache_policy, prefetch=prefetch,
    )  # fmt: skip
    layers = list(moe_layers(loaded.model).values())
    num_experts, top_k = layers[0].num_experts, layers[0].routing.top_k
    sizes = list(dict.fromkeys(cache_size or default_cache_sizes(top_k, num_experts)))
    if max(sizes) > num_experts:
        raise UserError(f"--cache-size {max(sizes)} is more than the {num_experts} experts of a layer")
    ids = join_tokens(texts, loaded.tokenizer)[:max_tokens]
    if not ids:
        raise UserError("the text files hold no tokens")
    with console.status(f"routing {len(ids):,} tokens..."):
        selected = collect_routing(loaded, ids)
    with console.status("simulating the expert caches..."):
        stats = routing_stats(selected, num_experts, sizes, segment)
    print_routing_table(stats)
    if loaded.cache is not None:
        loaded.cache.reset_stats()
        with console.status(f"decoding {len(ids):,} tokens through the expert cache..."):
            context = min(loaded.max_seq_len, 1024)
            replay_decode(default_runner(loaded.model, context), ids, context)
            loaded.cache.wait()
        print_cache_report(loaded.cache.report())
    if json_path is not None:
        record = {**stats.to_dict(), "model": str(loaded.path), "dtype": dtype, "files": [str(f) for f in files]}
        if loaded.cache is not None:
            record["expert_cache"] = loaded.cache.report()
        write_json_atomic(json_path, record)
        _say(f"wrote {json_path}")


def print_routing_table(stats) -> None:
    """The routing-stats table on stdout: one row per MoE layer, then their mean."""
    table = Table(
        title=f"{stats.tokens:,} tokens, {stats.num_experts} experts, top-{stats.top_k}; "
        f"SCH with {stats.segment} tokens of look-ahead"
    )
    k = stats.top_k
    sch_columns = [f"SCH C={c}" + (f" ({c // k}k)" if c % k == 0 else "") for c in stats.cache_sizes]
    for column in ("layer", "most used (share)", "min share", "max share", "eff. experts", *sch_columns):
        table.add_column(column, justify="left" if column in ("layer", "most used (share)") else "right")
    rows = []
    for s in stats.layers:
        top = sorted(range(len(s.shares)), key=lambda e: -s.shares[e])[:3]
        most_used = ", ".join(f"{e}: {s.shares[e]:.0%}" for e in top)
        rows.append((str(s.layer), most_used, min(s.shares), max(s.shares), s.effective_experts, *s.sch.values()))
    means = [sum(row[i] for row in rows) / len(rows) for i in range(2, len(rows[0]))]
    for row in [*rows, ("all layers", "", *means)]:
        low, high, effective, *sch = row[2:]
        style = "bold" if row[0] == "all layers" else None
        cells = (f"{low:.1%}", f"{high:.1%}", f"{effective:.2f}", *(f"{v:.1%}" for v in sch))
        table.add_row(*row[:2], *cells, style=style)
    out = Console()
    if not out.is_terminal:  # redirected output: never wrap the table's cells
        out.width = 160
    out.print(table)


@app.command()
def quantize(
    src: Annotated[Path, typer.Argument(help="Source checkpoint directory (read only).")],
    dst: Annotated[Path, typer.Argument(help="New directory for the quantized checkpoint (must not exist).")],
    bits: Annotated[int, typer.Option(help="Bits of the routed experts and the other large matrices: 8 or 4.")] = 4,
    group_size: Annotated[int, typer.Option(help="int4 values per scale: 32, 64 or 128.")] = 32,
    asymmetric: Annotated[bool, typer.Option(help="int4 with a per-group minimum as well as a scale.")] = False,
    dense_bits: Annotated[
        int | None, typer.Option(help="Bits of attention, dense MLPs and the output head (default: --bits).")
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Bytes for all routed experts ('600MB', '1.5GiB', or '30%' of their float size): each "
            "expert's format (int4 g128/g64/g32, int8, 16-bit) is then chosen on calibration text."
        ),
    ] = None,
    calibration: Annotated[
        list[Path] | None,
        typer.Option(help="Calibration text file for --memory-budget, repeat for several (default: stdlib modules)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Float dtype kept for embeddings, norms and routers: bf16 or fp32.")
    ] = "bf16",
    plan: Annotated[
        Path | None, typer.Option(help="Write the formats of this run plan (moerun plan) instead of --bits.")
    ] = None,
    debug: Debug = False,
) -> None:
    """Write a quantized copy of a checkpoint that load, generate, eval and bench read back."""
    from .models.convert import quantize_checkpoint
    from .models.loader import DTYPES
    from .models.quantized import QuantConfig
    from .sizes import format_size

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if bits not in (8, 4) or (dense_bits is not None and dense_bits not in (16, 8, 4)):
        raise UserError(f"--bits must be 8 or 4 (and --dense-bits 16, 8 or 4), got {bits} / {dense_bits}")
    if group_size not in (32, 64, 128):  # whatever --bits is: int4 experts a --memory-budget chooses use it too
        raise UserError(f"--group-size must be 32, 64 or 128 (the int4 group size), got {group_size}")
    _check_memory_budget(memory_budget)
    for file in calibration or []:
        if not file.is_file():
            raise UserError(f"calibration file {file} does not exist")
    _read_texts(calibration or [], "calibration file")
    _check_model_dir(src)
    config = QuantConfig(bits, group_size, not asymmetric, dense_bits)
    run_plan = None
    if plan is not None:
        from .models.run_plan import RunPlan

        run_plan = RunPlan.read(plan)
    with Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), TimeElapsedColumn(), console=console,
        transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("loading the model", total=None)

        def step(text: str) -> None:
            progress.update(task, description=text)
            progress.console.print(text, markup=False, highlight=False)

        try:
            summary = quantize_checkpoint(
                src, dst, config, memory_budget=memory_budget, calibration_files=calibration, dtype=dtype,
                progress=step, plan=run_plan,
            )  # fmt: skip
        except MemoryBudgetError as e:
            raise UserError(f"--memory-budget {memory_budget}: {e}") from None
    counts: dict[str, int] = {}
    for formats in summary["layout"]["experts"].values():
        for name in formats:
            counts[name] = counts.get(name, 0) + 1
    print(
        f"wrote {dst}: experts {format_size(summary['float_expert_bytes'])} -> "
        f"{format_size(summary['expert_bytes'])} ({', '.join(f'{n} x {k}' for k, n in counts.items())}); "
        f"file {format_size(summary['file_bytes'])}"
    )


@app.command("plan")
def plan_(
    memory_budget: Annotated[str, typer.Option(help="Peak resident memory a run may take: '12GB', '900MiB'.")],
    model: Annotated[
        str | None,
        typer.Option(help="Checkpoint directory, 'reference', or a synthetic model (bench) (default: reference)."),
    ] = None,
    max_kl: Annotated[
        float | None, typer.Option(help="Most mean KL divergence (nats/token) against the unmodified model.")
    ] = None,
    max_ppl_increase: Annotated[
        str | None, typer.Option(help="Most perplexity increase on the calibration text: '1%' or 0.01.")
    ] = None,
    objective: Annotated[str, typer.Option(help="What to make fastest: decode or prefill.")] = "decode",
    threads: Annotated[int | None, typer.Option(help="Most CPU threads (default: all cores).")] = None,
    calibration: Annotated[
        list[Path] | None, typer.Option(help="Calibration text file, repeat for several (default: stdlib modules).")
    ] = None,
    calibration_tokens: Annotated[int, typer.Option(help="Calibration tokens to use.")] = 512,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length the plan is made for.")] = 128,
    decode_tokens: Annotated[int, typer.Option(help="Tokens decoded after it.")] = 128,
    verify: Annotated[int, typer.Option(help="Measure this many of the best points of the front in fresh runs.")] = 0,
    verify_rounds: Annotated[int, typer.Option(help="With --verify: runs of each point, taking turns (median).")] = 3,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every point and the front as JSON.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw speed against memory, KL as colour, as a PNG.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the chosen plan here (default: plan.json).")] = None,
    debug: Debug = False,
) -> None:
    """Find the fastest configuration that fits a memory budget and keeps quality, and write it as a plan.

    Searches the experts' format (uniform or per expert), the attention's and head's, resident experts or a cache
    of them with its policy and prefetching, expert skipping and threads; predicts speed, memory and quality of
    each; prints the Pareto front and the choice. generate, eval, bench and quantize take the plan with --plan.
    """
    from .models.convert import calibration_tokens as read_calibration
    from .models.loader import default_model_dir, load_tokenizer, read_config
    from .perf.model_bench import REFERENCE, SYNTHETIC_MODELS
    from .perf.offload_bench import offload_checkpoint
    from .sizes import parse_size

    try:
        budget = parse_size(memory_budget)
    except ValueError as e:
        raise UserError(f"--memory-budget: {e}") from None
    if max_kl is not None and not (max_kl >= 0 and math.isfinite(max_kl)):
        raise UserError(f"--max-kl must be a finite number >= 0, got {max_kl}")
    ppl_limit = None if max_ppl_increase is None else _parse_share(max_ppl_increase, "--max-ppl-increase")
    if max_kl is not None and ppl_limit is not None:
        raise UserError("give one quality limit: --max-kl or --max-ppl-increase")
    if objective not in ("decode", "prefill"):
        raise UserError(f"--objective must be decode or prefill, got {objective!r}")
    for name, value in (("--threads", threads), ("--calibration-tokens", calibration_tokens),
                        ("--prompt-tokens", prompt_tokens), ("--decode-tokens", decode_tokens)):  # fmt: skip
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if verify < 0 or verify_rounds < 1:
        raise UserError(f"--verify must be >= 0 and --verify-rounds >= 1, got {verify} and {verify_rounds}")
    out = out or Path("plan.json")
    for path, option in ((json_path, "--json"), (plot, "--plot"), (out, "--out")):
        _check_destination(path, option)
    for file in calibration or []:
        if not file.is_file():
            raise UserError(f"calibration file {file} does not exist")
    _read_texts(calibration or [], "calibration file")

    with _tuning_progress() as progress:
        task = progress.add_task("planning", total=None)
        started = time.perf_counter()

        def step(text: str) -> None:
            progress.update(task, description=text)
            if not console.is_terminal:  # a log gets the steps as lines, with the time they began
                _say(f"[{time.perf_counter() - started:6.1f} s] {text}")

        if model in SYNTHETIC_MODELS:
            path = offload_checkpoint(model, 16, progress=step)
        elif model in (None, REFERENCE):
            path = default_model_dir()
        else:
            _check_model_dir(Path(model))
            path = Path(model).expanduser()
        step("reading calibration text")
        config = read_config(path)  # the planner loads the weights itself; only the tokenizer is needed here
        tokenizer = load_tokenizer(path) or load_tokenizer(default_model_dir())
        ids = read_calibration(tokenizer, calibration, calibration_tokens)
        ids = [i % config.vocab_size for i in ids]  # a checkpoint without a tokenizer reads the reference's tokens
        window = min(256, int(config.max_position_embeddings))
        from .errors import MemoryBudgetError as PlanLimitError
        from .plan.search import search_plan

        try:
            result = search_plan(
                path, budget, max_kl=max_kl, max_ppl_increase=ppl_limit, objective=objective, threads=threads,
                calibration_ids=ids, window=window, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                progress=step,
            )  # fmt: skip
        except PlanLimitError as e:
            raise UserError(str(e)) from None
        verified = []
        if verify:
            from .plan.search import plan_of
            from .plan.verify import planned_checkpoint, verify_plan

            fitting = [p for p in result.front if p.peak_bytes <= budget][:verify]
            if result.chosen not in fitting:
                fitting = [result.chosen, *fitting[: verify - 1]]
            runs = [(p, plan_of(result, p)) for p in fitting]
            runs = [(p, plan, planned_checkpoint(plan, path, step)) for p, plan in runs]
            measured: list[list[dict]] = [[] for _ in runs]
            for r in range(verify_rounds):  # points take turns, so that the host's noise hits them alike
                for i, (point, plan, checkpoint) in enumerate(runs):
                    step(f"verifying, round {r + 1}/{verify_rounds}: {point.config.label()}")
                    measured[i].append(verify_plan(checkpoint, plan))
            verified = [(p, _median_record(m)) for (p, _, _), m in zip(runs, measured, strict=True)]
    print_plan_front(result, objective, budget)
    if verified:
        print_verified(verified, objective)
    result.plan.write(out.expanduser())
    _say(f"wrote the plan to {out}: {result.chosen.config.label()}")
    if json_path is not None:
        from .plan.predict import point_record

        record = {
            "plan": result.plan.to_dict(),
            "front": [point_record(p) for p in result.front],
            "points": [point_record(p) for p in result.points],
            "verified": [{"predicted": point_record(p), "measured": m} for p, m in verified],
        }
        write_json_atomic(json_path, record)
        _say(f"wrote {len(result.points)} points to {json_path}")
    if plot is not None:
        from .plan.report import plot_front

        plot_front(result, objective, budget, plot.expanduser())
        _say(f"wrote {plot}")


def _median_record(records: list[dict]) -> dict:
    """The median of each number over several runs' records."""
    import statistics

    return {k: statistics.median(r[k] for r in records) if records[0][k] is not None else None for k in records[0]}


def _parse_share(text: str, option: str) -> float:
    """'1%' or '0.01' -> 0.01."""
    try:
        value = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise UserError(f"{option} must be a share such as '1%' or 0.01, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise UserError(f"{option} must be >= 0, got {text!r}")
    return value


def print_plan_front(result, objective: str, budget: int) -> None:
    """The Pareto front (at most 20 rows, fastest first), the chosen point marked."""
    from .sizes import format_size

    table = Table(title=f"Pareto front: {objective} speed, peak memory, KL (budget {format_size(budget)})")
    for column in ("", "configuration", "decode tok/s", "prefill tok/s", "peak memory", "KL", "ppl"):
        table.add_column(column, justify="left" if column in ("", "configuration") else "right")
    rows = result.front[:20]
    if result.chosen not in rows:
        rows.append(result.chosen)
    for p in rows:
        mark = "→" if p is result.chosen else ("" if p.peak_bytes <= budget else "over")
        kl = f"{p.kl:.4f}" + ("" if p.kl_measured else " (pred.)")
        table.add_row(
            mark, p.config.label(), f"{p.decode_tps:,.1f}", f"{p.prefill_tps:,.0f}", format_size(p.peak_bytes), kl,
            f"{p.ppl_increase:+.2%}",
        )  # fmt: skip
    out = Console()
    if not out.is_terminal:
        out.width = 160
    out.print(table)


def print_verified(verified: list, objective: str) -> None:
    """Predicted against measured, for each verified point."""
    from .sizes import format_size

    table = Table(title="predicted / measured (median of fresh processes, taking turns)")
    for column in ("configuration", "decode tok/s", "prefill tok/s", "peak memory"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for p, m in verified:

        def cell(predicted: float, measured: float, fmt) -> str:
            return f"{fmt(predicted)} / {fmt(measured)} ({measured / predicted - 1:+.0%})"

        table.add_row(
            p.config.label(),
            cell(p.decode_tps, m["decode_tokens_per_s"], lambda v: f"{v:,.1f}"),
            cell(p.prefill_tps, m["prefill_tokens_per_s"], lambda v: f"{v:,.0f}"),
            cell(p.peak_bytes, m["peak_bytes"], format_size),
        )
    out = Console()
    if not out.is_terminal:
        out.width = 160
    out.print(table)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _tuning_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=True,
    )  # fmt: skip


def _run_tune(cases: list, force: bool = False) -> list:
    """Measure the cases (the missing ones unless ``force``) with a progress bar; every case's result."""
    from .perf.tune import tune

    with _tuning_progress() as progress:
        task = progress.add_task("tuning kernels for this host", total=None)

        def on_case(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=f"tuning: {label}")

        return tune(cases, force=force, on_case=on_case)


def tune_on_first_use(model, threads: int, on_text=None) -> None:
    """Measure the kernel cases this model meets that this host's tuning table lacks (once per host;
    ``MOERUN_TUNING=0`` skips it and auto keeps its fixed rules). Progress goes to a bar of its own, or to
    ``on_text(message)`` where a caller already shows one."""
    from .perf.tune import missing_cases, model_cases, tune, tuning_enabled

    if not tuning_enabled():
        return
    missing = missing_cases(model_cases(model, threads))
    if not missing:
        return
    if on_text is not None:
        tune(missing, on_case=lambda done, total, label: on_text(f"tuning ({done + 1}/{total}): {label}"))
        return
    console.print(
        f"measuring {len(missing)} kernel case(s) on this host, once (moerun tune; MOERUN_TUNING=0 skips)",
        highlight=False,
    )
    _run_tune(missing)


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _load_model(
    model: Path | None,
    dtype: str,
    threads: int | None,
    needs_tokenizer_for: str,  # what needs one, for the error; empty: a model without a tokenizer is fine
    memory_budget: str | None = None,
    cache_policy: str = "lfu",
    prefetch: bool = True,
    plan: Path | None = None,
):
    """moerun.load with the CLI's option checks and a one-line report of what loading cost."""
    from .models.loader import DTYPES, SUPPORTED_MODEL_TYPES, default_model_dir, has_tokenizer, load
    from .offload.cache import POLICIES

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if cache_policy not in POLICIES:
        raise UserError(f"unknown --cache-policy {cache_policy!r}; choose from {', '.join(POLICIES)}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    _check_memory_budget(memory_budget)
    _check_model_dir(model)
    path = default_model_dir() if model is None else model.expanduser()
    if needs_tokenizer_for and path.is_dir() and not has_tokenizer(path):  # before the weights are read
        raise UserError(f"{path} has no tokenizer files; {needs_tokenizer_for} needs one")
    run_plan = None
    if plan is not None:
        from .kernels.tuning import host_fingerprint
        from .models.run_plan import RunPlan

        if memory_budget is not None or threads is not None:
            raise UserError("--plan sets the memory budget and the threads: leave out --memory-budget and --threads")
        run_plan = RunPlan.read(plan)
        if run_plan.host != host_fingerprint().key():
            from .plan.predict import repredict

            _say(f"warning: {plan} was planned on another host ({run_plan.host}); its predictions may not hold here")
            try:
                again = repredict(run_plan)
            except (ValueError, KeyError, TypeError) as e:
                _say(f"cannot predict the plan again on this host: {e}")
            else:
                _say(
                    f"predicted on this host: decode {again['decode_tokens_per_s']:.1f} tokens/s, prefill "
                    f"{again['prefill_tokens_per_s']:.0f} tokens/s (where it was planned: "
                    f"{run_plan.predicted.get('decode_tokens_per_s', float('nan')):.1f} and "
                    f"{run_plan.predicted.get('prefill_tokens_per_s', float('nan')):.0f}); moerun plan here to re-plan"
                )
    with console.status("loading the model..."):
        try:
            loaded = load(path, dtype, threads, memory_budget, cache_policy, prefetch, plan=run_plan)
        except MemoryBudgetError as e:
            raise UserError(f"--memory-budget {memory_budget}: {e}") from None
    s = loaded.stats
    added = s.peak_rss_bytes - s.rss_before_bytes
    _say(
        f"loaded {loaded.path} ({SUPPORTED_MODEL_TYPES[loaded.config.model_type]}, {_format_bytes(s.model_bytes)} "
        f"{dtype}) in {s.seconds:.1f} s; memory added at the peak: {_format_bytes(added)} "
        f"({s.peak_over_model:.2f}x the model)"
    )
    tune_on_first_use(loaded.model, torch_threads())
    if loaded.cache is not None:
        c = loaded.cache
        _say(
            f"routed experts stay in {loaded.path}: cache of {_format_bytes(c.budget_bytes)} ({c.num_slots} experts), "
            f"policy {c.policy.name}, prefetch {'on' if prefetch else 'off'}"
        )
    return loaded


def _accuracy(all_predictions: float | None, uncached: float | None) -> str:
    """A prediction accuracy cell: all predictions, and in parentheses those for uncached experts."""
    if all_predictions is None:
        return ""
    return f"{all_predictions:.0%}" + ("" if uncached is None else f" ({uncached:.0%})")


def print_cache_report(report: dict) -> None:
    """Per-layer expert cache statistics (``ExpertCache.report()``) as a table on stderr."""
    table = Table(title="expert cache")
    columns = (
        "MoE layer", "accesses", "hit rate", "prefetched", "prefetch hits", "read", "stalled s",
        "prediction (uncached)",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for i, layer in enumerate(report["layers"]):
        predicted = (
            _accuracy(layer["prediction_accuracy"], layer["uncached_prediction_accuracy"] or None)
            if layer["predicted"]
            else ""
        )
        table.add_row(
            str(i), str(layer["accesses"]), f"{layer['hit_rate']:.1%}", str(layer["prefetched"]),
            str(layer["prefetch_hits"]), _format_bytes(layer["bytes_read"]), f"{layer['stall_s']:.3f}", predicted,
        )  # fmt: skip
    console.print(table)
    accuracy, uncached = report["prediction_accuracy"], report["uncached_prediction_accuracy"]
    console.print(
        f"hit rate {report['hit_rate']:.1%}; read {_format_bytes(report['bytes_read'])} from storage at "
        f"{report['storage_gbps']:.2f} GB/s; stalled {report['stall_s']:.2f} s"
        + ("" if accuracy is None else f"; next-layer prediction {accuracy:.1%} right")
        + ("" if uncached is None else f", {uncached:.1%} for uncached experts"),
        highlight=False,
        soft_wrap=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code. Errors print one line unless --debug is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        # standalone mode: typer reports usage errors itself (exit code 2) and exits through SystemExit.
        app(args=argv, prog_name="moerun", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except (UserError, ValueError, OSError) as e:
        if debug:
            raise
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True, markup=True, highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
