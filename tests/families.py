"""Tiny random configurations of each supported transformers MoE family, shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

COMMON = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    max_position_embeddings=512, tie_word_embeddings=False,
)  # fmt: skip


def family_config(family: str):
    """A tiny config of ``family`` with 8 experts, 2 per token."""
    if family == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        )  # fmt: skip
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True,
        )  # fmt: skip
    if family == "olmoe":
        return OlmoeConfig(**COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v2":
        return DeepseekV2Config(
            **COMMON, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=2, first_k_dense_replace=0, routed_scaling_factor=1.5, topk_method="greedy",
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        )  # fmt: skip
    if family == "deepseek_v3":
        return DeepseekV3Config(
            **COMMON, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            rope_scaling=None,
        )  # fmt: skip
    if family == "gpt_oss":
        return GptOssConfig(
            **COMMON, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    return _more_family_config(family)


# Qwen-style experts with a shared expert, and the gated delta net layers of the hybrid Qwen families.
QWEN_EXPERTS = dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)
GATED_DELTA = dict(
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    layer_types=["linear_attention", "full_attention"],
)  # fmt: skip
DSV3_COMMON = dict(
    intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
)  # fmt: skip


def _more_family_config(family: str):
    """Tiny configs of the families that follow one of the seven patterns above (hf.FAMILIES)."""
    import transformers as t

    COMMON = {**globals()["COMMON"], "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    if family == "flex_olmo":
        return t.FlexOlmoConfig(**COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if family == "mellum":
        return t.MellumConfig(
            **COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    if family == "qwen3_next":
        return t.Qwen3NextConfig(**COMMON, head_dim=16, intermediate_size=64, **QWEN_EXPERTS, **GATED_DELTA)
    if family == "hunyuan_v1_moe":
        return t.HunYuanMoEV1Config(**COMMON, head_dim=16, intermediate_size=32, num_experts=8, moe_topk=2)
    if family == "glm4_moe":
        return t.Glm4MoeConfig(**COMMON, **DSV3_COMMON, first_k_dense_replace=0, use_qk_norm=True)
    if family == "dots1":
        return t.Dots1Config(**COMMON, **DSV3_COMMON, first_k_dense_replace=0)
    if family == "solar_open":
        return t.SolarOpenConfig(**COMMON, **DSV3_COMMON, head_dim=16)
    if family == "exaone_moe":
        settings = {**DSV3_COMMON, "num_experts": 8, "num_shared_experts": 1}
        del settings["n_routed_experts"], settings["n_shared_experts"]
        return t.ExaoneMoeConfig(**COMMON, **settings, first_k_dense_replace=0)
    if family == "minicpm5_moe":
        return t.MiniCPM5MoeConfig(**COMMON, **DSV3_COMMON, head_dim=16, mlp_layer_types=["sparse", "sparse"])
    mla = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    if family == "qwen3_5_moe_text":
        return t.Qwen3_5MoeTextConfig(**COMMON, head_dim=16, **QWEN_EXPERTS, **GATED_DELTA)
    if family == "lara_mini":
        settings = {**GATED_DELTA, "layer_types": ["sliding_attention", "full_attention"]}
        return t.LaraMiniConfig(**COMMON, head_dim=16, **QWEN_EXPERTS, **settings, sliding_window=16)
    if family == "jamba":
        return t.JambaConfig(
            **COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2, expert_layer_period=1,
            expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
            mamba_d_state=8,
        )  # fmt: skip
    if family == "mimo_v2_flash":
        settings = {k: v for k, v in DSV3_COMMON.items() if k != "n_shared_experts"}
        return t.MiMoV2FlashConfig(
            **COMMON, **settings, head_dim=16, v_head_dim=16, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"],
        )  # fmt: skip
    if family == "glm4_moe_lite":
        return t.Glm4MoeLiteConfig(**COMMON, **DSV3_COMMON, **mla, mlp_layer_types=["sparse", "sparse"])
    if family == "deepseek_v32":
        return t.DeepseekV32Config(
            **COMMON, **DSV3_COMMON, **mla, head_dim=8, first_k_dense_replace=0, index_topk=8, index_head_dim=8,
            index_n_heads=2, mlp_layer_types=["sparse", "sparse"],
        )  # fmt: skip
    if family == "granitemoe":
        return t.GraniteMoeConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if family == "granitemoeshared":
        return t.GraniteMoeSharedConfig(
            **COMMON, intermediate_size=32, shared_intermediate_size=48, num_local_experts=8, num_experts_per_tok=2
        )
    if family == "granitemoe_swa":
        return t.GraniteMoeSWAConfig(
            **COMMON, intermediate_size=32, shared_intermediate_size=48, num_local_experts=8, num_experts_per_tok=2
        )
    if family == "minimax_m2":
        return t.MiniMaxM2Config(
            **COMMON, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2
        )
    if family == "lfm2_moe":
        return t.Lfm2MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            num_dense_layers=0, routed_scaling_factor=2.0, layer_types=["conv", "full_attention"],
        )  # fmt: skip
    if family == "afmoe":
        return t.AfmoeConfig(
            **COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=0, route_scale=1.5, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    if family == "flint":
        return t.FlintConfig(
            **COMMON, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
            num_experts_per_tok=2, mlp_only_layers=[], sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    if family == "hy_v3":
        return t.HYV3Config(
            **COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            num_shared_experts=1, router_scaling_factor=2.5, mlp_layer_types=["sparse", "sparse"],
        )  # fmt: skip
    if family == "granitemoehybrid":
        return t.GraniteMoeHybridConfig(
            **COMMON, intermediate_size=32, shared_intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
            layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_state=8, mamba_d_head=32, mamba_chunk_size=16,
        )  # fmt: skip
    raise KeyError(family)


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
# Families described by an entry of hf.FAMILIES and tested end to end in test_families.py only.
MORE_FAMILIES = (
    "flex_olmo", "mellum", "qwen3_next", "hunyuan_v1_moe", "glm4_moe", "dots1", "solar_open",
    "qwen3_5_moe_text", "lara_mini", "jamba", "glm4_moe_lite", "granitemoe", "granitemoeshared", "granitemoe_swa",
    "minimax_m2", "lfm2_moe", "afmoe", "flint", "exaone_moe", "minicpm5_moe", "mimo_v2_flash", "hy_v3",
    "granitemoehybrid",
)  # fmt: skip


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random transformers model of ``family`` with weights large enough to route decisively."""
    return model_of_config(family_config(family), seed, dtype)


def model_of_config(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random transformers model of ``config``, initialised as ``tiny_model`` does."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02 if "embed" in name or "norm" in name else 0.15)
            if "norm" in name:
                p.add_(1.0)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name or name.endswith("expert_bias"):
                b.normal_(0.0, 0.1)
    return model.to(dtype)


def moe_blocks(model) -> list:
    """The model's MoE blocks, in layer order."""
    from moerun.models.hf import SUPPORTED_BLOCKS

    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_BLOCKS]
