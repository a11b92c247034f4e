"""MoELayer: route -> dispatch -> experts -> combine, plus optional shared experts.

Shape legend: T tokens, H hidden, E experts, I expert intermediate, Is shared-expert intermediate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import native
from .kernels.activation import GluSpec, apply_glu
from .kernels.experts import ExpertWeights, experts_forward, get_backend, native_supports
from .kernels.linear import linear
from .kernels.onednn import PackedExperts, pack_experts
from .quant.formats import ExpertMatrices, QuantFormat, QuantizedWeight, Weight, dequantize_matrix, quantize_weight
from .routing import RoutingConfig, RoutingPlan, make_plan, route


def check_hidden(x: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> None:
    """Raise ValueError unless x is a floating tensor [..., hidden_size] of ``dtype``."""
    if x.dim() < 1 or x.shape[-1] != hidden_size:
        raise ValueError(f"expected hidden states [..., {hidden_size}], got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"hidden states are {x.dtype} but the layer's weights are {dtype}; cast one of them")


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Args:
        hidden_size: H.
        intermediate_size: I, each routed expert's intermediate size.
        num_experts: E.
        routing: how the router picks experts.
        activation: the experts' gated activation (see ``GLU_ACTIVATIONS``).
        swiglu_alpha, swiglu_limit: parameters of ``swiglu_clamped``.
        expert_bias: routed experts have biases on both projections (GPT-OSS).
        router_bias: the router has a bias added to its logits (GPT-OSS).
        score_bias: the router has a choice-only per-expert score correction (DeepSeek-V3).
        router_fp32: compute router logits in float32 whatever the input dtype (DeepSeek-V3).
        shared_intermediate_size: intermediate size of the always-on shared expert, 0 for none.
        shared_gate: scale the shared expert by ``sigmoid(x @ shared_gate_weight.T)`` (Qwen2-MoE).
        backend: expert backend name (see ``moerun.kernels.experts.BACKENDS``).
        dtype: parameter dtype.
        device: parameter device (``"meta"`` to fill the parameters in afterwards).

    Forward: x [..., H] -> [..., H], same dtype as the parameters. Where autograd records it (grad mode on and
    x or a parameter requires grad) it runs differentiable torch operations only, and gradients reach x and the
    parameters; offloaded experts refuse it.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        routing: RoutingConfig,
        *,
        activation: str = "silu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        expert_bias: bool = False,
        router_bias: bool = False,
        score_bias: bool = False,
        router_fp32: bool = False,
        shared_intermediate_size: int = 0,
        shared_gate: bool = False,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if min(hidden_size, intermediate_size, num_experts) < 1:
            raise ValueError("hidden_size, intermediate_size and num_experts must all be >= 1")
        if shared_gate and shared_intermediate_size < 1:
            raise ValueError("shared_gate needs a shared expert (shared_intermediate_size >= 1)")
        routing.validate(num_experts)
        get_backend(backend)
        self.routing = routing
        self.glu = GluSpec(activation, swiglu_alpha, swiglu_limit)
        self.router_fp32 = router_fp32
        self.backend = backend
        self.packed: PackedExperts | None = None
        self.dtype = dtype
        self.expert_formats: list[QuantFormat] | None = None  # set by quantize_experts
        # Runs the routed experts instead of the resident weights (moerun.offload sets it): (x, plan) -> [T, H].
        self.offload: Callable[[torch.Tensor, RoutingPlan], torch.Tensor] | None = None
        factory = {"dtype": dtype, "device": device}
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        self.router_bias = nn.Parameter(torch.zeros(num_experts, **factory)) if router_bias else None
        self.score_bias = None
        if score_bias:  # DeepSeek keeps the correction in fp32 whatever the model dtype
            self.score_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=device))
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.gate_up_bias = (
            nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, **factory)) if expert_bias else None
        )
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size, **factory)) if expert_bias else None
        self.shared_gate_up = self.shared_down = self.shared_gate_weight = None
        if shared_intermediate_size:
            self.shared_gate_up = nn.Parameter(torch.empty(2 * shared_intermediate_size, hidden_size, **factory))
            self.shared_down = nn.Parameter(torch.empty(hidden_size, shared_intermediate_size, **factory))
            if shared_gate:
                self.shared_gate_weight = nn.Parameter(torch.empty(1, hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random normal weights (std ``std``), zero biases; for tests and benchmarks."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "bias" in name:
                    p.zero_()
                else:
                    p.normal_(0.0, std)

    @property
    def hidden_size(self) -> int:
        return self.router_weight.shape[1]

    @property
    def num_experts(self) -> int:
        return self.router_weight.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[2]

    def quantize_experts(self, formats: QuantFormat | list[QuantFormat]) -> None:
        """Replace the routed experts' float weights with low-bit ones, in place (the float copy is freed).

        Args:
            formats: one format for all experts, or one per expert (mixed precision; 16 bits keeps an
                expert in the layer's dtype).

        Raises:
            ValueError: already quantized, a wrong number of formats, or a format the shapes cannot take.
        """
        if self.expert_formats is not None:
            raise ValueError("this layer's experts are already quantized")
        if isinstance(formats, QuantFormat):
            formats = [formats] * self.num_experts
        if len(formats) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} expert formats, got {len(formats)}")
        gate_up, down = self.gate_up.detach(), self.down.detach()
        for name, k in (("gate_up", self.hidden_size), ("down", self.intermediate_size)):
            for fmt in set(formats):
                if not fmt.supports(k):
                    raise ValueError(
                        f"{fmt.name} cannot store the {name} projection (K = {k}): K must be a multiple of 64"
                    )
        self.set_expert_weights(formats, *(_quantize_stack(w, formats) for w in (gate_up, down)))

    def set_expert_weights(self, formats: list[QuantFormat], gate_up: Weight, down: Weight) -> None:
        """Install low-bit expert weights (from ``quantize_experts`` or a quantized checkpoint)."""
        for name in ("gate_up", "down"):
            if name in self._parameters:
                del self._parameters[name]
        self.packed = None
        self.gate_up, self.down = gate_up, down
        self.expert_formats = list(formats)

    def expert_weights(self) -> ExpertWeights:
        """The routed experts as the backends see them."""
        return ExpertWeights(self.gate_up, self.down, self.gate_up_bias, self.down_bias, self.glu, self.packed)

    def prepack(self) -> None:
        """Keep a oneDNN-packed copy of the expert weights for faster prefill GEMMs.

        Costs memory equal to the expert weights again; decode still reads the plain weights.
        The copy is a snapshot: call again after changing the weights, or ``unpack()`` to drop it.
        Low-bit experts are not packed (their prefill dequantizes tiles in the native kernel).

        Raises:
            ValueError: quantized experts, or weights that oneDNN cannot pack with this torch build on this CPU
                (``moerun.kernels.onednn.is_available(dtype)`` says which dtypes it can).
        """
        if self.expert_formats is not None:
            raise ValueError("prepack is for float experts; these are quantized")
        self.packed = pack_experts(self.gate_up.detach(), self.down.detach())

    def unpack(self) -> None:
        """Drop the packed copy made by ``prepack``."""
        self.packed = None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> logits [T, E]."""
        if self.router_fp32:
            bias = None if self.router_bias is None else self.router_bias.float()
            return F.linear(x.float(), self.router_weight.float(), bias)
        return F.linear(x, self.router_weight, self.router_bias)

    def records_grad(self, x: torch.Tensor) -> bool:
        """Whether autograd records a forward of x: grad mode is on and x or a parameter requires grad. Such a
        forward runs differentiable torch operations only (no native calls, no ``out=``), so gradients are
        never dropped."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        """The always-on shared expert. x: [T, H] -> [T, H]."""
        project = _differentiable_linear if self.records_grad(x) else linear
        out = project(apply_glu(project(x, self.shared_gate_up), self.glu), self.shared_down)
        if self.shared_gate_weight is not None:
            out = torch.sigmoid(F.linear(x, self.shared_gate_weight)) * out
        return out

    def routes_token_natively(self, x: torch.Tensor) -> bool:
        """Whether one token x [1, H] is routed by the native kernel (``native.route_token``): softmax top-k
        routing without router or score biases, an activation the kernel computes, and the native or auto
        backend. ``forward`` then also runs the experts in the same call where the kernel reads their weights
        and they are not offloaded. Never while autograd records the forward (``records_grad``)."""
        if x.shape[0] != 1 or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
            return False
        if self.records_grad(x):
            return False
        return (
            self.routing.mode == "softmax_topk"
            and self.router_bias is None
            and self.score_bias is None
            and not self.router_fp32
            and self.backend in ("auto", "native")
            and native.fuses_glu(self.glu)
            and native.is_available()
            and self.router_weight.is_contiguous()
        )

    def select_experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice for x [T, H]: weights [T, k] float32 and ids [T, k] int64 (one native call for a
        token where ``routes_token_natively``, the same choice the one-call decode path makes)."""
        routing = self.routing
        if self.routes_token_natively(x) and x.is_contiguous():
            return native.route_token(
                x, self.router_weight, routing.top_k, routing.renormalize, routing.routed_scaling_factor
            )
        return route(self.router_logits(x), routing, self.score_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_hidden(x, self.hidden_size, self.dtype)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()  # [T, H]
        routing = self.routing
        if self.offload is not None and self.records_grad(x):
            raise ValueError(
                "offloaded experts (a memory budget) run for inference only and cannot record gradients: call the "
                "model under torch.no_grad() or torch.inference_mode()"
            )
        if self.offload is None and self.routes_token_natively(x) and native_supports(x, self.expert_weights()):
            # Decode: router, routing and experts in one native call instead of ~25 small torch operations.
            y, _, _ = native.moe_token(
                x, self.router_weight, routing.top_k, self.gate_up, self.down, self.glu,
                renormalize=routing.renormalize, scaling=routing.routed_scaling_factor,
                gate_up_bias=self.gate_up_bias, down_bias=self.down_bias,
            )  # fmt: skip
            return self._add_shared(x, y).reshape(shape)
        weights, ids = self.select_experts(x)
        plan = make_plan(ids, weights, self.num_experts)
        if self.offload is None:
            y = experts_forward(x, plan, self.expert_weights(), self.backend)  # [T, H]
        else:
            y = self.offload(x, plan)
        return self._add_shared(x, y).reshape(shape)

    def _add_shared(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.shared_gate_up is None else y + self.shared_expert(x)


def _differentiable_linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``linear`` that autograd can follow: low-bit weights are dequantized, never run on the native kernel."""
    return F.linear(x, dequantize_matrix(weight, x.dtype))


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
