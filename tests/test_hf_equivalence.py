"""moerun's MoELayer built from a transformers MoE block computes the same outputs as the block."""

from __future__ import annotations

import pytest
import torch

import moerun
from families import FAMILIES, moe_blocks, tiny_model
from moerun.kernels import native

# bf16 differences come from transformers rounding every intermediate (expert outputs, weighted sums)
# to bf16 while moerun accumulates the combine in fp32: a few bf16 ulps of the output's scale.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def reference_output(block, x: torch.Tensor) -> torch.Tensor:
    block.experts.config._experts_implementation = "eager"
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.float().abs().max().item()
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} exceeds {rel:g} x output scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_layer_matches_transformers_block(family: str, tokens: int, dtype: torch.dtype) -> None:
    block = moe_blocks(tiny_model(family, dtype=dtype))[0]
    layer = moerun.layer_from_hf_block(block)
    x = torch.randn(1, tokens, 64).to(dtype)
    expected = reference_output(block, x)
    for backend in ("auto", "torch", "reference") + (("native",) if native.is_available() else ()):
        layer.backend = backend
        assert_close_to_scale(layer(x), expected, TOLERANCE[dtype])


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_experts_with_no_tokens(family: str) -> None:
    """One token routes to k of 8 experts: the others get nothing and must be skipped cleanly."""
    block = moe_blocks(tiny_model(family))[0]
    layer = moerun.layer_from_hf_block(block)
    x = torch.randn(1, 1, 64)
    logits = layer.router_logits(x.reshape(1, 64))
    weights, ids = moerun.route(logits, layer.routing, layer.score_bias)
    plan = moerun.make_plan(ids, weights, layer.num_experts)
    assert plan.num_groups == layer.routing.top_k < layer.num_experts
    assert_close_to_scale(layer(x), reference_output(block, x), TOLERANCE[torch.float32])
