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


@torch.no_grad()
def expert_sensitivity(
    layer: MoELayer,
    x: torch.Tensor,
    candidates: list[QuantFormat],
    quantized: dict[str, tuple[QuantizedWeight, QuantizedWeight]] | None = None,
) -> tuple[list[list[float]], list[list[int]]]:
    """Sensitivity and bytes of each expert of ``layer`` in each candidate format.

    Args:
        layer: a float MoE layer.
        x: [T, H] calibration inputs of the layer.
        candidates: C formats.
        quantized: this layer's (gate_up, down) stacks already quantized, by format name (they are then not
            quantized again).

    Returns:
        (sensitivity [E][C], cost [E][C] in bytes).
    """
    weights, ids = route(layer.router_logits(x), layer.routing, layer.score_bias)  # [T, k]
    xf = x.float()
    gate_up, down = layer.resident.gate_up.detach(), layer.resident.down.detach()
    float_bytes = gate_up.element_size()
    two_i, hidden = gate_up.shape[1:]
    sensitivity, cost = [], []
    for e in range(layer.num_experts):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        xe, we = xf[rows], weights[rows, slot].float()  # [n, H], [n]
        reference = _expert_output(xe, gate_up[e].float(), down[e].float(), layer)
        row_sens, row_cost = [], []
        for fmt in candidates:
            row_cost.append(fmt.nbytes(two_i, hidden, float_bytes) + fmt.nbytes(hidden, two_i // 2, float_bytes))
            if fmt.bits == 16:
                row_sens.append(0.0)
                continue
            made = (quantized or {}).get(fmt.name)
            if made is not None:
                qg, qd = (m[e].dequantize(torch.float32) for m in made)
            else:
                qg, qd = (quantize_weight(w[e], fmt).dequantize() for w in (gate_up, down))
            err = _expert_output(xe, qg, qd, layer) - reference
            # An expert the calibration never routes to still ranks by its weights' rounding error, far below
            # any routed expert's error, so spare bytes go to the routed ones first.
            weight_err = ((qg - gate_up[e].float()).square().sum() + (qd - down[e].float()).square().sum()).item()
            row_sens.append((we.square()[:, None] * err.square()).sum().item() + 1e-9 * weight_err)
        sensitivity.append(row_sens)
        cost.append(row_cost)
    return sensitivity, cost


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
