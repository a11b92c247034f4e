"""The lean runner for DeepSeek-V2/V3 (multi-head latent attention) and GPT-OSS (sinks, sliding windows)
computes what transformers computes: prefill and decode logits, greedy ids, continued prompts, low-bit."""

from __future__ import annotations

import pytest
import torch

import moerun
from families import family_config, tiny_model
from moerun.models.quantized import QuantConfig
from moerun.runtime.lean import make_lean_runner
from moerun.runtime.lean_variants import VariantLeanRunner, rope_tables, rotate
from test_lean import DECODE_STEPS, HFReference, assert_logits_close, greedy, prompt, relative_error

VARIANTS = ("deepseek_v2", "deepseek_v3", "gpt_oss")


def variant_model(name: str, dtype: torch.dtype = torch.float32):
    """A tiny model of a variant: the family's, or DeepSeek-V3 with a q LoRA / without interleaved RoPE."""
    if name == "deepseek_v3_q_lora":
        config = family_config("deepseek_v3")
        config.q_lora_rank = 24
        return _model_of(config, dtype)
    if name == "deepseek_v3_rotate_half":
        config = family_config("deepseek_v3")
        config.rope_interleave = False
        return _model_of(config, dtype)
    return tiny_model(name, dtype=dtype)


def _model_of(config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02 if "embed" in name or "norm" in name else 0.15)
            if "norm" in name:
                p.add_(1.0)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.1)
    return model.to(dtype)


@pytest.mark.parametrize("name", [*VARIANTS, "deepseek_v3_q_lora", "deepseek_v3_rotate_half"])
@pytest.mark.parametrize("prompt_length", [1, 11, 40])
def test_prefill_and_decode_match_transformers_fp32(name: str, prompt_length: int) -> None:
    """40 prompt tokens and 20 decode steps cross GPT-OSS's 16-token sliding window in both phases."""
    model = variant_model(name)
    runner = make_lean_runner(model, max_seq_len=64)
    assert isinstance(runner, VariantLeanRunner)
    reference = HFReference(model)
    ids = prompt(prompt_length)
    expected = reference(ids.tolist())
    got = runner.prefill(ids)
    assert got.dtype == torch.float32 and got.shape == (128,)
    assert_logits_close(got, expected, 1e-4)
    token = int(expected.argmax())
    for _ in range(DECODE_STEPS):
        expected = reference([token])
        assert_logits_close(runner.decode(token), expected, 1e-4)
        token = int(expected.argmax())
    assert runner.length == prompt_length + DECODE_STEPS


@pytest.mark.parametrize("family", VARIANTS)
def test_greedy_ids_match_transformers_generate(family: str) -> None:
    model = tiny_model(family)
    ids = prompt(7, seed=2)
    with torch.inference_mode():
        expected = model.generate(ids[None], max_new_tokens=DECODE_STEPS, do_sample=False, min_new_tokens=DECODE_STEPS)
    assert greedy(make_lean_runner(model, max_seq_len=32), ids, DECODE_STEPS) == expected[0, 7:].tolist()


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


@pytest.mark.parametrize("family", VARIANTS)
def test_patched_model_and_reset(family: str) -> None:
    model = tiny_model(family)
    ids = prompt(9)
    expected = greedy(make_lean_runner(model, max_seq_len=32), ids, 8)
    moerun.patch(model)
    runner = make_lean_runner(model, max_seq_len=32)
    assert greedy(runner, ids, 8) == expected
    runner.reset()
    assert runner.length == 0
    assert greedy(runner, ids, 8) == expected


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


def test_sequence_longer_than_the_cache_is_refused() -> None:
    runner = make_lean_runner(tiny_model("gpt_oss"), max_seq_len=8)
    runner.prefill(prompt(7))
    runner.decode(1)
    with pytest.raises(ValueError, match="holds 8"):
        runner.decode(1)
    runner.reset()
    with pytest.raises(ValueError, match="holds 8"):
        runner.prefill(prompt(9))
    with pytest.raises(ValueError, match="non-empty 1-D integer"):
        runner.prefill(torch.zeros(0, dtype=torch.int64))


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
