"""`moerun bench --model`: a whole model, moerun's lean runner vs plain transformers, side by side.

Each implementation runs one sequence per round: a P-token prompt (time to first token, so prefill
tokens/s = P / TTFT) and then N greedy decode steps (decode tokens/s). Implementations take turns round
by round, and the table reports medians, so that the host's noise hits them alike.

All implementations share one copy of the weights: the transformers model is loaded (or built) once;
``hf-eager`` and ``hf-grouped_mm`` switch its experts implementation, and ``moerun`` is the lean runner
over the same parameter tensors (plus its stacked copy of q/k/v) or, for families the lean runner does
not cover, transformers' forward with moerun's experts implementation.

Shape legend: P prompt tokens, N decode tokens, V vocabulary.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..layer import MoELayer
from ..models.hf import SUPPORTED_BLOCKS, patch
from ..models.quantized import QuantConfig, low_bit_weights, moe_layers, quantize
from ..quant.formats import weight_nbytes
from ..runtime.generate import HFRunner
from ..runtime.lean import LeanRunner, Runner, make_lean_runner
from ..runtime.lean_variants import VariantLeanRunner
from .bench import DTYPES, available_memory_bytes
from .predict import MatrixFormats, ModelShape, PerfModel

IMPLS = ("moerun", "hf-eager", "hf-grouped_mm")
_HF_EXPERTS = {"hf-eager": "eager", "hf-grouped_mm": "grouped_mm", "moerun": "moerun"}
_READ_PROBE_BYTES = 256 << 20  # far beyond the last-level cache

# Synthetic models: transformers configs of published shapes, built with seeded random weights.
SYNTHETIC_MODELS = {
    # OLMoE-1B-7B's layer shape (qk-norm, 64 experts, top-8) with 4 of its 16 layers and a 32000-token vocabulary.
    "olmoe-1b-7b-4l": (
        "OlmoeConfig",
        dict(
            hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=4,
            intermediate_size=1024, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
            vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        ),
    ),
    # DeepSeek-V2-Lite's shapes (multi-head latent attention, a dense first layer, 64 experts, top-6, two
    # shared experts) with 4 of its 27 layers; default RoPE instead of its YaRN.
    "deepseek-v2-lite-4l": (
        "DeepseekV2Config",
        dict(
            hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=4,
            intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
            num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=1.0,
            topk_method="greedy", norm_topk_prob=False, vocab_size=102400, max_position_embeddings=4096,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        ),
    ),
    # GPT-OSS-20B's shapes (64 query and 8 kv heads, sinks, alternating 128-token sliding windows, 32 experts,
    # top-4, expert biases) with 4 of its 24 layers.
    "gpt-oss-20b-4l": (
        "GptOssConfig",
        dict(
            hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_hidden_layers=4,
            intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * 2, vocab_size=201088,
            max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
            pad_token_id=None,
        ),
    ),
}  # fmt: skip
REFERENCE = "reference"  # the project's reference model, moerun.assets.REFERENCE_MODEL_DIR


def _fill_random_(p: torch.Tensor, generator: torch.Generator, chunk: int = 1 << 24) -> None:
    """Seeded random values with std ~0.018, ~10x faster than normal_ (which takes ~30 s for 1.8 G values here).

    Random bits are shaped into bf16 numbers with a random sign and mantissa and one of two exponents:
    magnitudes in [2^-7, 2^-5). The chunks of bf16 are then copied into p, whatever its dtype.
    """
    flat = p.view(-1)
    for part in flat.split(chunk):
        bits = torch.empty((part.numel() + 3) // 4, dtype=torch.int64)  # four bf16 per int64
        bits.random_(-(2**63), 2**63 - 1, generator=generator)
        # keep sign, lowest exponent bit and mantissa of each 16-bit lane (mask 0x80FF); exponent 120 or 121
        bits.bitwise_and_(-0x7F007F007F007F01).bitwise_or_(0x3C003C003C003C00)
        part.copy_(bits.view(torch.bfloat16)[: part.numel()])


def build_synthetic(name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A synthetic model (see ``SYNTHETIC_MODELS``) with seeded random weights of ``dtype``, norms at one.

    Built on the meta device and filled in place, so it costs one copy of the weights and a few seconds.
    """
    import transformers

    config_name, fields = SYNTHETIC_MODELS[name]
    config = getattr(transformers, config_name)(**fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name:
                p.fill_(1.0)
            else:
                _fill_random_(p, generator)
        # to_empty left the non-persistent buffers (RoPE frequencies) uninitialised: take a fresh module's.
        rotary = model.model.rotary_emb
        fresh = type(rotary)(config=model.config)
        for name, buffer in fresh.named_buffers():
            rotary.get_buffer(name).copy_(buffer)
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.zero_()
    return model


def synthetic_bytes(name: str, dtype: torch.dtype) -> int:
    """Bytes of a synthetic model's weights, without building it."""
    import transformers

    config_name, fields = SYNTHETIC_MODELS[name]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**fields))
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def resolve_model_dir(spec: str) -> Path:
    """The directory a --model value names: ``reference`` or a path holding a transformers checkpoint."""
    if spec == REFERENCE:
        try:
            from .. import assets
        except ImportError:
            raise ValueError("the reference model is not available in this install (moerun.assets)") from None
        path = Path(assets.REFERENCE_MODEL_DIR)
    else:
        path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {spec!r}: {path} is not a transformers checkpoint directory (no config.json); "
            f"built-in models: {', '.join([*SYNTHETIC_MODELS, REFERENCE])}"
        )
    return path


def load_model(spec: str, dtype: torch.dtype) -> nn.Module:
    """A synthetic model by name, or a checkpoint (``reference`` or a directory) loaded in ``dtype``."""
    if spec in SYNTHETIC_MODELS:
        need = synthetic_bytes(spec, dtype)
        free = available_memory_bytes()
        if need > free * 0.8:
            raise ValueError(f"{spec} needs {need / 2**30:.1f} GiB of weights; only {free / 2**30:.1f} GiB are free")
        return build_synthetic(spec, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir(spec), dtype=dtype).eval()


class TransformersRunner(HFRunner):
    """transformers' own forward and DynamicCache (:class:`~moerun.generate.HFRunner`) over a model that other
    runners share, so the experts implementation is set at every ``reset``.

    Args:
        model: the transformers model.
        experts_implementation: ``eager``, ``grouped_mm`` or ``moerun``.
    """

    def __init__(self, model: nn.Module, experts_implementation: str) -> None:
        self.experts_implementation = experts_implementation
        super().__init__(model)

    def reset(self) -> None:
        self.model.set_experts_implementation(self.experts_implementation)
        super().reset()


class MoETimer:
    """Seconds spent inside MoE blocks, summed until ``reset``; fed by wrapped callables and module hooks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def reset(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def timed(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = fn(x)
            self.seconds += time.perf_counter() - start
            return out

        return timed

    def hook(self, model: nn.Module) -> None:
        """Time every transformers MoE block of ``model`` (hooks stay for the model's lifetime)."""
        for module in model.modules():
            if type(module).__name__ in SUPPORTED_BLOCKS:
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._exit)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start


def make_runners(
    model: nn.Module, impls: tuple[str, ...], max_seq_len: int, timer: MoETimer
) -> tuple[dict[str, Runner], dict[str, str]]:
    """One runner per impl over the shared model, with MoE time reported to ``timer``; notes on fallbacks."""
    runners: dict[str, Runner] = {}
    notes: dict[str, str] = {}
    timer.hook(model)
    for impl in impls:
        if impl != "moerun":
            runners[impl] = TransformersRunner(model, _HF_EXPERTS[impl])
            continue
        try:
            lean = make_lean_runner(model, max_seq_len)
        except NotImplementedError as e:
            runners[impl] = TransformersRunner(model, "moerun")
            notes[impl] = f"transformers forward with moerun experts ({e})"
            continue
        for layer in lean.layers:
            if isinstance(layer.mlp, MoELayer):
                layer.mlp = timer.wrap(layer.mlp)
        runners[impl] = lean
    return runners, notes


def quantized_copy(
    model: nn.Module, bits: int, group_size: int = 32, dense_bits: int | None = None, made: dict | None = None
) -> nn.Module:
    """A moerun-patched copy of ``model`` with experts at ``bits`` and dense matrices at ``dense_bits`` (default:
    ``bits``; int4: ``group_size``); ``made``: low-bit weights already made, as ``models.quantized.quantize`` takes.

    The copy's modules are new but start out sharing ``model``'s parameters: patching and quantizing replace
    tensors rather than write into them, so the copy costs its low-bit weights, not a float copy as well.
    """
    quantized = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    if not moe_layers(quantized):
        patch(quantized)
    quantize(quantized, QuantConfig(bits=bits, group_size=group_size, dense_bits=dense_bits), made=made)
    return quantized


def decode_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: all weights, but one embedding row and top-k of each block's experts.

    The lm head is read whole (tied or not). Low-bit weights count their packed bytes and scales. The KV
    cache is left out.
    """
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    total += sum(weight_nbytes(w) for w in low_bit_weights(model))
    for layer in moe_layers(model).values():
        experts = layer.experts
        if experts.formats is not None:  # float experts are parameters, counted above
            routed = weight_nbytes(experts.gate_up) + weight_nbytes(experts.down)
        else:
            routed = (experts.gate_up.numel() + experts.down.numel()) * experts.gate_up.element_size()
        total -= routed * (layer.num_experts - layer.routing.top_k) // layer.num_experts
    total += embed.shape[1] * embed.element_size()  # the token's row
    if model.get_output_embeddings().weight is embed:  # tied: parameters() listed it once, as the embedding
        total += embed.numel() * embed.element_size()
    top_k = model.config.num_experts_per_tok
    for module in model.modules():
        if type(module).__name__ in SUPPORTED_BLOCKS:
            experts = module.experts
            routed = experts.gate_up_proj.numel() + experts.down_proj.numel()
            num_experts = experts.gate_up_proj.shape[0]
            total -= routed * (num_experts - top_k) // num_experts * experts.gate_up_proj.element_size()
    return total


@dataclass
class ModelRecord:
    """One (model, dtype, impl) measurement, as written to JSON."""

    model: str
    impl: str
    dtype: str
    bits: int
    threads: int
    prompt_tokens: int
    decode_tokens: int
    rounds: int
    ttft_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    decode_gbps: float  # weight bytes a decode step reads x decode tokens/s
    read_gbps: float  # memory read bandwidth measured in the same rounds
    decode_roofline_fraction: float  # decode tokens/s over read_gbps / bytes per token
    decode_non_moe_share: float  # fraction of a decode step spent outside the MoE blocks
    prefill_non_moe_share: float
    path: str  # how the impl ran: lean runner or transformers forward
    note: str | None
    # The performance model's predictions for moerun's lean runner, and their errors (predicted / measured - 1).
    predicted_prefill_tokens_per_s: float | None = None
    predicted_decode_tokens_per_s: float | None = None
    prefill_prediction_error: float | None = None
    decode_prediction_error: float | None = None


def _one_sequence(runner: Runner, prompt: torch.Tensor, decode_tokens: int, timer: MoETimer) -> dict[str, float]:
    """Prefill ``prompt`` then decode greedily; seconds of each phase and the MoE seconds inside them."""
    runner.reset()
    timer.reset()
    start = time.perf_counter()
    logits = runner.prefill(prompt)
    token = int(logits.argmax())
    ttft = time.perf_counter() - start
    prefill_moe = timer.seconds
    timer.reset()
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(runner.decode(token).argmax())
    decode = time.perf_counter() - start
    return {"ttft": ttft, "prefill_moe": prefill_moe, "decode": decode, "decode_moe": timer.seconds}


def run_model_bench(
    model_spec: str,
    dtype_name: str = "bf16",
    threads: int = 1,
    impls: tuple[str, ...] = IMPLS,
    prompt_tokens: int = 512,
    decode_tokens: int = 32,
    rounds: int = 3,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
    bits: tuple[int, ...] = (16,),
    group_size: int = 32,
    prepare: Callable[[nn.Module], None] | None = None,
    perf_model: Callable[[], PerfModel] | None = None,
) -> Iterator[ModelRecord]:
    """Measure each impl on one model, alternating round by round after one warm-up round; yields records.

    Args:
        model_spec: a name in ``SYNTHETIC_MODELS``, ``reference``, or a checkpoint directory.
        dtype_name: a key of ``DTYPES``.
        threads: torch (and native kernel) threads.
        impls: a subset of ``IMPLS``.
        bits: moerun also runs quantized copies of the model at these bits (8, 4; 16 is the model itself).
        group_size: int4 group size of those copies.
        prompt_tokens: P, the prompt length (random token ids, seeded).
        decode_tokens: N, greedy decode steps per round.
        rounds: timed rounds (the medians are reported).
        seed: seed of the prompt.
        on_step: called with a progress message before each step.
        prepare: called with each model moerun runs before any timing (the CLI tunes kernels there).
        perf_model: makes the performance model, after ``prepare``; its predictions join moerun's records.
    """
    dtype = DTYPES[dtype_name]
    torch.set_num_threads(threads)
    step = on_step or (lambda _: None)
    step(f"loading {model_spec}")
    model = load_model(model_spec, dtype)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + decode_tokens > context:
        raise ValueError(
            f"{prompt_tokens} prompt + {decode_tokens} decode tokens exceed the model's context of {context} positions"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed))
    timer = MoETimer()
    runners, notes = make_runners(model, impls, prompt_tokens + decode_tokens, timer)
    models = dict.fromkeys(runners, model)
    for b in (b for b in bits if b != 16):
        step(f"quantizing {model_spec} to {b} bits")
        quantized = quantized_copy(model, b, group_size)
        label = f"moerun-int{b}"
        runners[label] = make_runners(quantized, ("moerun",), prompt_tokens + decode_tokens, timer)[0]["moerun"]
        models[label] = quantized
    impls = tuple(runners)
    if prepare is not None:
        for impl in dict.fromkeys(i for i in impls if i.startswith("moerun")):
            prepare(models[impl])
    model_of_host = perf_model() if perf_model is not None else None
    read_buffer = torch.ones(_READ_PROBE_BYTES // 4, dtype=torch.float32)
    samples: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
    read_seconds = []
    for round_index in range(rounds + 1):  # round 0 warms up every impl and is not counted
        label = "warm-up" if round_index == 0 else f"round {round_index}/{rounds}"
        for impl, runner in runners.items():
            step(f"{model_spec} {label}: {impl}")
            sample = _one_sequence(runner, prompt, decode_tokens, timer)
            if round_index:
                samples[impl].append(sample)
        start = time.perf_counter()
        read_buffer.sum()
        read_seconds.append(time.perf_counter() - start)
    read_gbps = _READ_PROBE_BYTES / statistics.median(read_seconds[1:]) / 1e9
    for impl in impls:
        bytes_per_token = decode_bytes_per_token(models[impl])
        runs = samples[impl]
        med = {key: statistics.median(s[key] for s in runs) for key in ("ttft", "decode")}
        decode_per_s = decode_tokens / med["decode"]
        prefill_per_s = prompt_tokens / med["ttft"]
        predicted: dict[str, float | None] = dict.fromkeys(("prefill", "decode"))
        if model_of_host is not None and isinstance(runners[impl], LeanRunner):
            shape = ModelShape.of_model(models[impl])
            formats = MatrixFormats.of(dtype, int(impl.removeprefix("moerun-int")) if "int" in impl else 16, group_size)
            predicted["prefill"] = prompt_tokens / model_of_host.prefill(shape, formats, prompt_tokens).ms * 1e3
            step_ms = model_of_host.decode_step(shape, formats, position=prompt_tokens + decode_tokens // 2).ms
            predicted["decode"] = 1e3 / step_ms
        yield ModelRecord(
            model=model_spec,
            impl=impl,
            dtype=dtype_name,
            bits=int(impl.removeprefix("moerun-int")) if impl.startswith("moerun-int") else dtype.itemsize * 8,
            threads=threads,
            prompt_tokens=prompt_tokens,
            decode_tokens=decode_tokens,
            rounds=rounds,
            ttft_ms=med["ttft"] * 1e3,
            prefill_tokens_per_s=prefill_per_s,
            decode_tokens_per_s=decode_per_s,
            decode_ms_per_token=med["decode"] / decode_tokens * 1e3,
            decode_gbps=bytes_per_token * decode_per_s / 1e9,
            read_gbps=read_gbps,
            decode_roofline_fraction=decode_per_s * bytes_per_token / (read_gbps * 1e9),
            decode_non_moe_share=statistics.median(1 - s["decode_moe"] / s["decode"] for s in runs),
            prefill_non_moe_share=statistics.median(1 - s["prefill_moe"] / s["ttft"] for s in runs),
            path="lean" if isinstance(runners[impl], (LeanRunner, VariantLeanRunner)) else "transformers",
            note=notes.get(impl),
            predicted_prefill_tokens_per_s=predicted["prefill"],
            predicted_decode_tokens_per_s=predicted["decode"],
            prefill_prediction_error=_error(predicted["prefill"], prefill_per_s),
            decode_prediction_error=_error(predicted["decode"], decode_per_s),
        )


def _error(predicted: float | None, measured: float) -> float | None:
    return None if predicted is None else predicted / measured - 1


def record_dicts(records: list[ModelRecord]) -> list[dict]:
    return [asdict(r) for r in records]
