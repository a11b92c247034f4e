"""A byte-budgeted cache of experts read from the checkpoint, with eviction policies and prefetching.

The budget buys a fixed number of slots, each big enough for any expert (exactly one expert's bytes when
all experts share a format). Slots are one allocation that is touched only as experts are read into it,
so resident memory grows with what was loaded, up to the budget. Keys are (MoE layer, expert).

Policies decide which resident expert makes room:
- ``lru``: the least recently used.
- ``lfu``: the least frequently used, with frequencies that decay by half every ``half_life`` accesses
  (old popularity fades), ties to the least recent; with prefetching, the first MoE layer's experts count
  double, since no prediction covers that layer. Decoding walks the layers in a loop; when the cache is
  smaller than the loop's working set, LRU evicts exactly the experts the next token needs, while
  frequency keeps each layer's popular experts.

Prefetching runs reads on one background thread: ``prefetch`` queues experts predicted for a layer
(see :mod:`moerun.offload.offloaded`), ``acquire`` waits for any still in flight. Experts acquired for the
layer being computed are pinned until released, so a prefetch never evicts them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import torch

from .store import ExpertStore, ReadStats

Key = tuple[int, int]  # (MoE layer, expert)

# Running means (prediction accuracy, lead time, storage busy share, CPU time of a prefetch) weigh the last
# ~1 / RUNNING_MEAN_DECAY observations.
RUNNING_MEAN_DECAY = 1 / 8


def running_mean(mean: float | None, value: float) -> float:
    """``mean`` moved toward ``value`` by RUNNING_MEAN_DECAY; the first value (``mean`` None) as it is."""
    return value if mean is None else mean + RUNNING_MEAN_DECAY * (value - mean)


class LRUPolicy:
    """Evict the least recently used expert."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def access(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def victim(self, resident: set[Key], exclude: set[Key]) -> Key | None:
        candidates = resident - exclude
        never_used = candidates.difference(self._order)  # prefetched and not used yet: the oldest
        if never_used:
            return min(never_used)
        return next((k for k in self._order if k in candidates), None)


class LFUPolicy:
    """Evict the least frequently used expert; counts halve every ``half_life`` accesses, so popularity
    follows the text. Experts of ``favored`` layers count ``favor`` times: with prefetching, the first MoE
    layer is the one no prediction covers, so its misses always stall (Fate's shallow-layer preference)."""

    name = "lfu"

    def __init__(self, half_life: int = 128, favored: frozenset[int] = frozenset(), favor: float = 2.0) -> None:
        self.half_life = half_life
        self.favored = favored
        self.favor = favor
        self._count: dict[Key, float] = {}
        self._last: dict[Key, int] = {}
        self._clock = 0

    def access(self, key: Key) -> None:
        self._clock += 1
        if self._clock % self.half_life == 0:
            self._count = {k: c / 2 for k, c in self._count.items()}
        self._count[key] = self._count.get(key, 0.0) + 1.0
        self._last[key] = self._clock

    def _value(self, key: Key) -> tuple[float, int]:
        weight = self.favor if key[0] in self.favored else 1.0
        return self._count.get(key, 0.0) * weight, self._last.get(key, 0)

    def victim(self, resident: set[Key], exclude: set[Key]) -> Key | None:
        candidates = resident - exclude
        return min(candidates, key=self._value) if candidates else None


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str) -> LRUPolicy | LFUPolicy:
    """A fresh eviction policy by name (``lru`` or ``lfu``) with default settings."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]()


@dataclass
class LayerCacheStats:
    """Counters of one MoE layer's expert accesses."""

    accesses: int = 0
    hits: int = 0  # resident (or already in flight) when needed
    prefetch_hits: int = 0  # of the hits, experts a prefetch brought in
    prefetched: int = 0  # experts a prefetch read (used or not)
    bytes_read: int = 0  # demand and prefetch reads of this layer's experts
    stall_s: float = 0.0  # time the forward pass waited for this layer's reads
    predicted: int = 0  # experts the cross-layer prediction named for this layer
    predicted_used: int = 0  # of those, experts the layer then selected
    predicted_uncached: int = 0  # predicted experts that were not cached when predicted (a prefetch would read)
    predicted_uncached_used: int = 0  # of those, experts the layer then selected

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def prediction_accuracy(self) -> float:
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def uncached_prediction_accuracy(self) -> float:
        return self.predicted_uncached_used / self.predicted_uncached if self.predicted_uncached else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "hit_rate": self.hit_rate,
            "prediction_accuracy": self.prediction_accuracy,
            "uncached_prediction_accuracy": self.uncached_prediction_accuracy,
        }

    @classmethod
    def from_dict(cls, counters: dict) -> LayerCacheStats:
        """The counters of a ``to_dict`` result (its rates are dropped: they follow from the counters)."""
        return cls(**{f.name: counters[f.name] for f in fields(cls)})

    def __add__(self, other: LayerCacheStats) -> LayerCacheStats:
        return LayerCacheStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @classmethod
    def total(cls, stats: Iterable[LayerCacheStats]) -> LayerCacheStats:
        return sum(stats, cls())


def summarize(stats: Iterable[LayerCacheStats]) -> dict:
    """Totals over layers: hit rate, time stalled, and prediction accuracies (None where nothing was predicted)."""
    total = LayerCacheStats.total(stats)
    return {
        "hit_rate": total.hit_rate,
        "stall_s": total.stall_s,
        "prediction_accuracy": total.prediction_accuracy if total.predicted else None,
        "uncached_prediction_accuracy": total.uncached_prediction_accuracy if total.predicted_uncached else None,
    }


class ExpertCache:
    """Experts of an :class:`ExpertStore` in ``num_slots`` slots.

    Args:
        store: where the experts are read from.
        num_slots: experts held at once (at least one layer's selected experts: see ``offload``).
        policy: the eviction policy.
        prefetch: start a background thread for ``prefetch``.
    """

    def __init__(
        self, store: ExpertStore, num_slots: int, policy: LRUPolicy | LFUPolicy, prefetch: bool = False
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"the cache needs at least one slot, got {num_slots}")
        self.store = store
        self.num_slots = num_slots
        self.slot_nbytes = store.slot_nbytes()
        self.policy = policy
        self._arena = torch.empty(num_slots, self.slot_nbytes, dtype=torch.uint8)
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot: dict[Key, int] = {}  # resident or loading
        self._loading: dict[Key, Future] = {}
        self._prefetched: set[Key] = set()  # brought in by a prefetch, not used yet
        self._pinned: set[Key] = set()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moerun-prefetch") if prefetch else None
        # Running CPU seconds the prefetch thread spends per expert it reads (None until one was read): time
        # taken from the computation wherever its threads fill every core.
        self.prefetch_cpu_s: float | None = None
        self.stats = [LayerCacheStats() for _ in range(store.num_layers)]

    @property
    def budget_bytes(self) -> int:
        return self.num_slots * self.slot_nbytes

    def resident(self) -> set[Key]:
        with self._lock:
            return {k for k in self._slot if k not in self._loading}

    def _take_slot(self, exclude: set[Key]) -> int | None:
        """A free slot, evicting by policy if needed (caller holds the lock); None if all are pinned."""
        if self._free:
            return self._free.pop()
        candidates = {k for k in self._slot if k not in self._loading}
        victim = self.policy.victim(candidates, exclude | self._pinned)
        if victim is None:
            return None
        self._prefetched.discard(victim)
        return self._slot.pop(victim)

    def _load(self, key: Key, slot: int) -> None:
        """Read ``key`` into ``slot``; a failed read frees the slot, so half-read bytes never count as resident."""
        layer, expert = key
        try:
            nbytes = self.store.read(layer, expert, self._arena[slot])
        except BaseException:
            with self._lock:
                if self._slot.get(key) == slot:
                    del self._slot[key]
                    self._free.append(slot)
                self._prefetched.discard(key)
            raise
        with self._lock:
            self.stats[layer].bytes_read += nbytes

    def uncached(self, layer: int, experts: list[int]) -> list[int]:
        """Those of ``experts`` of ``layer`` neither resident nor being read."""
        with self._lock:
            return [e for e in experts if (layer, e) not in self._slot]

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading these experts of ``layer`` in the background (no-op without a prefetch thread)."""
        if self._executor is None:
            return
        with self._lock:
            wanted = {(layer, e) for e in experts}
            for key in wanted:
                if key in self._slot:
                    continue
                slot = self._take_slot(exclude=wanted)
                if slot is None:
                    return
                self._slot[key] = slot
                self._prefetched.add(key)
                self.stats[layer].prefetched += 1
                self._loading[key] = self._executor.submit(self._load_async, key, slot)

    def _load_async(self, key: Key, slot: int) -> None:
        cpu = time.thread_time()
        try:
            self._load(key, slot)
        finally:
            with self._lock:
                self._loading.pop(key, None)
                self.prefetch_cpu_s = running_mean(self.prefetch_cpu_s, time.thread_time() - cpu)

    def acquire(self, layer: int, experts: list[int]) -> list[torch.Tensor]:
        """Make these experts of ``layer`` resident and pin them; returns their slots (uint8 views).

        Raises:
            ValueError: more experts than slots.
        """
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts cannot be held in {self.num_slots} slots")
        stats = self.stats[layer]
        keys = [(layer, e) for e in experts]
        waits: list[Future] = []
        misses: list[tuple[Key, int]] = []
        start = time.perf_counter()
        with self._lock:
            self._pinned.update(keys)
            for key in keys:
                self.policy.access(key)
                stats.accesses += 1
                if key in self._slot:
                    stats.hits += 1
                    if key in self._prefetched:
                        stats.prefetch_hits += 1
                        self._prefetched.discard(key)
                    if key in self._loading:
                        waits.append(self._loading[key])
                    continue
                slot = self._take_slot(exclude=set(keys))
                while slot is None:  # every other slot is being prefetched: wait for one
                    in_flight = next(iter(self._loading.values()))
                    self._lock.release()
                    try:
                        in_flight.result()
                    finally:
                        self._lock.acquire()
                    slot = self._take_slot(exclude=set(keys))
                self._slot[key] = slot
                misses.append((key, slot))
        try:
            while misses:
                self._load(*misses[0])
                misses.pop(0)
            for future in waits:
                future.result()
        except BaseException:
            with self._lock:  # the misses not read yet hold slots they never filled
                for key, slot in misses[1:]:
                    del self._slot[key]
                    self._free.append(slot)
                self._pinned.difference_update(keys)
            raise
        stats.stall_s += time.perf_counter() - start
        with self._lock:
            return [self._arena[self._slot[k]] for k in keys]

    def release(self, layer: int, experts: list[int]) -> None:
        """Unpin experts acquired for a layer's computation."""
        with self._lock:
            self._pinned.difference_update((layer, e) for e in experts)

    def wait(self) -> None:
        """Wait for every prefetch in flight."""
        with self._lock:
            futures = list(self._loading.values())
        for future in futures:
            future.result()

    def report(self) -> dict:
        """Per-layer statistics and totals, as JSON-ready numbers."""
        return {
            "budget_bytes": self.budget_bytes,
            "slots": self.num_slots,
            "policy": self.policy.name,
            "prefetch": self._executor is not None,
            "bytes_read": self.store.stats.bytes,
            "storage_gbps": self.store.stats.gbps,
            **summarize(self.stats),
            "layers": [s.to_dict() for s in self.stats],
        }

    def reset_stats(self) -> None:
        """Start the cache's and the store's counters afresh (the cached experts stay)."""
        self.stats = [LayerCacheStats() for _ in range(self.store.num_layers)]
        self.store.stats = ReadStats()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.store.close()
