"""transformers integration: convert MoE blocks into MoELayer, register moerun as an experts implementation.

Two ways in:

- ``experts_implementation="moerun"`` (after ``import moerun``): transformers keeps its own router and
  calls :func:`moerun_experts_forward` with the chosen experts; moerun runs dispatch, experts, combine.
- :func:`patch`: every supported MoE block is replaced by a :class:`PatchedMoEBlock` whose whole
  forward (router included) is moerun's.

Shape legend: T tokens, H hidden, E experts, I expert intermediate, k experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.activation import GluSpec
from ..kernels.experts import ExpertWeights, experts_forward
from ..layer import MoELayer
from ..routing import RoutingConfig, make_plan

IMPLEMENTATION_NAME = "moerun"

# transformers' hidden_act names -> moerun GLU activations.
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "gelu_new": "gelu_pytorch_tanh",
}

_SOFTMAX_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock")
SUPPORTED_BLOCKS = (*_SOFTMAX_BLOCKS, "DeepseekV2Moe", "DeepseekV3MoE", "GptOssMLP")


def glu_from_hf(experts: nn.Module) -> GluSpec:
    """The GLU a transformers Experts module applies (GPT-OSS's clamped SwiGLU or config.hidden_act)."""
    if hasattr(experts, "limit") and hasattr(experts, "alpha"):
        return GluSpec("swiglu_clamped", alpha=float(experts.alpha), limit=float(experts.limit))
    act = getattr(experts.config, "hidden_act", None) if hasattr(experts, "config") else None
    if act is None:
        act = type(experts.act_fn).__name__.lower().replace("activation", "")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"unsupported expert activation {act!r}; supported: {', '.join(_HF_ACTIVATIONS)}")
    return GluSpec(_HF_ACTIVATIONS[act])


def expert_weights_from_hf(experts: nn.Module) -> ExpertWeights:
    """moerun's view of a transformers Experts module's weights.

    Concatenated, non-transposed layouts (Mixtral, Qwen, OLMoE, DeepSeek) are used as they are, with no
    copy. Transposed or interleaved layouts (GPT-OSS) are rearranged once and cached on the module.
    """
    transposed = getattr(experts, "is_transposed", False)
    interleaved = not getattr(experts, "is_concatenated", True)
    glu = glu_from_hf(experts)
    gate_up_bias = getattr(experts, "gate_up_proj_bias", None)
    down_bias = getattr(experts, "down_proj_bias", None)
    if not transposed and not interleaved:
        return ExpertWeights(experts.gate_up_proj, experts.down_proj, gate_up_bias, down_bias, glu)
    key = tuple((p.data_ptr(), None if p.is_inference() else p._version) for p in experts.parameters())
    cached = getattr(experts, "_moerun_weights", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        gate_up = experts.gate_up_proj.transpose(1, 2) if transposed else experts.gate_up_proj  # [E, 2I, H]
        down = experts.down_proj.transpose(1, 2) if transposed else experts.down_proj  # [E, H, I]
        if interleaved:
            # GPT-OSS interleaves gate and up rows (g0 u0 g1 u1 ...); moerun wants [gate; up].
            gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
            if gate_up_bias is not None:
                gate_up_bias = torch.cat([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], dim=1)
        weights = ExpertWeights(gate_up.contiguous(), down.contiguous(), gate_up_bias, down_bias, glu)
    experts._moerun_weights = (key, weights)
    return weights


def moerun_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers ExpertsInterface entry point.

    Args:
        self: the model's Experts module.
        hidden_states: [T, H].
        top_k_index: [T, k] expert ids; ids >= num_experts are expert-parallel sentinels and are skipped.
        top_k_weights: [T, k] router weights.

    Returns:
        [T, H] in hidden_states' dtype.
    """
    weights = expert_weights_from_hf(self)
    plan = make_plan(top_k_index, top_k_weights, weights.num_experts)
    return experts_forward(hidden_states, plan, weights)


def register_experts_implementation() -> None:
    """Make ``experts_implementation="moerun"`` available to transformers models (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION_NAME, moerun_experts_forward)


def _mlp_gate_up(mlp: nn.Module) -> torch.Tensor:
    """[2Is, H] gate then up weights of a transformers gated MLP (gate_proj / up_proj Linears)."""
    return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)


def _new_layer(block_experts: nn.Module, routing: RoutingConfig, **kwargs) -> MoELayer:
    """An empty (meta-device) MoELayer shaped like a transformers Experts module."""
    w = expert_weights_from_hf(block_experts)
    layer = MoELayer(
        w.hidden_size,
        w.intermediate_size,
        w.num_experts,
        routing,
        activation=w.glu.activation,
        swiglu_alpha=w.glu.alpha,
        swiglu_limit=w.glu.limit,
        expert_bias=w.gate_up_bias is not None,
        dtype=w.gate_up.dtype,
        device="meta",
        **kwargs,
    )
    layer.gate_up = nn.Parameter(w.gate_up, requires_grad=False)
    layer.down = nn.Parameter(w.down, requires_grad=False)
    if w.gate_up_bias is not None:
        layer.gate_up_bias = nn.Parameter(w.gate_up_bias, requires_grad=False)
        layer.down_bias = nn.Parameter(w.down_bias, requires_grad=False)
    return layer


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


def layer_from_hf_block(block: nn.Module) -> MoELayer:
    """Build a MoELayer that computes what a transformers MoE block computes, sharing its weights.

    Args:
        block: a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE sparse MoE block, a DeepseekV3MoE or a GptOssMLP.

    Raises:
        ValueError: the block is not one of the supported kinds.
    """
    kind = type(block).__name__
    if kind in _SOFTMAX_BLOCKS:
        router = block.gate
        shared = getattr(block, "shared_expert", None)
        routing = RoutingConfig("softmax_topk", router.top_k, getattr(router, "norm_topk_prob", True))
        layer = _new_layer(
            block.experts,
            routing,
            shared_intermediate_size=0 if shared is None else shared.down_proj.weight.shape[1],
            shared_gate=shared is not None,
        )
        layer.router_weight = _param(router.weight)
        if shared is not None:
            layer.shared_gate_up = _param(_mlp_gate_up(shared))
            layer.shared_down = _param(shared.down_proj.weight)
            layer.shared_gate_weight = _param(block.shared_expert_gate.weight)
        return layer
    if kind in ("DeepseekV2Moe", "DeepseekV3MoE"):
        router = block.gate
        scale = float(router.routed_scaling_factor)
        if kind == "DeepseekV3MoE":
            mode = ("sigmoid_group_topk", router.norm_topk_prob, router.num_group, router.topk_group)
        elif router.topk_method == "greedy":
            mode = ("softmax_topk", False, 1, 1)
        else:
            raise ValueError(f"DeepSeek-V2 topk_method {router.topk_method!r} is not supported; use 'greedy'")
        layer = _new_layer(
            block.experts,
            RoutingConfig(mode[0], router.top_k, *mode[1:], scale),
            score_bias=kind == "DeepseekV3MoE",
            router_fp32=True,
            shared_intermediate_size=block.shared_experts.down_proj.weight.shape[1],
        )
        layer.router_weight = _param(router.weight)
        if kind == "DeepseekV3MoE":
            layer.score_bias = _param(router.e_score_correction_bias.float())
        layer.shared_gate_up = _param(_mlp_gate_up(block.shared_experts))
        layer.shared_down = _param(block.shared_experts.down_proj.weight)
        return layer
    if kind == "GptOssMLP":
        router = block.router
        layer = _new_layer(block.experts, RoutingConfig("topk_softmax", router.top_k), router_bias=True)
        layer.router_weight = _param(router.weight)
        layer.router_bias = _param(router.bias)
        return layer
    raise ValueError(f"unsupported MoE block {kind}; supported: {', '.join(SUPPORTED_BLOCKS)}")


class PatchedMoEBlock(nn.Module):
    """Stands in for a transformers MoE block; keeps the block's calling convention.

    Args:
        layer: the moerun layer.
        returns_router_scores: the replaced block returned ``(hidden, router_scores)`` (GPT-OSS).
    """

    def __init__(self, layer: MoELayer, returns_router_scores: bool) -> None:
        super().__init__()
        self.layer = layer
        self.returns_router_scores = returns_router_scores

    def forward(self, hidden_states: torch.Tensor):
        out = self.layer(hidden_states)
        # GPT-OSS decoder layers unpack and discard the router scores.
        return (out, None) if self.returns_router_scores else out


def patch(model: nn.Module) -> int:
    """Replace every supported MoE block of a transformers model by moerun's, in place.

    Weights are shared with the original blocks where the layout allows (all but GPT-OSS).

    Args:
        model: a transformers model (or any module tree containing supported MoE blocks).

    Returns:
        the number of blocks replaced.

    Raises:
        ValueError: the model contains no supported MoE block.
    """
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no supported MoE block; supported: {', '.join(SUPPORTED_BLOCKS)}")
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        patched = PatchedMoEBlock(layer_from_hf_block(block), type(block).__name__ == "GptOssMLP")
        setattr(parent, child, patched)
    return len(targets)
