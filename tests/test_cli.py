"""`moerun bench` end to end on a tiny preset, and its bad-input handling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import moerun
from moerun import cli
from moerun.models.loader import CheckpointError
from moerun.perf import bench
from moerun.perf.roofline import Roofline
from tiny_checkpoints import save_checkpoint

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
    impls = set(bench.IMPLS) - set(bench.unavailable_impls(bench.IMPLS, "bf16"))  # prepacked needs bf16 packing
    assert len(records) == 2 * 2 * len(impls)
    required = {"preset", "dtype", "bits", "tokens", "impl", "median_ms", "gbps", "gflops", "roofline_fraction"}
    for r in records:
        assert required <= r.keys()
        assert r["machine"]["gemm_gflops"]["bfloat16"] == 100.0  # cached peak, bandwidth measured alongside
        assert r["machine"]["read_gbps"] > 0
        assert r["median_ms"] > 0 and 0 < r["roofline_fraction"]
        assert r["bound"] in ("bandwidth", "compute")
        if r["impl"] == "moerun":  # the performance model predicts moerun's own layer, not transformers'
            assert r["predicted_ms"] > 0
            assert r["prediction_error"] == pytest.approx(r["predicted_ms"] / r["median_ms"] - 1)
        else:
            assert r["predicted_ms"] is None and r["prediction_error"] is None
    assert {r["impl"] for r in records} == impls
    out_text = capsys.readouterr().out
    assert "tiny-olmoe" in out_text and "predicted" in out_text and "bound" in out_text
    assert not list(tmp_path.glob(".*tmp"))


def test_bench_leaves_out_prepacked_where_onednn_cannot_pack(tiny_presets, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr("moerun.kernels.onednn.is_available", lambda dtype: False)
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny-olmoe", "--tokens", "3", "--threads", "1", "--budget", "0.01"]
    assert cli.main([*args, "--json", str(out)]) == 0
    assert {r["impl"] for r in json.loads(out.read_text())} == {"moerun", "hf-eager", "hf-grouped_mm"}
    assert "moerun-prepacked left out: oneDNN cannot pack bf16" in " ".join(capsys.readouterr().err.split())
    assert cli.main([*args, "--impl", "moerun-prepacked"]) == 2
    assert "moerun-prepacked cannot run here" in capsys.readouterr().err


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
        (["--threads", "0"], "--threads must be >= 1, got 0"),  # as generate: 0 is not "all cores"
        (["--budget", "nan"], "--budget must be a positive number of seconds, got nan"),
        (["--budget", "inf"], "--budget must be a positive number of seconds, got inf"),
        (["--budget", "0"], "--budget must be a positive number of seconds"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
        (["--bogus"], "No such option"),
    ],
)
def test_bench_bad_input(tiny_presets, capsys, args: list[str], message: str) -> None:
    code = cli.main(["bench", "--preset", "tiny-olmoe", "--tokens", "1", "--budget", "0.01", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_bench_json_must_be_a_regular_file_or_new(tiny_presets, tmp_path: Path, capsys, kind: str) -> None:
    target = tmp_path / "records.json"
    if kind == "directory":
        target.mkdir()
    else:
        (tmp_path / "elsewhere.json").write_text("keep")
        target.symlink_to(tmp_path / "elsewhere.json")
    args = ["bench", "--preset", "tiny-olmoe", "--tokens", "1", "--budget", "0.01", "--threads", "1"]
    assert cli.main([*args, "--json", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--json {target} " in err and "Traceback" not in err and "roofline" not in err
    assert target.is_dir() if kind == "directory" else target.is_symlink()


def test_debug_shows_the_traceback(tiny_presets) -> None:
    with pytest.raises(cli.UserError, match="--tokens must be"):
        cli.main(["--debug", "bench", "--tokens", "x"])


# ---- moerun generate / moerun eval -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny OLMoE checkpoint directory with a byte-level tokenizer."""
    return save_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe"), tokenizer=True)


def test_generate_streams_text_then_stats(checkpoint: Path, capsys) -> None:
    args = ["--model", str(checkpoint), "--prompt", "héllo", "--max-new-tokens", "6", "--dtype", "fp32"]
    assert cli.main(["generate", *args, "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    expected = moerun.generate(moerun.load(checkpoint, "fp32"), prompt="héllo", max_new_tokens=6)
    assert out == expected.text + "\n"
    for part in (
        "prompt tokens 6",
        "generated 6 (stop: max_new_tokens)",
        "time to first token",
        "tokens/s",
        "peak memory",
    ):
        assert part in err


def test_eval_writes_json(checkpoint: Path, tmp_path: Path, capsys) -> None:
    files = [tmp_path / "a.py", tmp_path / "b.py"]
    files[0].write_text("def f(x):\n    return x\n")
    files[1].write_text("print('héllo')\n")
    out_json = tmp_path / "eval.json"
    args = ["eval", "--model", str(checkpoint), "--text", str(files[0]), "--text", str(files[1]), "--dtype", "fp32"]
    assert cli.main([*args, "--context", "16", "--threads", "1", "--json", str(out_json)]) == 0
    record = json.loads(out_json.read_text())
    expected = moerun.evaluate(moerun.load(checkpoint, "fp32"), [f.read_text() for f in files], context=16)
    assert record["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert record["tokens"] == expected.tokens and record["context"] == 16
    assert record["files"] == [str(f) for f in files] and record["dtype"] == "fp32"
    assert "perplexity" in capsys.readouterr().out


def _no_tokenizer(path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()


def _truncate_weights(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])


@pytest.mark.parametrize(
    ("damage", "args", "message"),
    [
        (None, ["--model", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
        (lambda p: (p / "config.json").write_text("[1,"), [], "config.json is not valid JSON"),
        (lambda p: (p / "config.json").write_text('{"model_type": "bert"}'), [], "'bert' is not a supported MoE"),
        (_truncate_weights, [], "model.safetensors is truncated"),
        (_no_tokenizer, [], "has no tokenizer files"),
        (None, ["--prompt", "x" * 600], "the prompt is 600 tokens, longer than the model's context of 512 tokens"),
        (None, ["--dtype", "fp16"], "unknown dtype 'fp16'"),
        (None, ["--threads", "0"], "--threads must be >= 1"),
        (None, ["--top-p", "2"], "--top-p must be in (0, 1]"),
    ],
)
def test_generate_bad_input(checkpoint: Path, tmp_path: Path, capsys, damage, args: list[str], message: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    if damage is not None:
        damage(model)
    assert cli.main(["generate", "--model", str(model), "--prompt", "hi", "--threads", "1", *args]) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert len(err.strip().splitlines()) <= 2  # the load report (when loading got that far) and the error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "/nonexistent.py"], "text file /nonexistent.py does not exist"),
        (["--context", "1"], "context must be between 2"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
    ],
)
def test_eval_bad_input(checkpoint: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    text = tmp_path / "t.py"
    text.write_text("x = 1\n")
    code = cli.main(["eval", "--model", str(checkpoint), "--text", str(text), "--threads", "1", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_generate_debug_shows_the_traceback(tmp_path: Path, where: str) -> None:
    args = ["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]
    with pytest.raises(CheckpointError, match="does not exist"):
        cli.main(["--debug", *args] if where == "before" else [*args, "--debug"])


def test_defaults_to_the_reference_model_and_its_heldout_files(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "one.py").write_text("x = 1\n")
    (tmp_path / "two.py").write_text("y = 2\n")
    monkeypatch.setattr("moerun.assets.REFERENCE_MODEL_DIR", checkpoint)
    monkeypatch.setattr("moerun.assets.REFERENCE_HELDOUT_DIR", tmp_path)
    assert cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1"]) == 0
    out_json = tmp_path / "eval.json"
    assert cli.main(["eval", "--threads", "1", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["files"] == [str(tmp_path / "one.py"), str(tmp_path / "two.py")]


def test_missing_reference_model(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("moerun.assets.REFERENCE_MODEL_DIR", tmp_path / "absent")
    monkeypatch.setattr("moerun.assets.REFERENCE_HELDOUT_DIR", tmp_path / "absent")
    assert cli.main(["generate", "--prompt", "hi"]) == 2
    assert cli.main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "moerun's reference model is not installed" in err
    assert "moerun's reference held-out files are not installed" in err
