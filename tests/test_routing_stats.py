"""Routing statistics: SCH on hand-made routings with known answers and against an exhaustive optimum,
activation shares, routing collected from the reference model against transformers' own router, the CLI."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch

import moerun
from moerun import cli
from moerun.assets import REFERENCE_HELDOUT_DIR, REFERENCE_MODEL_DIR
from moerun.runtime.eval import join_tokens
from moerun.runtime.routing_stats import (
    activation_frequencies,
    collect_routing,
    default_cache_sizes,
    routing_stats,
    segment_cache_hit_rate,
)


def _random_routing(rng: random.Random, tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    return torch.tensor([rng.sample(range(num_experts), top_k) for _ in range(tokens)])  # [T, k]


def _naive_sch(selected: torch.Tensor, cache_size: int, segment: int) -> float:
    """SCH recounting every expert's remaining uses from the whole routing at each eviction."""
    rows = selected.tolist()
    cache: list[int] = []
    last_use: dict[int, int] = {}
    hits = 0
    for t, row in enumerate(rows):
        for j, e in enumerate(row):
            if e in cache or len(cache) < cache_size:
                hits += 1
                cache = [*dict.fromkeys([*cache, e])]
            else:
                ahead = row[j + 1 :] + [x for later in rows[t + 1 : t + segment] for x in later]
                cache.remove(min(cache, key=lambda c: (ahead.count(c), last_use[c])))
                cache.append(e)
            last_use[e] = t * len(row) + j
    return hits / selected.numel()


def _optimal_hit_rate(selected: torch.Tensor, cache_size: int) -> float:
    """The best any demand-loading cache can do knowing all the routing: every eviction choice tried."""
    accesses = selected.flatten().tolist()

    @functools.cache
    def best(i: int, cache: frozenset[int]) -> int:
        if i == len(accesses):
            return 0
        e = accesses[i]
        if e in cache or len(cache) < cache_size:  # free slots fill without a miss, as in SCH
            return 1 + best(i + 1, cache | {e})
        return max(best(i + 1, (cache - {victim}) | {e}) for victim in cache)

    return best(0, frozenset()) / len(accesses)


# ---- SCH -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("segment", [1, 3, 16])
@pytest.mark.parametrize("cache_size", [2, 3, 8])
def test_constant_routing_always_hits(cache_size: int, segment: int) -> None:
    assert segment_cache_hit_rate(torch.tensor([[5, 1]] * 20), cache_size, segment) == 1.0


def test_cache_of_one_expert_for_two_per_token() -> None:
    # Only the very first access fills a free slot; afterwards the two experts evict each other.
    assert segment_cache_hit_rate(torch.tensor([[0, 1]] * 10), 1, 4) == 1 / 20


def test_cycling_experts() -> None:
    cycle = torch.tensor([0, 1, 2] * 4).view(-1, 1)  # k = 1, 12 tokens, 3 experts, cache of 2
    # No look-ahead is LRU, which misses every access of a cycle one longer than the cache; only the two
    # first accesses (free slots) hit.
    assert segment_cache_hit_rate(cycle, 2, 1) == 2 / 12
    # Seeing the next token, the cache evicts the expert not needed next: a miss at tokens 2, 4, 6, 8, 10
    # and a hit at 3, 5, 7, 9, 11, plus the two free slots.
    assert segment_cache_hit_rate(cycle, 2, 2) == 7 / 12
    assert segment_cache_hit_rate(cycle, 3, 1) == 1.0


@pytest.mark.parametrize("seed", range(40))
def test_matches_naive_recount_and_never_beats_the_optimum(seed: int) -> None:
    rng = random.Random(seed)
    num_experts = rng.randint(3, 6)
    top_k = rng.randint(1, 2)
    selected = _random_routing(rng, rng.randint(1, 9), num_experts, top_k)
    rates = []
    for cache_size in range(1, num_experts + 1):
        segment = rng.randint(1, 12)
        rate = segment_cache_hit_rate(selected, cache_size, segment)
        assert rate == pytest.approx(_naive_sch(selected, cache_size, segment), abs=1e-12)
        assert rate <= _optimal_hit_rate(selected, cache_size) + 1e-12
        rates.append(segment_cache_hit_rate(selected, cache_size, 4))
    assert rates == sorted(rates) and rates[-1] == 1.0  # a larger cache never hits less; C = E always hits


def test_sch_bad_input() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        segment_cache_hit_rate(torch.tensor([[0, 1]]), 0, 4)
    with pytest.raises(ValueError, match=">= 1"):
        segment_cache_hit_rate(torch.tensor([[0, 1]]), 2, 0)
    with pytest.raises(ValueError, match=r"\[tokens, top_k\]"):
        segment_cache_hit_rate(torch.tensor([0, 1]), 2, 4)


# ---- shares and the summary ----------------------------------------------------------------------------------


def test_activation_shares_sum_to_one() -> None:
    selected = _random_routing(random.Random(0), 100, 8, 3)
    shares = activation_frequencies(selected, 8)
    assert shares.shape == (8,) and float(shares.sum()) == pytest.approx(1.0)
    assert shares.tolist() == [float((selected == e).sum()) / 300 for e in range(8)]
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        activation_frequencies(selected, 4)


def test_routing_stats_summary() -> None:
    rng = random.Random(1)
    selected = [_random_routing(rng, 50, 8, 2) for _ in range(3)]
    stats = routing_stats(selected, 8, default_cache_sizes(2, 8), segment=4)
    assert stats.cache_sizes == [2, 4, 8] and stats.tokens == 50 and stats.top_k == 2
    for i, layer in enumerate(stats.layers):
        assert layer.sch[4] == segment_cache_hit_rate(selected[i], 4, 4) and layer.sch[8] == 1.0
        assert layer.static[2] == pytest.approx(sum(sorted(layer.shares)[-2:]))
        assert 1.0 <= layer.effective_experts <= 8.0
    assert stats.mean_sch()[4] == pytest.approx(sum(s.sch[4] for s in stats.layers) / 3)
    assert json.loads(json.dumps(stats.to_dict()))["mean_sch"]["4"] == pytest.approx(stats.mean_sch()[4])
    assert default_cache_sizes(8, 64) == [8, 16, 32] and default_cache_sizes(3, 8) == [3, 6, 8]
    with pytest.raises(ValueError, match="between 1 and the 8 experts"):
        routing_stats(selected, 8, [9])


# ---- the reference model -------------------------------------------------------------------------------------


def test_collect_routing_matches_transformers_router() -> None:
    from transformers import AutoModelForCausalLM

    loaded = moerun.load(REFERENCE_MODEL_DIR, "fp32")
    ids = join_tokens([(REFERENCE_HELDOUT_DIR / "heapq.py").read_text()], loaded.tokenizer)[:300]
    selected = collect_routing(loaded, ids, context=128)
    assert len(selected) == loaded.config.num_hidden_layers
    assert all(s.shape == (300, 2) and s.dtype == torch.int64 for s in selected)

    hf = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).eval()
    logits: list[list[torch.Tensor]] = [[] for _ in selected]
    with torch.inference_mode():
        for start in range(0, 300, 128):
            out = hf(input_ids=torch.tensor(ids[start : start + 128]).view(1, -1), output_router_logits=True)
            for i, layer_logits in enumerate(out.router_logits):
                logits[i].append(layer_logits)
    for mine, parts in zip(selected, logits, strict=True):
        layer_logits = torch.cat(parts)  # [T, E]
        top = layer_logits.topk(3, dim=-1).values
        clear = (top[:, 1] - top[:, 2]) > 1e-4  # tokens whose second and third experts are not near-tied
        assert clear.float().mean() > 0.95
        expected = layer_logits.topk(2, dim=-1).indices
        assert torch.equal(mine.sort(dim=-1).values[clear], expected.sort(dim=-1).values[clear])


def test_cli_writes_per_layer_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "routing.json"
    assert cli.main(["routing-stats", "--max-tokens", "200", "--threads", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["tokens"] == 200 and record["cache_sizes"] == [2, 4, 8] and record["segment"] == 16
    assert len(record["layers"]) == 4
    for layer in record["layers"]:
        assert len(layer["shares"]) == 8 and sum(layer["shares"]) == pytest.approx(1.0)
        assert 0.0 <= layer["sch"]["2"] <= layer["sch"]["4"] <= layer["sch"]["8"] == 1.0
    assert "all layers" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache-size", "0"], "--cache-size must be >= 1 expert, got 0"),
        (["--cache-size", "9"], "--cache-size 9 is more than the 8 experts of a layer"),
        (["--segment", "0"], "--segment must be >= 1"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--text", "/nonexistent.py"], "text file /nonexistent.py does not exist"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
    ],
)
def test_cli_bad_input(capsys, args: list[str], message: str) -> None:
    assert cli.main(["routing-stats", "--max-tokens", "10", "--threads", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
