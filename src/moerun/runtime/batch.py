"""Several independent sequences at once: continuous batching's runner.

Decode on a CPU is bound by reading the selected experts. B sequences stepping together read each chosen
expert once for all the tokens that chose it, and the union of their experts grows far slower than B. A
:class:`BatchRunner` holds a KV cache per sequence slot; each :meth:`~BatchRunner.step` takes work items,
each a chunk of a prompt or one decode token of one slot, and runs every decoder layer once over all their
tokens: one q/k/v GEMM, each item's causal attention over its own slot's cache (its own length and
positions), one o GEMM and **one MoE call for every token of the step**. The lm head runs on each item's
last token. Sequences join (a slot is ``reset``) and leave between steps; a long prompt goes in chunks over
several steps, beside the other slots' decode tokens.

The layers are those of :class:`~moerun.runtime.lean.LeanRunner` (same families: OLMoE, Qwen3-MoE, Mixtral,
Qwen2-MoE), so low-bit, mixed and offloaded experts and the planner's plans run here as there.
:class:`SequentialBatch` serves the other families with one runner per slot, stepped in turn (correct, but
without the shared expert reads).

Shape legend: N tokens of a step (all items), B items, n one item's tokens, H hidden, Hq / Hkv query and
key/value heads, D head dim, P positions of a slot, L max_seq_len, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lean import LeanRunner, Runner, apply_rope, rms_norm


@dataclass(frozen=True)
class WorkItem:
    """What one slot adds in a step: ``token_ids`` [n] int64 appended to that slot's sequence (a prompt chunk,
    or the one token just sampled)."""

    slot: int
    token_ids: torch.Tensor


def _check_items(items: Sequence[WorkItem], slots: int, lengths: list[int], max_seq_len: int) -> None:
    """ValueError for a step that names a slot twice or out of range, has no tokens, or outgrows a slot."""
    seen = set()
    for item in items:
        if not 0 <= item.slot < slots:
            raise ValueError(f"slot {item.slot} is out of range: this runner has {slots} slots")
        if item.slot in seen:
            raise ValueError(f"slot {item.slot} appears twice in one step")
        seen.add(item.slot)
        ids = item.token_ids
        if ids.dim() != 1 or ids.numel() < 1 or ids.dtype.is_floating_point:
            raise ValueError(f"slot {item.slot}: token_ids must be a non-empty 1-D integer tensor")
        if lengths[item.slot] + ids.numel() > max_seq_len:
            raise ValueError(
                f"slot {item.slot} would reach {lengths[item.slot] + ids.numel()} positions; a slot holds {max_seq_len}"
            )


class BatchRunner:
    """Prefill chunks and decode tokens of up to ``slots`` sequences, one pass per layer for all of them.

    Args:
        model: a model :class:`~moerun.runtime.lean.LeanRunner` covers (its weights are shared, not copied).
        slots: sequences held at once, each with its own KV cache of ``max_seq_len`` positions. The caches are
            reserved, not written, up front: memory grows with the positions used.
        max_seq_len: L, positions per slot (default: the model's context, at most 4096).

    Raises:
        NotImplementedError: a family the lean runner does not cover (use :class:`SequentialBatch`).
    """

    def __init__(self, model: nn.Module, slots: int, max_seq_len: int | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.lean = LeanRunner(model, max_seq_len, use_native=False)
        self.lean.cache = None  # its single-sequence cache: the slots below hold the batch's
        self.slots = slots
        self.max_seq_len = self.lean.max_seq_len
        lean = self.lean
        shape = (slots, len(lean.layers), lean.num_kv_heads, self.max_seq_len, lean.head_dim)
        self.keys = torch.empty(shape, dtype=lean.dtype)  # [slots, layers, Hkv, L, D]
        self.values = torch.empty(shape, dtype=lean.dtype)  # [slots, layers, Hkv, L, D]
        self.lengths = [0] * slots

    def reset(self, slot: int) -> None:
        """Start a new sequence in ``slot`` (its old positions are forgotten)."""
        self.lengths[slot] = 0

    @torch.inference_mode()
    def step(self, items: Sequence[WorkItem]) -> torch.Tensor:
        """Append each item's tokens to its slot's sequence, all items in one pass.

        Args:
            items: at most one per slot; any mix of prompt chunks and single decode tokens.

        Returns:
            logits [B, V] float32: row b is the next-token logits after item b's last token.
        """
        _check_items(items, self.slots, self.lengths, self.max_seq_len)
        if not items:
            return torch.empty(0, self.lean.lm_head.out_features)
        lean = self.lean
        d, hq, hkv = lean.head_dim, lean.num_heads, lean.num_kv_heads
        counts = [item.token_ids.numel() for item in items]
        starts = [self.lengths[item.slot] for item in items]
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts, strict=True)])  # [N]
        cos, sin = lean.cos_model[positions].unsqueeze(1), lean.signed_sin_model[positions].unsqueeze(1)  # [N, 1, D]
        num_tokens = positions.numel()
        h = lean.embed[torch.cat([item.token_ids for item in items])]  # [N, H]
        for i, layer in enumerate(lean.layers):
            x = rms_norm(h, layer.input_norm, lean.eps)
            q, k, v = layer.qkv.rows(x).split(lean._qkv_sizes, dim=1)  # [N, Hq*D], [N, Hkv*D], [N, Hkv*D]
            q, k = lean._norm_qk(layer, q, k)
            if lean.clip_qkv is not None:
                v = v.clamp(-lean.clip_qkv, lean.clip_qkv)
            q = apply_rope(q.view(num_tokens, hq, d), cos, sin)  # [N, Hq, D]
            k = apply_rope(k.view(num_tokens, hkv, d), cos, sin)  # [N, Hkv, D]
            v = v.view(num_tokens, hkv, d)
            attn = torch.empty(num_tokens, hq * d, dtype=q.dtype)  # [N, Hq*D]
            first = 0
            for item, start, n in zip(items, starts, counts, strict=True):
                attn[first : first + n] = self._attention(
                    item.slot, i, q[first : first + n], k[first : first + n], v[first : first + n], start
                )
                first += n
            h = h + layer.o.rows(attn)
            h = h + layer.mlp(rms_norm(h, layer.post_norm, lean.eps))  # one MoE call for every token of the step
        for item, n in zip(items, counts, strict=True):
            self.lengths[item.slot] += n
        last = torch.tensor(counts).cumsum(0) - 1  # [B] each item's last token
        return lean.lm_head.rows(rms_norm(h[last], lean.final_norm, lean.eps)).float()  # [B, V]

    def _attention(
        self, slot: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> torch.Tensor:
        """One item's causal attention: q [n, Hq, D], its new keys and values [n, Hkv, D] written at positions
        [start, start + n) of the slot's cache -> [n, Hq*D]."""
        n, hq, d = q.shape
        end = start + n
        keys, values = self.keys[slot, layer], self.values[slot, layer]  # [Hkv, L, D] each
        keys[:, start:end] = k.transpose(0, 1)
        values[:, start:end] = v.transpose(0, 1)
        # Causal relative to the chunk's own start: it sees every cached position and its own earlier tokens.
        mask = None if start == 0 or n == 1 else torch.arange(end) <= torch.arange(start, end).unsqueeze(1)  # [n, P]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys[None, :, :end], values[None, :, :end], attn_mask=mask,
            is_causal=start == 0 and n > 1, scale=self.lean.scaling, enable_gqa=hq != keys.shape[0],
        )  # [1, Hq, n, D]  # fmt: skip
        return out[0].transpose(0, 1).reshape(n, hq * d)


class SequentialBatch:
    """:class:`BatchRunner`'s interface over one :class:`~moerun.runtime.lean.Runner` per slot, stepped in turn:
    the families the batch runner does not cover (their sequences share no expert reads).

    Args:
        make_runner: makes one single-sequence runner (each holds its own KV cache).
        slots: sequences held at once.
    """

    def __init__(self, make_runner: Callable[[], Runner], slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.runners = [make_runner() for _ in range(slots)]
        self.slots = slots
        self.max_seq_len = self.runners[0].max_seq_len
        self.lengths = [0] * slots

    def reset(self, slot: int) -> None:
        self.runners[slot].reset()
        self.lengths[slot] = 0

    def step(self, items: Sequence[WorkItem]) -> torch.Tensor:
        _check_items(items, self.slots, self.lengths, self.max_seq_len)
        rows = []
        for item in items:
            runner = self.runners[item.slot]
            ids = item.token_ids
            rows.append(runner.prefill(ids) if ids.numel() > 1 or self.lengths[item.slot] == 0
                        else runner.decode(int(ids[0])))  # fmt: skip
            self.lengths[item.slot] += ids.numel()
        return torch.stack(rows) if rows else torch.empty(0, 0)


def make_batch_runner(model: nn.Module, slots: int, max_seq_len: int | None = None) -> BatchRunner | SequentialBatch:
    """The batch runner where the lean runner covers the model, else one runner per slot (``default_runner``)."""
    try:
        return BatchRunner(model, slots, max_seq_len)
    except NotImplementedError:
        from .generate import default_runner

        return SequentialBatch(lambda: default_runner(model, max_seq_len), slots)
