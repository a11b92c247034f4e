"""Low-bit models: ``quantize`` a loaded model in place, and the quantized checkpoint format.

A quantized model keeps its transformers skeleton: routed experts (and shared experts) of every moerun
MoE layer, every ``nn.Linear`` of the decoder layers (attention, dense MLPs) and the output head become
low-bit; embeddings, norms and routers stay in the model's dtype (they are small, or read one row per
token, or decide routing).

A quantized checkpoint directory holds config.json, tokenizer and generation files copied from the
source, ``model.safetensors`` with the model's float tensors under moerun's module names plus each
low-bit weight's storage tensors (``<module>.<weight>.qweight`` / ``.scales`` / ``.mins``; mixed-precision
experts one stack per format, ``<layer>.gate_up.int4-g32.qweight`` ...), and ``moerun_quant.json``
describing every weight's format (also stored in the safetensors metadata).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..experts import experts_from_stacks
from ..kernels.linear import linear
from ..layer import MoELayer
from ..quant.formats import (
    ExpertMatrices,
    QuantFormat,
    QuantizedWeight,
    Weight,
    make_int4_layout,
    quantize_weight,
    weight_nbytes,
)

QUANT_FILE = "moerun_quant.json"
QUANT_FORMAT_VERSION = 3  # 2: int4 in row tiles and blocks of 16 groups; 3: float expert tensors under <layer>.experts


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantize`` does.

    Attributes:
        bits: routed experts' bits, 8 or 4 (16: leave them as they are).
        group_size: int4 group size (32, 64 or 128).
        symmetric: int4 without per-group minimums.
        dense_bits: bits of the other large matrices (attention, dense and shared MLPs, output head); None
            for the same as ``bits``. A matrix whose K int4 cannot take (not a multiple of 64 and the group
            size) gets int8.
        expert_formats: per MoE layer (module name), one format name per expert, overriding ``bits`` for
            those layers (mixed precision; see ``moerun.quant.mixed``).
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    dense_bits: int | None = None
    expert_formats: dict[str, list[str]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for bits in (self.bits, self.dense_bits if self.dense_bits is not None else self.bits):
            QuantFormat(bits, self.group_size if bits == 4 else 32, self.symmetric)

    def format(self, bits: int) -> QuantFormat:
        return QuantFormat(bits, self.group_size, self.symmetric) if bits == 4 else QuantFormat(bits)

    def dense_format(self, in_features: int) -> QuantFormat:
        fmt = self.format(self.bits if self.dense_bits is None else self.dense_bits)
        return fmt if fmt.supports(in_features) else QuantFormat(8)


class QuantLinear(nn.Module):
    """``nn.Linear`` with a low-bit weight: x [..., K] -> [..., N] in x's dtype.

    Args:
        weight: the [N, K] matrix.
        bias: [N] or None.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.weight.format.name}"


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The moerun MoE layers of a (patched) model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def dense_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules ``quantize`` converts: those of attention layers and MLPs, and the output
    head (routers are not Linear in a patched model). Others are left in float: recurrent mixers (Mamba,
    gated delta nets) read their weights directly and compound rounding over the sequence."""
    parents = {name: type(m).__name__ for name, m in model.named_modules()}
    found = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        parent = parents.get(name.rpartition(".")[0], "")
        if name.endswith("lm_head") or parent.endswith("Attention") or "MLP" in parent:
            found[name] = module
    return found


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _replace_param(module: nn.Module, name: str, value: Weight) -> None:
    del module._parameters[name]
    setattr(module, name, value)


def quantize(
    model: nn.Module,
    config: QuantConfig,
    progress: Callable[[str], None] | None = None,
    made: dict[tuple[str, str], QuantizedWeight] | None = None,
) -> dict[str, object]:
    """Quantize a moerun-patched model in place (``moerun.load`` returns one) and return its quant layout.

    Args:
        model: a transformers CausalLM whose MoE blocks moerun patched.
        config: what to quantize to.
        progress: called with a module name after each MoE layer or dense matrix.
        made: low-bit weights already made, by (parameter name, format name), used instead of quantizing
            again (uniform expert formats and dense matrices).

    Returns:
        the quant layout ``moerun_quant.json`` stores: format names per expert per MoE layer and per dense weight.

    Raises:
        ValueError: the model has no moerun MoE layer, is already quantized, or a format does not fit.
    """
    if getattr(model, "moerun_quant", None) is not None:
        raise ValueError("this model is already quantized")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no moerun MoE layer; load it with moerun.load or run moerun.patch first")
    layout: dict[str, object] = {"experts": {}, "dense": {}, "config": config_record(config)}
    # the model's own conversions (torch's int4 layout, made on first use), not the given weights'
    made = {key: replace(w, conversions={}) for key, w in (made or {}).items()}
    with torch.no_grad():
        for name, layer in layers.items():
            names = (config.expert_formats or {}).get(name)
            if names:
                layer.resident.quantize([QuantFormat.parse(n) for n in names])
            elif config.bits != 16:
                fmt = config.format(config.bits)
                if not (fmt.supports(layer.hidden_size) and fmt.supports(layer.intermediate_size)):
                    fmt = QuantFormat(8)  # int4 needs K % 64 == 0; tiny test models have smaller experts
                stacks = [made.get((f"{name}.experts.{attr}", fmt.name)) for attr in ("gate_up", "down")]
                if all(stacks):
                    layer.resident.set_weights([fmt] * layer.num_experts, *stacks)
                else:
                    layer.resident.quantize(fmt)
            layout["experts"][name] = [f.name for f in (layer.experts.formats or [QuantFormat(16)] * layer.num_experts)]
            for attr in ("shared_gate_up", "shared_down"):
                weight = getattr(layer, attr)
                if isinstance(weight, torch.Tensor):
                    fmt = config.dense_format(weight.shape[1])
                    if fmt.bits != 16:
                        low = made.get((f"{name}.{attr}", fmt.name)) or quantize_weight(weight, fmt)
                        _replace_param(layer, attr, low)
                        layout["dense"][f"{name}.{attr}"] = fmt.name
            if progress:
                progress(name)
        for name, lin in dense_linears(model).items():
            fmt = config.dense_format(lin.in_features)
            if fmt.bits == 16:
                continue
            low = made.get((f"{name}.weight", fmt.name)) or quantize_weight(lin.weight, fmt)
            _replace_module(model, name, QuantLinear(low, lin.bias))
            layout["dense"][f"{name}.weight"] = fmt.name
            if progress:
                progress(name)
    model.moerun_quant = layout
    return layout


def config_record(config: QuantConfig) -> dict[str, object]:
    record = asdict(config)
    record.pop("expert_formats")
    return record


def _expert_storage(weight: Weight, formats: list[QuantFormat]) -> dict[str, torch.Tensor]:
    """Storage tensors of one expert projection by name suffix (a stack per format for mixed experts)."""
    if isinstance(weight, QuantizedWeight):
        return weight.tensors()
    if isinstance(weight, torch.Tensor):
        return {"16": weight}
    out = {}
    for fmt in dict.fromkeys(formats):
        members = [weight[e] for e, f in enumerate(formats) if f == fmt]
        if fmt.bits == 16:
            out["16"] = torch.stack(members)
        else:
            for key in members[0].tensors():
                out[f"{fmt.name}.{key}"] = torch.stack([m.tensors()[key] for m in members])
    return out


def _empty_experts(
    formats: list[QuantFormat], shape: tuple[int, int, int], dtype: torch.dtype
) -> tuple[Weight, dict[str, torch.Tensor]]:
    """Uninitialised expert weights laid out as ``_expert_storage`` names them, and that storage."""
    num_experts, n, k = shape
    storage: dict[str, torch.Tensor] = {}

    def make_stack(fmt: QuantFormat, ids: list[int]) -> torch.Tensor | QuantizedWeight:
        if fmt.bits == 16:
            stack = storage["16"] = torch.empty(len(ids), n, k, dtype=dtype)
            return stack
        stack = QuantizedWeight.empty(fmt, (len(ids), n, k))
        prefix = "" if len(ids) == num_experts else f"{fmt.name}."  # one format: the stack is the weight
        storage.update({prefix + key: t for key, t in stack.tensors().items()})
        return stack

    return experts_from_stacks(formats, make_stack), storage


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a quantized checkpoint stores, by name: float state plus low-bit storage."""
    tensors = dict(model.state_dict())
    for name, layer in moe_layers(model).items():
        experts = layer.resident
        if experts.formats is not None:
            for proj in ("gate_up", "down"):
                storage = _expert_storage(getattr(experts, proj), experts.formats)
                tensors.update({f"{name}.{proj}.{key}": t for key, t in storage.items()})
        for attr in ("shared_gate_up", "shared_down"):
            weight = getattr(layer, attr)
            if isinstance(weight, QuantizedWeight):
                tensors.update({f"{name}.{attr}.{key}": t for key, t in weight.tensors().items()})
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            tensors.update({f"{name}.weight.{key}": t for key, t in module.weight.tensors().items()})
    return tensors


def apply_quant_layout(model: nn.Module, layout: dict[str, object]) -> dict[str, torch.Tensor]:
    """Give a freshly built, patched model the low-bit layout of ``layout`` with uninitialised storage.

    Returns:
        every tensor the checkpoint must fill, by name (as ``quantized_tensors`` names them).

    Raises:
        ValueError: the quant layout names a module the model lacks, or does not fit its shapes.
    """
    layers = moe_layers(model)
    storage: dict[str, torch.Tensor] = {}
    for name, names in layout["experts"].items():
        if name not in layers:
            raise ValueError(f"the quant layout names MoE layer {name}, which the model does not have")
        layer = layers[name]
        formats = [QuantFormat.parse(n) for n in names]
        if len(formats) != layer.num_experts:
            raise ValueError(
                f"the quant layout gives {len(formats)} expert formats for {name}, which has {layer.num_experts}"
            )
        if all(f.bits == 16 for f in formats):
            continue
        weights = []
        for proj in ("gate_up", "down"):
            weight, parts = _empty_experts(formats, tuple(getattr(layer.resident, proj).shape), layer.dtype)
            weights.append(weight)
            storage.update({f"{name}.{proj}.{key}": t for key, t in parts.items()})
        layer.resident.set_weights(formats, *weights)
    for key, fmt_name in layout["dense"].items():
        module_name, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            current = getattr(module, attr)
        except AttributeError:
            raise ValueError(f"the quant layout names {key}, which the model does not have") from None
        weight = QuantizedWeight.empty(QuantFormat.parse(fmt_name), tuple(current.shape))
        if type(module) is nn.Linear:
            _replace_module(model, module_name, QuantLinear(weight, module.bias))
        else:
            _replace_param(module, attr, weight)
        storage.update({f"{key}.{k}": t for k, t in weight.tensors().items()})
    model.moerun_quant = layout
    return {**model.state_dict(), **storage}


def low_bit_weights(model: nn.Module) -> list[Weight]:
    """Every low-bit weight of a model (not parameters: they are not nn.Parameters)."""
    out: list[Weight] = []
    for layer in moe_layers(model).values():
        if layer.experts.formats is not None:
            out += [layer.experts.gate_up, layer.experts.down]
        out += [w for w in (layer.shared_gate_up, layer.shared_down) if isinstance(w, QuantizedWeight)]
    out += [m.weight for m in model.modules() if isinstance(m, QuantLinear)]
    return out


def make_int4_layouts(model: nn.Module) -> int:
    """Make the experts' int4 matrices' torch-layout copies now instead of on first use, where torch runs them
    (the native kernel reads moerun's own layout): a served model's first requests, and a timed run's first
    steps, would otherwise wait for the experts the first tokens did not select. Dense matrices are left to
    their first use, which the first token makes (and a runner may use its own copy, as the lean runner's
    stacked q/k/v: converting the model's would only take memory). Returns the matrices converted."""
    from ..kernels import native

    if native.is_available():
        return 0
    dtype = model.get_input_embeddings().weight.dtype  # the activations'
    made = 0
    for layer in moe_layers(model).values():
        weights = [layer.experts.gate_up, layer.experts.down] if layer.experts.formats is not None else []
        weights += [w for w in (layer.shared_gate_up, layer.shared_down) if isinstance(w, QuantizedWeight)]
        for w in weights:
            matrices = w.matrices if isinstance(w, ExpertMatrices) else [w]
            made += sum(make_int4_layout(m, dtype) for m in matrices if isinstance(m, QuantizedWeight))
    return made


def model_nbytes(model: nn.Module) -> int:
    """Bytes of a model's weights, low-bit storage included (tied tensors counted once)."""
    unique = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in unique) + sum(map(weight_nbytes, low_bit_weights(model)))


def expert_nbytes(model: nn.Module) -> int:
    """Bytes of the routed experts' weights."""
    return sum(weight_nbytes(getattr(m.experts, p)) for m in moe_layers(model).values() for p in ("gate_up", "down"))


def quant_layout_metadata(layout: dict[str, object], version: str) -> str:
    """The JSON stored beside the weights (``moerun_quant.json`` and the safetensors metadata)."""
    return json.dumps({"format_version": QUANT_FORMAT_VERSION, "moerun_version": version, **layout}, indent=1)
