"""Routing statistics: how often each expert is used, and how well a per-layer expert cache can do.

Before buying memory for an offloaded model, the question is how much of each layer's expert traffic a cache
of C experts can serve. Two numbers answer it per layer, from the routing of real text:

- **Activation shares**: the fraction of all (token, expert) activations that go to each expert. The C largest
  shares add up to the hit rate of a *static* cache that pins the C most used experts.
- **SCH, the segment cache best hit rate** of Liang et al., "Not All Models Suit Expert Offloading: On Local
  Routing Consistency of Mixture-of-Expert Models" (arXiv 2505.16056): the hit rate of a cache of C experts
  per layer that may look m tokens ahead. In our words: tokens are served in order, and a token's k experts
  one at a time in the router's order. A cached expert is a hit. A missing one is loaded; when all C slots
  are taken, the cache evicts the expert that the segment of m tokens starting at the current one will still
  use the fewest times (uses already served do not count), ties going to the least recently used. Empty
  slots fill without a miss, as the paper's authors count it: the cache starts out holding the first C
  distinct experts, so SCH measures steady-state locality and C = E gives 1. SCH = hits / (T * k).
  m = 1 is a cache with no look-ahead beyond the current token (LRU among the experts it does not need);
  a larger m rewards routing that stays on the same experts for stretches of tokens. The paper evaluates
  m in {4, 16, 64, 256} and finds most models balance hit rate against memory near C = 2k.

Two small differences from the authors' published numbers: they count a token's hits against the cache as
it was before any of that token's experts is loaded (we serve the experts one at a time, which differs only
when loading one evicts another that the same token still needs), and they average 512-token samples with
fresh caches where we run the whole token stream through one cache per layer.

Shape legend: T tokens, k experts per token, E experts per layer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..layer import MoELayer
from ..models.loader import LoadedModel
from ..models.quantized import moe_layers
from ..routing import route
from .lean import Runner

DEFAULT_SEGMENT = 16  # tokens of look-ahead, the middle of the paper's {4, 16, 64, 256}


def collect_routing(
    model: LoadedModel | nn.Module, token_ids: Sequence[int] | torch.Tensor, *, context: int | None = None
) -> list[torch.Tensor]:
    """The experts every MoE layer chooses for each token of ``token_ids``.

    The tokens run through the model in consecutive windows of ``context`` tokens (each token once, seeing the
    tokens before it in its window); a forward hook on each MoE layer routes the layer's input again with the
    layer's own router and routing function, so the ids are exactly those its forward used.

    Args:
        model: a :class:`LoadedModel` or a transformers CausalLM patched by ``moerun.patch``.
        token_ids: [T] token ids.
        context: window length (default: the model's context, max_position_embeddings).

    Returns:
        one [T, k] int64 tensor of expert ids per MoE layer, in forward order; each row in the router's order
        (highest weight first for the softmax routers).

    Raises:
        ValueError: no moerun MoE layers, no tokens, or a context out of range.
    """
    if isinstance(model, LoadedModel):
        model = model.model
    layers = list(moe_layers(model).values())
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moerun MoE layers; load it with moerun.load or patch it")
    ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()  # [T]
    if ids.numel() == 0:
        raise ValueError("collect_routing needs at least one token")
    max_context = int(model.config.max_position_embeddings)
    context = max_context if context is None else context
    if not 1 <= context <= max_context:
        raise ValueError(f"context must be between 1 and the model's context of {max_context} tokens, got {context}")
    chosen: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook_for(i: int):
        def hook(layer: MoELayer, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, layer.hidden_size)  # [L, H], one window of batch 1
            _, experts = route(layer.router_logits(x), layer.routing, layer.score_bias)  # [L, k]
            chosen[i].append(experts.cpu())

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for start in range(0, ids.numel(), context):
                model.model(input_ids=ids[start : start + context].view(1, -1), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in chosen]


def _check_selected(selected: torch.Tensor, num_experts: int | None = None) -> None:
    if selected.dim() != 2 or selected.numel() == 0:
        raise ValueError(f"selected experts must be a non-empty [tokens, top_k] tensor, got {tuple(selected.shape)}")
    if selected.is_floating_point():
        raise ValueError(f"selected experts must be integer ids, got {selected.dtype}")
    if int(selected.min()) < 0 or (num_experts is not None and int(selected.max()) >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}), got {int(selected.min())}..{int(selected.max())}")


def activation_frequencies(selected: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each expert's share of all activations.

    Args:
        selected: [T, k] expert ids.
        num_experts: E.

    Returns:
        [E] float64 shares: the number of (token, slot) pairs routed to each expert over T * k; they sum to 1.
    """
    _check_selected(selected, num_experts)
    counts = torch.bincount(selected.reshape(-1).long(), minlength=num_experts)  # [E]
    return counts.double() / selected.numel()


def segment_cache_hit_rate(selected: torch.Tensor, cache_size: int, segment: int = DEFAULT_SEGMENT) -> float:
    """SCH: the hit rate of a cache of ``cache_size`` experts that sees ``segment`` tokens ahead (module docs).

    Args:
        selected: [T, k] expert ids of one layer, rows in the order the token's experts are served.
        cache_size: C, experts the cache holds.
        segment: m, tokens of routing the cache knows when serving a token: that token and the m - 1 after it.

    Returns:
        hits / (T * k), in [0, 1].
    """
    _check_selected(selected)
    if cache_size < 1 or segment < 1:
        raise ValueError(f"cache_size and segment must be >= 1, got {cache_size} and {segment}")
    rows: list[list[int]] = selected.tolist()
    # remaining[e]: uses of e from the access being served to the end of the look-ahead, that one included.
    remaining: defaultdict[int, int] = defaultdict(int)
    for row in rows[: segment - 1]:
        for e in row:
            remaining[e] += 1
    last_use: dict[int, int] = {}  # access number of each expert's latest use: the LRU tie-break
    cache: set[int] = set()
    hits = served = 0
    for t, row in enumerate(rows):
        if t + segment - 1 < len(rows):  # token t + m - 1 comes into view
            for e in rows[t + segment - 1]:
                remaining[e] += 1
        for e in row:
            remaining[e] -= 1
            if e in cache:
                hits += 1
            elif len(cache) < cache_size:  # a free slot: the paper counts it as filled ahead of time
                cache.add(e)
                hits += 1
            else:
                victim = min(cache, key=lambda c: (remaining[c], last_use[c]))
                cache.remove(victim)
                cache.add(e)
            last_use[e] = served
            served += 1
    return hits / served


def static_cache_hit_rate(shares: torch.Tensor, cache_size: int) -> float:
    """Hit rate of a cache that always holds the ``cache_size`` most used experts. shares: [E] summing to 1."""
    return float(shares.topk(min(cache_size, shares.numel())).values.sum())


def default_cache_sizes(top_k: int, num_experts: int) -> list[int]:
    """k, 2k and 4k experts, capped at E, without repeats."""
    return list(dict.fromkeys(min(n * top_k, num_experts) for n in (1, 2, 4)))


@dataclass(frozen=True)
class LayerRoutingStats:
    """One MoE layer's routing summary; cache sizes are in experts."""

    layer: int  # position among the model's MoE layers
    shares: list[float]  # [E] share of activations per expert, summing to 1
    sch: dict[int, float]  # cache size -> segment cache best hit rate
    static: dict[int, float]  # cache size -> hit rate of pinning the most used experts

    @property
    def effective_experts(self) -> float:
        """exp(entropy of the shares): E when routing is perfectly balanced, 1 when one expert takes all."""
        return math.exp(-sum(p * math.log(p) for p in self.shares if p > 0))


@dataclass(frozen=True)
class RoutingStats:
    """Routing statistics of a model over some tokens."""

    tokens: int  # T
    num_experts: int  # E
    top_k: int  # k
    segment: int  # m
    cache_sizes: list[int]
    layers: list[LayerRoutingStats]

    def mean_sch(self) -> dict[int, float]:
        """Cache size -> SCH averaged over the layers."""
        return {c: sum(s.sch[c] for s in self.layers) / len(self.layers) for c in self.cache_sizes}

    def to_dict(self) -> dict:
        layers = [{**asdict(s), "effective_experts": s.effective_experts} for s in self.layers]
        # JSON object keys are strings: cache sizes become "2", "4", ...
        return {**asdict(self), "layers": layers, "mean_sch": self.mean_sch()}


def routing_stats(
    selected: Sequence[torch.Tensor], num_experts: int, cache_sizes: Sequence[int], segment: int = DEFAULT_SEGMENT
) -> RoutingStats:
    """Activation shares, SCH and static hit rates of every layer.

    Args:
        selected: one [T, k] tensor of expert ids per MoE layer (from :func:`collect_routing`).
        num_experts: E.
        cache_sizes: cache sizes in experts per layer, each in [1, E].
        segment: m, SCH's look-ahead in tokens.

    Raises:
        ValueError: no layers, layers of different shapes, or a cache size or segment out of range.
    """
    if not selected:
        raise ValueError("routing_stats needs the routing of at least one layer")
    shapes = {tuple(s.shape) for s in selected}
    if len(shapes) != 1:
        raise ValueError(f"every layer must route the same tokens with the same top_k, got shapes {sorted(shapes)}")
    tokens, top_k = selected[0].shape
    bad = [c for c in cache_sizes if not 1 <= c <= num_experts]
    if not cache_sizes or bad:
        raise ValueError(f"cache sizes must be between 1 and the {num_experts} experts of a layer, got {bad}")
    layers = []
    for i, layer_ids in enumerate(selected):
        shares = activation_frequencies(layer_ids, num_experts)
        sch = {c: segment_cache_hit_rate(layer_ids, c, segment) for c in cache_sizes}
        static = {c: static_cache_hit_rate(shares, c) for c in cache_sizes}
        layers.append(LayerRoutingStats(i, shares.tolist(), sch, static))
    return RoutingStats(tokens, num_experts, top_k, segment, list(cache_sizes), layers)


def replay_decode(runner: Runner, token_ids: Sequence[int], context: int) -> None:
    """Run the tokens through ``runner`` one decode step at a time (teacher-forced), in windows of ``context``
    tokens: the access pattern of generation, for measuring an expert cache on text. The runner must hold
    ``context`` tokens."""
    for start in range(0, len(token_ids), context):
        window = list(token_ids[start : start + context])
        runner.reset()
        runner.prefill(torch.tensor(window[:1]))
        for token in window[1:]:
            runner.decode(token)
