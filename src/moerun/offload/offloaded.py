"""MoE layers whose routed experts come from an :class:`ExpertCache` instead of resident weights.

Each layer computes its routing as usual, then takes its selected experts from the cache, at most a
cache's worth at a time: groups run in consecutive parts into one shared output, so the parts give bit for
bit what the resident layer's single call gives: with the native kernel they accumulate into one float32
[T, H], each part with the fusion choice of the whole plan; with torch they write their rows of one sorted
[S, H] buffer, combined once at the end.

A layer also predicts the next layer's experts (Fate's cross-layer gate: the next router applied to this
layer's input) and has the cache read them in the background while it computes; the next layer scores the
prediction against its real selection. Prefetching pays only when the predictions for experts that are not
cached come true often enough (see :func:`prefetch_pays`); each layer measures that accuracy whether it
prefetches or not, so a layer that stopped can start again.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import MemoryBudgetError
from ..experts import Experts, ResidentExperts
from ..kernels import native
from ..kernels.experts import (
    ExpertWeights,
    combine,
    experts_forward,
    experts_native,
    experts_torch,
    fuses_glu,
    native_supports,
)
from ..layer import MoELayer
from ..quant.formats import ExpertMatrices, QuantizedWeight, Weight, conversions_nbytes
from ..routing import RoutingPlan
from ..sizes import budget_bytes, format_size
from .cache import ExpertCache, LFUPolicy, LRUPolicy, make_policy, running_mean
from .store import ExpertLayout, ExpertStore, meta_like

# Storage speed assumed for the prefetch decision until reads have been timed.
ASSUMED_STORAGE_BYTES_PER_S = 1e9


def prefetch_pays(accuracy: float, lead_s: float, read_s: float, busy: float, cpu_s: float = 0.0) -> bool:
    """Whether reading a layer's predicted, uncached experts ahead is expected to save more time than it costs.

    Args:
        accuracy: share of the predictions for uncached experts that the layer then selected.
        lead_s: time from the prediction to the layer; a right prediction hides up to that much of its read.
        read_s: time to read one expert. A wrong prediction reads an expert nobody uses, which delays the demand
            reads as far as storage is busy with them anyway.
        busy: share of the time storage spends reading, in [0, 1].
        cpu_s: CPU time the prefetch thread spends on a read, right or wrong. On a host whose cores the
            computation fills (2 cores, 2 threads here) it comes out of the computation: 0.13 ms for a 384 KiB
            expert of the reference model, a quarter of the 0.5 ms read a right prediction hides at best.

    Only predictions for uncached experts count: a prediction for an expert already cached costs nothing and
    saves nothing. On the random-weight OLMoE-shaped model, 39% of all predictions come true but only 1-17% of
    those for uncached experts, against 45-71% on the trained reference model; gating on all predictions
    made that random model decode at 0.80-0.99x on-demand LRU at 20-30% of the expert bytes, where storage
    is busy.
    """
    return accuracy * min(lead_s, read_s) > (1.0 - accuracy) * read_s * busy + cpu_s


def _cores_are_full() -> bool:
    """Whether torch's threads take every core this process may run on (a prefetch then preempts them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return torch.get_num_threads() >= cores


def _own_slots(plan: RoutingPlan, sub: RoutingPlan) -> RoutingPlan:
    """``sub`` (consecutive groups of ``plan``) as a plan of its groups' slots alone, [S'] of ``plan``'s [S]: any
    backend runs it on its own, as it computes and combines only the slots it is given."""
    lo = int(sub.group_starts[0])
    hi = int(sub.group_starts[-1] + sub.group_counts[-1])
    return replace(
        sub,
        token_index=plan.token_index[lo:hi],
        weights=plan.weights[lo:hi],
        counts=sub.group_counts,
        group_starts=sub.group_starts - lo,
        slot_of=plan.slot_of[lo:hi],
    )


class OffloadedExperts(Experts):
    """The routed experts of MoE layer ``index``, read through ``cache``: what the layer calls instead of its
    ``ResidentExperts`` once offloaded (``offload_experts`` swaps them).

    Args:
        cache: the model's expert cache.
        index: this layer's position among the model's MoE layers.
        resident: the experts replaced (activation, backend and biases, which stay in memory).
        next_layer: the next MoE layer and its experts, to prefetch for; None for the last or without prefetch.
        slot_views: the views over the cache's slots, shared by every layer of the cache (None: this layer's own).

    Attributes:
        gate_up, down: stand-ins of the experts' weights without storage (same shape, dtype and format).
        formats: the experts' formats as for ``ResidentExperts``.

    Forward: as ``Experts``; for inference only (a forward that autograd records raises ValueError).
    """

    def __init__(
        self,
        cache: ExpertCache,
        index: int,
        resident: ResidentExperts,
        next_layer: tuple[MoELayer, OffloadedExperts] | None = None,
        slot_views: dict[int, tuple[int, int, tuple]] | None = None,
    ) -> None:
        super().__init__(
            resident.num_experts, resident.hidden_size, resident.intermediate_size, resident.glu, resident.backend
        )
        self.gate_up_bias, self.down_bias = resident.gate_up_bias, resident.down_bias
        # Storage-free stand-ins with the stored experts' shapes, dtypes and formats (for sizes and shapes).
        self.gate_up, self.down = _meta_like(resident.gate_up), _meta_like(resident.down)
        self.formats = resident.formats
        self.cache = cache
        self.index = index
        self.next_layer = next_layer
        self.layouts: list[ExpertLayout] = cache.store.layouts[index]
        self.expected: set[int] | None = None  # experts the previous layer predicted for this one
        self.expected_uncached: set[int] = set()  # of those, experts not cached when predicted
        # Slot address -> (MoE layer, expert, its (gate_up, down) views over the slot), shared by the layers of
        # one cache: decode reuses a cached expert's views instead of rebuilding a dozen tensor views per expert
        # and token, and a slot holds one expert's views (and their int4 conversions) whichever layer used it.
        self._views = {} if slot_views is None else slot_views
        # Running means, None until first measured: the share of the uncached one-token predictions this
        # layer then selected, the time from the previous layer's prediction to this layer's call, and the
        # share of the time between this layer's calls that storage spent reading.
        self.accuracy: float | None = None
        self.lead_s: float | None = None
        self.busy: float | None = None
        self._predicted_at = 0.0
        self._last_call: tuple[float, float] | None = None  # (time, store.busy_s) at this layer's last call

    def _predict_next(self, x: torch.Tensor) -> None:
        layer, following = self.next_layer
        _, ids = layer.select_experts(x)
        predicted = sorted(set(ids.flatten().tolist()))
        following.expected, following.expected_uncached = set(predicted), set()
        following._predicted_at = time.perf_counter()
        # Many tokens (prefill) select most experts: reading them all ahead would only evict this layer's. Their
        # predictions are not scored either: they come true far more often than one token's.
        if len(predicted) > self.cache.num_slots // 2:
            return
        uncached = self.cache.uncached(self.index + 1, predicted)
        following.expected_uncached = set(uncached)
        if not uncached or following.accuracy is None or following.lead_s is None or following.busy is None:
            return
        reads = self.cache.store.stats
        bytes_per_s = reads.bytes / reads.seconds if reads.seconds > 0 else ASSUMED_STORAGE_BYTES_PER_S
        read_s = following.layouts[uncached[0]].nbytes / bytes_per_s
        cpu_s = self.cache.prefetch_cpu_s if _cores_are_full() else 0.0
        if prefetch_pays(following.accuracy, following.lead_s, read_s, following.busy, cpu_s or 0.0):
            self.cache.prefetch(self.index + 1, uncached)

    def _score_prediction(self, experts: list[int]) -> None:
        """Count the previous layer's prediction against the experts selected, and update the running means."""
        now, busy_s = time.perf_counter(), self.cache.store.busy_s
        if self._last_call is not None and now > self._last_call[0]:
            busy = min(1.0, (busy_s - self._last_call[1]) / (now - self._last_call[0]))
            self.busy = running_mean(self.busy, busy)
        self._last_call = (now, busy_s)
        if self.expected is None:
            return
        stats = self.cache.stats[self.index]
        stats.predicted += len(self.expected)
        stats.predicted_used += len(self.expected.intersection(experts))
        if self.expected_uncached:
            used = len(self.expected_uncached.intersection(experts))
            stats.predicted_uncached += len(self.expected_uncached)
            stats.predicted_uncached_used += used
            self.accuracy = running_mean(self.accuracy, used / len(self.expected_uncached))
            self.lead_s = running_mean(self.lead_s, now - self._predicted_at)
        self.expected = None

    def _matrices(self, expert: int, slot: torch.Tensor) -> tuple:
        """(gate_up, down) of ``expert`` held in ``slot``."""
        held = self._views.get(slot.data_ptr())
        if held is None or held[:2] != (self.index, expert):
            # The views keep their own conversions (torch's int4 GEMM layout, made on first use) for as long as
            # the slot holds this expert: dequantizing an int4 matrix at every call is ~100x slower off the
            # native kernel. They cost up to the slot's bytes again.
            matrices = tuple(
                replace(m, conversions={}) if isinstance(m, QuantizedWeight) else m
                for m in self.layouts[expert].matrices(slot)
            )
            held = (self.index, expert, matrices)
            self._views[slot.data_ptr()] = held
        return held[2]

    def _parts_output(self, x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights) -> tuple[str, torch.Tensor]:
        """How a plan's parts add up, and the output they share, for x [T, H] and a part's weights ``w``.

        ``native``: each part accumulates into one float32 [T, H] (``experts_native(out=...)``), fused as the
        whole plan would be. ``torch``: each part writes its groups' rows of one sorted [S, H] buffer in x's
        dtype (``experts_torch(out_sorted=...)``), combined once with the whole plan. Both give bit for bit
        what the layer's backend gives resident; ``auto`` picks between them by the fixed rule for unpacked
        weights (native where it runs). ``sum``: any other backend (the reference) runs each part as a plan of
        its own slots (``_own_slots``) and the parts' outputs are summed in float32: close to one call, but
        rounded per part.
        """
        backend = self.backend
        if backend in ("auto", "native") and native_supports(x, w):
            return "native", torch.zeros(plan.num_tokens, self.hidden_size, dtype=torch.float32)
        if backend in ("auto", "torch"):
            return "torch", x.new_empty(plan.num_slots, self.hidden_size)  # every part writes its rows
        # The native backend where it cannot run lands here too: its first part raises as a resident call does.
        return "sum", torch.zeros(plan.num_tokens, self.hidden_size, dtype=torch.float32)

    def forward(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        records = x.requires_grad or plan.weights.requires_grad or any(p.requires_grad for p in self.parameters())
        if torch.is_grad_enabled() and records:
            raise ValueError(
                "offloaded experts (a memory budget) run for inference only and cannot record gradients: call the "
                "model under torch.no_grad() or torch.inference_mode()"
            )
        if plan.num_tokens == 0:  # no experts selected: nothing to read, predict or score
            return x.new_zeros(0, self.hidden_size)
        experts = plan.group_experts.tolist()
        self._score_prediction(experts)
        mode, out, fused = None, None, None
        for first in range(0, len(experts), self.cache.num_slots):
            part = list(range(first, min(first + self.cache.num_slots, len(experts))))
            ids = [experts[g] for g in part]
            slots = self.cache.acquire(self.index, ids)
            if first == 0 and self.next_layer is not None:
                # After this layer's own reads: prefetches overlap its computation, not its demand reads.
                self._predict_next(x)
            try:
                matrices = [self._matrices(e, slot) for e, slot in zip(ids, slots, strict=True)]
                index = torch.tensor(ids)
                w = ExpertWeights(
                    ExpertMatrices([m[0] for m in matrices]),
                    ExpertMatrices([m[1] for m in matrices]),
                    None if self.gate_up_bias is None else self.gate_up_bias[index],
                    None if self.down_bias is None else self.down_bias[index],
                    self.glu,
                )
                sub = replace(
                    plan,
                    group_experts=torch.arange(len(part)),
                    group_starts=plan.group_starts[first : first + len(part)],
                    group_counts=plan.group_counts[first : first + len(part)],
                )
                if len(part) == len(experts):  # one part: exactly the resident layer's call
                    return experts_forward(x, sub, w, self.backend)
                if mode is None:
                    mode, out = self._parts_output(x, plan, w)
                    fused = mode == "native" and fuses_glu(plan, w)
                if mode == "native":
                    experts_native(x, sub, w, out=out, fused=fused)
                elif mode == "torch":
                    experts_torch(x, sub, w, out_sorted=out)
                else:
                    out.add_(experts_forward(x, _own_slots(plan, sub), w, self.backend).float())
            finally:
                self.cache.release(self.index, ids)
        return combine(out, plan) if mode == "torch" else out.to(x.dtype)


def _meta_like(weight: Weight) -> Weight:
    """A weight of the same shape, dtype and format with no storage (offloaded experts are never resident)."""
    if isinstance(weight, ExpertMatrices):
        return ExpertMatrices([meta_like(m) for m in weight.matrices])
    meta = meta_like(weight)
    return nn.Parameter(meta, requires_grad=False) if isinstance(weight, nn.Parameter) else meta


def eviction_policy(name: str, top_ks: list[int], prefetch: bool) -> LRUPolicy | LFUPolicy:
    """The eviction policy an offloaded model of MoE layers with these top-k uses: LFU forgets at the pace of
    16 decoded tokens and, with prefetching, favours the first layer, which no prediction covers."""
    eviction = make_policy(name)
    if isinstance(eviction, LFUPolicy):
        eviction = LFUPolicy(16 * sum(top_ks), frozenset({0} if prefetch else ()))
    return eviction


def conversions_nbytes_of(layout: ExpertLayout, dtype: torch.dtype) -> int:
    """Bytes a cache slot's views of this expert add for torch's int4 GEMM layout (``OffloadedExperts._matrices``)
    where the native kernel does not run, for activations in ``dtype``: a budget counts them with the slot."""
    if native.is_available():
        return 0
    return sum(conversions_nbytes(t, dtype) for t in layout.templates if isinstance(t, QuantizedWeight))


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
        memory_budget: cache bytes: an int, or a size such as "6GB", "512MiB", or "40%" of the experts' bytes;
            experts and slots count the int4 GEMM layout torch's path keeps beside them (``conversions_nbytes_of``).
        policy: eviction policy, ``lru`` or ``lfu``.
        prefetch: predict each next layer's experts and read them in the background.
        bypass_page_cache: read storage, not the OS page cache (see :class:`ExpertStore`).

    Returns:
        the cache (its ``stats`` per layer, its ``store.stats`` for storage reads); each layer's resident
        experts (whose storage was never filled) are replaced by ``OffloadedExperts``.

    Raises:
        MemoryBudgetError: an unreadable budget, or one below one layer's selected experts (the message
            names the minimum).
        ValueError: a checkpoint that does not hold every expert.
    """
    store = ExpertStore(layers, destinations, bypass_page_cache)
    dtype = layers[0].dtype
    extra = [[conversions_nbytes_of(layout, dtype) for layout in layouts] for layouts in store.layouts]
    expert_bytes = sum(store.expert_nbytes(li, e) + extra[li][e] for li, layer in enumerate(layers)
                       for e in range(layer.num_experts))  # fmt: skip
    budget = budget_bytes(memory_budget, expert_bytes)
    slot = store.slot_nbytes() + max(max(row) for row in extra)
    needed = max(layer.routing.top_k for layer in layers)
    if budget < needed * slot:
        raise MemoryBudgetError(
            f"memory budget {format_size(budget)} is below one layer's selected experts: at least "
            f"{format_size(needed * slot)} ({needed} experts of {format_size(slot)}) are needed"
        )
    total_experts = sum(layer.num_experts for layer in layers)
    eviction = eviction_policy(policy, [layer.routing.top_k for layer in layers], prefetch)
    cache = ExpertCache(store, min(budget // slot, total_experts), eviction, prefetch)
    offloaded: list[OffloadedExperts] = []
    slot_views: dict[int, tuple[int, int, tuple]] = {}
    for index in reversed(range(len(layers))):
        following = (layers[index + 1], offloaded[0]) if prefetch and index + 1 < len(layers) else None
        offloaded.insert(0, OffloadedExperts(cache, index, layers[index].resident, following, slot_views))
    for layer, experts in zip(layers, offloaded, strict=True):
        layer.experts = experts
    return cache
