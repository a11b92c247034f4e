"""The command line's handling of hostile input: paths holding Rich markup, non-finite and out-of-range options,
text that is not UTF-8, output paths that are not regular files. Each is refused with one line (exit 2) naming
the option or the file, before the model is loaded where the check needs no model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from moerun import cli
from tiny_checkpoints import save_checkpoint

# Directory and file names that Rich would read as markup: a closing tag with nothing open (MarkupError), a
# style tag that would be swallowed, so the message would name another path.
MARKUP_NAMES = ["[/x]", "[red]m", "a[/]b"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny OLMoE checkpoint directory with a byte-level tokenizer."""
    return save_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe"), tokenizer=True)


def _one_error_line(capsys) -> str:
    """The only stderr line of a refused command (nothing loaded first), checked to be a clean error."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- paths with Rich markup ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MARKUP_NAMES)
def test_paths_with_markup_are_printed_verbatim(checkpoint: Path, tmp_path: Path, capsys, name: str) -> None:
    model = tmp_path / name / "model"
    shutil.copytree(checkpoint, model)
    (tmp_path / name / "out").mkdir()
    text = tmp_path / name / "t.py"
    text.write_text("def f(x):\n    return x\n")
    out_json = tmp_path / name / "out" / "eval.json"
    args = ["eval", "--model", str(model), "--text", str(text), "--json", str(out_json), "--context", "16"]
    assert cli.main([*args, "--threads", "1", "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert f"loaded {model} (" in err
    assert f"wrote {out_json}" in err
    assert json.loads(out_json.read_text())["files"] == [str(text)]


@pytest.mark.parametrize("name", MARKUP_NAMES)
@pytest.mark.parametrize("option", ["--model", "--text", "--json"])
def test_errors_name_markup_paths_verbatim(checkpoint: Path, tmp_path: Path, capsys, name: str, option: str) -> None:
    missing = str(tmp_path / name / "nope")
    text = tmp_path / "t.py"
    text.write_text("x = 1\n")
    args = {"--model": str(checkpoint), "--text": str(text), "--json": str(tmp_path / "e.json"), option: missing}
    assert cli.main(["eval", *(a for kv in args.items() for a in kv), "--threads", "1"]) == 2
    line = _one_error_line(capsys)
    assert missing in line


def test_generic_errors_escape_markup(capsys, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise OSError("cannot open [/x]/[red]file")

    monkeypatch.setattr("moerun.models.loader.load", fail)
    assert cli.main(["generate", "--prompt", "hi", "--threads", "1"]) == 2
    assert _one_error_line(capsys) == "error: cannot open [/x]/[red]file"


# ---- generate: options and prompt ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
        (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
        (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["--prompt", "caf\udcc3\udca9 \udcff"], "--prompt is not valid UTF-8 text"),  # bytes argv could not decode
        (["--memory-budget", "12XB"], "--memory-budget: size '12XB' has an unknown unit 'XB'"),
        (["--memory-budget", "0"], "--memory-budget: size '0' must be positive"),
        (["--memory-budget", "nan"], "--memory-budget: size 'nan' is not a finite number"),
    ],
)
def test_generate_refuses_bad_options_before_loading(checkpoint: Path, capsys, args: list[str], message: str) -> None:
    code = cli.main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--threads", "1", *args])
    assert code == 2
    assert message in _one_error_line(capsys)


def test_a_budget_too_small_for_the_model_names_the_option(checkpoint: Path, capsys) -> None:
    args = ["generate", "--model", str(checkpoint), "--prompt", "hi", "--threads", "1", "--memory-budget", "1B"]
    assert cli.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --memory-budget 1B: ") and "is below one layer's selected experts" in last
    assert str(checkpoint) not in last


@pytest.mark.parametrize("command", ["generate", "eval", "routing-stats", "quantize"])
def test_a_file_given_as_model_is_not_a_directory(tmp_path: Path, capsys, command: str) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a directory")
    args = {
        "generate": ["generate", "--model", str(file), "--prompt", "hi"],
        "eval": ["eval", "--model", str(file)],
        "routing-stats": ["routing-stats", "--model", str(file)],
        "quantize": ["quantize", str(file), str(tmp_path / "dst")],
    }[command]
    assert cli.main(args) == 2
    line = _one_error_line(capsys)
    assert f"{file} is not a directory" in line and "does not exist" not in line


# ---- text files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "routing-stats"])
def test_text_that_is_not_utf8_is_refused(checkpoint: Path, tmp_path: Path, capsys, command: str) -> None:
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("x = 1\n")
    bad.write_bytes(b"x = 'caf\xe9'\n")  # Latin-1
    args = [command, "--model", str(checkpoint), "--text", str(good), "--text", str(bad), "--threads", "1"]
    assert cli.main(args) == 2
    assert f"text file {bad} is not UTF-8 text (byte 0xe9 at offset 8)" in _one_error_line(capsys)


# ---- quantize ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "8", "--group-size", "7"], "--group-size must be 32, 64 or 128"),
        (["--memory-budget", "lots"], "--memory-budget: cannot read 'lots' as a size"),
        (["--memory-budget", "30%", "--calibration", "{bad}"], "calibration file {bad} is not UTF-8 text"),
    ],
)
def test_quantize_refuses_bad_options_before_loading(
    checkpoint: Path, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    bad = tmp_path / "latin1.py"
    bad.write_bytes(b"x = '\xe9'\n")
    dst = tmp_path / "dst"
    code = cli.main(["quantize", str(checkpoint), str(dst), *(a.format(bad=bad) for a in args)])
    assert code == 2
    assert message.format(bad=bad) in _one_error_line(capsys)
    assert not dst.exists()


# ---- --json destinations ------------------------------------------------------------------------------------------


def _symlink_to_file(tmp_path: Path) -> Path:
    target = tmp_path / "target.json"
    target.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    return link


def _dangling_symlink(tmp_path: Path) -> Path:
    link = tmp_path / "dangling.json"
    link.symlink_to(tmp_path / "absent.json")
    return link


def _fifo(tmp_path: Path) -> Path:  # a special file like /dev/null, which the tests must never risk replacing
    os.mkfifo(tmp_path / "fifo.json")
    return tmp_path / "fifo.json"


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "dir.json").mkdir()
    return tmp_path / "dir.json"


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        (_fifo, "exists and is not a regular file"),
        (_directory, "exists and is not a regular file"),
        (_symlink_to_file, "is a symbolic link"),
        (_dangling_symlink, "is a symbolic link"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "routing-stats"])
def test_json_refuses_what_is_not_a_regular_file(
    checkpoint: Path, tmp_path: Path, capsys, destination, message: str, command: str
) -> None:
    path = destination(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main([command, "--model", str(checkpoint), "--threads", "1", "--json", str(path)]) == 2
    assert f"--json {path} {message}" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if path.is_symlink() and path.exists():
        assert path.read_text() == "keep"


def test_json_refuses_a_device() -> None:  # the check alone: nothing is written
    with pytest.raises(cli.UserError, match=f"--json {os.devnull} exists and is not a regular file"):
        cli._check_destination(Path(os.devnull))
    assert Path(os.devnull).is_char_device()


def test_write_json_atomic_refuses_a_symlink_and_replaces_a_regular_file(tmp_path: Path) -> None:
    link = _symlink_to_file(tmp_path)
    with pytest.raises(cli.UserError, match="symbolic link"):
        cli.write_json_atomic(link, {"a": 1})
    assert link.is_symlink() and (tmp_path / "target.json").read_text() == "keep"
    cli.write_json_atomic(tmp_path / "target.json", {"a": 1})
    assert json.loads((tmp_path / "target.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "target.json"]


# ---- families the lean runner does not cover ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["routing-stats", "bench"])
def test_memory_budget_runs_families_outside_the_lean_runner(tmp_path: Path, capsys, command: str) -> None:
    """DeepSeek runs on transformers' forward (the HF runner) with experts read from storage, as in generate."""
    model = save_checkpoint("deepseek_v3", tmp_path / "deepseek", tokenizer=True)
    args = [command, "--model", str(model), "--memory-budget", "50%", "--threads", "1"]
    if command == "routing-stats":
        text = tmp_path / "text.txt"
        text.write_text("hello world, hello moe\n")
        args += ["--text", str(text)]
    else:
        args += ["--prompt-tokens", "8", "--decode-tokens", "4", "--rounds", "1"]
    code = cli.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "hit rate" in captured.out + captured.err  # the expert cache's report


# ---- moerun serve and bench --concurrency: refused before a server starts or a model loads --------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--max-batch", "0"], "--max-batch"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--port", "70000"], "--port"),
        (["--context", "1"], "--context"),
        (["--timeout", "nan"], "--timeout"),
        (["--shutdown-deadline", "-2"], "--shutdown-deadline"),
        (["--api-key", ""], "API key"),
        (["--api-key", "a", "--api-key-file", "f"], "--api-key-file"),
        (["--api-key-file", "/nonexistent/key"], "--api-key-file"),
        (["--model", "/nonexistent/model"], "does not exist"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(capsys, args: list[str], names: str) -> None:
    assert cli.main(["serve", *args]) == 2
    assert names in _one_error_line(capsys)


@pytest.mark.parametrize("value", ["0", "two", "1,,-3", " "])
def test_bench_concurrency_refuses_bad_counts(capsys, value: str) -> None:
    assert cli.main(["bench", "--model", "reference", "--concurrency", value]) == 2
    assert "--concurrency" in _one_error_line(capsys)
