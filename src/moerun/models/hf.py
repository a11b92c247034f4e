"""transformers integration: convert MoE blocks into MoELayer, register moerun as an experts implementation.

Two ways in:

- ``experts_implementation="moerun"`` (after ``import moerun``): transformers keeps its own router and
  calls :func:`moerun_experts_forward` with the chosen experts; moerun runs dispatch, experts, combine.
- :func:`patch`: every supported MoE block is replaced by a :class:`PatchedMoEBlock` whose whole
  forward (router included) is moerun's.

Shape legend: T tokens, H hidden, E experts, I expert intermediate, k experts per token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Family:
    """What moerun needs to know of a transformers MoE family: where its MoE block's parts live and how it
    routes. Every entry is checked against transformers' own generation (tests/test_families.py).

    Attributes:
        model_type: config.json's ``model_type``.
        name: the family's name for people.
        block: the class name of its MoE block (the module ``patch`` replaces).
        router: how the block routes: ``softmax`` (softmax over all experts, top-k, renormalised as
            ``renormalize`` says), ``deepseek_v2`` (greedy softmax top-k, fp32, routed scaling),
            ``deepseek_v3`` (sigmoid, correction bias for the choice only, group-limited top-k, fp32,
            routed scaling), ``sigmoid`` (sigmoid scores, an optional choice-only correction bias, top-k
            without groups, renormalised as ``renormalize`` says, times the router's ``scaling``) or ``gpt_oss``
            (top-k of biased logits, then softmax over the k).
        router_path: the router module under the block (``top_k``, ``norm_topk_prob`` and the DeepSeek
            settings are read from it).
        router_weight: the router matrix's parameter under the router module (its ``bias`` beside it).
        router_fp32: the router computes its logits in fp32 (an fp32 matrix and fp32 input).
        renormalize: for ``softmax``: whether the top-k weights are renormalised; None reads the router's
            ``norm_topk_prob`` (True where it has none, as Mixtral).
        shared: attribute of the block's shared-expert MLP (gate_proj/up_proj/down_proj), if any.
        shared_gate: attribute of the Linear whose sigmoid scales the shared expert, if any.
        score_bias: for ``sigmoid``: path under the block of the choice-only correction bias (absent on the
            block: none).
        scaling: for ``sigmoid``: the router's attribute holding the routed scaling factor (None: 1).
    """

    model_type: str
    name: str
    block: str
    router: str
    router_path: str = "gate"
    router_weight: str = "weight"
    router_fp32: bool = False
    renormalize: bool | None = None
    shared: str | None = None
    shared_gate: str | None = None
    score_bias: str | None = None
    scaling: str | None = None


FAMILIES = (
    Family("mixtral", "Mixtral", "MixtralSparseMoeBlock", "softmax"),
    Family("qwen2_moe", "Qwen2-MoE", "Qwen2MoeSparseMoeBlock", "softmax", shared="shared_expert",
           shared_gate="shared_expert_gate"),
    Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeSparseMoeBlock", "softmax"),
    Family("olmoe", "OLMoE", "OlmoeSparseMoeBlock", "softmax"),
    Family("deepseek_v2", "DeepSeek-V2", "DeepseekV2Moe", "deepseek_v2", shared="shared_experts"),
    Family("deepseek_v3", "DeepSeek-V3", "DeepseekV3MoE", "deepseek_v3", shared="shared_experts"),
    Family("gpt_oss", "GPT-OSS", "GptOssMLP", "gpt_oss", router_path="router"),
    # Families that follow one of the patterns above.
    Family("flex_olmo", "FlexOlmo", "FlexOlmoSparseMoeBlock", "softmax"),
    Family("mellum", "Mellum", "MellumSparseMoeBlock", "softmax"),
    Family("qwen3_next", "Qwen3-Next", "Qwen3NextSparseMoeBlock", "softmax", shared="shared_expert",
           shared_gate="shared_expert_gate"),
    Family("hunyuan_v1_moe", "Hunyuan-MoE", "HunYuanMoEV1Moe", "softmax", router_weight="wg.weight",
           router_fp32=True, renormalize=True, shared="shared_mlp"),
    Family("glm4_moe", "GLM-4-MoE", "Glm4MoeMoE", "deepseek_v3", shared="shared_experts"),
    Family("dots1", "dots.llm1", "Dots1MoE", "deepseek_v3", shared="shared_experts"),
    Family("solar_open", "Solar-Open", "SolarOpenMoE", "deepseek_v3", shared="shared_experts"),
    Family("qwen3_5_moe_text", "Qwen3.5-MoE", "Qwen3_5MoeSparseMoeBlock", "softmax", renormalize=True,
           shared="shared_expert", shared_gate="shared_expert_gate"),
    Family("lara_mini", "Lara-Mini", "LaraMiniSparseMoeBlock", "softmax", router_fp32=True, shared="shared_expert"),
    Family("jamba", "Jamba", "JambaSparseMoeBlock", "softmax", router_path="router", renormalize=False),
    Family("glm4_moe_lite", "GLM-4-MoE-Lite", "Glm4MoeLiteMoE", "deepseek_v3", shared="shared_experts"),
    Family("exaone_moe", "EXAONE-MoE", "ExaoneMoeSparseMoEBlock", "deepseek_v3", shared="shared_experts"),
    Family("minicpm5_moe", "MiniCPM5-MoE", "MiniCPM5MoeMoE", "deepseek_v3", shared="shared_experts"),
    Family("mimo_v2_flash", "MiMo-V2-Flash", "MiMoV2FlashMoE", "deepseek_v3"),
    # Top-k of the logits, then softmax over the k: softmax over all experts renormalised over the top k.
    Family("granitemoe", "Granite-MoE", "GraniteMoeMoE", "softmax", router_path="router", renormalize=True),
    Family("granitemoeshared", "Granite-MoE-Shared", "GraniteMoeSharedMoE", "softmax", router_path="router",
           renormalize=True),
    Family("granitemoe_swa", "Granite-MoE-SWA", "GraniteMoeSWAMoE", "softmax", router_path="router",
           renormalize=True),
    Family("granitemoehybrid", "Granite-MoE-Hybrid", "GraniteMoeHybridMoE", "softmax", router_path="router",
           renormalize=True),
    Family("minimax_m2", "MiniMax-M2", "MiniMaxM2SparseMoeBlock", "sigmoid", renormalize=True,
           score_bias="e_score_correction_bias"),
    Family("lfm2_moe", "LFM2-MoE", "Lfm2MoeSparseMoeBlock", "sigmoid", score_bias="expert_bias",
           scaling="routed_scaling_factor"),
    Family("flint", "Flint", "FlintSparseMoeBlock", "sigmoid", router_fp32=True, shared="shared_expert"),
    Family("hy_v3", "Hunyuan-V3", "HYV3MoE", "sigmoid", router_fp32=True, renormalize=True, shared="shared_experts",
           score_bias="e_score_correction_bias", scaling="router_scaling_factor"),
    Family("afmoe", "AFMoE", "AfmoeSparseMoeBlock", "sigmoid", router_path="router", router_weight="gate.weight",
           renormalize=True, shared="shared_experts", score_bias="expert_bias", scaling="route_scale"),
)  # fmt: skip
# MoE causal-LM families of transformers that moerun does not run, with the reason. Those "not described yet"
# follow a pattern moerun has but are not in FAMILIES (an entry and its test away); the rest need computation
# moerun lacks.
_NOT_YET = "not described yet: its MoE block follows a pattern moerun runs, but it has no entry and test"
_NOT_EXAMINED = "not examined yet"
UNSUPPORTED_FAMILIES: dict[str, str] = {
    "aria_text": "its shared expert uses another activation than its routed experts; moerun applies one to both",
    "axk1": "an RMSNorm on the MoE block's output",
    "axk2": _NOT_YET + " (DeepSeek-V3 routing)",
    "bailing_hybrid": "its experts clamp after the activation with per-layer limits (a gate function of its own)",
    "beam": "its experts compute the activation in fp32 (a gate function of its own)",
    "cohere2_moe": "top-k before the selection function, and shared experts averaged with the routed output",
    "dbrx": "experts outside transformers' experts interface (w1/v1/w2 stacks), weights normalised by a p-norm",
    "deepseek_v32": _NOT_YET + " (DeepSeek-V3 routing)",
    "deepseek_v4": "square-root-softplus scores and routing by token id (hash routing) in its first layers",
    "doge": "product-key retrieval experts, not feed-forward experts",
    "dots3_note": _NOT_YET + " (DeepSeek-V3 routing)",
    "dots3_note_text": _NOT_YET + " (DeepSeek-V3 routing)",
    "ergo": "non-gated experts with an RMSNorm on each expert's output",
    "ernie4_5_moe": "softmax routing with a choice-only correction bias (moerun has one for sigmoid routing only)",
    "gemma4": "no MoE block: router and experts sit on the decoder layer beside a dense MLP and scale per expert",
    "gemma4_text": "no MoE block: router and experts sit on the decoder layer beside a dense MLP and scale per expert",
    "glm_moe_dsa": _NOT_YET + " (DeepSeek-V3 routing)",
    "hy_v4": "its routed experts clamp the gate before SiLU and its shared expert does not (own gate function)",
    "inkling2_loop_text": "softcapped SwiGLU experts (a gate function of its own)",
    "inkling2_text": "softcapped SwiGLU experts (a gate function of its own)",
    "inkling_text": "shared experts weighted by the router together with the routed ones",
    "jetmoe": "experts outside transformers' experts interface (input/output_linear stacks) with an output bias",
    "kimi_linear": "its checkpoints hold tensors transformers reshapes on loading (not only renames); moerun does not",
    "kolibri1": "the correction bias is added to the logits before the sigmoid",
    "kolibri1_1": "the correction bias is added to the logits before the sigmoid",
    "laguna": _NOT_YET + " (sigmoid routing with a correction bias, optional logit softcap)",
    "llama4": "the router weight multiplies the expert input, not its output",
    "llama4_text": "the router weight multiplies the expert input, not its output",
    "longcat_flash": "zero (identity) experts among the routed ones",
    "minimax": "decoding step by step through its lightning-attention cache gives other tokens than transformers'"
    " generate (not yet examined)",
    "minimax_m3_vl_text": "GPT-OSS's clamped SwiGLU on concatenated experts under other attribute names",
    "nemotron_h": "non-gated relu-squared experts",
    "param2moe": _NOT_EXAMINED,
    "phimoe": "sparsemixer routing",
    "qwen3_5_moe": _NOT_YET + " (softmax routing, always renormalised, gated shared expert)",
    "qwen4_exp": _NOT_YET + " (softmax routing, gated shared expert)",
    "qwen4_exp_text": _NOT_YET + " (softmax routing, gated shared expert)",
    "sarvam_mla": _NOT_EXAMINED,
    "sarvam_moe": _NOT_EXAMINED,
    "zaya": "an MLP router with state carried between layers and a skip-expert class",
}


FAMILY_OF_TYPE = {f.model_type: f for f in FAMILIES}
FAMILY_OF_BLOCK = {f.block: f for f in FAMILIES}
SUPPORTED_BLOCKS = tuple(FAMILY_OF_BLOCK)


# The activation module a transformers Experts module applies to its gate (its ``act_fn``) -> moerun's GLU.
_HF_ACTIVATION_CLASSES = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_pytorch_tanh",
    "NewGELUActivation": "gelu_pytorch_tanh",
}


def _gate_function(experts: nn.Module) -> Callable | None:
    """The experts class's ``_apply_gate`` (what transformers' experts interface runs between the gate/up
    and down projections), or None for a class outside that interface."""
    return getattr(type(experts), "_apply_gate", None)


def _is_gpt_oss_gate(fn: Callable) -> bool:
    """Whether ``fn`` is GPT-OSS's clamped SwiGLU over interleaved gate/up rows, reading ``self.alpha`` and
    ``self.limit``: the same code, not merely the same name (a copy reading other attributes is not)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    reference = GptOssExperts._apply_gate.__code__
    code = getattr(fn, "__code__", None)
    return code is not None and (code.co_code, code.co_names, code.co_consts) == (
        reference.co_code,
        reference.co_names,
        reference.co_consts,
    )


def moe_model_types() -> list[str]:
    """The model types of the installed transformers that are causal LMs with routed experts: their modeling
    code uses transformers' experts interface or their config counts experts per token. Read from the
    source files: no model code is imported."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    models = Path(transformers.__file__).parent / "models"
    moe = re.compile(r"use_experts_implementation|num_experts_per_tok|n_routed_experts|num_local_experts|moe_topk")
    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        texts = [
            f.read_text(errors="replace")
            for f in (models / module).glob("*_*.py")
            if f.name.startswith(("modeling_", "configuration_"))
        ]
        if any(moe.search(text) for text in texts):
            found.append(model_type)
    return sorted(found)


def glu_from_hf(experts: nn.Module) -> GluSpec:
    """The GLU a transformers Experts module applies: GPT-OSS's clamped SwiGLU, or the standard
    ``act(gate) * up`` with the activation of its ``act_fn`` (else ``config.hidden_act``).

    Raises:
        ValueError: experts moerun would compute differently: their own gate function, no gate (up
            projection only), a norm after each expert, or an activation moerun does not have.
    """
    from transformers.integrations.moe import _default_apply_gate

    name = type(experts).__name__
    if getattr(experts, "has_gate", True) is False:
        raise ValueError(f"{name} has no gate projection (non-gated experts); moerun runs gated experts only")
    if getattr(experts, "has_post_expert_norm", False):
        raise ValueError(f"{name} normalises each expert's output; moerun does not")
    gate = _gate_function(experts)
    if gate is not None and gate is not _default_apply_gate:
        if _is_gpt_oss_gate(gate) and hasattr(experts, "limit") and hasattr(experts, "alpha"):
            return GluSpec("swiglu_clamped", alpha=float(experts.alpha), limit=float(experts.limit))
        raise ValueError(
            f"{name} gates its experts its own way ({gate.__qualname__}); moerun runs act(gate) * up and "
            "GPT-OSS's clamped SwiGLU"
        )
    act_fn = getattr(experts, "act_fn", None)
    if act_fn is not None:
        import torch.nn.functional as F

        functions = {F.silu: "silu", F.gelu: "gelu"}
        act = (
            functions.get(act_fn)
            if not isinstance(act_fn, nn.Module)
            else _HF_ACTIVATION_CLASSES.get(type(act_fn).__name__)
        )
        if act is None:
            raise ValueError(
                f"unsupported expert activation {type(act_fn).__name__}; supported: "
                f"{', '.join(sorted(set(_HF_ACTIVATION_CLASSES)))}"
            )
        return GluSpec(act)
    act = getattr(experts.config, "hidden_act", None) if hasattr(experts, "config") else None
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
    experts = layer.resident
    experts.gate_up = nn.Parameter(w.gate_up, requires_grad=False)
    experts.down = nn.Parameter(w.down, requires_grad=False)
    if w.gate_up_bias is not None:
        experts.gate_up_bias = nn.Parameter(w.gate_up_bias, requires_grad=False)
        experts.down_bias = nn.Parameter(w.down_bias, requires_grad=False)
    return layer


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


def _optional_attribute(module: nn.Module, path: str | None) -> torch.Tensor | None:
    """The tensor at dotted ``path`` under ``module``, or None (no path, or nothing there)."""
    if path is None:
        return None
    value: object = module
    for name in path.split("."):
        value = getattr(value, name, None)
    return value if isinstance(value, torch.Tensor) else None


def layer_from_hf_block(block: nn.Module) -> MoELayer:
    """Build a MoELayer that computes what a transformers MoE block computes, sharing its weights.

    Args:
        block: the MoE block of a family in ``FAMILIES``.

    Raises:
        ValueError: the block is not one of a supported family, or routes in a way moerun does not.
    """
    family = FAMILY_OF_BLOCK.get(type(block).__name__)
    if family is None:
        raise ValueError(f"unsupported MoE block {type(block).__name__}; supported: {', '.join(SUPPORTED_BLOCKS)}")
    router = block.get_submodule(family.router_path)
    top_k = int(getattr(router, "top_k", None) or block.experts.config.num_experts_per_tok)
    shared = getattr(block, family.shared) if family.shared else None
    options: dict = dict(router_fp32=family.router_fp32)
    if family.router == "softmax":
        renormalize = family.renormalize
        if renormalize is None:
            renormalize = bool(getattr(router, "norm_topk_prob", True))
        routing = RoutingConfig("softmax_topk", top_k, renormalize)
    elif family.router == "deepseek_v2":
        if router.topk_method != "greedy":
            raise ValueError(f"DeepSeek-V2 topk_method {router.topk_method!r} is not supported; use 'greedy'")
        routing = RoutingConfig("softmax_topk", top_k, False, 1, 1, float(router.routed_scaling_factor))
        options = dict(router_fp32=True)
    elif family.router == "deepseek_v3":
        mode = ("sigmoid_group_topk", router.norm_topk_prob, router.num_group, router.topk_group)
        routing = RoutingConfig(mode[0], top_k, *mode[1:], float(router.routed_scaling_factor))
        options = dict(router_fp32=True, score_bias=True)
    elif family.router == "sigmoid":
        renormalize = family.renormalize
        if renormalize is None:
            renormalize = bool(getattr(router, "norm_topk_prob", True))
        scale = float(getattr(router, family.scaling)) if family.scaling else 1.0
        routing = RoutingConfig("sigmoid_group_topk", top_k, renormalize, 1, 1, scale)
        score_bias = _optional_attribute(block, family.score_bias)
        options["score_bias"] = score_bias is not None
    elif family.router == "gpt_oss":
        routing = RoutingConfig("topk_softmax", top_k)
        options = dict(router_bias=True)
    else:
        raise ValueError(f"family {family.name}: unknown router kind {family.router!r}")
    layer = _new_layer(
        block.experts,
        routing,
        shared_intermediate_size=0 if shared is None else shared.down_proj.weight.shape[1],
        shared_gate=family.shared_gate is not None,
        **options,
    )
    weight = router.get_parameter(family.router_weight)
    layer.router_weight = _param(weight)
    if family.router == "gpt_oss":
        bias_path = family.router_weight.rpartition(".")[0]
        layer.router_bias = _param(router.get_parameter(f"{bias_path}.bias" if bias_path else "bias"))
    if family.router == "deepseek_v3":
        layer.score_bias = _param(router.e_score_correction_bias.float())
    if family.router == "sigmoid" and score_bias is not None:
        layer.score_bias = _param(score_bias.float())
    if shared is not None:
        layer.shared_gate_up = _param(_mlp_gate_up(shared))
        layer.shared_down = _param(shared.down_proj.weight)
    if family.shared_gate is not None:
        layer.shared_gate_weight = _param(getattr(block, family.shared_gate).weight)
    return layer


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
        returns_scores = FAMILY_OF_BLOCK[type(block).__name__].router == "gpt_oss"
        patched = PatchedMoEBlock(layer_from_hf_block(block), returns_scores)
        setattr(parent, child, patched)
    return len(targets)
