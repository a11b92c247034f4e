"""moerun.evaluate: perplexity over windows that predict every token once, against a direct computation; KL
divergence against a reference model, against F.kl_div on whole-window logits; moerun eval --kl-against."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moerun
from families import tiny_model
from moerun import cli
from moerun.models.loader import load_tokenizer
from moerun.runtime.eval import ReferenceLogprobs, _encode, join_tokens, kl_divergence, reference_logprobs
from tiny_checkpoints import BYTE_VOCAB, EOS, one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld, " * 3, "z"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE checkpoint directory with a byte-level tokenizer."""
    return save_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), tokenizer=True)


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> moerun.LoadedModel:
    return moerun.load(checkpoint, dtype="fp32")


def direct_nll(model, ids: list[int], context: int) -> tuple[float, int]:
    """Summed NLL and count of the tokens after the first, each predicted from up to ``context - 1``
    tokens before it, with windows restarting every ``context - 1`` tokens: the full forward, no chunking."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, context - 1):
        window = torch.tensor(ids[start : start + context])
        with torch.inference_mode():
            logits = model(window[None]).logits[0, :-1].float()
        total += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return total, count


def test_texts_are_joined_with_eos(loaded) -> None:
    ids = join_tokens(["ab", "c"], loaded.tokenizer)
    assert ids == [*b"ab", loaded.tokenizer.convert_tokens_to_ids(EOS), *b"c"]


@pytest.mark.parametrize("context", [None, 3, 17])
def test_perplexity_matches_a_direct_computation(loaded, context: int | None) -> None:
    ids = join_tokens(TEXTS, loaded.tokenizer)
    result = moerun.evaluate(loaded, TEXTS, context=context)
    window = context or loaded.max_seq_len
    total, count = direct_nll(loaded.model, ids, window)
    assert result.tokens == count == len(ids) - 1 and result.context == window
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.seconds > 0 and result.tokens_per_s == pytest.approx(result.tokens / result.seconds)
    assert set(result.to_dict()) == {"perplexity", "nll", "tokens", "seconds", "tokens_per_s", "context"}


def test_bad_input(loaded) -> None:
    with pytest.raises(ValueError, match="context must be between 2 and the model's context of 512"):
        moerun.evaluate(loaded, TEXTS, context=513)
    with pytest.raises(ValueError, match="context must be between 2"):
        moerun.evaluate(loaded, TEXTS, context=1)
    with pytest.raises(ValueError, match="perplexity needs at least 2"):
        moerun.evaluate(loaded, ["x"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        moerun.evaluate(loaded.model, TEXTS)


# ---- KL divergence against a reference ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(checkpoint: Path) -> dict[int, moerun.LoadedModel]:
    """fp32 copies of the checkpoint quantized to int8 and int4 (attention and head int4, experts int8: the
    tiny experts' K = 32 is too short for int4)."""
    copies = {}
    for bits in (8, 4):
        copies[bits] = moerun.load(checkpoint, dtype="fp32")
        moerun.quantize(copies[bits].model, moerun.QuantConfig(bits=bits))
    return copies


def direct_kl(reference, model, ids: list[int], context: int) -> dict[str, float]:
    """KL(reference || model) per token from full-window fp32 logits and F.kl_div, the windows of direct_nll."""
    kl, agree, nll_p, nll_q = [], 0, 0.0, 0.0
    for start in range(0, len(ids) - 1, context - 1):
        window = torch.tensor(ids[start : start + context])
        with torch.inference_mode():
            log_p = F.log_softmax(reference(window[None]).logits[0, :-1].float(), dim=-1)  # [L-1, V]
            log_q = F.log_softmax(model(window[None]).logits[0, :-1].float(), dim=-1)
        kl.append(F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1))
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        nll_p -= log_p.gather(1, window[1:, None]).sum().item()
        nll_q -= log_q.gather(1, window[1:, None]).sum().item()
    per_token = torch.cat(kl).double()
    n = per_token.numel()
    return {
        "kl_mean": per_token.mean().item(),
        "kl_median": per_token.quantile(0.5).item(),
        "kl_p99": per_token.quantile(0.99).item(),
        "kl_max": per_token.max().item(),
        "top1_agreement": agree / n,
        "perplexity": math.exp(nll_q / n),
        "reference_perplexity": math.exp(nll_p / n),
    }


@pytest.mark.parametrize("context", [5, 17, None])
def test_kl_of_a_model_against_itself_is_zero(loaded, context: int | None) -> None:
    ids = join_tokens(TEXTS, loaded.tokenizer)
    reference = reference_logprobs(loaded, ids, context)
    result = kl_divergence(loaded, reference)
    evaluated = moerun.evaluate(loaded, TEXTS, context=context)
    assert result.tokens == reference.tokens == evaluated.tokens == len(ids) - 1
    assert result.context == reference.context == evaluated.context
    assert reference.codes.dtype == torch.int16 and reference.codes.shape == (len(ids) - 1, BYTE_VOCAB)
    assert abs(result.kl_mean) < 1e-7 and abs(result.kl_max) < 1e-6 and result.top1_agreement == 1.0
    assert result.perplexity == pytest.approx(result.reference_perplexity, rel=1e-6)
    assert result.perplexity == pytest.approx(evaluated.perplexity, rel=1e-5)


def test_int8_is_closer_to_the_reference_than_int4(loaded, quantized) -> None:
    reference = reference_logprobs(loaded, join_tokens(TEXTS, loaded.tokenizer), 17)  # computed once, used twice
    kl = {bits: kl_divergence(model, reference) for bits, model in quantized.items()}
    for result in kl.values():
        assert 0 < result.kl_mean <= result.kl_max < math.inf and 0 < result.top1_agreement <= 1
        assert result.kl_median <= result.kl_p99 <= result.kl_max
    assert kl[8].kl_mean < kl[4].kl_mean


@pytest.mark.parametrize("chunk", [256, 3])
@pytest.mark.parametrize("context", [6, None])
def test_kl_matches_a_direct_computation(loaded, quantized, monkeypatch, chunk: int, context: int | None) -> None:
    """Against F.kl_div on whole-window fp32 logits; lm_head chunks of 3 positions split every window."""
    monkeypatch.setattr("moerun.runtime.eval._LOGITS_CHUNK", chunk)
    ids = join_tokens(TEXTS, loaded.tokenizer)
    result = kl_divergence(quantized[4], reference_logprobs(loaded, ids, context))
    expected = direct_kl(loaded.model, quantized[4].model, ids, context or loaded.max_seq_len)
    assert expected["kl_mean"] > 1e-5  # far enough from 0 for a relative comparison
    for name, value in expected.items():
        assert getattr(result, name) == pytest.approx(value, rel=1e-3 if name.startswith("kl_") else 1e-5), name


def test_reference_storage_is_within_its_grid_step() -> None:
    """Stored log-probs are within half a grid step of their value; those far below the row's top are 0."""
    log_p = F.log_softmax(torch.randn(7, 1000) * 8, dim=-1)
    log_p[0] = F.log_softmax(torch.zeros(1000), dim=-1)  # a flat row: one value
    log_p[1, :3] = -math.inf  # tokens a model rules out
    codes, low, step = _encode(log_p)
    stored = ReferenceLogprobs(codes, low, step, log_p.argmax(-1), 0.0, torch.zeros(8, dtype=torch.int64), 8)
    decoded = stored.logprobs()
    kept = log_p >= log_p.amax(-1, keepdim=True) - 32
    assert torch.all(decoded[~kept] == -math.inf) and (~kept).any()
    assert (decoded - log_p)[kept].abs().max() < 32 / 65534
    assert torch.allclose(decoded.logsumexp(-1), torch.zeros(7), atol=1e-6)


def test_kl_bad_input(loaded) -> None:
    ids = [b % 128 for b in join_tokens(TEXTS, loaded.tokenizer)]
    reference = reference_logprobs(loaded, ids, 17)
    small_vocab = tiny_model("qwen3_moe")  # a transformers CausalLM with 128 tokens
    with pytest.raises(ValueError, match="vocabulary has 128 tokens and the reference's 260"):
        kl_divergence(small_vocab, reference)
    with pytest.raises(ValueError, match="perplexity needs at least 2"):
        reference_logprobs(loaded, [5], 17)
    with pytest.raises(ValueError, match="context must be between 2"):
        reference_logprobs(loaded, ids, 1)


# ---- moerun eval --kl-against ------------------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    (tmp_path / "t.py").write_text(TEXTS[0] + TEXTS[1])
    return tmp_path / "t.py"


def test_cli_kl_against_bf16(checkpoint: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out_json = tmp_path / "kl.json"
    args = ["eval", "--model", str(checkpoint), "--text", str(text_file), "--dtype", "fp32", "--context", "16"]
    assert cli.main([*args, "--kl-against", "bf16", "--threads", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KL divergence vs bf16: mean ") and "top-1 agreement" in out and "(reference " in out
    assert len(out.strip().splitlines()) == 1
    record = json.loads(out_json.read_text())
    ids = join_tokens([text_file.read_text()], load_tokenizer(checkpoint))
    reference = reference_logprobs(moerun.load(checkpoint, "bf16"), ids, 16)
    expected = kl_divergence(moerun.load(checkpoint, "fp32"), reference)
    for name, value in expected.to_dict().items():
        assert record[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    assert record["kl_mean"] > 0 and record["tokens"] == len(ids) - 1
    assert record["perplexity_change"] == pytest.approx(record["perplexity"] / record["reference_perplexity"] - 1)
    assert record["kl_against"] == "bf16" and record["reference_dtype"] == "bf16" and record["dtype"] == "fp32"
    assert record["reference"] == record["model"] == str(checkpoint) and record["files"] == [str(text_file)]


def test_cli_kl_against_the_float_source_of_a_quantized_checkpoint(
    checkpoint: Path, text_file: Path, tmp_path: Path, capsys
) -> None:
    int8 = tmp_path / "int8"
    assert cli.main(["quantize", str(checkpoint), str(int8), "--bits", "8", "--dtype", "fp32"]) == 0
    args = ["eval", "--model", str(int8), "--text", str(text_file), "--dtype", "fp32", "--threads", "1"]
    out_json = tmp_path / "kl.json"
    assert cli.main([*args, "--kl-against", str(checkpoint), "--json", str(out_json)]) == 0
    record = json.loads(out_json.read_text())
    assert record["kl_mean"] > 0 and record["reference"] == str(checkpoint) and record["reference_dtype"] == "fp32"
    capsys.readouterr()
    assert cli.main([*args, "--kl-against", "bf16"]) == 2
    err = capsys.readouterr().err
    assert f"{int8} is a quantized checkpoint" in err and "float source checkpoint's directory" in err
    assert len(err.strip().splitlines()) == 1 and "loaded" not in err


@pytest.mark.parametrize(
    ("kl_against", "message"),
    [
        ("bf17", "--kl-against takes bf16, fp32 or a checkpoint directory; bf17 does not exist"),
        ("FILE", "is not a directory"),
        ("SMALL_VOCAB", "the model's vocabulary has 260 tokens and the reference's 128"),
    ],
)
def test_cli_kl_against_bad_input(
    checkpoint: Path, text_file: Path, tmp_path: Path, capsys, kl_against: str, message: str
) -> None:
    if kl_against == "FILE":
        kl_against = str(text_file)
    elif kl_against == "SMALL_VOCAB":  # the byte tokenizer beside a model with 128 tokens
        kl_against = str(save_checkpoint("qwen3_moe", tmp_path / "small"))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(checkpoint / name, tmp_path / "small" / name)
        text_file.write_text("abc def")  # byte ids below 128
    args = ["eval", "--model", str(checkpoint), "--text", str(text_file), "--threads", "1"]
    assert cli.main([*args, "--kl-against", kl_against]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
