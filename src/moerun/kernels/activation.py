"""Gated activations applied between the two expert GEMMs.

Shape legend: S slots, I expert intermediate size. The gate/up projection output is laid out
as [S, 2I] with the gate in the first I columns and the up projection in the last I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GLU_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "swiglu_clamped")


@dataclass(frozen=True)
class GluSpec:
    """A gated linear unit: ``act(gate) * up``.

    Args:
        activation: one of ``GLU_ACTIVATIONS``. ``swiglu_clamped`` is GPT-OSS's variant:
            gate clamped above at ``limit``, up clamped to [-limit, limit],
            ``(up + 1) * gate * sigmoid(alpha * gate)``.
        alpha: sigmoid slope of ``swiglu_clamped``.
        limit: clamp bound of ``swiglu_clamped``.
    """

    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.activation not in GLU_ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {', '.join(GLU_ACTIVATIONS)}")


def apply_glu(gate_up: torch.Tensor, spec: GluSpec) -> torch.Tensor:
    """Apply the gated activation.

    Args:
        gate_up: [S, 2I] gate columns then up columns, any float dtype.
        spec: the activation.

    Returns:
        [S, I] in gate_up's dtype.
    """
    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
    if spec.activation == "silu":
        return F.silu(gate) * up
    if spec.activation == "gelu":
        return F.gelu(gate) * up
    if spec.activation == "gelu_pytorch_tanh":
        return F.gelu(gate, approximate="tanh") * up
    gate = gate.clamp(max=spec.limit)
    up = up.clamp(min=-spec.limit, max=spec.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * spec.alpha))
