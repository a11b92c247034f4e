"""The `moerun` command line. ``main(argv) -> int`` is the console script's entry point."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    name="moerun",
    help="Run Mixture-of-Experts models fast on the hardware you have.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def _parse_tokens(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--tokens must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--tokens needs token counts >= 1, got {text!r}")
    return values


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place when complete."""
    path = path.expanduser()
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@app.command()
def bench(
    preset: Annotated[
        list[str] | None,
        typer.Option(help="Model shape preset, repeat for several, or 'all'. Default: olmoe-1b-7b."),
    ] = None,
    tokens: Annotated[str, typer.Option(help="Comma-separated token counts.")] = "1,16,128,512",
    dtype: Annotated[str, typer.Option(help="bf16 or fp32.")] = "bf16",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    impl: Annotated[
        list[str] | None,
        typer.Option(help="Implementation(s): moerun, moerun-prepacked, hf-eager, hf-grouped_mm. Default: all."),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the records as JSON here.")] = None,
    budget: Annotated[float, typer.Option(help="Seconds of timing per case (at least 5 runs each).")] = 3.0,
    remeasure: Annotated[bool, typer.Option(help="Measure the machine's roofline again, ignoring the cache.")] = False,
) -> None:
    """Time one MoE layer of real model shapes: moerun vs transformers, side by side."""
    from .perf.bench import DTYPES, IMPLS, PRESETS, record_dicts, run_bench
    from .perf.roofline import load_or_measure_roofline

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
    token_counts = _parse_tokens(tokens)
    threads = threads or os.cpu_count() or 1
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if budget <= 0:
        raise UserError(f"--budget must be positive, got {budget}")
    if json_path is not None and not json_path.expanduser().parent.is_dir():
        raise UserError(f"cannot write {json_path}: directory {json_path.parent} does not exist")

    with console.status(f"measuring this machine's roofline ({threads} threads)..."):
        roofline = load_or_measure_roofline(threads, remeasure=remeasure)
    console.print(
        f"roofline, {threads} threads: read {roofline.read_gbps:.1f} GB/s, "
        + ", ".join(f"{k} GEMM {v:.0f} GFLOP/s" for k, v in roofline.gemm_gflops.items())
    )
    records = []
    total = len(presets) * len(token_counts)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("building layer", total=total)
        done_cases: set[tuple[str, int]] = set()
        for record in run_bench(
            presets, token_counts, dtype, threads, roofline, impls, budget_s=budget,
            on_step=lambda text: progress.update(task, description=text),
        ):  # fmt: skip
            records.append(record)
            if (record.preset, record.tokens) not in done_cases:
                done_cases.add((record.preset, record.tokens))
                progress.advance(task)
    for note in dict.fromkeys(f"{r.preset}: {r.note}" for r in records if r.note):
        console.print(f"[yellow]note[/] {note}")
    print_bench_table(records)
    if json_path is not None:
        write_json_atomic(json_path, record_dicts(records))
        console.print(f"wrote {len(records)} records to {json_path}")


def print_bench_table(records: list) -> None:
    """The bench table on stdout, with speed-up over transformers' grouped_mm where both ran."""
    base = {(r.preset, r.tokens): r.median_ms for r in records if r.impl == "hf-grouped_mm"}
    table = Table(title="MoE layer, median of alternating runs")
    columns = ("preset", "dtype", "tokens", "impl", "ms", "tokens/s", "GB/s", "GFLOP/s", "roofline", "vs grouped_mm")
    for column in columns:
        table.add_column(column, justify="left" if column in ("preset", "impl", "dtype") else "right")
    for r in records:
        ref = base.get((r.preset, r.tokens))
        table.add_row(
            r.preset, r.dtype, str(r.tokens), r.impl, f"{r.median_ms:.2f}", f"{r.tokens_per_s:,.0f}",
            f"{r.gbps:.1f}", f"{r.gflops:.0f}", f"{r.roofline_fraction:.0%}",
            "" if ref is None else f"{ref / r.median_ms:.2f}x",
        )  # fmt: skip
    out = Console()
    if not out.is_terminal:  # redirected output: never wrap the table's cells
        out.width = 160
    out.print(table)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Run Mixture-of-Experts models fast on the hardware you have."""


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
        console.print(f"[red]error:[/] {e}", soft_wrap=True, markup=True, highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
