"""The routed experts of an MoE layer, as containers the layer calls: ``experts(x, plan) -> [T, H]``.

:class:`Experts` is the interface. :class:`ResidentExperts` holds the weights in memory (float, one low-bit
format, or a format per expert); ``moerun.offload.OffloadedExperts`` reads them through an expert cache.
Offloading a layer swaps its container; the layer itself does not change.

Shape legend: T tokens, H hidden, I expert intermediate, E experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .kernels.activation import GluSpec
from .kernels.experts import ExpertWeights, experts_forward, fused_token_supported, get_backend, moe_token
from .kernels.onednn import PackedExperts, pack_experts
from .quant.formats import ExpertMatrices, QuantFormat, QuantizedWeight, Weight, quantize_weight
from .routing import RoutingConfig, RoutingPlan


class Experts(nn.Module):
    """E routed experts of hidden size H and intermediate size I with a gated activation.

    Subclasses implement ``forward(x, plan)``: x [T, H] routed by ``plan`` -> the experts' combined output
    [T, H] in x's dtype.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, glu: GluSpec, backend: str) -> None:
        super().__init__()
        if min(hidden_size, intermediate_size, num_experts) < 1:
            raise ValueError("hidden_size, intermediate_size and num_experts must all be >= 1")
        get_backend(backend)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.glu = glu
        self.backend = backend

    def forward(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        raise NotImplementedError

    def fused_token(self, x: torch.Tensor, router_weight: torch.Tensor, routing: RoutingConfig) -> torch.Tensor | None:
        """One token x [1, H] routed by ``router_weight`` [E, H] and run through the experts in one call, or None
        where these experts have no such path (the layer then routes and calls ``forward``)."""
        return None


class ResidentExperts(Experts):
    """Routed experts held in memory.

    Args:
        num_experts, hidden_size, intermediate_size: E, H, I.
        glu: the gated activation (default SiLU).
        bias: the experts have biases on both projections (GPT-OSS).
        backend: expert backend name (see ``moerun.kernels.experts.BACKENDS``).
        dtype, device: of the float parameters (``"meta"`` to fill them in afterwards).

    Attributes:
        gate_up: [E, 2I, H] gate rows then up rows: a float Parameter, a ``QuantizedWeight`` stack, or
            ``ExpertMatrices`` (a format per expert).
        down: [E, H, I], likewise.
        gate_up_bias, down_bias: [E, 2I] and [E, H], or None.
        formats: one format per expert once quantized (``quantize``, ``set_weights``), else None.
        packed: a oneDNN-packed copy for prefill GEMMs (``prepack``), or None.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        glu: GluSpec | None = None,
        *,
        bias: bool = False,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_experts, hidden_size, intermediate_size, glu or GluSpec(), backend)
        factory = {"dtype": dtype, "device": device}
        self.gate_up: Weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down: Weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.gate_up_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, **factory)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size, **factory)) if bias else None
        self.formats: list[QuantFormat] | None = None
        self.packed: PackedExperts | None = None

    def weights(self) -> ExpertWeights:
        """The experts as the backends see them."""
        return ExpertWeights(self.gate_up, self.down, self.gate_up_bias, self.down_bias, self.glu, self.packed)

    def forward(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return experts_forward(x, plan, self.weights(), self.backend)

    def fused_token(self, x: torch.Tensor, router_weight: torch.Tensor, routing: RoutingConfig) -> torch.Tensor | None:
        w = self.weights()
        if self.backend not in ("auto", "native") or not fused_token_supported(x, router_weight, routing, w):
            return None
        return moe_token(x, router_weight, routing, w)

    def quantize(self, formats: QuantFormat | list[QuantFormat]) -> None:
        """Replace the float weights with low-bit ones, in place (the float copy is freed).

        Args:
            formats: one format for all experts, or one per expert (mixed precision; 16 bits keeps an
                expert in the float dtype).

        Raises:
            ValueError: already quantized, a wrong number of formats, or a format the shapes cannot take.
        """
        if self.formats is not None:
            raise ValueError("these experts are already quantized")
        if isinstance(formats, QuantFormat):
            formats = [formats] * self.num_experts
        if len(formats) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} expert formats, got {len(formats)}")
        for name, k in (("gate_up", self.hidden_size), ("down", self.intermediate_size)):
            for fmt in set(formats):
                if not fmt.supports(k):
                    raise ValueError(
                        f"{fmt.name} cannot store the {name} projection (K = {k}): K must be a multiple of 64"
                    )
        gate_up, down = self.gate_up.detach(), self.down.detach()
        self.set_weights(formats, *(_quantize_stack(w, formats) for w in (gate_up, down)))

    def set_weights(self, formats: list[QuantFormat], gate_up: Weight, down: Weight) -> None:
        """Install low-bit weights (from ``quantize`` or a quantized checkpoint)."""
        for name in ("gate_up", "down"):
            if name in self._parameters:
                del self._parameters[name]
        self.packed = None
        self.gate_up, self.down = gate_up, down
        self.formats = list(formats)

    def prepack(self) -> None:
        """Keep a oneDNN-packed copy of the weights for faster prefill GEMMs.

        Costs memory equal to the weights again; decode still reads the plain weights. The copy is a
        snapshot: call again after changing the weights, or ``unpack()`` to drop it. Low-bit experts are not
        packed (their prefill dequantizes tiles in the native kernel).

        Raises:
            ValueError: quantized experts, or weights that oneDNN cannot pack with this torch build on this CPU
                (``moerun.kernels.onednn.is_available(dtype)`` says which dtypes it can).
        """
        if self.formats is not None:
            raise ValueError("prepack is for float experts; these are quantized")
        self.packed = pack_experts(self.gate_up.detach(), self.down.detach())

    def unpack(self) -> None:
        """Drop the packed copy made by ``prepack``."""
        self.packed = None


def experts_from_stacks(
    formats: list[QuantFormat], make_stack: Callable[[QuantFormat, list[int]], torch.Tensor | QuantizedWeight]
) -> Weight:
    """Expert weights [E, N, K] in per-expert formats, from ``make_stack(format, expert ids)`` -> a stack of
    those experts: the stack itself when all share one low-bit format, else ExpertMatrices over its rows."""
    distinct = list(dict.fromkeys(formats))
    if len(distinct) == 1 and distinct[0].bits != 16:
        return make_stack(distinct[0], list(range(len(formats))))
    matrices: list[torch.Tensor | QuantizedWeight | None] = [None] * len(formats)
    for fmt in distinct:
        ids = [e for e, f in enumerate(formats) if f == fmt]
        stack = make_stack(fmt, ids)
        for i, e in enumerate(ids):
            matrices[e] = stack[i]
    return ExpertMatrices(matrices)


def _quantize_stack(w: torch.Tensor, formats: list[QuantFormat]) -> Weight:
    """A float stack [E, N, K] in per-expert formats (16-bit experts are copied out of ``w``)."""

    def make_stack(fmt: QuantFormat, ids: list[int]) -> torch.Tensor | QuantizedWeight:
        chosen = w if len(ids) == w.shape[0] else w[ids]
        return chosen.contiguous() if fmt.bits == 16 else quantize_weight(chosen, fmt)

    return experts_from_stacks(formats, make_stack)
