"""Per-expert bit-widths under a memory budget (mixed precision).

Each routed expert gets a sensitivity per candidate format: the squared error its quantized output
makes on calibration activations, summed over the tokens the router sends to it, each weighted by the
square of its router weight (MC-MoE's observation: experts differ in reconstruction error, routing
score and activation frequency; the sum over routed tokens counts all three). ``allocate_bits`` then
picks the formats that minimise the total under the budget exactly.

Candidates: int4 at group sizes 128, 64 and 32, int8 and the model's float dtype. Mixing group sizes
lets an allocation with the memory of uniform int4-g32 buy int8 for sensitive experts by giving
insensitive ones g128.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.activation import apply_glu
from ..layer import MoELayer
from ..quant.allocate import allocate_bits
from ..quant.formats import QuantFormat, QuantizedWeight, quantize_weight
from ..routing import route
from .quantized import moe_layers

CANDIDATES = ("int4-g128", "int4-g64", "int4-g32", "int8", "16")


@torch.no_grad()
def calibration_inputs(model: nn.Module, token_ids: list[int], window: int) -> dict[str, torch.Tensor]:
    """Each MoE layer's input hidden states [T, H] over ``token_ids`` run in windows of ``window`` tokens."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, layer in moe_layers(model).items():

        def hook(_module, args, name=name):
            captured.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        for start in range(0, len(token_ids), window):
            model(torch.tensor([token_ids[start : start + window]]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


def _expert_output(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, layer: MoELayer) -> torch.Tensor:
    """One expert's output [n, H] in float32 (biases left out: quantization does not touch them)."""
    return apply_glu(x @ gate_up.T, layer.glu) @ down.T


@dataclass
class ExpertReference:
    """Each expert's calibration tokens and float output, to score formats against (``output_errors``).

    Attributes:
        inputs: per expert, the hidden states [n_e, H] float32 the router sent to it.
        weights: per expert, their router weights [n_e] float32.
        outputs: per expert, its float output [n_e, H] float32.
        unrouted: the float32 (gate_up, down) of each expert no calibration token reached, by expert.
    """

    inputs: list[torch.Tensor]
    weights: list[torch.Tensor]
    outputs: list[torch.Tensor]
    unrouted: dict[int, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def expert_reference(layer: MoELayer, x: torch.Tensor) -> ExpertReference:
    """Route the calibration inputs x [T, H] of a float MoE layer and keep each expert's tokens and output."""
    weights, ids = route(layer.router_logits(x), layer.routing, layer.score_bias)  # [T, k]
    xf = x.float()
    gate_up, down = layer.resident.gate_up.detach(), layer.resident.down.detach()
    inputs, token_weights, outputs, unrouted = [], [], [], {}
    for e in range(layer.num_experts):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        inputs.append(xf[rows])
        token_weights.append(weights[rows, slot].float())
        outputs.append(_expert_output(inputs[-1], gate_up[e].float(), down[e].float(), layer))
        if rows.numel() == 0:
            unrouted[e] = (gate_up[e].float().clone(), down[e].float().clone())
    return ExpertReference(inputs, token_weights, outputs, unrouted)


@torch.no_grad()
def output_errors(
    layer: MoELayer, reference: ExpertReference, matrices: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
) -> list[float]:
    """Each expert's sensitivity to the values ``matrices(e)`` -> (gate_up [2I, H], down [H, I]) give it: the
    squared error of its output on its calibration tokens, each weighted by its router weight squared."""
    out = []
    for e in range(layer.num_experts):
        qg, qd = (m.float() for m in matrices(e))
        if e in reference.unrouted:
            # An expert the calibration never routes to still ranks by its weights' rounding error, far below
            # any routed expert's error, so spare bytes go to the routed ones first.
            gate_up, down = reference.unrouted[e]
            out.append(1e-9 * ((qg - gate_up).square().sum() + (qd - down).square().sum()).item())
            continue
        err = _expert_output(reference.inputs[e], qg, qd, layer) - reference.outputs[e]
        out.append((reference.weights[e].square()[:, None] * err.square()).sum().item())
    return out


@torch.no_grad()
def expert_sensitivity(
    layer: MoELayer,
    x: torch.Tensor,
    candidates: list[QuantFormat],
    quantized: dict[str, tuple[QuantizedWeight, QuantizedWeight]] | None = None,
) -> tuple[list[list[float]], list[list[int]]]:
    """Sensitivity (``output_errors``) and bytes of each expert of ``layer`` in each candidate format.

    Args:
        layer: a float MoE layer.
        x: [T, H] calibration inputs of the layer.
        candidates: C formats.
        quantized: this layer's (gate_up, down) stacks already quantized, by format name (they are then not
            quantized again).

    Returns:
        (sensitivity [E][C], cost [E][C] in bytes).
    """
    reference = expert_reference(layer, x)
    gate_up, down = layer.resident.gate_up.detach(), layer.resident.down.detach()
    float_bytes = gate_up.element_size()
    two_i, hidden = gate_up.shape[1:]
    columns = []
    for fmt in candidates:
        if fmt.bits == 16:
            columns.append([0.0] * layer.num_experts)
            continue
        made = (quantized or {}).get(fmt.name)

        def matrices(e: int, fmt=fmt, made=made) -> tuple[torch.Tensor, torch.Tensor]:
            if made is not None:
                return tuple(m[e].dequantize(torch.float32) for m in made)
            return tuple(quantize_weight(w[e], fmt).dequantize() for w in (gate_up, down))

        columns.append(output_errors(layer, reference, matrices))
    cost = [fmt.nbytes(two_i, hidden, float_bytes) + fmt.nbytes(hidden, two_i // 2, float_bytes) for fmt in candidates]
    return [list(row) for row in zip(*columns, strict=True)], [list(cost) for _ in range(layer.num_experts)]


def choose_expert_formats(
    model: nn.Module,
    token_ids: list[int],
    budget: int,
    window: int = 256,
    candidates: tuple[str, ...] = CANDIDATES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[str]]:
    """The per-expert formats that minimise total sensitivity with all routed experts within ``budget`` bytes.

    Args:
        model: a float, moerun-patched model.
        token_ids: calibration tokens.
        budget: bytes for all routed experts' weights together.
        window: tokens per calibration forward pass.
        candidates: format names to choose from; those some layer's shapes cannot take are dropped.
        progress: called with each MoE layer's name once it is scored.

    Returns:
        format names per expert, per MoE layer name (``QuantConfig.expert_formats``).

    Raises:
        ValueError: the budget is below the smallest allocation (the message names it).
    """
    layers = moe_layers(model)
    formats = [
        f for f in map(QuantFormat.parse, candidates)
        if all(f.supports(m.hidden_size) and f.supports(m.intermediate_size) for m in layers.values())
    ]  # fmt: skip
    inputs = calibration_inputs(model, token_ids, window)
    all_sens, all_cost, owners = [], [], []
    for name, layer in layers.items():
        x = inputs.get(name, torch.zeros(0, layer.hidden_size, dtype=layer.dtype))
        sens, cost = expert_sensitivity(layer, x, formats)
        all_sens += sens
        all_cost += cost
        owners += [name] * layer.num_experts
        if progress:
            progress(name)
    choice = allocate_bits(all_sens, all_cost, budget)
    expert_formats: dict[str, list[str]] = {name: [] for name in layers}
    for owner, c in zip(owners, choice, strict=True):
        expert_formats[owner].append(formats[c].name)
    return expert_formats
