"""The lean runner computes what transformers computes: prefill and decode logits, greedy ids, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import moerun
from families import tiny_model
from moerun.kernels import native
from moerun.runtime.lean import (
    KVCache,
    LeanRunner,
    NativeDecodeAttention,
    apply_rope,
    decode_attention,
    make_lean_runner,
)

LEAN_FAMILIES = ("olmoe", "qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")
NATIVE = [True, False] if native.is_available() else [False]
DECODE_STEPS = 20


class HFReference:
    """transformers' forward with its DynamicCache: logits [V] float32 of the last position."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)

    @torch.inference_mode()
    def __call__(self, ids: list[int]) -> torch.Tensor:
        out = self.model(torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        return out.logits[0, -1].float()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference as a fraction of the largest expected logit."""
    return float((got - expected).abs().max() / expected.abs().max())


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    err = relative_error(got, expected)
    assert err <= rel, f"max error {err:.2e} x the largest logit (allowed {rel:.0e})"


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(seed))


def assert_prefill_and_decode_match(model, runner, ids: torch.Tensor) -> None:
    """The runner's logits after the prompt ``ids`` and DECODE_STEPS greedy steps equal transformers' (fp32)."""
    reference = HFReference(model)
    expected = reference(ids.tolist())
    got = runner.prefill(ids)
    assert got.dtype == torch.float32 and got.shape == (128,)
    assert_logits_close(got, expected, 1e-4)
    token = int(expected.argmax())
    for _ in range(DECODE_STEPS):
        expected = reference([token])
        assert_logits_close(runner.decode(token), expected, 1e-4)
        token = int(expected.argmax())
    assert runner.length == ids.shape[0] + DECODE_STEPS


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_prefill_and_decode_match_transformers_fp32(family: str, use_native: bool) -> None:
    model = tiny_model(family)
    assert_prefill_and_decode_match(model, make_lean_runner(model, max_seq_len=64, use_native=use_native), prompt(11))


def greedy(runner, ids: torch.Tensor, steps: int) -> list[int]:
    token = int(runner.prefill(ids).argmax())
    out = [token]
    for _ in range(steps - 1):
        token = int(runner.decode(token).argmax())
        out.append(token)
    return out


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_greedy_ids_match_transformers_generate(family: str) -> None:
    model = tiny_model(family)
    ids = prompt(7, seed=2)
    with torch.inference_mode():
        expected = model.generate(ids[None], max_new_tokens=DECODE_STEPS, do_sample=False, min_new_tokens=DECODE_STEPS)
    runner = make_lean_runner(model, max_seq_len=32)
    assert greedy(runner, ids, DECODE_STEPS) == expected[0, 7:].tolist()


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v2", "gpt_oss"])
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


def test_prefill_after_cached_positions_matches_transformers() -> None:
    model = tiny_model("qwen3_moe")
    runner = make_lean_runner(model, max_seq_len=64)
    reference = HFReference(model)
    first, second = prompt(10, seed=3), prompt(6, seed=4)
    assert_logits_close(runner.prefill(first), reference(first.tolist()), 1e-4)
    assert_logits_close(runner.decode(5), reference([5]), 1e-4)
    assert_logits_close(runner.prefill(second), reference(second.tolist()), 1e-4)
    assert runner.length == 17


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_bf16_close_to_transformers(family: str) -> None:
    # In bf16 a near-tie in a router can pick another expert in either implementation, which moves the logits
    # by ~10%; the median over several prompts shows the usual distance (transformers' own bf16 error vs fp32
    # is 1-3% on these models).
    model = tiny_model(family, dtype=torch.bfloat16)
    runner = make_lean_runner(model, max_seq_len=32)
    errors = []
    for seed in range(6):
        runner.reset()
        reference = HFReference(model)
        ids = prompt(12, seed)
        errors.append(relative_error(runner.prefill(ids), reference(ids.tolist())))
        for token in (3, 50, 7):
            errors.append(relative_error(runner.decode(token), reference([token])))
    assert sorted(errors)[len(errors) // 2] <= 3e-2, errors


@pytest.mark.parametrize("use_native", NATIVE)
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_decode_attention_matches_sdpa(hkv: int, use_native: bool) -> None:
    q = torch.randn(4, 16)
    keys, values = torch.randn(hkv, 9, 16), torch.randn(hkv, 9, 16)
    expected = F.scaled_dot_product_attention(
        q.view(1, 4, 1, 16), keys[None], values[None], scale=0.3, enable_gqa=True
    )  # [1, Hq, 1, D]
    cache = KVCache(1, hkv, 16, max_seq_len=40, dtype=torch.float32, block=8)
    cache.reserve(9, 0)
    cache.keys[0, :, :9] = keys
    cache.values[0, :, :, :9] = values.transpose(1, 2)
    if use_native:
        got = NativeDecodeAttention(4, hkv, 40, torch.float32)(q, cache.keys[0], cache.values[0], 9, 0.3)
    else:
        got = decode_attention(q, cache.keys[0, :, :9], cache.values[0, :, :, :9].transpose(1, 2), 0.3)
    torch.testing.assert_close(got, expected.view(4, 16))


def test_kv_cache_grows_by_blocks_and_keeps_filled_positions() -> None:
    cache = KVCache(2, 3, 4, max_seq_len=100, dtype=torch.float32, block=8)
    cache.reserve(5, 0)
    assert cache.capacity == 8 and cache.keys.shape == (2, 3, 8, 4) and cache.values.shape == (2, 3, 4, 8)
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 4, 5)
    cache.keys[:, :, :5] = keys
    cache.values[..., :5] = values
    for length, capacity in ((8, 8), (9, 16), (70, 72), (97, 100)):
        cache.reserve(length, 5)
        assert cache.capacity == capacity
        assert torch.equal(cache.keys[:, :, :5], keys) and torch.equal(cache.values[..., :5], values)
        assert not cache.values[..., 5:].any()
    cache.clear()
    assert not cache.values.any()


def test_decode_across_cache_growth_matches_transformers() -> None:
    model = tiny_model("olmoe")
    runner = make_lean_runner(model, max_seq_len=200)  # capacities 128 -> 200
    reference = HFReference(model)
    ids = prompt(60)
    assert_logits_close(runner.prefill(ids), reference(ids.tolist()), 1e-4)
    for step in range(80):
        token = (7 * step) % 128
        assert_logits_close(runner.decode(token), reference([token]), 1e-4)
    assert runner.cache.capacity == 200
    more = prompt(50, seed=5)  # a prompt after cached positions, up to the full length
    assert_logits_close(runner.prefill(more), reference(more.tolist()), 1e-4)


def test_apply_rope_matches_rotate_half() -> None:
    x, cos, sin = torch.randn(3, 5, 8), torch.randn(5, 8), torch.randn(5, 8)
    rotated = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    signed_sin = torch.cat((-sin[:, :4], sin[:, 4:]), dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, signed_sin), x * cos + rotated * sin)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_sequence_longer_than_the_cache_is_refused(family: str) -> None:
    runner = make_lean_runner(tiny_model(family), max_seq_len=8)
    runner.prefill(prompt(7))
    runner.decode(1)
    with pytest.raises(ValueError, match="holds 8"):
        runner.decode(1)
    runner.reset()
    with pytest.raises(ValueError, match="holds 8"):
        runner.prefill(prompt(9))
    with pytest.raises(ValueError, match="non-empty 1-D integer"):
        runner.prefill(torch.zeros(0, dtype=torch.int64))


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_uncovered_families_raise_not_implemented(family: str) -> None:
    with pytest.raises(NotImplementedError, match="HF runner"):
        LeanRunner(tiny_model(family))


def test_sliding_window_shorter_than_the_cache_raises() -> None:
    model = tiny_model("mixtral")
    model.config.sliding_window = 16
    with pytest.raises(NotImplementedError, match="sliding window"):
        LeanRunner(model, max_seq_len=32)
    assert LeanRunner(model, max_seq_len=16).max_seq_len == 16


def test_reference_model_matches_transformers() -> None:
    from transformers import AutoModelForCausalLM

    from moerun import assets

    if not (assets.REFERENCE_MODEL_DIR / "config.json").is_file():
        pytest.skip("the reference model is not in this checkout")
    model = AutoModelForCausalLM.from_pretrained(assets.REFERENCE_MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    runner = make_lean_runner(model, max_seq_len=64)
    reference = HFReference(model)
    assert_logits_close(runner.prefill(ids), reference(ids.tolist()), 1e-4)
    with torch.inference_mode():
        expected = model.generate(ids[None], max_new_tokens=DECODE_STEPS, do_sample=False, min_new_tokens=DECODE_STEPS)
    runner.reset()
    assert greedy(runner, ids, DECODE_STEPS) == expected[0, 40:].tolist()
