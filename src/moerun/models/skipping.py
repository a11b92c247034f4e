"""Dynamic expert skipping for a whole model: calibrate, set, and count what was skipped.

Threshold skipping takes one beta per MoE layer, calibrated on text so that the layer drops a target share of its
(token, expert) pairs (``moerun.routing.calibrate_threshold``); top-p routing takes one p for all layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import ExpertSkipping, calibrate_threshold, route
from .mixed import calibration_inputs
from .quantized import moe_layers


@torch.no_grad()
def calibrate_skipping(
    model: nn.Module,
    token_ids: list[int],
    skip_share: float,
    window: int = 256,
    inputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, ExpertSkipping]:
    """Threshold skipping per MoE layer that drops ``skip_share`` of the layer's pairs on ``token_ids``.

    The layers' inputs come from the unmodified model, so a layer's beta does not depend on what the layers
    before it skip; the share measured while they all skip differs a little (``skipped_share`` says by how much).

    Args:
        model: a moerun-patched model (with skipping off).
        token_ids: calibration tokens.
        skip_share: the share of pairs to drop in every layer, in [0, (k-1)/k].
        window: tokens per calibration forward pass.
        inputs: each MoE layer's inputs [T, H] on the calibration text, where a caller has them already (the
            text is then not run again).

    Returns:
        ``ExpertSkipping("threshold", beta)`` per MoE layer name.
    """
    layers = moe_layers(model)
    if any(layer.skipping is not None for layer in layers.values()):
        raise ValueError("calibrate skipping on the model with skipping off")
    if inputs is None:
        inputs = calibration_inputs(model, token_ids, window)
    skipping = {}
    for name, layer in layers.items():
        x = inputs.get(name, torch.zeros(0, layer.hidden_size, dtype=layer.dtype))
        weights, _ = route(layer.router_logits(x), layer.routing, layer.score_bias)  # [T, k]
        skipping[name] = ExpertSkipping("threshold", calibrate_threshold(weights, skip_share))
    return skipping


def set_skipping(model: nn.Module, skipping: ExpertSkipping | dict[str, ExpertSkipping] | None) -> None:
    """Set every MoE layer's skipping: one for all, one per layer name (every layer named), or None for off.

    Raises:
        ValueError: a layer missing from the mapping, a name that is no MoE layer, or a routing that cannot skip
            that way (nothing is changed then).
    """
    layers = moe_layers(model)
    if isinstance(skipping, dict):
        unknown = sorted(set(skipping) - set(layers))
        missing = sorted(set(layers) - set(skipping))
        if unknown or missing:
            raise ValueError(
                f"expert skipping names {unknown[0]!r}, which is no MoE layer of this model"
                if unknown
                else f"expert skipping has no setting for MoE layer {missing[0]!r}"
            )
        chosen = skipping
    else:
        chosen = dict.fromkeys(layers, skipping)
    for name, layer in layers.items():
        if chosen[name] is not None:
            chosen[name].validate(layer.routing)
    for name, layer in layers.items():
        layer.skipping = chosen[name]


def skipped_share(model: nn.Module) -> float | None:
    """The share of routed (token, expert) pairs skipped since skipping was set, over all MoE layers; None when
    nothing was routed with skipping on."""
    routed = skipped = 0
    for layer in moe_layers(model).values():
        routed += layer.skip_counts[0]
        skipped += layer.skip_counts[1]
    return skipped / routed if routed else None
