"""MoE layers whose routed experts come from an :class:`ExpertCache` instead of resident weights.

Each layer computes its routing as usual, then takes its selected experts from the cache, at most a
cache's worth at a time: groups run in consecutive parts that accumulate into one float32 output, each
part with the fusion choice of the whole plan, so the native kernel adds exactly what the resident layer's
single call adds (bit for bit). A layer also predicts the next layer's experts (Fate's cross-layer gate:
the next router applied to this layer's input) and has the cache read them in the background while it
computes; the next layer scores the prediction against its real selection.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..kernels.experts import ExpertWeights, experts_forward, experts_native, fuses_glu, native_supports
from ..layer import MoELayer
from ..quant.formats import ExpertMatrices, Weight
from ..routing import RoutingPlan
from ..sizes import format_size, parse_size
from .cache import ExpertCache, LFUPolicy, make_policy
from .store import ExpertLayout, ExpertStore, meta_like

# Running means (prediction accuracy, lead time) weigh the last ~1 / RUNNING_MEAN_DECAY tokens.
RUNNING_MEAN_DECAY = 1 / 8
# Storage speed assumed for the prefetch decision until reads have been timed.
ASSUMED_STORAGE_BYTES_PER_S = 1e9


def prefetch_pays(accuracy: float, lead_s: float, read_s: float) -> bool:
    """Whether prefetching a layer's predicted experts is expected to save more stall than it adds.

    A right prediction hides up to ``lead_s`` (the time from the prediction to the layer) of its read; a wrong
    one reads an expert nobody uses, in front of the demand reads: up to ``read_s`` of added stall. Measured
    on a random model whose predictions came true 39% of the time, prefetching on a weaker rule (accuracy
    >= 0.4) decoded at 0.71-0.96x on-demand LRU between 20% and 60% of the expert bytes.
    """
    return accuracy * min(lead_s, read_s) > (1.0 - accuracy) * read_s


class OffloadedExperts:
    """The routed experts of MoE layer ``index``, read through ``cache`` (a layer's ``offload`` hook).

    Args:
        cache: the model's expert cache.
        index: this layer's position among the model's MoE layers.
        layer: the layer (routing config, biases, activation).
        next_layer: the next MoE layer and its hook, to prefetch for; None for the last or without prefetch.
    """

    def __init__(
        self,
        cache: ExpertCache,
        index: int,
        layer: MoELayer,
        next_layer: tuple[MoELayer, OffloadedExperts] | None = None,
    ) -> None:
        self.cache = cache
        self.index = index
        self.layer = layer
        self.next_layer = next_layer
        self.layouts: list[ExpertLayout] = cache.store.layouts[index]
        self.expected: set[int] | None = None  # experts the previous layer predicted for this one
        # Slot address -> (expert, its (gate_up, down) views over the slot): decode reuses a cached expert's
        # views instead of rebuilding a dozen tensor views per expert and token.
        self._views: dict[int, tuple[int, tuple]] = {}
        self.accuracy = 0.5  # running share of those predictions this layer then selected
        self.lead_s = 0.0  # running time from the previous layer's prediction to this layer's call
        self._predicted_at = 0.0

    def _predict_next(self, x: torch.Tensor) -> None:
        layer, hook = self.next_layer
        _, ids = layer.select_experts(x)
        predicted = sorted(set(ids.flatten().tolist()))
        hook.expected = set(predicted)
        hook._predicted_at = time.perf_counter()
        reads = self.cache.store.stats
        bytes_per_s = reads.bytes / reads.seconds if reads.seconds > 0 else ASSUMED_STORAGE_BYTES_PER_S
        read_s = hook.layouts[predicted[0]].nbytes / bytes_per_s
        # Many tokens (prefill) select most experts: reading them all ahead would only evict this layer's.
        if prefetch_pays(hook.accuracy, hook.lead_s, read_s) and len(predicted) <= self.cache.num_slots // 2:
            self.cache.prefetch(self.index + 1, predicted)

    def _matrices(self, expert: int, slot: torch.Tensor) -> tuple:
        """(gate_up, down) of ``expert`` held in ``slot``."""
        held = self._views.get(slot.data_ptr())
        if held is None or held[0] != expert:
            held = (expert, self.layouts[expert].matrices(slot))
            self._views[slot.data_ptr()] = held
        return held[1]

    def __call__(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """The experts' combined output [T, H] in x's dtype for x [T, H] routed by ``plan``."""
        experts = plan.group_experts.tolist()
        stats = self.cache.stats[self.index]
        if self.expected is not None:
            used = len(self.expected.intersection(experts))
            stats.predicted += len(self.expected)
            stats.predicted_used += used
            self.accuracy += RUNNING_MEAN_DECAY * (used / len(self.expected) - self.accuracy)
            self.lead_s += RUNNING_MEAN_DECAY * (time.perf_counter() - self._predicted_at - self.lead_s)
            self.expected = None
        if self.next_layer is not None:
            self._predict_next(x)
        layer = self.layer
        out = None
        fused = None
        for first in range(0, len(experts), self.cache.num_slots):
            part = list(range(first, min(first + self.cache.num_slots, len(experts))))
            ids = [experts[g] for g in part]
            slots = self.cache.acquire(self.index, ids)
            try:
                matrices = [self._matrices(e, slot) for e, slot in zip(ids, slots, strict=True)]
                index = torch.tensor(ids)
                w = ExpertWeights(
                    ExpertMatrices([m[0] for m in matrices]),
                    ExpertMatrices([m[1] for m in matrices]),
                    None if layer.gate_up_bias is None else layer.gate_up_bias[index],
                    None if layer.down_bias is None else layer.down_bias[index],
                    layer.glu,
                )
                sub = replace(
                    plan,
                    group_experts=torch.arange(len(part)),
                    group_starts=plan.group_starts[first : first + len(part)],
                    group_counts=plan.group_counts[first : first + len(part)],
                )
                if len(part) == len(experts):  # one part: exactly the resident layer's call
                    return experts_forward(x, sub, w, layer.backend)
                if not native_supports(x, w):
                    y = experts_forward(x, sub, w, layer.backend).float()
                    out = y if out is None else out.add_(y)
                    continue
                if out is None:
                    out = torch.zeros(plan.num_tokens, layer.hidden_size, dtype=torch.float32)
                    fused = fuses_glu(plan, w)
                experts_native(x, sub, w, out=out, fused=fused)
            finally:
                self.cache.release(self.index, ids)
        return out.to(x.dtype)


def _meta_like(weight: Weight) -> Weight:
    """A weight of the same shape, dtype and format with no storage (offloaded experts are never resident)."""
    if isinstance(weight, ExpertMatrices):
        return ExpertMatrices([meta_like(m) for m in weight.matrices])
    meta = meta_like(weight)
    return nn.Parameter(meta, requires_grad=False) if isinstance(weight, nn.Parameter) else meta


def offload_experts(
    layers: list[MoELayer],
    destinations: list[tuple[Path, int, torch.dtype, torch.Tensor]],
    memory_budget: str | int,
    policy: str = "lfu",
    prefetch: bool = True,
    bypass_page_cache: bool = True,
) -> ExpertCache:
    """Leave the routed experts of ``layers`` in the checkpoint and run them through an expert cache.

    Args:
        layers: the model's MoE layers in order, with their (uninitialised, untouched) expert storage.
        destinations: every checkpoint tensor as (file, offset, stored dtype, model storage it fills).
        memory_budget: cache bytes: an int, or a size such as "6GB", "512MiB", or "40%" of the experts' bytes.
        policy: eviction policy, ``lru`` or ``lfu``.
        prefetch: predict each next layer's experts and read them in the background.
        bypass_page_cache: read storage, not the OS page cache (see :class:`ExpertStore`).

    Returns:
        the cache (its ``stats`` per layer, its ``store.stats`` for storage reads); the layers' expert
        storage is released and their ``offload`` hooks set.

    Raises:
        ValueError: a budget below one layer's selected experts (the message names the minimum), or a
            checkpoint that does not hold every expert.
    """
    store = ExpertStore(layers, destinations, bypass_page_cache)
    expert_bytes = sum(store.expert_nbytes(li, e) for li, layer in enumerate(layers) for e in range(layer.num_experts))
    budget = memory_budget if isinstance(memory_budget, int) else parse_size(memory_budget, expert_bytes)
    slot = store.slot_nbytes()
    needed = max(layer.routing.top_k for layer in layers)
    if budget < needed * slot:
        raise ValueError(
            f"memory budget {format_size(budget)} is below one layer's selected experts: at least "
            f"{format_size(needed * slot)} ({needed} experts of {format_size(slot)}) are needed"
        )
    total_experts = sum(layer.num_experts for layer in layers)
    eviction = make_policy(policy)
    if isinstance(eviction, LFUPolicy):  # forget at the pace of 16 decoded tokens; favour what no prediction covers
        eviction = LFUPolicy(16 * sum(layer.routing.top_k for layer in layers), frozenset({0} if prefetch else ()))
    cache = ExpertCache(store, min(budget // slot, total_experts), eviction, prefetch)
    hooks: list[OffloadedExperts] = []
    for index in reversed(range(len(layers))):
        following = (layers[index + 1], hooks[0]) if prefetch and index + 1 < len(layers) else None
        hooks.insert(0, OffloadedExperts(cache, index, layers[index], following))
    for layer, hook in zip(layers, hooks, strict=True):
        layer.offload = hook
        layer.gate_up, layer.down = _meta_like(layer.gate_up), _meta_like(layer.down)
    return cache
