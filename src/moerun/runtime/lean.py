"""A lean runner for llama-like MoE models: preallocated KV cache, precomputed RoPE, native matrix-vector products.

transformers' decoder layers are general: every decode step grows a dynamic cache, builds a mask, goes
through several module layers and runs 1-row bf16 GEMMs at a third of the memory bandwidth. For the
families below a decoder layer is always the same sequence (RMSNorm -> q/k/v projections -> optional q/k
norm -> RoPE -> causal attention -> o projection -> residual -> RMSNorm -> MoE or MLP -> residual), so
:class:`LeanRunner` runs that sequence directly over the model's own parameter tensors with:

- the model's weights referenced, not copied, except q/k/v: each layer's three projections are stacked
  once into one matrix (one native call instead of three measured 3-4% faster decode on
  ``olmoe-1b-7b-4l``), which costs their size again (3% of that model) since the model keeps its own;
- a KV cache allocated once, [layers, 2, Hkv, L, D], written in place;
- RoPE cos/sin for every position computed once by the model's own rotary embedding;
- decode matrix-vector products (qkv, o and the lm head) on the native AVX-512 kernel as one group with
  one "expert", writing into preallocated float32 buffers, and attention scores on the same kernel; the
  RMS norms, and the q/k norms, clamp, RoPE and cache writes of each layer, are one native call each
  (together some 30 small torch ops a layer, ~10% of an int4 decode step);
- the MoE blocks as moerun layers sharing the blocks' weights (decode groups of one row go to the native
  kernel);
- prefill as bf16 GEMMs over all prompt tokens with causal SDPA, and the lm head on the last position only.

Families: OLMoE (q/k RMSNorm over all heads, optional qkv clipping), Qwen3-MoE (per-head q/k RMSNorm),
Mixtral, Qwen2-MoE (qkv biases; its shared expert lives in the MoE layer). DeepSeek (MLA) and GPT-OSS
(attention sinks, sliding windows) run on :mod:`moerun.runtime.lean_variants`; :func:`make_lean_runner`
picks the runner for a model.

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
from ..kernels.linear import as_stack, linear
from ..models.hf import SUPPORTED_BLOCKS, PatchedMoEBlock, layer_from_hf_block
from ..quant.formats import QuantizedWeight, concat_rows

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


class KVCache:
    """Every layer's keys [Hkv, C, D] and transposed values [Hkv, D, C], at a capacity C that grows.

    The native kernel reads its weight [E, N, K] as one contiguous block, so a decode step's attention is
    one call per layer only if each head's cached positions directly follow the previous head's: the cache
    is laid out for a capacity C (P rounded up to a multiple of ``block`` positions, at most L) rather than
    for L, and a call reads fewer than ``block`` positions beyond the P filled ones. When the sequence
    outgrows C the filled positions are copied into the next layout (8 KB per position and layer with
    OLMoE-1B-7B's heads, every ``block`` tokens: ~40 us per generated token at 2048 positions on 4 layers);
    the memory for L is allocated once. Values are stored transposed so that probabilities times values also
    reduces along contiguous memory. Value positions in [P, C) are kept at zero, so a product over all C
    positions with zero probabilities beyond P is exact.

    Args:
        num_layers, num_kv_heads, head_dim: the model's.
        max_seq_len: L.
        dtype: the cache dtype (the model's).
        block: the capacity's granularity, in positions.
    """

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype,
        block: int = 128,
    ) -> None:  # fmt: skip
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.max_seq_len = max_seq_len
        self.block = block
        self._keys = torch.zeros(num_layers, num_kv_heads * max_seq_len * head_dim, dtype=dtype)
        self._values = torch.zeros_like(self._keys)
        self.capacity = 0
        self.keys, self.values = self._views(0)  # [layers, Hkv, C, D], [layers, Hkv, D, C]

    def _views(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers, hkv, d = self.shape
        size = hkv * capacity * d
        keys = self._keys[:, :size].view(layers, hkv, capacity, d)
        values = self._values[:, :size].view(layers, hkv, d, capacity)
        return keys, values

    def reserve(self, length: int, filled: int) -> None:
        """Make room for ``length`` positions, keeping the first ``filled``."""
        if length <= self.capacity:
            return
        capacity = min(-(-length // self.block) * self.block, self.max_seq_len)
        keys, values = self._views(capacity)
        if filled:  # the old and new layouts overlap in memory: copy through a temporary
            keys[:, :, :filled] = self.keys[:, :, :filled].clone()
            values[..., :filled] = self.values[..., :filled].clone()
        values[..., filled:].zero_()
        self.keys, self.values, self.capacity = keys, values, capacity

    def clear(self) -> None:
        """Zero the values of the current layout (the invariant above, for a new sequence)."""
        self.values.zero_()


class NativeDecodeAttention:
    """Attention of one position over a :class:`KVCache` layer: two native calls.

    The scores of every query head against its kv head's cached keys are one grouped call (group = kv
    head, rows = the query heads sharing it), and so are the probabilities times the transposed values;
    both stream the cache at memory speed and accumulate in float32. Measured per layer at P = 544 with
    OLMoE-1B-7B's heads, against transformers' SDPA (flash, 2.1 ms on one thread): this layout's ~0.2 ms
    beats one native call per kv head (0.6 ms; most of it per-call overhead), a float32 broadcast product
    (1.4 ms; 0.8 ms under torch.compile) and bf16 bmm (0.8 ms, with the scores rounded to bf16).

    Args:
        num_heads: Hq.
        num_kv_heads: Hkv.
        max_seq_len: L.
        dtype: the cache dtype.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, max_seq_len: int, dtype: torch.dtype) -> None:
        group = num_heads // num_kv_heads
        self.scores = torch.empty(num_heads, max_seq_len, dtype=torch.float32)  # [Hq, L]
        self.probs = torch.zeros(num_heads, max_seq_len, dtype=dtype)  # [Hq, L]; zero beyond the filled length
        self._groups = (
            torch.arange(num_kv_heads),  # expert = kv head
            torch.arange(num_kv_heads) * group,  # first row of its query heads
            torch.full((num_kv_heads,), group),
        )

    def clear(self) -> None:
        """Zero the probabilities (for a new sequence)."""
        self.probs.zero_()

    def __call__(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float
    ) -> torch.Tensor:
        """q: [Hq, D] in the cache dtype; keys [Hkv, C, D] and values [Hkv, D, C] with ``length`` positions
        filled -> [Hq, D] float32."""
        capacity = keys.shape[1]
        scores = native.grouped_gemv(q, keys, *self._groups, out=self.scores[:, :capacity])  # [Hq, C]
        native.softmax(scores[:, :length], scale, self.probs[:, :length])
        return native.grouped_gemv(self.probs[:, :capacity], values, *self._groups)  # [Hq, D]


class Matvec:
    """One-row products x @ W.T (+ b) into a float32 row.

    On the native kernel the weight is a single group of one expert, streamed once from memory; for a
    1-row bf16 product torch's GEMM reaches about a third of the memory bandwidth on our hosts.

    Args:
        weight: [N, K], referenced (not copied).
        bias: [N] or None.
        use_native: run on the native kernel (falls back to F.linear where it cannot).
    """

    def __init__(self, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, use_native: bool) -> None:
        quantized = isinstance(weight, QuantizedWeight)
        self.weight = weight if quantized else weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.native = (
            use_native
            and native.is_available()
            and weight.device.type == "cpu"
            and (quantized or (weight.dtype in (torch.bfloat16, torch.float32) and weight.is_contiguous()))
        )
        if self.native:
            self._weight3 = as_stack(weight) if quantized else self.weight.unsqueeze(0)  # [1, N, K]: one "expert"
            self._bias2 = None if bias is None else self.bias.float().unsqueeze(0)  # [1, N], N floats
            self._group = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))  # expert, start
            self._count = torch.ones(1, dtype=torch.int64)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> x @ W.T (+ b) [T, N] in x's dtype (prefill)."""
        return linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x: [1, K] in the weight's dtype; out: [1, N] float32 with unit stride along N. Returns out."""
        if self.native:
            return native.grouped_gemv(x, self._weight3, *self._group, self._count, bias=self._bias2, out=out)
        return out.copy_(linear(x, self.weight, self.bias))


@dataclass
class LeanLayer:
    """One decoder layer as the runner sees it: references to the model's parameters, and its MLP.

    ``mlp`` maps [T, H] -> [T, H] in the model dtype: a moerun MoELayer for MoE layers (benchmarks wrap
    it to time the MoE share of a step), the model's own module for dense layers.
    """

    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv: Matvec  # q, k and v projections stacked: [(Hq + 2 Hkv) D, H]
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


def resolve_max_seq_len(config, max_seq_len: int | None) -> int:
    """The positions a runner's cache holds: ``max_seq_len``, by default the model's context (at most
    ``DEFAULT_MAX_SEQ_LEN``); ValueError below 1."""
    if max_seq_len is None:
        max_seq_len = min(getattr(config, "max_position_embeddings", DEFAULT_MAX_SEQ_LEN), DEFAULT_MAX_SEQ_LEN)
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    return max_seq_len


def check_static_rope(config) -> None:
    """NotImplementedError for RoPE variants whose tables change with the sequence (they cannot be precomputed)."""
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _DYNAMIC_ROPE:
        raise NotImplementedError(f"RoPE type {rope_type!r} depends on the sequence length; use the HF runner")


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
    check_static_rope(config)
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
            is not modified, and its parameters are shared (q/k/v are stacked into a copy), so changes to
            its weights after this reach the runner except for q/k/v.
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
        max_seq_len = resolve_max_seq_len(config, max_seq_len)
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
        self.cache = KVCache(len(self.layers), self.num_kv_heads, self.head_dim, max_seq_len, self.dtype)
        # Decode buffers, reused every step: the stacked q|k|v projections, the o projection.
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self._qkv = torch.empty(1, q_size + 2 * kv_size, dtype=torch.float32)  # [1, (Hq + 2 Hkv) D]
        self._qkv_sizes = [q_size, kv_size, kv_size]
        self._q, self._k, self._v = self._qkv.split(self._qkv_sizes, dim=1)
        self._o = torch.empty(1, hidden, dtype=torch.float32)  # [1, H]
        self._h = torch.empty(1, hidden, dtype=self.dtype)  # [1, H] the residual stream
        self._attention = None
        if all(layer.qkv.native for layer in self.layers):  # the kernel runs this dtype on this host
            self._attention = NativeDecodeAttention(self.num_heads, self.num_kv_heads, max_seq_len, self.dtype)
            self._q_cache = torch.empty(self.num_heads, self.head_dim, dtype=self.dtype)  # [Hq, D] rotated q
            norm_dtype = torch.promote_types(self.dtype, self.final_norm.dtype)
            self._normed = torch.empty(1, hidden, dtype=norm_dtype)  # [1, H] a norm's output
        self.length = 0

    def _layer(self, layer: nn.Module, use_native: bool) -> LeanLayer:
        attn = layer.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        biases = [proj.bias for proj in projections]
        with torch.no_grad():
            weights = [proj.weight for proj in projections]
            quantized = all(isinstance(w, QuantizedWeight) for w in weights)
            qkv_weight = concat_rows(weights) if quantized else torch.cat(weights)  # [(Hq + 2 Hkv) D, H]
            qkv_bias = None if biases[0] is None else torch.cat(biases)
        norms = [None, None] if self.qk_norm is None else [attn.q_norm.weight.detach(), attn.k_norm.weight.detach()]
        return LeanLayer(
            input_norm=layer.input_layernorm.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            qkv=Matvec(qkv_weight, qkv_bias, use_native),
            o=Matvec(attn.o_proj.weight, attn.o_proj.bias, use_native),
            q_norm=norms[0],
            k_norm=norms[1],
            mlp=_mlp_of(layer.mlp),
        )

    def reset(self) -> None:
        """Start a new sequence."""
        self.length = 0
        self.cache.clear()
        if self._attention is not None:
            self._attention.clear()

    def _make_room(self, tokens: int) -> None:
        """Grow the cache for ``tokens`` more positions; ValueError beyond max_seq_len.

        One position more is reserved, for the next decode step: a prompt filling a whole number of cache
        blocks would otherwise make the first decode step copy the whole cache into a larger layout (16 MB,
        ~2 ms, after a 512-token prompt on olmoe-1b-7b-4l), where growing before the prompt is written copies
        nothing.
        """
        if self.length + tokens > self.max_seq_len:
            raise ValueError(
                f"the sequence would reach {self.length + tokens} positions; this runner holds {self.max_seq_len} "
                "(make it with a larger max_seq_len)"
            )
        self.cache.reserve(min(self.length + tokens + 1, self.max_seq_len), self.length)

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
        self._make_room(num_tokens)
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
            qkv = layer.qkv.rows(x)  # [T, (Hq + 2 Hkv) D]
            q, k, v = qkv.split(self._qkv_sizes, dim=1)  # [T, Hq*D], [T, Hkv*D], [T, Hkv*D]
            q, k = self._norm_qk(layer, q, k)
            if self.clip_qkv is not None:
                v = v.clamp(-self.clip_qkv, self.clip_qkv)
            q = apply_rope(q.view(num_tokens, hq, d).transpose(0, 1), cos, sin)  # [Hq, T, D]
            k = apply_rope(k.view(num_tokens, hkv, d).transpose(0, 1), cos, sin)  # [Hkv, T, D]
            keys, values = self.cache.keys[i], self.cache.values[i]  # [Hkv, C, D], [Hkv, D, C]
            keys[:, start:end] = k
            values[:, :, start:end] = v.view(num_tokens, hkv, d).permute(1, 2, 0)
            # SDPA takes its flash kernel only with the head dim contiguous: untranspose the values (a copy of
            # 1/3 of the prefix's kv bytes; the math fallback it avoids took 3x as long at 512 tokens).
            values = values[:, :, :end].transpose(-1, -2).contiguous()  # [Hkv, P, D]
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(0), keys[None, :, :end], values[None], attn_mask=mask,
                is_causal=mask is None, scale=self.scaling, enable_gqa=hq != hkv,
            )  # [1, Hq, T, D]  # fmt: skip
            attn = attn[0].transpose(0, 1).reshape(num_tokens, hq * d)  # [T, Hq*D]
            h = h + layer.o.rows(attn)
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
        self._make_room(1)
        pos = self.length
        end = pos + 1
        d, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        cos, sin = self.cos[pos], self.signed_sin[pos]  # [D] float32
        h = self._h.copy_(self.embed[token_id])  # [1, H] model dtype, the residual stream
        for i, layer in enumerate(self.layers):
            layer.qkv(self._norm(h, layer.input_norm), self._qkv)
            keys, values = self.cache.keys[i], self.cache.values[i]  # [Hkv, C, D], [Hkv, D, C]
            if self._attention is None:
                q, k = self._norm_qk(layer, self._q, self._k)  # float32
                v = self._v if self.clip_qkv is None else self._v.clamp(-self.clip_qkv, self.clip_qkv)
                q = apply_rope(q.view(hq, d), cos, sin)  # [Hq, D]
                keys[:, pos] = apply_rope(k.view(hkv, d), cos, sin)
                values[:, :, pos] = v.view(hkv, d)
                attn = decode_attention(q, keys[:, :end], values[:, :, :end].transpose(-1, -2), self.scaling)
            else:  # norms, clamp, RoPE and the cache writes in one native call instead of some 20 torch ops
                native.attention_inputs(
                    self._qkv, (hq, hkv, d), self.qk_norm, (layer.q_norm, layer.k_norm), self.eps, self.clip_qkv,
                    cos, sin, self._q_cache, keys[:, pos], values[:, :, pos],
                )  # fmt: skip
                attn = self._attention(self._q_cache, keys, values, end, self.scaling)  # [Hq, D] float32
            h.add_(layer.o(attn.view(1, hq * d).to(self.dtype), self._o))
            h.add_(layer.mlp(self._norm(h, layer.post_norm)))
        self.length = end
        logits = torch.empty(1, self.lm_head.out_features, dtype=torch.float32)
        return self.lm_head(self._norm(h, self.final_norm), logits)[0]

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMS norm of the residual row h [1, H] (into a reused buffer on the native kernel)."""
        if self._attention is None:
            return rms_norm(h, weight, self.eps)
        return native.rms_norm(h, weight, self.eps, self._normed)


def make_lean_runner(model: nn.Module, max_seq_len: int | None = None, use_native: bool = True) -> Runner:
    """The lean runner over ``model``: :class:`LeanRunner` for llama-like attention, ``VariantLeanRunner``
    (:mod:`moerun.runtime.lean_variants`) for DeepSeek-V2/V3 and GPT-OSS; NotImplementedError for the rest."""
    from .lean_variants import VARIANT_FAMILIES, VariantLeanRunner

    if getattr(model.config, "model_type", None) in VARIANT_FAMILIES:
        return VariantLeanRunner(model, max_seq_len, use_native)
    return LeanRunner(model, max_seq_len, use_native)
