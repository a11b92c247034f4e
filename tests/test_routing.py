"""Routing functions against per-token brute force, and the dispatch plan's invariants."""

from __future__ import annotations

import itertools

import pytest
import torch

from moerun.routing import RoutingConfig, make_plan, route


def logits_of(tokens: int, experts: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_softmax_topk_matches_brute_force(top_k: int, renormalize: bool) -> None:
    logits = logits_of(37, 10)
    weights, ids = route(logits, RoutingConfig("softmax_topk", top_k, renormalize))
    for t in range(logits.shape[0]):
        probs = torch.softmax(logits[t].double(), 0)
        best = sorted(range(10), key=lambda e: -probs[e].item())[:top_k]
        assert ids[t].tolist() == best
        expected = probs[best] / (probs[best].sum() if renormalize else 1.0)
        torch.testing.assert_close(weights[t].double(), expected, rtol=1e-6, atol=1e-7)


def test_topk_softmax_over_selected_logits() -> None:
    logits = logits_of(20, 8)
    weights, ids = route(logits, RoutingConfig("topk_softmax", 3))
    torch.testing.assert_close(weights, torch.softmax(logits.gather(1, ids), -1))
    assert torch.equal(ids, logits.topk(3, -1).indices)


@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_group_topk_matches_brute_force(renormalize: bool) -> None:
    num_experts, n_group, topk_group, top_k, scale = 16, 4, 2, 3, 2.5
    logits = logits_of(25, num_experts, seed=3)
    bias = torch.randn(num_experts, generator=torch.Generator().manual_seed(4)) * 0.3
    config = RoutingConfig("sigmoid_group_topk", top_k, renormalize, n_group, topk_group, scale)
    weights, ids = route(logits, config, bias)
    per_group = num_experts // n_group
    for t in range(logits.shape[0]):
        scores = logits[t].double().sigmoid()
        choice = scores + bias.double()
        group_score = [sorted(choice[g * per_group : (g + 1) * per_group].tolist())[-2:] for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
        allowed = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        best = sorted(allowed, key=lambda e: -choice[e].item())[:top_k]
        assert sorted(ids[t].tolist()) == sorted(best)
        expected = scores[ids[t]] / (scores[ids[t]].sum() if renormalize else 1.0) * scale
        torch.testing.assert_close(weights[t].double(), expected, rtol=1e-6, atol=1e-7)


def test_score_bias_changes_choice_not_weights() -> None:
    logits = logits_of(5, 8)
    bias = torch.zeros(8)
    bias[7] = 100.0
    config = RoutingConfig("sigmoid_group_topk", 2, False, 1, 1, 1.0)
    weights, ids = route(logits, config, bias)
    assert (ids == 7).any(dim=1).all()
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, ids))


@pytest.mark.parametrize(("tokens", "top_k", "experts"), list(itertools.product([1, 7, 100, 600], [1, 2, 3], [4, 64])))
def test_plan_groups_tokens_by_expert(tokens: int, top_k: int, experts: int) -> None:
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])  # [T, k]
    weights = torch.rand(tokens, top_k, generator=g)
    plan = make_plan(ids, weights, experts)
    assert plan.num_slots == tokens * top_k
    assert plan.counts.tolist() == torch.bincount(ids.flatten(), minlength=experts).tolist()
    assert plan.group_counts.min() >= 1 and int(plan.group_counts.sum()) == plan.num_slots
    for e, start, count in zip(plan.group_experts, plan.group_starts, plan.group_counts, strict=True):
        rows = plan.token_index[start : start + count]
        # every slot in expert e's group is a token routed to e, each exactly once, in token order
        assert rows.tolist() == torch.nonzero((ids == e).any(1)).flatten().tolist()
        expected_w = torch.stack([weights[t][ids[t] == e][0] for t in rows.tolist()])
        torch.testing.assert_close(plan.weights[start : start + count], expected_w)


def test_plan_drops_expert_parallel_sentinels() -> None:
    ids = torch.tensor([[0, 8], [8, 2], [2, 0]])
    plan = make_plan(ids, torch.ones(3, 2), num_experts=8)
    assert plan.num_slots == 4
    assert plan.group_experts.tolist() == [0, 2]
    assert plan.token_index.tolist() == [0, 2, 1, 2]


@pytest.mark.parametrize(
    ("config", "experts", "message"),
    [
        (RoutingConfig("softmax_topk", 9), 8, "top_k=9"),
        (RoutingConfig("softmax_topk", 0), 8, "top_k=0"),
        (RoutingConfig("nearest", 2), 8, "unknown routing mode 'nearest'"),
        (RoutingConfig("sigmoid_group_topk", 2, n_group=3), 8, "n_group=3"),
        (RoutingConfig("sigmoid_group_topk", 2, n_group=4, topk_group=5), 8, "topk_group=5"),
        (RoutingConfig("sigmoid_group_topk", 6, n_group=4, topk_group=2), 8, "exceeds"),
    ],
)
def test_bad_config_is_rejected(config: RoutingConfig, experts: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        route(logits_of(3, experts), config)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_are_rejected(bad: float) -> None:
    logits = logits_of(4, 8)
    logits[2, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        route(logits, RoutingConfig("softmax_topk", 2))


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
        route(torch.randn(8), RoutingConfig("softmax_topk", 2))
    with pytest.raises(ValueError, match="score_bias"):
        route(logits_of(2, 8), RoutingConfig("sigmoid_group_topk", 2), torch.zeros(7))
    with pytest.raises(ValueError, match="must both be"):
        make_plan(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1), 4)
