"""MoELayer: route -> plan -> ``experts(x, plan)`` -> output, plus optional shared experts.

The routed experts are a container (``moerun.experts``): resident or offloaded, the layer calls them alike.

Shape legend: T tokens, H hidden, E experts, I expert intermediate, Is shared-expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import Experts, ResidentExperts
from .kernels.activation import GluSpec, apply_glu
from .kernels.experts import get_backend, route_token, routes_token_natively
from .kernels.linear import linear
from .quant.formats import Weight, dequantize_matrix
from .routing import ExpertSkipping, RoutingConfig, make_plan, route, skip_experts


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
        if shared_gate and shared_intermediate_size < 1:
            raise ValueError("shared_gate needs a shared expert (shared_intermediate_size >= 1)")
        glu = GluSpec(activation, swiglu_alpha, swiglu_limit)
        self.experts: Experts = ResidentExperts(
            num_experts, hidden_size, intermediate_size, glu, bias=expert_bias, backend=backend, dtype=dtype,
            device=device,
        )  # fmt: skip
        routing.validate(num_experts)
        self.routing = routing
        self.glu = glu
        self.router_fp32 = router_fp32
        self.dtype = dtype
        self._skipping: ExpertSkipping | None = None
        self.skip_counts = [0, 0]  # (pairs routed, pairs skipped) while skipping is set
        factory = {"dtype": dtype, "device": device}
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        self.router_bias = nn.Parameter(torch.zeros(num_experts, **factory)) if router_bias else None
        self.score_bias = None
        if score_bias:  # DeepSeek keeps the correction in fp32 whatever the model dtype
            self.score_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=device))
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
        return self.experts.intermediate_size

    @property
    def backend(self) -> str:
        """The routed experts' backend name (settable)."""
        return self.experts.backend

    @backend.setter
    def backend(self, name: str) -> None:
        get_backend(name)
        self.experts.backend = name

    @property
    def skipping(self) -> ExpertSkipping | None:
        """Dynamic expert skipping (``moerun.routing.ExpertSkipping``), or None (the default: every routed expert
        runs, bit for bit as without the option). Settable; ValueError where the routing cannot take it."""
        return self._skipping

    @skipping.setter
    def skipping(self, skipping: ExpertSkipping | None) -> None:
        if skipping is not None:
            skipping.validate(self.routing)
        self._skipping = skipping
        self.skip_counts = [0, 0]

    @property
    def resident(self) -> ResidentExperts:
        """The routed experts held in memory; ValueError when they are not (offloaded)."""
        if not isinstance(self.experts, ResidentExperts):
            raise ValueError(f"this layer's experts are {type(self.experts).__name__}, not resident")
        return self.experts

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
        """Whether one token x [1, H] is routed by the native kernel (``kernels.experts.route_token``): plain
        softmax top-k routing (no router or score biases, no fp32 router), the native or auto backend, and a
        token and activation the kernel takes. Never while autograd records the forward (``records_grad``)."""
        return (
            self.routing.mode == "softmax_topk"
            and self.router_bias is None
            and self.score_bias is None
            and not self.router_fp32
            and self.backend in ("auto", "native")
            and routes_token_natively(x, self.router_weight, self.glu)
            and not self.records_grad(x)
        )

    def select_experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice for x [T, H]: weights [T, k] float32 and ids [T, k] int64 (one native call for a
        token where ``routes_token_natively``, the same choice the experts' one-call path makes)."""
        if self.routes_token_natively(x):
            return route_token(x, self.router_weight, self.routing)
        return route(self.router_logits(x), self.routing, self.score_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_hidden(x, self.hidden_size, self.dtype)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()  # [T, H]
        if self._skipping is not None:
            weights, ids = self._select_and_skip(x)
        else:
            if self.routes_token_natively(x):
                y = self.experts.fused_token(x, self.router_weight, self.routing)  # decode: one call, where it can
                if y is not None:
                    return self._add_shared(x, y).reshape(shape)
            weights, ids = self.select_experts(x)
        y = self.experts(x, make_plan(ids, weights, self.num_experts))  # [T, H]
        return self._add_shared(x, y).reshape(shape)

    def _select_and_skip(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice for x [T, H] with ``skipping`` applied: weights [T, k], ids [T, k] with skipped
        pairs as sentinels. The one-token decode path then runs the kept experts through the experts' backend
        (the native grouped kernel where it runs) rather than the one-call path, which cannot skip."""
        logits = self.router_logits(x)
        weights, ids = route(logits, self.routing, self.score_bias)
        weights, ids = skip_experts(logits, weights, ids, self._skipping, self.routing, self.num_experts)
        self.skip_counts[0] += ids.numel()
        self.skip_counts[1] += int((ids == self.num_experts).sum())
        return weights, ids

    def _add_shared(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.shared_gate_up is None else y + self.shared_expert(x)


def _differentiable_linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``linear`` that autograd can follow: low-bit weights are dequantized, never run on the native kernel."""
    return F.linear(x, dequantize_matrix(weight, x.dtype))
