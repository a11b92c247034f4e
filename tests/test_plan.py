"""moerun plan: the cache replay against a real offloaded decode, the Pareto front, run plans and their
application, and the command's bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import moerun
from moerun import cli
from moerun.models.loader import default_model_dir
from moerun.models.quantized import moe_layers
from moerun.models.run_plan import PlanError, RunPlan, model_identity
from moerun.plan.predict import Configuration, Point
from moerun.plan.search import pareto_front
from moerun.plan.trace import record_trace, replay_cache
from moerun.runtime.generate import default_runner
from tiny_checkpoints import one_thread, save_checkpoint  # noqa: F401  (one_thread: autouse fixture)

REFERENCE = default_model_dir()
IDS = torch.randint(0, 4000, (48,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("share", ["25%", "50%"])
def test_replayed_cache_hits_equal_a_real_offloaded_decode(policy: str, share: str) -> None:
    resident = moerun.load(REFERENCE, "fp32")
    trace = record_trace(resident.model, IDS, window=len(IDS))
    offloaded = moerun.load(REFERENCE, "fp32", memory_budget=share, cache_policy=policy, prefetch=False)
    runner = default_runner(offloaded.model, len(IDS))
    runner.reset()
    with torch.inference_mode():
        for token in IDS:  # decode token by token, as the replay does
            runner.decode(token)
    report = offloaded.cache.report()
    replay = replay_cache(trace, offloaded.cache.num_slots, policy, prefetch=False)
    assert replay.hit_rate == pytest.approx(report["hit_rate"], abs=1e-12)
    misses = sum(layer["accesses"] - layer["hits"] for layer in report["layers"])
    assert replay.demand_reads * len(IDS) * 4 == pytest.approx(misses)
    offloaded.cache.close()


def test_trace_of_a_skipping_model_skips_and_prefetch_replay_reads_ahead() -> None:
    from moerun.models.skipping import calibrate_skipping, set_skipping

    loaded = moerun.load(REFERENCE, "fp32")
    set_skipping(loaded.model, calibrate_skipping(loaded.model, IDS, 0.25, window=48))
    trace = record_trace(loaded.model, IDS, window=48)
    assert 0.1 < trace.skipped_share() < 0.4
    assert all(layer.skip_counts == [0, 0] for layer in moe_layers(loaded.model).values())  # tracing is no run
    ahead = replay_cache(trace, 8, "lru", prefetch=True)
    assert ahead.prefetch_reads > 0 and 0 <= ahead.prefetch_used <= ahead.prefetch_reads


def _point(speed: float, memory: int, kl: float) -> Point:
    config = Configuration("int8", "float", 1.0, "lfu", False, 0.0, 1)
    return Point(config, speed, speed, memory, kl, kl)


def test_pareto_front_keeps_exactly_the_undominated_points() -> None:
    generator = torch.Generator().manual_seed(0)
    points = [
        _point(float(s), int(m), float(k))
        for s, m, k in zip(
            torch.randint(1, 50, (300,), generator=generator),
            torch.randint(1, 50, (300,), generator=generator),
            torch.randint(1, 50, (300,), generator=generator),
            strict=True,
        )
    ]
    front = pareto_front(points, "decode")

    def dominates(a: Point, b: Point) -> bool:
        better_or_equal = a.decode_tps >= b.decode_tps and a.peak_bytes <= b.peak_bytes and a.kl <= b.kl
        return better_or_equal and (a.decode_tps, a.peak_bytes, a.kl) != (b.decode_tps, b.peak_bytes, b.kl)

    assert all(not any(dominates(q, p) for q in points) for p in front)
    assert all(any(dominates(q, p) or q is p or (q.decode_tps, q.peak_bytes, q.kl) ==
                   (p.decode_tps, p.peak_bytes, p.kl) for q in front) for p in points)  # fmt: skip
    assert [p.decode_tps for p in front] == sorted((p.decode_tps for p in front), reverse=True)


def _plan(**changes) -> RunPlan:
    plan = RunPlan(model_identity(REFERENCE), str(REFERENCE), "host", 1, 8, None, 16)
    return replace(plan, **changes)


def test_run_plan_round_trips_and_is_written_whole(tmp_path) -> None:
    plan = _plan(skip_thresholds={"model.layers.0.mlp.layer": 0.3})
    plan.write(tmp_path / "p.json")
    assert RunPlan.read(tmp_path / "p.json") == plan
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"expert_bits": 3}, "expert_bits"), ({"threads": 0}, "threads"), ({"cache_policy": "fifo"}, "cache_policy"),
     ({"skip_thresholds": {"x": 2.0}}, "skip threshold")],
)  # fmt: skip
def test_bad_plans_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        RunPlan.from_dict(_plan(**changes).to_dict())


def test_a_plan_applies_formats_skipping_and_threads() -> None:
    names = list(moe_layers(moerun.load(REFERENCE, "fp32").model))
    plan = _plan(threads=1, expert_bits=4, dense_bits=8, skip_thresholds=dict.fromkeys(names, 0.5))
    loaded = moerun.load(REFERENCE, "fp32", plan=plan)
    layers = moe_layers(loaded.model).values()
    assert all(layer.skipping.level == 0.5 and layer.experts.formats[0].name == "int4-g32" for layer in layers)
    assert torch.get_num_threads() == 1 and loaded.plan == plan
    with pytest.raises(PlanError, match="reads low-bit experts from storage"):
        moerun.load(REFERENCE, "fp32", plan=replace(plan, cache_bytes=1 << 20))
    with pytest.raises(ValueError, match="a plan sets the memory budget"):
        moerun.load(REFERENCE, "fp32", plan=plan, memory_budget="50%")


def test_a_plan_for_another_model_is_refused(tmp_path) -> None:
    other = save_checkpoint("olmoe", tmp_path / "other")
    with pytest.raises(PlanError, match="made for another model"):
        moerun.load(other, "fp32", plan=_plan())


def test_quantize_with_a_plan_writes_a_checkpoint_the_plan_loads(tmp_path) -> None:
    plan = _plan(expert_bits=4, dense_bits=8)
    plan.write(tmp_path / "p.json")
    assert cli.main(["quantize", "--plan", str(tmp_path / "p.json"), str(REFERENCE), str(tmp_path / "q")]) == 0
    assert model_identity(tmp_path / "q") == plan.model_identity
    loaded = moerun.load(tmp_path / "q", "fp32", plan=replace(plan, cache_bytes=1 << 20))
    assert loaded.cache is not None
    with pytest.raises(PlanError, match="other formats"):
        moerun.load(tmp_path / "q", "fp32", plan=replace(plan, expert_bits=8))


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--memory-budget", "lots"], "--memory-budget"), (["--memory-budget", "1GB", "--max-kl", "-1"], "--max-kl"),
     (["--memory-budget", "1GB", "--max-ppl-increase", "x%"], "--max-ppl-increase"),
     (["--memory-budget", "1GB", "--max-kl", "1", "--max-ppl-increase", "1%"], "one quality limit"),
     (["--memory-budget", "1GB", "--objective", "both"], "--objective")],
)  # fmt: skip
def test_plan_bad_input_is_one_line(capsys, tmp_path, args: list[str], message: str) -> None:
    assert cli.main(["plan", *args, "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_plan_refuses_a_budget_below_the_smallest_configuration_naming_it(capsys, tmp_path) -> None:
    args = ["plan", "--memory-budget", "10MB", "--calibration-tokens", "200", "--out", str(tmp_path / "p.json")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "below the smallest configuration" in err and "MiB" in err
    assert not (tmp_path / "p.json").exists()


def test_plan_writes_a_plan_that_generate_runs(capsys, tmp_path) -> None:
    out, table = tmp_path / "p.json", tmp_path / "all.json"
    args = ["plan", "--memory-budget", "2GB", "--max-kl", "0.05", "--calibration-tokens", "200",
            "--out", str(out), "--json", str(table), "--plot", str(tmp_path / "p.png")]  # fmt: skip
    assert cli.main(args) == 0
    plan = RunPlan.read(out)
    assert plan.predicted["kl"] <= 0.05 and plan.predicted["kl_measured"]
    record = json.loads(table.read_text())
    assert record["front"] and len(record["points"]) > len(record["front"])
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert cli.main(["generate", "--prompt", "def f(", "--max-new-tokens", "4", "--plan", str(out)]) == 0
    capsys.readouterr()
    replace(plan, host="another host").write(out)  # planned elsewhere: a warning and this host's prediction
    assert cli.main(["generate", "--prompt", "def f(", "--max-new-tokens", "4", "--plan", str(out)]) == 0
    err = capsys.readouterr().err
    assert "planned on another host" in err and "predicted on this host: decode" in err


@pytest.mark.parametrize("dense", ["float", "int8", "int4-g32"])
@pytest.mark.parametrize("experts", ["float", "int8", "int4-g32", "mixed"])
def test_emulated_formats_give_the_low_bit_model_and_restore_the_float_one(experts: str, dense: str) -> None:
    from moerun.models.quantized import QuantConfig, quantize
    from moerun.plan.measure import emulated_formats, lowbit_weights

    model = moerun.load(REFERENCE, "fp32").model
    source = moerun.load(REFERENCE, "bf16").model
    names = list(moe_layers(model))
    formats = experts
    if experts == "mixed":
        formats = {n: ["int4-g32", "int8", "16", "int8", "int4-g32", "16", "int8", "int4-g32"] for n in names}
    bits = {"float": 16, "int8": 8, "int4-g32": 4}
    quantized = moerun.load(REFERENCE, "fp32").model
    quantize(quantized, QuantConfig(bits=16 if experts == "mixed" else bits[experts], dense_bits=bits[dense],
                                    expert_formats=formats if experts == "mixed" else None))  # fmt: skip
    ids = torch.tensor([IDS[:40]])
    with torch.no_grad():
        before = model(ids).logits
        made = lowbit_weights(quantized) if dense == "int8" else None  # reuse the low-bit weights, or quantize
        with emulated_formats(model, formats, dense, source=source if experts != "int8" else None, quantized=made):
            torch.testing.assert_close(model(ids).logits, quantized(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(model(ids).logits, before)
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_emulation_collects_the_low_bit_weights_a_variant_is_built_from() -> None:
    """emulated_formats quantizes whole matrices once and hands them over: the variant built from them is the
    model quantized directly, and it keeps its own int4 conversions."""
    from moerun.models.quantized import QuantConfig, quantize
    from moerun.plan.measure import _variant, emulated_formats

    model = moerun.load(REFERENCE, "fp32").model
    made: dict = {}
    with emulated_formats(model, "int4-g32", "int8", quantized=made):
        pass
    assert {fmt for _, fmt in made} == {"int4-g32", "int8"} and len(made) > 2 * len(moe_layers(model))
    direct = moerun.load(REFERENCE, "fp32").model
    quantize(direct, QuantConfig(bits=4, group_size=32, dense_bits=8))
    variant = _variant(model, "int4-g32", "int8", made)
    ids = torch.tensor([IDS[:20]])
    with torch.no_grad():
        assert torch.equal(variant(ids).logits, direct(ids).logits)
    assert all(not w.conversions for w in made.values())


def test_replay_counts_only_the_tokens_after_its_warmup() -> None:
    """The prompt's tokens fill the cache and are not counted: a text that repeats its experts then hits."""
    from moerun.plan.trace import RoutingTrace, replay_cache

    selected = [torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]) for _ in range(2)]
    predicted = [torch.full((4, 2), 8) for _ in range(2)]
    trace = RoutingTrace(selected, predicted, 8, [2, 2])
    cold = replay_cache(trace, 8, "lru", False)
    warm = replay_cache(trace, 8, "lru", False, warmup=2)
    assert cold.demand_reads == 1.0 and cold.hit_rate == 0.5  # 2 tokens x 2 layers x 2 misses over 4 x 2 steps
    assert warm.demand_reads == 0.0 and warm.hit_rate == 1.0
