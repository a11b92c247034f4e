"""The lean runner for DeepSeek-V2/V3 (multi-head latent attention) and GPT-OSS (sinks, sliding windows)
computes what transformers computes: prefill and decode logits, continued prompts, low-bit, bf16 (test_lean.py
runs them through its family tests too: greedy ids, patched models)."""

from __future__ import annotations

import pytest
import torch

import moerun
from families import family_config, model_of_config, tiny_model
from moerun.models.quantized import QuantConfig
from moerun.runtime.lean import make_lean_runner
from moerun.runtime.lean_variants import VariantLeanRunner, rope_tables, rotate
from test_lean import HFReference, assert_logits_close, assert_prefill_and_decode_match, prompt, relative_error

VARIANTS = ("deepseek_v2", "deepseek_v3", "gpt_oss")


def variant_model(name: str, dtype: torch.dtype = torch.float32):
    """A tiny model of a variant: the family's, or DeepSeek-V3 with a q LoRA / without interleaved RoPE."""
    if name == "deepseek_v3_q_lora":
        config = family_config("deepseek_v3")
        config.q_lora_rank = 24
        return model_of_config(config, dtype=dtype)
    if name == "deepseek_v3_rotate_half":
        config = family_config("deepseek_v3")
        config.rope_interleave = False
        return model_of_config(config, dtype=dtype)
    return tiny_model(name, dtype=dtype)


@pytest.mark.parametrize("name", [*VARIANTS, "deepseek_v3_q_lora", "deepseek_v3_rotate_half"])
@pytest.mark.parametrize("prompt_length", [1, 11, 40])
def test_prefill_and_decode_match_transformers_fp32(name: str, prompt_length: int) -> None:
    """40 prompt tokens and 20 decode steps cross GPT-OSS's 16-token sliding window in both phases."""
    model = variant_model(name)
    runner = make_lean_runner(model, max_seq_len=64)
    assert isinstance(runner, VariantLeanRunner)
    assert_prefill_and_decode_match(model, runner, prompt(prompt_length))


@pytest.mark.parametrize("family", VARIANTS)
def test_prompt_after_cached_positions_matches_transformers(family: str) -> None:
    """A second prompt attends to the cached positions (and, in GPT-OSS's sliding layers, only the last 16)."""
    model = tiny_model(family)
    runner = make_lean_runner(model, max_seq_len=64)
    first, second = prompt(14, seed=3), prompt(9, seed=4)
    whole = torch.cat((first, torch.tensor([5]), second))
    with torch.inference_mode():  # one uncached forward: transformers' DeepSeek-V2 fails a cached multi-token one
        expected = model(whole[None]).logits[0].float()
    assert_logits_close(runner.prefill(first), expected[13], 1e-4)
    assert_logits_close(runner.decode(5), expected[14], 1e-4)
    assert_logits_close(runner.prefill(second), expected[-1], 1e-4)
    assert runner.length == 24


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", VARIANTS)
def test_low_bit_model_matches_its_transformers_forward(family: str, bits: int) -> None:
    """After moerun.quantize the attention projections are low-bit too (MLA's kv_b_proj is dequantized once
    for decode's absorbed form); the runner computes what the quantized model's own forward computes."""
    model = tiny_model(family)
    moerun.patch(model)
    moerun.quantize(model, QuantConfig(bits=bits))
    runner = make_lean_runner(model, max_seq_len=32)
    reference = HFReference(model)
    ids = prompt(12, seed=5)
    assert_logits_close(runner.prefill(ids), reference(ids.tolist()), 2e-3)
    for token in (3, 50, 7):
        assert_logits_close(runner.decode(token), reference([token]), 2e-3)


@pytest.mark.parametrize("family", VARIANTS)
def test_bf16_close_to_transformers_fp32(family: str) -> None:
    """bf16 against transformers in fp32 on the same weights: every position within 5% of the largest logit
    (transformers' own bf16 forward is 1-3% away on these models)."""
    model = tiny_model(family)
    runner = make_lean_runner(model.to(torch.bfloat16), max_seq_len=32)
    reference = HFReference(tiny_model(family))
    ids = prompt(12, seed=6)
    errors = [relative_error(runner.prefill(ids), reference(ids.tolist()))]
    for token in (3, 50, 7, 90):
        errors.append(relative_error(runner.decode(token), reference([token])))
    assert max(errors) <= 5e-2, errors


def test_families_without_a_lean_path_are_refused() -> None:
    with pytest.raises(NotImplementedError, match="covers"):
        VariantLeanRunner(tiny_model("olmoe"))


@pytest.mark.parametrize("pairs", [True, False])
def test_rotate_matches_the_model_layouts(pairs: bool) -> None:
    """Adjacent pairs (DeepSeek's complex form) or halves (rotate_half): dot products of rotated vectors are the
    model's whatever the output layout."""
    torch.manual_seed(0)
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    angle = torch.randn(5, 4)
    if pairs:
        rotation = torch.polar(torch.ones_like(angle), angle)
        want_q = torch.view_as_real(torch.view_as_complex(q.view(5, 4, 2)) * rotation).flatten(1)
        want_k = torch.view_as_real(torch.view_as_complex(k.view(5, 4, 2)) * rotation).flatten(1)
    else:
        cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
        want_q = q * cos + torch.cat((-q[:, 4:], q[:, :4]), 1) * sin
        want_k = k * cos + torch.cat((-k[:, 4:], k[:, :4]), 1) * sin
    got_q, got_k = (rotate(t, angle.cos(), angle.sin(), pairs) for t in (q, k))
    torch.testing.assert_close(got_q @ got_k.T, want_q @ want_k.T)


def test_rope_tables_of_each_rotary_embedding() -> None:
    for family in VARIANTS:
        model = tiny_model(family)
        attn = model.model.layers[0].self_attn
        dims = getattr(attn, "qk_rope_head_dim", None) or attn.head_dim
        cos, sin = rope_tables(model.model.rotary_emb, 16, dims)
        assert cos.shape == sin.shape == (16, dims // 2) and cos.dtype == torch.float32
        torch.testing.assert_close(cos[0], torch.full_like(cos[0], cos[0, 0].item()))  # position 0: angle 0
