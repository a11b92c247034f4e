"""The lean runner for families whose attention is not llama-like: DeepSeek-V2/V3 and GPT-OSS.

- **Multi-head latent attention** (DeepSeek-V2/V3, :class:`LatentAttention`). The cache holds each position's
  compressed latent ``c`` [R] (after its RMSNorm) and its rotary key [Dr], not per-head keys and values:
  (R + Dr) values a position instead of Hq (Dn + Dr + Dv). Prefill expands the latents through ``kv_b_proj``
  and runs SDPA as transformers does. Decode absorbs ``kv_b_proj`` into the query and the output instead:
  ``q_lat = q_nope W_UK`` [Hq, R], scores ``q_lat c^T + q_rot k_rot^T``, ``o = (p c) W_UV``, so a step reads
  the latent cache and ``kv_b_proj`` once rather than expanding every cached position (which would cost
  P times the projection).
- **Attention with sinks and sliding windows** (GPT-OSS, :class:`SinkAttention`): q/k/v/o biases, a learned
  per-head logit that joins every softmax and takes probability mass without a value, and layers that see
  only the last ``sliding_window`` positions.

RoPE tables come from the model's own rotary embedding, precomputed for every position in float32; each
decoder layer is RMSNorm -> attention -> residual -> RMSNorm -> MoE or MLP -> residual as in
:mod:`moerun.runtime.lean`, with the same moerun MoE layers.

Shape legend: T prompt tokens, P cached positions, L max_seq_len, H hidden, Hq query heads, Hkv key/value
heads, D head dim, Dn / Dr / Dv MLA's non-rotary, rotary and value head dims, R MLA's kv latent rank, V
vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.linear import linear
from ..quant.formats import QuantizedWeight, concat_rows, dequantize_matrix
from . import lean
from .lean import Matvec, _mlp_of, check_static_rope, resolve_max_seq_len

# model_type -> its attention: DeepSeek's latent attention, or GPT-OSS's with sinks (whose RMSNorm also rounds
# to the model dtype after the weight, not before it).
VARIANT_FAMILIES = {"deepseek_v2": "latent", "deepseek_v3": "latent", "gpt_oss": "sinks"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_fp32: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim in float32: ``weight * n.to(dtype)`` (llama) or ``(weight * n).to(dtype)``
    (GPT-OSS, ``weight_in_fp32``). x: [..., N] -> [..., N] in x's dtype."""
    if weight_in_fp32:
        return (weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps)).to(x.dtype)
    return lean.rms_norm(x, weight, eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: bool) -> torch.Tensor:
    """RoPE on the last dim of x [..., Dr] with half tables cos, sin [..., Dr/2] (broadcast), in float32.

    ``pairs``: the rotated pairs are (x0, x1), (x2, x3), ... (DeepSeek); else (x_i, x_{i+Dr/2}) (GPT-OSS).
    The output lists the pairs' first elements, then their second ones, for both layouts: queries and keys
    go through the same function, so their dot products are those of the model's own layout.
    """
    x = x.float()
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if pairs else x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_tables(rotary_emb: nn.Module, max_seq_len: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [L, Dr/2] float32 from a transformers rotary embedding (complex ``freqs_cis`` for
    DeepSeek-V2, (cos, sin) of Dr or Dr/2 columns otherwise), attention scaling included."""
    positions = torch.arange(max_seq_len).unsqueeze(0)  # [1, L]
    with torch.no_grad():
        out = rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    if isinstance(out, torch.Tensor) and out.is_complex():
        cos, sin = out.real[0].float(), out.imag[0].float()
    else:
        cos, sin = out[0][0].float(), out[1][0].float()
        if cos.shape[-1] == rotary_dim:  # cat(freqs, freqs): the first half holds each pair's angle
            half = rotary_dim // 2
            if not torch.equal(cos[:, :half], cos[:, half:]):
                raise NotImplementedError("a rotary embedding whose halves differ is not covered")
            cos, sin = cos[:, :half], sin[:, :half]
    if cos.shape[-1] != rotary_dim // 2:
        raise NotImplementedError(f"rotary tables of {cos.shape[-1]} columns for {rotary_dim} rotary dims")
    return cos, sin


def _causal_mask(start: int, end: int, window: int | None) -> torch.Tensor:
    """[T, P] True where query position start + t may attend key position p (p <= it, within the window)."""
    queries = torch.arange(start, end).unsqueeze(1)
    keys = torch.arange(end)
    allowed = keys <= queries
    if window is not None:
        allowed &= queries - keys < window
    return allowed


class LatentAttention:
    """DeepSeek-V2/V3 multi-head latent attention of one layer, with its latent cache (module docstring).

    Args:
        attn: the transformers attention module (``DeepseekV2Attention`` / ``DeepseekV3Attention``).
        cos, sin: [L, Dr/2] RoPE tables.
        pairs: RoPE rotates adjacent pairs (DeepSeek-V2, V3 with ``rope_interleave``).
        eps: the latent norms' epsilon.
        dtype: the model dtype (activations and caches).
        use_native: decode matrix-vector products on the native kernel where it runs.
    """

    def __init__(
        self, attn: nn.Module, cos: torch.Tensor, sin: torch.Tensor, pairs: bool, eps: float, dtype: torch.dtype,
        use_native: bool,
    ) -> None:  # fmt: skip
        self.num_heads = attn.num_heads
        self.nope, self.rope, self.value = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
        self.rank = attn.kv_lora_rank
        self.scaling = float(attn.scaling)
        self.cos, self.sin, self.pairs, self.eps = cos, sin, pairs, eps
        if attn.q_lora_rank is None:
            self.q = Matvec(attn.q_proj.weight, attn.q_proj.bias, use_native)
            self.q_a = self.q_b = self.q_norm = None
        else:
            self.q = None
            self.q_a = Matvec(attn.q_a_proj.weight, attn.q_a_proj.bias, use_native)
            self.q_norm = attn.q_a_layernorm.weight.detach()
            self.q_b = Matvec(attn.q_b_proj.weight, attn.q_b_proj.bias, use_native)
        self.kv_a = Matvec(attn.kv_a_proj_with_mqa.weight, attn.kv_a_proj_with_mqa.bias, use_native)
        self.kv_norm = attn.kv_a_layernorm.weight.detach()
        self.kv_b = attn.kv_b_proj.weight  # [Hq (Dn + Dv), R], float or low-bit
        self.o = Matvec(attn.o_proj.weight, attn.o_proj.bias, use_native)
        self.dtype = dtype
        # Decode's absorbed projections, in the model dtype: W_UK [Hq, Dn, R] and W_UV^T [Hq, R, Dv].
        kv_b = dequantize_matrix(self.kv_b, dtype).detach()
        per_head = kv_b.view(self.num_heads, self.nope + self.value, self.rank)
        self.w_uk = per_head[:, : self.nope].contiguous()
        self.w_uv_t = per_head[:, self.nope :].transpose(1, 2).contiguous()
        max_seq_len = cos.shape[0]
        self.latents = torch.zeros(max_seq_len, self.rank, dtype=self.dtype)  # [L, R] normed latents
        self.rotary_keys = torch.zeros(max_seq_len, self.rope, dtype=self.dtype)  # [L, Dr]

    def _queries(self, x: torch.Tensor, rows: bool) -> torch.Tensor:
        """x [T, H] -> q [T, Hq (Dn + Dr)] in the model dtype."""
        if self.q is not None:
            return self.q.rows(x) if rows else self._matvec(self.q, x)
        latent = self.q_a.rows(x) if rows else self._matvec(self.q_a, x)
        latent = rms_norm(latent, self.q_norm, self.eps)
        return self.q_b.rows(latent) if rows else self._matvec(self.q_b, latent)

    def _matvec(self, proj: Matvec, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(1, proj.out_features, dtype=torch.float32)
        return proj(x.contiguous(), out).to(self.dtype)

    def _split_and_cache(self, q: torch.Tensor, kv: torch.Tensor, start: int, end: int) -> tuple:
        """Rotate, and write the latents and rotary keys of positions [start, end); returns (q_nope [T, Hq, Dn],
        q_rot [T, Hq, Dr]) in the model dtype."""
        cos, sin = self.cos[start:end], self.sin[start:end]  # [T, Dr/2]
        q = q.view(q.shape[0], self.num_heads, self.nope + self.rope)
        q_nope, q_rot = q.split((self.nope, self.rope), dim=-1)
        q_rot = rotate(q_rot, cos[:, None], sin[:, None], self.pairs).to(self.dtype)
        latent, k_rot = kv.split((self.rank, self.rope), dim=-1)
        self.latents[start:end] = rms_norm(latent, self.kv_norm, self.eps)
        self.rotary_keys[start:end] = rotate(k_rot, cos, sin, self.pairs).to(self.dtype)
        return q_nope, q_rot

    def prefill(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [T, H] normed hidden states at positions start.. -> attention output after o_proj [T, H]."""
        end = start + x.shape[0]
        q_nope, q_rot = self._split_and_cache(self._queries(x, True), self.kv_a.rows(x), start, end)
        expanded = linear(self.latents[:end], self.kv_b).view(end, self.num_heads, self.nope + self.value)
        k_nope, values = expanded.split((self.nope, self.value), dim=-1)  # [P, Hq, Dn], [P, Hq, Dv]
        keys = torch.cat((k_nope, self.rotary_keys[:end, None].expand(-1, self.num_heads, -1)), dim=-1)
        queries = torch.cat((q_nope, q_rot), dim=-1)  # [T, Hq, Dn + Dr]
        mask = None if start == 0 else _causal_mask(start, end, None)
        attn = F.scaled_dot_product_attention(
            queries.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
            is_causal=mask is None, scale=self.scaling,
        )  # [Hq, T, Dv]  # fmt: skip
        return self.o.rows(attn.transpose(0, 1).reshape(x.shape[0], -1))

    def decode(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """x [1, H] normed hidden state at ``position`` -> attention output after o_proj [1, H]."""
        end = position + 1
        q_nope, q_rot = self._split_and_cache(self._queries(x, False), self._matvec(self.kv_a, x), position, end)
        q_latent = torch.bmm(q_nope[0].unsqueeze(1), self.w_uk)[:, 0]  # [Hq, R]
        latents = self.latents[:end]  # [P, R]
        scores = (q_latent @ latents.T).float() + (q_rot[0] @ self.rotary_keys[:end].T).float()  # [Hq, P]
        probs = torch.softmax(scores * self.scaling, dim=-1).to(self.dtype)
        out = torch.bmm((probs @ latents).unsqueeze(1), self.w_uv_t)[:, 0]  # [Hq, Dv]
        return self._matvec(self.o, out.reshape(1, -1))


class SinkAttention:
    """GPT-OSS attention of one layer with its KV cache (module docstring).

    Args:
        attn: the transformers ``GptOssAttention``.
        cos, sin: [L, D/2] RoPE tables.
        window: the layer's sliding window in positions, or None for full causal attention.
        dtype: the model dtype (activations and caches).
        use_native: decode matrix-vector products on the native kernel where it runs.
    """

    def __init__(
        self, attn: nn.Module, cos: torch.Tensor, sin: torch.Tensor, window: int | None, dtype: torch.dtype,
        use_native: bool,
    ) -> None:  # fmt: skip
        config = attn.config
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = float(attn.scaling)
        self.cos, self.sin, self.window = cos, sin, window
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        with torch.no_grad():
            weights = [p.weight for p in projections]
            quantized = all(isinstance(w, QuantizedWeight) for w in weights)
            stacked = concat_rows(weights) if quantized else torch.cat(weights)  # [(Hq + 2 Hkv) D, H]
            biases = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
        self.qkv = Matvec(stacked, biases, use_native)
        self.o = Matvec(attn.o_proj.weight, attn.o_proj.bias, use_native)
        self.sinks = attn.sinks.detach().float()  # [Hq]
        self.dtype = dtype
        self.sizes = [self.num_heads * self.head_dim, *[self.num_kv_heads * self.head_dim] * 2]
        max_seq_len = cos.shape[0]
        self.keys = torch.zeros(self.num_kv_heads, max_seq_len, self.head_dim, dtype=self.dtype)
        self.values = torch.zeros_like(self.keys)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """q [T, Hq D], k and v [T, Hkv D] of positions [start, end) -> [T, Hq D] in the model dtype."""
        t, d, group = q.shape[0], self.head_dim, self.num_heads // self.num_kv_heads
        cos, sin = self.cos[start:end, None], self.sin[start:end, None]  # [T, 1, D/2]
        q = rotate(q.view(t, self.num_heads, d), cos, sin, pairs=False).to(self.dtype)
        self.keys[:, start:end] = rotate(k.view(t, self.num_kv_heads, d), cos, sin, pairs=False).transpose(0, 1)
        self.values[:, start:end] = v.view(t, self.num_kv_heads, d).transpose(0, 1)
        lo = 0 if self.window is None else max(0, start - self.window + 1)  # keys no query of these sees
        keys, values = self.keys[:, lo:end], self.values[:, lo:end]  # [Hkv, P', D]
        queries = q.view(t, self.num_kv_heads, group, d).permute(1, 2, 0, 3).float()  # [Hkv, g, T, D]
        scores = queries @ keys.float().unsqueeze(1).transpose(-1, -2) * self.scaling  # [Hkv, g, T, P']
        allowed = _causal_mask(start, end, self.window)[:, lo:]  # [T, P']
        scores = scores.masked_fill(~allowed, float("-inf"))
        sinks = self.sinks.view(self.num_kv_heads, group, 1, 1).expand(-1, -1, t, 1)
        logits = torch.cat((scores, sinks), dim=-1)
        probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
        out = probs.to(self.dtype) @ values.unsqueeze(1)  # [Hkv, g, T, D]
        return out.permute(2, 0, 1, 3).reshape(t, -1)

    def prefill(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [T, H] normed hidden states at positions start.. -> attention output after o_proj [T, H]."""
        q, k, v = self.qkv.rows(x).split(self.sizes, dim=1)
        return self.o.rows(self._attend(q, k, v, start, start + x.shape[0]))

    def decode(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """x [1, H] normed hidden state at ``position`` -> attention output after o_proj [1, H]."""
        qkv = torch.empty(1, sum(self.sizes), dtype=torch.float32)
        q, k, v = self.qkv(x.contiguous(), qkv).to(self.dtype).split(self.sizes, dim=1)
        attn = self._attend(q, k, v, position, position + 1)
        out = torch.empty(1, self.o.out_features, dtype=torch.float32)
        return self.o(attn.contiguous(), out).to(self.dtype)


@dataclass
class VariantLayer:
    """One decoder layer: its norms' weights, its attention, and its MoE or dense MLP ([T, H] -> [T, H])."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attention: LatentAttention | SinkAttention
    mlp: Callable[[torch.Tensor], torch.Tensor]


class VariantLeanRunner:
    """Prefill and decode of one sequence over a DeepSeek-V2/V3 or GPT-OSS ``*ForCausalLM`` (module docstring).

    Args:
        model: the loaded model, moerun-patched or not; not modified, its parameters shared (GPT-OSS's q/k/v
            are stacked into a copy; MLA's ``kv_b_proj`` is kept once more, split per head, for decode).
        max_seq_len: L, positions the caches hold (default: the model's context, at most 4096).
        use_native: run decode matrix-vector products on the native kernel (default: where available).

    Raises:
        NotImplementedError: the model's family or configuration is not covered (use the HF runner).
    """

    def __init__(self, model: nn.Module, max_seq_len: int | None = None, use_native: bool = True) -> None:
        config = model.config
        family = getattr(config, "model_type", None)
        if family not in VARIANT_FAMILIES:
            raise NotImplementedError(f"the variant lean runner covers {', '.join(VARIANT_FAMILIES)}, not {family}")
        max_seq_len = resolve_max_seq_len(config, max_seq_len)
        check_static_rope(config)
        self.max_seq_len = max_seq_len
        decoder = model.model
        self.eps = float(decoder.norm.variance_epsilon)
        self.norm_weight_in_fp32 = VARIANT_FAMILIES[family] == "sinks"
        self.embed = decoder.embed_tokens.weight.detach()  # [V, H]
        self.dtype = self.embed.dtype
        self.final_norm = decoder.norm.weight.detach()
        self.lm_head = Matvec(model.lm_head.weight, model.lm_head.bias, use_native)
        first = decoder.layers[0].self_attn
        if VARIANT_FAMILIES[family] == "latent":
            cos, sin = rope_tables(decoder.rotary_emb, max_seq_len, first.qk_rope_head_dim)
            pairs = family == "deepseek_v2" or bool(getattr(config, "rope_interleave", False))

            def attention(layer: nn.Module, index: int) -> LatentAttention:
                eps = float(layer.self_attn.kv_a_layernorm.variance_epsilon)
                return LatentAttention(layer.self_attn, cos, sin, pairs, eps, self.dtype, use_native)
        else:
            cos, sin = rope_tables(decoder.rotary_emb, max_seq_len, first.head_dim)
            layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers

            def attention(layer: nn.Module, index: int) -> SinkAttention:
                window = config.sliding_window if layer_types[index] == "sliding_attention" else None
                return SinkAttention(layer.self_attn, cos, sin, window, self.dtype, use_native)

        self.layers = [
            VariantLayer(
                input_norm=layer.input_layernorm.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                attention=attention(layer, i),
                mlp=_mlp_of(layer.mlp),
            )
            for i, layer in enumerate(decoder.layers)
        ]
        self.length = 0

    def reset(self) -> None:
        """Start a new sequence (cached positions beyond the length are never read)."""
        self.length = 0

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, weight, self.eps, self.norm_weight_in_fp32)

    def _check_room(self, tokens: int) -> None:
        if self.length + tokens > self.max_seq_len:
            raise ValueError(
                f"the sequence would reach {self.length + tokens} positions; this runner holds {self.max_seq_len} "
                "(make it with a larger max_seq_len)"
            )

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.empty(1, self.lm_head.out_features, dtype=torch.float32)
        return self.lm_head(self._norm(h, self.final_norm).contiguous(), logits)[0]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64 appended to the sequence -> logits [V] float32 of its last position."""
        if input_ids.dim() != 1 or input_ids.numel() < 1 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be a non-empty 1-D integer tensor, got {tuple(input_ids.shape)}")
        self._check_room(input_ids.shape[0])
        start = self.length
        h = self.embed[input_ids]  # [T, H]
        for layer in self.layers:
            h = h + layer.attention.prefill(self._norm(h, layer.input_norm), start)
            h = h + layer.mlp(self._norm(h, layer.post_norm))
        self.length = start + input_ids.shape[0]
        return self._logits(h[-1:])

    @torch.inference_mode()
    def decode(self, token_id: int) -> torch.Tensor:
        """One token appended to the sequence -> logits [V] float32 of its position."""
        self._check_room(1)
        position = self.length
        h = self.embed[token_id].unsqueeze(0)  # [1, H]
        for layer in self.layers:
            h = h + layer.attention.decode(self._norm(h, layer.input_norm), position)
            h = h + layer.mlp(self._norm(h, layer.post_norm))
        self.length = position + 1
        return self._logits(h)
