"""The performance model: its terms against hand computations, its fallbacks, and the shapes it reads."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from moerun.kernels import tuning
from moerun.perf import predict
from moerun.perf.predict import MatrixFormats, ModelShape, Overheads, PerfModel, expected_groups, rows_distribution
from moerun.perf.roofline import Roofline

ROOFLINE = Roofline(2, 10.0, {"bfloat16": 100.0, "float32": 50.0}, "test cpu", "2", "now")
OVERHEADS = Overheads(moe_call_ms=0.5, decode_layer_ms=0.25, decode_step_ms=1.0, prefill_layer_ms=2.0,
                      attention_gflops=20.0, expert_miss_ms=0.3, offloaded_call_ms=0.2, moe_call_wide_ms=0.5,
                      decode_layer_wide_ms=0.25,
                      prefill_layer_wide_ms=2.0)  # fmt: skip
SHAPE = ModelShape(num_layers=2, hidden=64, intermediate=32, num_experts=8, top_k=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, vocab=100)  # fmt: skip
FORMATS = MatrixFormats.of(torch.bfloat16)


def full_table(ms_per_group: float = 2.0, linear_ms: float = 0.1) -> tuning.TuningTable:
    cases = {}
    for rows in tuning.ROW_BUCKETS:
        cases[tuning.case_key("experts", "bfloat16", (64, 32), rows, 2)] = {"torch": ms_per_group}
        for shape in ((128, 64), (64, 64), (100, 64)):  # qkv, o, head
            cases[tuning.case_key("linear", "bfloat16", shape, rows, 2)] = {"torch": linear_ms, "native": linear_ms}
    return tuning.TuningTable(cases)


def test_expected_groups() -> None:
    assert expected_groups(8, 2, 1) == pytest.approx(2.0)
    assert expected_groups(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))
    assert expected_groups(64, 8, 10_000) == pytest.approx(64.0)
    assert expected_groups(1, 1, 5) == 1.0


def test_layer_prediction_is_the_sum_of_its_terms() -> None:
    model = PerfModel(ROOFLINE, full_table(), OVERHEADS, threads=2, native=False)
    pred = model.moe_layer(SHAPE, FORMATS, 4)
    groups = expected_groups(8, 2, 4)
    router_s = max(8 * 64 * 2 / 10e9, 2 * 4 * 8 * 64 / 100e9)
    gather_s = 3 * 4 * 2 * 64 * 2 / 10e9
    assert pred.parts["experts"] == pytest.approx(groups * 2.0)
    assert pred.ms == pytest.approx(0.5 + groups * 2.0 + (router_s + gather_s) * 1e3)
    assert not pred.estimated


def test_missing_cases_fall_back_to_the_roofline_and_say_so() -> None:
    model = PerfModel(ROOFLINE, tuning.TuningTable(), OVERHEADS, threads=2, native=False)
    pred = model.moe_layer(SHAPE, FORMATS, 1)
    # one token, two experts: each reads its 3 x 32 x 64 bf16 weights at 10 GB/s
    assert pred.parts["experts"] == pytest.approx(2 * 3 * 32 * 64 * 2 / 10e9 * 1e3)
    assert pred.estimated == {"experts bfloat16 H=64 I=32"}


def test_low_bit_formats_count_their_packed_bytes() -> None:
    assert MatrixFormats.of(torch.bfloat16, 8).bytes_of("int8", 96, 64) == 96 * 64 + 4 * 96
    assert MatrixFormats.of(torch.bfloat16, 4, 64).experts == "int4-g64"
    assert MatrixFormats.of(torch.float32).bytes_of("float32", 3, 5) == 60


def test_decode_step_adds_layers_head_and_misses() -> None:
    model = PerfModel(ROOFLINE, full_table(), OVERHEADS, threads=2, native=False)
    resident = model.decode_step(SHAPE, FORMATS, position=10)
    layer = model.moe_layer(SHAPE, FORMATS, 1).ms
    kv_s = 2 * 10 * 2 * 16 * 2 / 10e9
    expected = 2 * (0.1 + 0.1 + layer + 0.25 + kv_s * 1e3) + 0.1 + 1.0
    assert resident.ms == pytest.approx(expected)
    offloaded = model.decode_step(SHAPE, FORMATS, position=10, hit_rate=0.75, storage_gbps=1.0)
    misses = 2 * 2 * 0.25  # layers x k x miss rate
    calls = 2 * 0.2  # layers x the offloaded call's own cost
    assert offloaded.ms - resident.ms == pytest.approx(misses * ((3 * 32 * 64 * 2) / 1e9 * 1e3 + 0.3) + calls)
    assert offloaded.parts["expert misses"] == pytest.approx(misses * 0.3)
    all_cached = model.decode_step(SHAPE, FORMATS, position=10, offloaded=True)
    assert all_cached.ms - resident.ms == pytest.approx(calls) and "expert misses" not in all_cached.parts
    with pytest.raises(ValueError, match="storage read bandwidth"):
        model.decode_step(SHAPE, FORMATS, hit_rate=0.5)


def test_prefill_grows_with_the_prompt_and_reads_uncached_experts() -> None:
    model = PerfModel(ROOFLINE, full_table(), OVERHEADS, threads=2, native=False)
    short, long = model.prefill(SHAPE, FORMATS, 16), model.prefill(SHAPE, FORMATS, 256)
    assert long.ms > short.ms > 0
    assert long.parts["attention"] == pytest.approx(2 * 2 * 256 * 256 * 4 * 16 / 20e9 * 1e3)
    offloaded = model.prefill(SHAPE, FORMATS, 16, cached_experts=2, storage_gbps=1.0)
    touched = expected_groups(8, 2, 16)
    assert offloaded.parts["expert reads"] == pytest.approx(2 * touched * 0.75 * 3 * 32 * 64 * 2 / 1e9 * 1e3)
    assert offloaded.parts["expert misses"] == pytest.approx(2 * touched * 0.75 * 0.3)
    # Right after a load the cache is empty: every expert the prompt touches is read, whatever the budget.
    cold = model.prefill(SHAPE, FORMATS, 16, cached_experts=0, storage_gbps=1.0)
    assert cold.parts["expert misses"] == pytest.approx(2 * touched * 0.3)
    assert "expert reads" not in model.prefill(SHAPE, FORMATS, 16, cached_experts=8, storage_gbps=1.0).parts


def test_decode_uses_the_native_matrix_vector_time_where_the_kernel_runs() -> None:
    table = full_table()
    for key in list(table.cases):
        if key.startswith("linear"):
            table.cases[key] = {"torch": 5.0, "native": 0.1}
    with_native = PerfModel(ROOFLINE, table, OVERHEADS, threads=2, native=True).decode_step(SHAPE, FORMATS)
    without = PerfModel(ROOFLINE, table, OVERHEADS, threads=2, native=False).decode_step(SHAPE, FORMATS)
    assert without.ms - with_native.ms == pytest.approx((2 * 2 + 1) * 4.9)


def tiny_olmoe(**changes) -> transformers.PreTrainedModel:
    config = transformers.OlmoeConfig(
        hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
        num_experts_per_tok=2, vocab_size=100, num_hidden_layers=3, **changes,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


def test_model_shape_from_a_model_and_its_config_agree() -> None:
    model = tiny_olmoe()
    expected = ModelShape(3, 64, 32, 8, 2, 4, 2, 16, 100)
    assert ModelShape.of_model(model) == expected
    assert ModelShape.of_config(model.config) == expected
    assert expected.qkv_rows == (4 + 2 * 2) * 16


def test_model_shape_reads_shared_experts_from_the_config() -> None:
    config = transformers.Qwen2MoeConfig(
        hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_attention_heads=4,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=1, vocab_size=50,
    )  # fmt: skip
    assert ModelShape.of_config(config).shared_intermediate == 48
    with pytest.raises(ValueError, match="num_experts"):
        ModelShape.of_config(transformers.LlamaConfig())


def test_overheads_are_measured_once_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOERUN_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(threads: int, dtype: torch.dtype) -> Overheads:
        calls.append(threads)
        return OVERHEADS

    monkeypatch.setattr(predict, "measure_overheads", fake)
    assert predict.load_or_measure_overheads(3) == OVERHEADS
    assert predict.load_or_measure_overheads(3) == OVERHEADS
    assert calls == [3]
    tuning.save_overheads(3, {"moe_call_ms": "nope"})  # a corrupt entry is measured again
    assert predict.load_or_measure_overheads(3) == OVERHEADS
    assert calls == [3, 3]


def test_layer_overheads_follow_the_hidden_size() -> None:
    overheads = replace(OVERHEADS, moe_call_wide_ms=1.5, decode_layer_wide_ms=0.75, prefill_layer_wide_ms=4.0)
    assert overheads.at_hidden(32) == overheads.at_hidden(Overheads.NARROW) == (0.5, 0.25, 2.0)
    assert overheads.at_hidden(4096) == overheads.at_hidden(Overheads.WIDE) == (1.5, 0.75, 4.0)
    middle = (Overheads.NARROW + Overheads.WIDE) // 2
    assert overheads.at_hidden(middle) == pytest.approx((1.0, 0.5, 3.0))
    assert Overheads.from_dict(overheads.to_dict()) == overheads


def test_measured_overheads_are_finite_and_not_negative(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOERUN_CACHE_DIR", str(tmp_path))  # the miss probe's checkpoint goes there, then away
    overheads = predict.measure_overheads(1, reps=3)
    assert list(tmp_path.iterdir()) == []
    for name, value in overheads.to_dict().items():
        assert math.isfinite(value) and value >= 0, name
    assert overheads.attention_gflops > 0


@pytest.mark.parametrize("tokens", [1, 7, 512])
def test_rows_distribution_is_the_binomial_without_zero(tokens: int) -> None:
    p = 8 / 64
    dist = rows_distribution(tokens, p)
    assert 64 * sum(q for _, q in dist) == pytest.approx(expected_groups(64, 8, tokens))
    assert sum(r * q for r, q in dist) == pytest.approx(tokens * p)  # zero rows add nothing to the mean
    assert all(r >= 1 for r, _ in dist)
    assert rows_distribution(0, p) == [] and rows_distribution(5, 1.0) == [(5, 1.0)]
