"""Bench presets build transformers' own blocks, and moerun's layer made from them computes the same."""

from __future__ import annotations

import pytest
import torch

from moerun.models.hf import layer_from_hf_block
from moerun.perf import bench


@pytest.mark.parametrize("family", sorted({p.family for p in bench.PRESETS.values()}))
@torch.inference_mode()
def test_tiny_preset_block_matches_layer(family: str) -> None:
    preset = bench.Preset(family, 64, 32, 8, 2, shared_intermediate_size=64 if family == "deepseek_v2" else 0)
    block = bench.build_block(preset, torch.float32)
    layer = layer_from_hf_block(block)
    x = torch.randn(1, 9, 64)
    block.experts.config._experts_implementation = "eager"
    expected = block(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_work_of_one_token_counts_selected_experts() -> None:
    preset = bench.Preset("olmoe", 64, 32, 8, 2)
    layer = layer_from_hf_block(bench.build_block(preset, torch.bfloat16))
    touched, flops = bench.work_of(layer, torch.randn(1, 64, dtype=torch.bfloat16))
    per_expert = 3 * 64 * 32
    assert touched == (2 * per_expert + 8 * 64) * 2
    assert flops == 2 * (2 * per_expert + 8 * 64)
