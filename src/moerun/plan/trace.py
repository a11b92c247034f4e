"""Routing traces, and the expert cache replayed over them exactly.

A trace is what each MoE layer selected for each calibration token, with expert skipping as configured, and
what the offloaded layer before it would have predicted for it (the next layer's router on the current
layer's input, as ``moerun.offload.OffloadedExperts`` predicts). Replaying it through moerun's own
``ExpertCache`` and eviction policies, over a store that reads nothing, gives the hits, misses and prefetches
a decode of that text makes: the cache's decisions, not an estimate of them.

Shape legend: T tokens, k experts per token, L MoE layers.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from ..layer import MoELayer
from ..models.quantized import moe_layers
from ..offload.cache import ExpertCache, LayerCacheStats
from ..offload.offloaded import eviction_policy


@dataclass(frozen=True)
class RoutingTrace:
    """Per MoE layer: the experts each token selected and those the layer before predicted for it.

    Attributes:
        selected: L tensors [T, k] int64; skipped pairs hold the sentinel E.
        predicted: L tensors [T, k] int64, the previous layer's prediction (row 0 of layer 0: none, all E).
        num_experts: E.
        top_ks: k of each layer.
    """

    selected: list[torch.Tensor]
    predicted: list[torch.Tensor]
    num_experts: int
    top_ks: list[int]

    @property
    def num_tokens(self) -> int:
        return self.selected[0].shape[0]

    def first(self, tokens: int) -> RoutingTrace:
        """The trace of the first ``tokens`` tokens."""
        return RoutingTrace([s[:tokens] for s in self.selected], [p[:tokens] for p in self.predicted],
                            self.num_experts, self.top_ks)  # fmt: skip

    def skipped_share(self) -> float:
        """The share of (token, expert) pairs the trace skipped."""
        total = sum(s.numel() for s in self.selected)
        return sum(int((s >= self.num_experts).sum()) for s in self.selected) / max(total, 1)


class TraceRecorder:
    """Records the routing of every forward ``model`` runs inside ``with``; ``trace()`` returns it afterwards.
    With ``keep_inputs``, each MoE layer's inputs [T, H] are kept too (``inputs``, by layer name), for
    calibrations that would otherwise run the text again. Tracing is not a run: the layers' skip counters are
    left as they were.

    Raises:
        ValueError: a model without MoE layers, or layers of different expert counts.
    """

    def __init__(self, model: nn.Module, keep_inputs: bool = False) -> None:
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("the model has no moerun MoE layer to trace")
        self.num_experts = next(iter(self.layers.values())).num_experts
        if any(layer.num_experts != self.num_experts for layer in self.layers.values()):
            raise ValueError("tracing needs every MoE layer to have the same number of experts")
        self.keep_inputs = keep_inputs
        self._selected: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._predicted: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._hooks: list = []
        self._counts: list[list[int]] = []

    def _hook(self, i: int, following: MoELayer | None):
        def hook(module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            with torch.no_grad():
                ids = module._select_and_skip(x)[1] if module.skipping is not None else module.select_experts(x)[1]
                self._selected[i].append(ids)
                if following is not None:
                    self._predicted[i + 1].append(following.select_experts(x)[1])
                if i == 0:
                    self._predicted[0].append(torch.full_like(ids, self.num_experts))
            if self.keep_inputs:
                self._inputs[i].append(x.detach().clone())

        return hook

    def __enter__(self) -> TraceRecorder:
        layers = list(self.layers.values())
        self._counts = [list(layer.skip_counts) for layer in layers]
        for i, layer in enumerate(layers):
            following = layers[i + 1] if i + 1 < len(layers) else None
            self._hooks.append(layer.register_forward_pre_hook(self._hook(i, following)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer, count in zip(self.layers.values(), self._counts, strict=True):
            layer.skip_counts = count

    def trace(self) -> RoutingTrace:
        return RoutingTrace(
            [torch.cat(s) for s in self._selected],
            [torch.cat(p) for p in self._predicted],
            self.num_experts,
            [layer.routing.top_k for layer in self.layers.values()],
        )

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts) for name, parts in zip(self.layers, self._inputs, strict=True) if parts}


@torch.no_grad()
def record_trace(model: nn.Module, token_ids: list[int], window: int) -> RoutingTrace:
    """Run ``token_ids`` through ``model`` in windows of ``window`` tokens and record its routing (with the
    layers' current expert skipping)."""
    with TraceRecorder(model) as recorder:
        for start in range(0, len(token_ids), window):
            model(torch.tensor([token_ids[start : start + window]]), use_cache=False)
    return recorder.trace()


class _NullStore:
    """A store whose reads cost nothing and move nothing: the cache's bookkeeping alone."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def slot_nbytes(self) -> int:
        return 1

    def read(self, layer: int, expert: int, slot: torch.Tensor) -> int:
        return 1


class _DeferredExecutor:
    """Runs the cache's prefetch reads when told to (``run``), outside the cache's lock, so a replay is
    deterministic: every prefetch completes before the next layer's call, as when prefetching keeps up."""

    def __init__(self) -> None:
        self._pending: list[tuple[Future, object, tuple]] = []

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._pending.append((future, fn, args))
        return future

    def run(self) -> None:
        while self._pending:
            future, fn, args = self._pending.pop(0)
            fn(*args)
            future.set_result(None)


@dataclass(frozen=True)
class CacheReplay:
    """What a decode of the trace does with the cache, per token and MoE layer (means).

    Attributes:
        hit_rate: share of expert accesses found resident (prefetched ones included).
        demand_reads: experts read at the moment a layer needs them.
        prefetch_reads: experts read ahead by a prefetch.
        prefetch_used: of those, the ones the layer then selected.
    """

    hit_rate: float
    demand_reads: float
    prefetch_reads: float
    prefetch_used: float


def replay_cache(trace: RoutingTrace, num_slots: int, policy: str, prefetch: bool, warmup: int = 0) -> CacheReplay:
    """Decode the trace token by token through an ``ExpertCache`` of ``num_slots`` slots, with the eviction
    policy and prefetching an offloaded load would use (``offload_experts``). The first ``warmup`` tokens stand
    for the prompt: they fill the cache as a prefill does and are not counted.

    Prefetching is replayed as always issued for the predicted uncached experts (at runtime it is skipped
    where measurement says it does not pay) and always complete in time; the time it costs is the performance
    model's.
    """
    num_layers = len(trace.selected)
    cache = ExpertCache(_NullStore(num_layers), num_slots, eviction_policy(policy, trace.top_ks, prefetch))
    executor = _DeferredExecutor()
    if prefetch:
        cache._executor = executor
    selected = [s.tolist() for s in trace.selected]
    predicted = [p.tolist() for p in trace.predicted]
    sentinel = trace.num_experts
    for t in range(trace.num_tokens):
        if t == warmup and t:
            cache.stats = [LayerCacheStats() for _ in range(num_layers)]
        for layer in range(num_layers):
            experts = sorted({e for e in selected[layer][t] if e < sentinel})
            cache.acquire(layer, experts)
            if prefetch and layer + 1 < num_layers:
                ahead = sorted(set(predicted[layer + 1][t]))
                if len(ahead) <= num_slots // 2:  # as OffloadedExperts: many predictions would evict this layer's
                    cache.prefetch(layer + 1, cache.uncached(layer + 1, ahead))
                    executor.run()
            cache.release(layer, experts)
    total = LayerCacheStats.total(cache.stats)
    steps = max((trace.num_tokens - min(warmup, trace.num_tokens)) * num_layers, 1)
    misses = total.accesses - total.hits
    return CacheReplay(
        hit_rate=total.hits / total.accesses if total.accesses else 1.0,
        demand_reads=misses / steps,
        prefetch_reads=total.prefetched / steps,
        prefetch_used=total.prefetch_hits / steps,
    )
