"""moerun's MoELayer built from a transformers MoE block computes the same outputs as the block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


# ---- the experts interface refuses experts it would compute differently --------------------------------------


def _experts_class(apply_gate=None, hidden_act: str = "silu", **flags):
    """A transformers-style Experts module (decorated like transformers' own), 4 experts, H 8, I 4."""
    from transformers import PretrainedConfig
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    body = {}
    if apply_gate is not None:
        body["_apply_gate"] = apply_gate

    def __init__(self, config) -> None:
        nn.Module.__init__(self)
        self.num_experts = 4
        self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 8))
        self.down_proj = nn.Parameter(torch.randn(4, 8, 4))
        self.act_fn = ACT2FN[config.hidden_act]
        self.limit, self.alpha, self.swiglu_limit, self.swiglu_alpha = 7.0, 1.702, 7.0, 1.702

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("transformers' own forward is not what is tested")

    cls = type("Experts", (nn.Module,), {"__init__": __init__, "forward": forward, **body})
    cls = use_experts_implementation(cls, **flags)
    return cls(PretrainedConfig(hidden_act=hidden_act))


def _clamped_gate_other_names(self, gate_up: torch.Tensor) -> torch.Tensor:
    # GPT-OSS's computation reading other attributes (as MiniMax-M3-VL's does)
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=self.swiglu_limit)
    up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
    return (up + 1) * gate * torch.sigmoid(gate * self.swiglu_alpha)


def _silu_then_clamp(self, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate).clamp(max=self.limit) * up


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _experts_class(_silu_then_clamp), "gates its experts its own way"),
        (lambda: _experts_class(_clamped_gate_other_names), "gates its experts its own way"),
        (lambda: _experts_class(has_gate=False), "no gate projection"),
        (lambda: _experts_class(has_post_expert_norm=True), "normalises each expert's output"),
        (lambda: _experts_class(hidden_act="relu2"), "unsupported expert activation"),
    ],
)
def test_experts_computed_differently_are_refused(make, message: str) -> None:
    from moerun.models.hf import expert_weights_from_hf, moerun_experts_forward

    experts = make()
    with pytest.raises(ValueError, match=message):
        expert_weights_from_hf(experts)
    with pytest.raises(ValueError, match=message):
        moerun_experts_forward(experts, torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


def test_the_experts_activation_comes_from_their_act_fn_not_the_config() -> None:
    """Aria-like: the experts' act_fn is SiLU while config.hidden_act (meant for another MLP) says gelu."""
    from transformers.activations import SiLUActivation

    from moerun.models.hf import glu_from_hf

    experts = _experts_class(hidden_act="gelu")
    assert glu_from_hf(experts).activation == "gelu"
    experts.act_fn = SiLUActivation()
    assert glu_from_hf(experts).activation == "silu"
