"""`moerun bench --model` end to end on tiny models, the synthetic builder, and bad-input handling."""

from __future__ import annotations

import json

import pytest
import torch

from families import family_config, tiny_model
from moerun import cli
from moerun.perf import model_bench
from moerun.runtime.lean import make_lean_runner

TINY_OLMOE = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, intermediate_size=32,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, vocab_size=128, max_position_embeddings=256,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-olmoe")
    tiny_model("olmoe").save_pretrained(path)
    return path


def test_bench_model_writes_json_records(tiny_dir, tmp_path, capsys) -> None:
    out = tmp_path / "model.json"
    args = ["bench", "--model", str(tiny_dir), "--prompt-tokens", "6", "--decode-tokens", "3", "--rounds", "2"]
    assert cli.main([*args, "--threads", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["impl"] for r in records] == list(model_bench.IMPLS)
    for r in records:
        assert (r["dtype"], r["bits"], r["prompt_tokens"], r["decode_tokens"], r["rounds"]) == ("bf16", 16, 6, 3, 2)
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert r["prefill_tokens_per_s"] == pytest.approx(6 / (r["ttft_ms"] / 1e3))
        assert 0 < r["decode_non_moe_share"] < 1 and 0 < r["prefill_non_moe_share"] < 1
        assert r["decode_gbps"] > 0 and r["read_gbps"] > 0 and r["decode_roofline_fraction"] > 0
    assert records[0]["path"] == "lean" and {r["path"] for r in records[1:]} == {"transformers"}
    lean = records[0]  # the performance model predicts the lean runner only
    assert lean["predicted_decode_tokens_per_s"] > 0 and lean["predicted_prefill_tokens_per_s"] > 0
    assert lean["decode_prediction_error"] == pytest.approx(
        lean["predicted_decode_tokens_per_s"] / lean["decode_tokens_per_s"] - 1
    )
    assert all(r["predicted_decode_tokens_per_s"] is None for r in records[1:])
    assert "hf-grouped_mm" in capsys.readouterr().out


def test_uncovered_family_runs_transformers_with_moerun_experts(tmp_path) -> None:
    tiny_model("glm4_moe").save_pretrained(tmp_path)
    (record,) = model_bench.run_model_bench(str(tmp_path), "fp32", 1, ("moerun",), 4, 2, rounds=1)
    assert record.path == "transformers" and "moerun experts" in record.note
    assert record.decode_tokens_per_s > 0


def test_synthetic_model_is_seeded_and_runs_lean(monkeypatch) -> None:
    monkeypatch.setitem(model_bench.SYNTHETIC_MODELS, "tiny", ("OlmoeConfig", TINY_OLMOE))
    model = model_bench.build_synthetic("tiny", torch.bfloat16, seed=3)
    again = model_bench.build_synthetic("tiny", torch.bfloat16, seed=3)
    weights = model.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(weights, again.model.layers[0].mlp.experts.gate_up_proj)
    assert 0.01 < weights.float().std() < 0.03 and abs(weights.float().mean()) < 1e-3
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert model_bench.synthetic_bytes("tiny", torch.bfloat16) == sum(p.numel() * 2 for p in model.parameters())
    ids = torch.arange(5)
    runner = make_lean_runner(model.float(), max_seq_len=8)
    with torch.inference_mode():
        expected = model(ids[None]).logits[0, -1]
    torch.testing.assert_close(runner.prefill(ids), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss"])
def test_synthetic_variants_rebuild_their_rope_and_run_lean(monkeypatch, family: str) -> None:
    """The synthetic DeepSeek and GPT-OSS builders (meta device, then filled) recompute the rotary buffers
    (YaRN for GPT-OSS), so the lean runner computes what the model's own forward does."""
    config = family_config(family)
    fields = {k: v for k, v in config.to_dict().items() if k in type(config)().to_dict()}
    monkeypatch.setitem(model_bench.SYNTHETIC_MODELS, "tiny", (type(config).__name__, fields))
    model = model_bench.build_synthetic("tiny", torch.float32, seed=3)
    assert torch.equal(model.model.rotary_emb.inv_freq, type(model.model.rotary_emb)(config=model.config).inv_freq)
    ids = torch.arange(9)
    runner = make_lean_runner(model, max_seq_len=16)
    with torch.inference_mode():
        expected = model(ids[None]).logits[0, -1]
    torch.testing.assert_close(runner.prefill(ids), expected, rtol=1e-4, atol=1e-5)


def test_quantized_copy_shares_float_weights_and_leaves_the_model_alone() -> None:
    model = tiny_model("olmoe")
    before = {name: p.clone() for name, p in model.named_parameters()}
    ids = torch.arange(7)
    with torch.inference_mode():
        expected = model(ids[None]).logits
        quantized = model_bench.quantized_copy(model, 8)
        assert torch.equal(model(ids[None]).logits, expected)
        assert (quantized(ids[None]).logits - expected).abs().max() < 0.1 * expected.abs().max()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    # the copy holds no float expert weights of its own: its embedding is the model's very tensor
    assert quantized.model.embed_tokens.weight is model.model.embed_tokens.weight


def test_decode_bytes_per_token_counts_top_k_experts() -> None:
    model = tiny_model("olmoe")  # 2 layers, 8 experts of 3 * 64 * 32 weights, top-2, vocab 128, untied
    total = sum(p.numel() for p in model.parameters())
    unused_experts = 2 * 6 * 3 * 64 * 32
    embedding_rows_not_read = 127 * 64
    assert model_bench.decode_bytes_per_token(model) == (total - unused_experts - embedding_rows_not_read) * 4


def test_sequence_beyond_the_model_context_is_refused(tiny_dir) -> None:
    with pytest.raises(ValueError, match="context of 512 positions"):
        list(model_bench.run_model_bench(str(tiny_dir), prompt_tokens=500, decode_tokens=13))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/dir"], "not a transformers checkpoint directory"),
        (["--model", "olmoe-1b-7b-4l", "--impl", "moerun-prepacked"], "unknown implementation 'moerun-prepacked'"),
        (["--model", "olmoe-1b-7b-4l", "--preset", "olmoe-1b-7b"], "give one of them"),
        (["--model", "olmoe-1b-7b-4l", "--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
        (["--model", "olmoe-1b-7b-4l", "--decode-tokens", "0"], "--decode-tokens must be >= 1"),
        (["--model", "olmoe-1b-7b-4l", "--json", "/nonexistent/x.json"], "does not exist"),
    ],
)
def test_bench_model_bad_input_exits_2(args: list[str], message: str, capsys) -> None:
    assert cli.main(["bench", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
