"""`moerun bench` end to end on a tiny preset, and its bad-input handling."""

from __future__ import annotations

import json

import pytest

from moerun import cli
from moerun.perf import bench
from moerun.perf.roofline import Roofline

FAKE_ROOFLINE = Roofline(
    threads=1, read_gbps=10.0, gemm_gflops={"bfloat16": 100.0, "float32": 50.0}, cpu="test cpu",
    torch_version="test", measured_at="2026-01-01T00:00:00",
)  # fmt: skip


@pytest.fixture
def tiny_presets(monkeypatch):
    monkeypatch.setitem(bench.PRESETS, "tiny-olmoe", bench.Preset("olmoe", 64, 32, 8, 2))
    monkeypatch.setitem(bench.PRESETS, "tiny-dsv2", bench.Preset("deepseek_v2", 64, 32, 8, 2, 64))
    monkeypatch.setattr("moerun.perf.roofline.load_or_measure_roofline", lambda *a, **k: FAKE_ROOFLINE)


def test_bench_writes_json_records(tiny_presets, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny-olmoe", "--preset", "tiny-dsv2", "--tokens", "1,5", "--threads", "1"]
    code = cli.main([*args, "--budget", "0.01", "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    assert len(records) == 2 * 2 * 4
    required = {"preset", "dtype", "bits", "tokens", "impl", "median_ms", "gbps", "gflops", "roofline_fraction"}
    for r in records:
        assert required <= r.keys()
        assert r["machine"]["gemm_gflops"]["bfloat16"] == 100.0  # cached peak, bandwidth measured alongside
        assert r["machine"]["read_gbps"] > 0
        assert r["median_ms"] > 0 and 0 < r["roofline_fraction"]
    assert {r["impl"] for r in records} == {"moerun", "moerun-prepacked", "hf-eager", "hf-grouped_mm"}
    assert "tiny-olmoe" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp"))


def test_fit_to_memory_scales_experts_down() -> None:
    preset = bench.PRESETS["mixtral-8x7b"]
    scaled, note = bench.fit_to_memory(preset, bench.DTYPES["bf16"], available_bytes=2 * 2**30)
    assert scaled.num_experts < preset.num_experts and scaled.top_k <= scaled.num_experts
    assert "scaled from 8 to" in note
    assert bench.fit_to_memory(preset, bench.DTYPES["bf16"], 64 * 2**30) == (preset, None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "gpt-9"], "unknown preset 'gpt-9'"),
        (["--tokens", "1,x"], "--tokens must be comma-separated"),
        (["--tokens", "0"], "token counts >= 1"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
        (["--impl", "llama.cpp"], "unknown implementation"),
        (["--threads", "-2"], "--threads must be >= 1"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
        (["--bogus"], "No such option"),
    ],
)
def test_bench_bad_input(tiny_presets, capsys, args: list[str], message: str) -> None:
    code = cli.main(["bench", "--preset", "tiny-olmoe", "--tokens", "1", "--budget", "0.01", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_debug_shows_the_traceback(tiny_presets) -> None:
    with pytest.raises(cli.UserError, match="--tokens must be"):
        cli.main(["--debug", "bench", "--tokens", "x"])
