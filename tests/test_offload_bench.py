"""`moerun bench --model M --memory-budget SIZE | --sweep-memory` on the reference model: records, JSON, PNG,
the cached quantized checkpoint, and bad flag combinations."""

from __future__ import annotations

import json

import pytest

from moerun import cli
from moerun.perf import offload_bench
from moerun.perf.offload_bench import Setup

FAST = ["--model", "reference", "--prompt-tokens", "8", "--decode-tokens", "2", "--rounds", "1", "--threads", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_sweep_writes_records_json_and_png(tmp_path) -> None:
    records = offload_bench.run_memory_sweep(
        "reference", Setup("lfu", True), percents=(100, 30), prompt_tokens=8, decode_tokens=2, rounds=1, bits=16
    )
    assert [(r.budget, r.setup) for r in records] == [
        ("30%", "on-demand LRU"), ("30%", "LFU + prefetch"), ("100%", "on-demand LRU"), ("100%", "LFU + prefetch"),
    ]  # fmt: skip
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    cli.write_json_atomic(out, offload_bench.record_dicts(records))
    offload_bench.plot_sweep(records, png)
    rows = json.loads(out.read_text())
    fields = {
        "budget", "budget_bytes", "budget_fraction", "setup", "decode_tokens_per_s", "hit_rate", "read_mb_per_token",
        "stall_ms_per_token", "storage_gbps", "prediction_accuracy", "cache_filled_bytes", "rss_added_bytes",
        "rss_expected_bytes", "rss_overhead_bytes", "non_expert_bytes", "layers",
    }  # fmt: skip
    for r in rows:
        assert fields <= r.keys()
        assert r["decode_tokens_per_s"] > 0 and 0 <= r["hit_rate"] <= 1
        assert r["rss_expected_bytes"] == r["budget_bytes"] + r["non_expert_bytes"]
        assert 0 < r["cache_filled_bytes"] <= r["budget_bytes"]
        assert r["rss_overhead_bytes"] == r["rss_added_bytes"] - r["cache_filled_bytes"] - r["non_expert_bytes"]
        assert sum(layer["accesses"] for layer in r["layers"]) == 2 * 4 * 2  # steps x MoE layers x top-k
    assert rows[0]["prediction_accuracy"] is None and rows[1]["prediction_accuracy"] is not None
    # Offloading is exact, so each run sees the same accesses; with room for all experts only first uses miss.
    assert rows[2]["budget_fraction"] == 1.0 and rows[2]["hit_rate"] >= rows[0]["hit_rate"]
    assert rows[2]["read_mb_per_token"] <= rows[0]["read_mb_per_token"]
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json", "sweep.png"]  # no temporary files left


def test_memory_budget_run_compares_with_on_demand_lru(tmp_path, capsys) -> None:
    out = tmp_path / "run.json"
    code = cli.main(["bench", *FAST, "--memory-budget", "50%", "--cache-policy", "lru", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["setup"] for r in rows] == ["on-demand LRU", "LRU + prefetch"]
    assert all(r["budget"] == "50%" and r["slots"] == 16 for r in rows)
    for r in rows:  # predicted at the measured hit rate and storage bandwidth
        assert r["predicted_decode_tokens_per_s"] > 0 and r["predicted_prefill_tokens_per_s"] > 0
        assert r["decode_prediction_error"] == pytest.approx(
            r["predicted_decode_tokens_per_s"] / r["decode_tokens_per_s"] - 1
        )
    captured = capsys.readouterr()
    assert "vs LRU" in captured.out and "expert cache" in captured.err


def test_cli_sweep_writes_plot_beside_json(tmp_path) -> None:
    out = tmp_path / "sweep.json"
    assert cli.main(["bench", *FAST, "--sweep-memory", "--no-prefetch", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted({r["budget"] for r in rows}) == sorted(f"{p}%" for p in offload_bench.SWEEP_PERCENTS)
    assert {r["setup"] for r in rows} == {"on-demand LRU", "LFU on demand"}
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)


def test_quantized_copy_is_made_once_and_remade_when_stale(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = offload_bench.offload_checkpoint("reference", bits=4)
    assert path.parent == tmp_path / "moerun" / "checkpoints" and path.name.endswith("-int4-g32")
    made = (path / "model.safetensors").stat().st_mtime_ns
    assert offload_bench.offload_checkpoint("reference", bits=4) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == made
    layout = json.loads((path / "moerun_quant.json").read_text())
    (path / "moerun_quant.json").write_text(json.dumps({**layout, "format_version": 1}))
    assert offload_bench.offload_checkpoint("reference", bits=4) == path
    assert json.loads((path / "moerun_quant.json").read_text())["format_version"] == layout["format_version"]
    with pytest.raises(ValueError, match="already a quantized checkpoint"):
        offload_bench.offload_checkpoint(str(path), bits=4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory-budget", "50%"], "need --model"),
        (["--sweep-memory"], "need --model"),
        (["--model", "reference", "--plot", "x.png"], "--plot goes with --sweep-memory"),
        (["--model", "reference", "--memory-budget", "50%", "--sweep-memory"], "give one of them"),
        (["--model", "reference", "--cache-policy", "lru"], "apply with --memory-budget"),
        (["--model", "reference", "--no-prefetch"], "apply with --memory-budget"),
        (["--model", "reference", "--memory-budget", "50%", "--cache-policy", "fifo"], "unknown --cache-policy"),
        (["--model", "reference", "--memory-budget", "lots"], "--memory-budget: cannot read"),
        (["--model", "reference", "--memory-budget", "50%", "--bits", "16,4"], "one --bits value"),
        (["--model", "reference", "--memory-budget", "50%", "--impl", "moerun"], "--impl does not apply"),
        (["--model", "reference", "--memory-budget", "50%", "--rounds", "0"], "--rounds must be >= 1"),
        (["--model", "reference", "--sweep-memory", "--plot", "/no/such/dir/x.png"], "does not exist"),
        ([*FAST, "--memory-budget", "1%"], "below one layer's selected experts"),
    ],
)
def test_bad_offload_flags_exit_2(args: list[str], message: str, capsys) -> None:
    assert cli.main(["bench", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
