"""A lean runner for llama-like MoE models: preallocated KV cache, precomputed RoPE, native matrix-vector products.

transformers' decoder layers are general: every decode step grows a dynamic cache, builds a mask, goes
through several module layers and runs 1-row bf16 GEMMs at a third of the memory bandwidth. For the
families below a decoder layer is always the same sequence (RMSNorm -> q/k/v projections -> optional q/k
norm -> RoPE -> causal attention -> o projection -> residual -> RMSNorm -> MoE or MLP -> residual), so
:class:`LeanRunner` runs that sequence directly over the model's own parameter tensors (referenced, never
copied) with:

- a KV cache allocated once, [layers, 2, Hkv, L, D], written in place;
- RoPE cos/sin for every position computed once by the model's own rotary embedding;
- decode matrix-vector products (q/k/v/o and the lm head) on the native AVX-512 kernel as one group
  with one "expert", writing into preallocated float32 buffers;
- the MoE blocks as moerun layers sharing the blocks' weights (decode groups of one row go to the native
  kernel);
- prefill as bf16 GEMMs over all prompt tokens with causal SDPA, and the lm head on the last position only.

Families: OLMoE (q/k RMSNorm over all heads, optional qkv clipping), Qwen3-MoE (per-head q/k RMSNorm),
Mixtral, Qwen2-MoE (qkv biases; its shared expert lives in the MoE layer). DeepSeek (MLA) and GPT-OSS
(attention sinks, sliding windows) are left to transformers.

Shape legend: T prompt tokens, H hidden, Hq query heads, Hkv key/value heads, D head dim, L max_seq_len,
P cached positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from .hf import SUPPORTED_BLOCKS, PatchedMoEBlock, layer_from_hf_block

# model_type -> how q and k are RMS-normalised before RoPE: over all heads at once, per head, or not at all.
QK_NORM = {"olmoe": "all_heads", "qwen3_moe": "per_head", "mixtral": None, "qwen2_moe": None}
# RoPE variants whose frequencies change with the sequence seen so far cannot be precomputed.
_DYNAMIC_ROPE = ("dynamic", "longrope")
DEFAULT_MAX_SEQ_LEN = 4096


class Runner(Protocol):
    """What a generation loop drives: one sequence, prefill then one token at a time."""

    max_seq_len: int

    def reset(self) -> None:
        """Forget the sequence (empty the KV cache)."""

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64 appended to the sequence -> logits [V] float32 of its last position."""

    def decode(self, token_id: int) -> torch.Tensor:
        """One token appended to the sequence -> logits [V] float32 of its position."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, round to x's dtype, scale. x: [..., N] -> [..., N].

    torch's fused rms_norm takes a quarter of the CPU time of the five-op formula on a decode row.
    """
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE, ``x * cos + rotate_half(x) * sin``, in three ops instead of six.

    Args:
        x: [..., D].
        cos: broadcastable to x.
        signed_sin: sin with its first half negated (``rotate_half`` swaps the halves and negates the first).

    Returns:
        [..., D] in the promoted dtype of the inputs.
    """
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [..., D]: second half, then first
    return torch.addcmul(x * cos, swapped, signed_sin)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of one position over the cached prefix, in float32 (the path without the native kernel).

    Args:
        q: [Hq, D] queries; the query heads sharing a kv head are adjacent (transformers' repeat_kv).
        keys, values: [Hkv, P, D] the cached prefix.
        scale: the softmax scale.

    Returns:
        [Hq, D] float32.
    """
    hkv, _, d = keys.shape
    q = q.float().view(hkv, -1, 1, d)  # [Hkv, g, 1, D]
    scores = (keys.float().unsqueeze(1) * q).sum(-1) * scale  # [Hkv, g, P]
    probs = torch.softmax(scores, dim=-1)
    return (probs.unsqueeze(-1) * values.float().unsqueeze(1)).sum(2).view(-1, d)  # [Hq, D]


class NativeDecodeAttention:
    """Attention of one position over the cached prefix, with the scores on the native kernel.

    Each kv head's cached keys [P, D] are a contiguous block of the cache, so the scores of the query heads
    that share it are one native call, streamed at memory speed and accumulated in float32. The values
    product stays a torch bmm: the kernel reads weight rows along the reduced dim, and a value row is not.
    Measured per layer at P = 544, OLMoE-1B-7B heads, 1 thread: 0.62 ms against 1.4 ms for the float32
    broadcast formulation, 0.8 ms for the same under torch.compile and 2.1 ms for SDPA (flash).

    Args:
        num_heads: Hq.
        num_kv_heads: Hkv.
        max_seq_len: L, the longest prefix.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, max_seq_len: int) -> None:
        self.group = num_heads // num_kv_heads
        self.scores = torch.empty(num_heads, max_seq_len, dtype=torch.float32)  # [Hq, L]
        self._expert = torch.zeros(1, dtype=torch.int64)  # each call sees one kv head as expert 0, from row 0
        self._count = torch.full((1,), self.group, dtype=torch.int64)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [Hq, D] in the cache dtype; keys, values: [Hkv, P, D] -> [Hq, D] in the cache dtype."""
        hkv, length, d = keys.shape
        g = self.group
        for h in range(hkv):
            rows = slice(h * g, (h + 1) * g)
            native.grouped_gemv(
                q[rows], keys[h : h + 1], self._expert, self._expert, self._count, out=self.scores[rows, :length]
            )  # [g, P]
        probs = torch.softmax(self.scores[:, :length] * scale, dim=-1).to(values.dtype)  # [Hq, P]
        return torch.bmm(probs.view(hkv, g, length), values).view(-1, d)  # [Hq, D]


class Matvec:
    """One-row products x @ W.T (+ b) over a Linear's own weight, into a float32 row.

    On the native kernel the weight is a single group of one expert, streamed once from memory; for a
    1-row bf16 product torch's GEMM reaches about a third of the memory bandwidth on our hosts.

    Args:
        weight: [N, K] the Linear's weight, referenced (not copied).
        bias: [N] or None.
        use_native: run on the native kernel (falls back to F.linear where it cannot).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, use_native: bool) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.native = (
            use_native
            and native.is_available()
            and weight.is_cpu
            and weight.dtype in (torch.bfloat16, torch.float32)
            and weight.is_contiguous()
        )
        if self.native:
            self._weight3 = self.weight.unsqueeze(0)  # [1, N, K]: one "expert"
            self._bias2 = None if bias is None else self.bias.float().unsqueeze(0)  # [1, N], N floats
            self._group = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))  # expert, start
            self._count = torch.ones(1, dtype=torch.int64)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x: [1, K] in the weight's dtype; out: [1, N] float32 with unit stride along N. Returns out."""
        if self.native:
            return native.grouped_gemv(x, self._weight3, *self._group, self._count, bias=self._bias2, out=out)
        return out.copy_(F.linear(x, self.weight, self.bias))


@dataclass
class LeanLayer:
    """One decoder layer as the runner sees it: references to the model's parameters, and its MLP.

    ``mlp`` maps [T, H] -> [T, H] in the model dtype: a moerun MoELayer for MoE layers (benchmarks wrap
    it to time the MoE share of a step), the model's own module for dense layers.
    """

    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    q: Matvec
    k: Matvec
    v: Matvec
    o: Matvec
    q_norm: torch.Tensor | None  # [Hq*D] (all heads) or [D] (per head)
    k_norm: torch.Tensor | None  # [Hkv*D] or [D]
    mlp: Callable[[torch.Tensor], torch.Tensor]


def _mlp_of(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's feed-forward as a [T, H] -> [T, H] callable; MoE blocks become moerun layers (shared weights)."""
    if isinstance(module, PatchedMoEBlock):
        return module.layer
    if type(module).__name__ in SUPPORTED_BLOCKS:
        return layer_from_hf_block(module)
    return module  # a dense gated MLP (Qwen2/3-MoE's mlp_only_layers) works on [T, H] as it is


def _sliding_window(config, layer_idx: int) -> int | None:
    """The attention window of a layer as transformers' mask applies it, or None for full causal attention."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None) or None


def _check_supported(model: nn.Module, max_seq_len: int) -> None:
    """Raise NotImplementedError unless the runner computes exactly what this model computes."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    if family not in QK_NORM:
        raise NotImplementedError(
            f"the lean runner covers {', '.join(QK_NORM)}; {family} needs transformers' own forward (HF runner)"
        )
    if not (hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model, "lm_head")):
        raise NotImplementedError(f"expected a *ForCausalLM model with .model.layers and .lm_head, got {type(model)}")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _DYNAMIC_ROPE:
        raise NotImplementedError(f"RoPE type {rope_type!r} depends on the sequence length; use the HF runner")
    for i in range(config.num_hidden_layers):
        window = _sliding_window(config, i)
        if window is not None and window < max_seq_len:
            raise NotImplementedError(
                f"layer {i} uses a {window}-token sliding window; the lean runner needs max_seq_len <= {window}"
            )


class LeanRunner:
    """Prefill and decode of one sequence over a transformers model's weights (see the module docstring).

    Args:
        model: a loaded OLMoE / Qwen3-MoE / Mixtral / Qwen2-MoE ``*ForCausalLM``, moerun-patched or not; it
            is not modified, and its parameters are shared, so it must outlive the runner.
        max_seq_len: L, positions the KV cache holds (default: the model's context, at most 4096).
        use_native: run decode matrix-vector products on the native kernel (default: where available).

    Raises:
        NotImplementedError: the model's family or configuration is not covered (use the HF runner).
    """

    def __init__(
        self,
        model: nn.Module,
        max_seq_len: int | None = None,
        use_native: bool = True,
    ) -> None:
        config = model.config
        if max_seq_len is None:
            max_seq_len = min(getattr(config, "max_position_embeddings", DEFAULT_MAX_SEQ_LEN), DEFAULT_MAX_SEQ_LEN)
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        _check_supported(model, max_seq_len)
        self.max_seq_len = max_seq_len
        self.qk_norm = QK_NORM[config.model_type]
        self.clip_qkv = getattr(config, "clip_qkv", None)
        decoder = model.model
        first = decoder.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = first.head_dim
        self.scaling = float(first.scaling)
        self.eps = float(decoder.norm.variance_epsilon)
        self.embed = decoder.embed_tokens.weight.detach()  # [V, H]
        self.dtype = self.embed.dtype
        self.final_norm = decoder.norm.weight.detach()
        self.lm_head = Matvec(model.lm_head.weight, model.lm_head.bias, use_native)
        self.layers = [self._layer(layer, use_native) for layer in decoder.layers]

        # RoPE tables from the model's own rotary embedding, in float32 (decode) and the model dtype (prefill,
        # where transformers rounds them to the activations' dtype).
        positions = torch.arange(max_seq_len).unsqueeze(0)  # [1, L]
        with torch.no_grad():
            cos, sin = decoder.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)  # [1, L, D] each
        if cos.shape[-1] != self.head_dim:
            raise NotImplementedError(f"partial RoPE ({cos.shape[-1]} of {self.head_dim} dims) is not covered")
        half = self.head_dim // 2
        self.cos = cos[0]  # [L, D] float32
        self.signed_sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # [L, D]
        self.cos_model, self.signed_sin_model = self.cos.to(self.dtype), self.signed_sin.to(self.dtype)

        hidden = self.embed.shape[1]
        self.kv = torch.zeros(len(self.layers), 2, self.num_kv_heads, max_seq_len, self.head_dim, dtype=self.dtype)
        self.keys, self.values = list(self.kv[:, 0]), list(self.kv[:, 1])  # per layer [Hkv, L, D] views
        # Decode buffers, reused every step: q|k|v projections side by side, the o projection.
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self._qkv = torch.empty(1, q_size + 2 * kv_size, dtype=torch.float32)  # [1, (Hq + 2 Hkv) D]
        self._q, self._k, self._v = self._qkv.split([q_size, kv_size, kv_size], dim=1)
        self._o = torch.empty(1, hidden, dtype=torch.float32)  # [1, H]
        self._h = torch.empty(1, hidden, dtype=self.dtype)  # [1, H] the residual stream
        self._attention = None
        if all(layer.q.native for layer in self.layers):  # the kernel runs this dtype on this host
            self._attention = NativeDecodeAttention(self.num_heads, self.num_kv_heads, max_seq_len)
        self.length = 0

    def _layer(self, layer: nn.Module, use_native: bool) -> LeanLayer:
        attn = layer.self_attn
        linears = {name: getattr(attn, f"{name}_proj") for name in ("q", "k", "v", "o")}
        norms = [None, None] if self.qk_norm is None else [attn.q_norm.weight.detach(), attn.k_norm.weight.detach()]
        return LeanLayer(
            input_norm=layer.input_layernorm.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            **{name: Matvec(lin.weight, lin.bias, use_native) for name, lin in linears.items()},
            q_norm=norms[0],
            k_norm=norms[1],
            mlp=_mlp_of(layer.mlp),
        )

    def reset(self) -> None:
        """Start a new sequence. The cache is not cleared: only positions below ``length`` are ever read."""
        self.length = 0

    def _check_room(self, tokens: int) -> None:
        if self.length + tokens > self.max_seq_len:
            raise ValueError(
                f"the sequence would reach {self.length + tokens} positions; this runner holds {self.max_seq_len} "
                "(make it with a larger max_seq_len)"
            )

    def _norm_qk(self, layer: LeanLayer, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's q/k normalisation and clipping. q: [T, Hq*D], k: [T, Hkv*D] -> same shapes."""
        if self.qk_norm == "all_heads":
            q, k = rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)
        elif self.qk_norm == "per_head":
            d = self.head_dim
            q = rms_norm(q.unflatten(-1, (-1, d)), layer.q_norm, self.eps).flatten(-2)
            k = rms_norm(k.unflatten(-1, (-1, d)), layer.k_norm, self.eps).flatten(-2)
        if self.clip_qkv is not None:
            q, k = q.clamp(-self.clip_qkv, self.clip_qkv), k.clamp(-self.clip_qkv, self.clip_qkv)
        return q, k

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append a prompt to the sequence: bf16 GEMMs over all its tokens, causal SDPA, lm head on the last.

        Args:
            input_ids: [T] int64 token ids (T >= 1).

        Returns:
            logits [V] float32 of the last position.
        """
        if input_ids.dim() != 1 or input_ids.numel() < 1 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be a non-empty 1-D integer tensor, got {tuple(input_ids.shape)}")
        num_tokens = input_ids.shape[0]
        self._check_room(num_tokens)
        start, end = self.length, self.length + num_tokens
        d, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        cos, sin = self.cos_model[start:end], self.signed_sin_model[start:end]  # [T, D]
        # A prompt after cached positions attends to all of them: causal relative to its own start.
        mask = None
        if start:
            mask = torch.arange(end) <= torch.arange(start, end).unsqueeze(1)  # [T, P]
        h = self.embed[input_ids]  # [T, H]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, self.eps)
            q = F.linear(x, layer.q.weight, layer.q.bias)  # [T, Hq*D]
            k = F.linear(x, layer.k.weight, layer.k.bias)  # [T, Hkv*D]
            v = F.linear(x, layer.v.weight, layer.v.bias)  # [T, Hkv*D]
            q, k = self._norm_qk(layer, q, k)
            if self.clip_qkv is not None:
                v = v.clamp(-self.clip_qkv, self.clip_qkv)
            q = apply_rope(q.view(num_tokens, hq, d).transpose(0, 1), cos, sin)  # [Hq, T, D]
            k = apply_rope(k.view(num_tokens, hkv, d).transpose(0, 1), cos, sin)  # [Hkv, T, D]
            keys, values = self.keys[i][:, :end], self.values[i][:, :end]  # [Hkv, P, D]
            keys[:, start:].copy_(k)
            values[:, start:].copy_(v.view(num_tokens, hkv, d).transpose(0, 1))
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask,
                is_causal=mask is None, scale=self.scaling, enable_gqa=hq != hkv,
            )  # [1, Hq, T, D]  # fmt: skip
            attn = attn[0].transpose(0, 1).reshape(num_tokens, hq * d)  # [T, Hq*D]
            h = h + F.linear(attn, layer.o.weight, layer.o.bias)
            h = h + layer.mlp(rms_norm(h, layer.post_norm, self.eps))
        self.length = end
        logits = torch.empty(1, self.lm_head.out_features, dtype=torch.float32)
        return self.lm_head(rms_norm(h[-1:], self.final_norm, self.eps), logits)[0]

    @torch.inference_mode()
    def decode(self, token_id: int) -> torch.Tensor:
        """Append one token: matrix-vector products into reused buffers, attention over the cached prefix.

        Args:
            token_id: the token at the next position.

        Returns:
            logits [V] float32 of that position (a new tensor; the runner keeps no reference to it).
        """
        self._check_room(1)
        pos = self.length
        end = pos + 1
        d, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        cos, sin = self.cos[pos], self.signed_sin[pos]  # [D] float32
        h = self._h.copy_(self.embed[token_id])  # [1, H] model dtype, the residual stream
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, self.eps)  # [1, H]
            layer.q(x, self._q)
            layer.k(x, self._k)
            layer.v(x, self._v)
            q, k = self._norm_qk(layer, self._q, self._k)  # float32
            v = self._v if self.clip_qkv is None else self._v.clamp(-self.clip_qkv, self.clip_qkv)
            q = apply_rope(q.view(hq, d), cos, sin)  # [Hq, D]
            k = apply_rope(k.view(hkv, d), cos, sin)  # [Hkv, D]
            keys, values = self.keys[i], self.values[i]
            keys[:, pos].copy_(k)
            values[:, pos].copy_(v.view(hkv, d))
            if self._attention is None:
                attn = decode_attention(q, keys[:, :end], values[:, :end], self.scaling).to(self.dtype)  # [Hq, D]
            else:
                attn = self._attention(q.to(self.dtype), keys[:, :end], values[:, :end], self.scaling)
            h.add_(layer.o(attn.view(1, hq * d), self._o))
            h.add_(layer.mlp(rms_norm(h, layer.post_norm, self.eps)))
        self.length = end
        logits = torch.empty(1, self.lm_head.out_features, dtype=torch.float32)
        return self.lm_head(rms_norm(h, self.final_norm, self.eps), logits)[0]


def make_lean_runner(model: nn.Module, max_seq_len: int | None = None, use_native: bool = True) -> LeanRunner:
    """The lean runner over ``model`` (see :class:`LeanRunner`); NotImplementedError for uncovered families."""
    return LeanRunner(model, max_seq_len, use_native)
