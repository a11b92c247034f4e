"""Expert computation backends: grouped gate/up GEMM -> GLU -> grouped down GEMM -> weighted combine.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, S sorted slots, G non-empty groups.

Backends, all with the signature ``fn(x, plan, weights) -> [T, H]``:

- ``reference``: per-expert loop in float32; the oracle the others are tested against.
- ``torch``: one torch matmul per non-empty group over contiguous sorted rows; the prefill path.
- ``native``: the AVX-512 grouped kernel: streams weight rows for decode-sized groups, runs register
  tiles over packed rows for prefill-sized ones.
- ``grouped_mm``: torch's ``_grouped_mm``, one call per projection over all experts (plain float weights).
- ``auto``: the implementation measured fastest on this host for the case (``tuning.active_table``), else
  ``native`` when the kernel supports the input, else ``torch``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..quant.formats import QuantizedWeight, Weight, dequantize_matrix, matmul_transposed
from ..routing import RoutingConfig, RoutingPlan
from . import native, tuning
from .activation import GluSpec, apply_glu
from .onednn import PackedExperts, packed_linear

# Fixed rules for hosts where nothing was measured (see ``tuning``). From this many rows per group on
# average the native kernel fuses the activation into the gate/up
# projection. Measured on the olmoe-1b-7b layer (bf16, CPU time): fused is 12% faster at 64 rows per
# group, even at 16, and 12% slower at 8, where the unfused call streams small groups' weight rows one
# at a time (the fused path reads gate and up rows in tiles).
FUSED_GLU_MIN_ROWS_PER_GROUP = 16
# With oneDNN-packed weights, torch's GEMMs beat the native kernel from 4 to 32 rows per group on
# average and lose from 64 (olmoe-1b-7b layer, bf16, one thread, CPU time: 54 vs 68 ms at 4 rows,
# 101 vs 151 at 16, 171 vs 193 at 32, 341 vs 294 at 64). On plain weights native wins throughout.
PACKED_TORCH_ROWS_PER_GROUP = (4.0, 48.0)


@dataclass(frozen=True)
class ExpertWeights:
    """The routed experts' weights, in the layout every backend reads.

    Attributes:
        gate_up: [E, 2I, H] gate rows then up rows of each expert: a float tensor, a ``QuantizedWeight``
            stack or ``ExpertMatrices`` (each expert in its own format).
        down: [E, H, I], likewise.
        gate_up_bias: [E, 2I] or None.
        down_bias: [E, H] or None.
        glu: the gated activation.
        packed: the same weights packed for oneDNN (prefill GEMMs), or None.
    """

    gate_up: Weight
    down: Weight
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    glu: GluSpec = GluSpec()
    packed: PackedExperts | None = None

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate_up.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[2]

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The weights' dtype when they are a plain float tensor, else None (low-bit or mixed)."""
        return self.gate_up.dtype if isinstance(self.gate_up, torch.Tensor) else None

    def validate(self) -> None:
        """Raise ValueError if the tensors do not fit together."""
        num_experts, two_i, hidden = self.gate_up.shape if len(self.gate_up.shape) == 3 else (None, None, None)
        if num_experts is None or two_i % 2:
            raise ValueError(f"gate_up must be [experts, 2*intermediate, hidden], got {tuple(self.gate_up.shape)}")
        expected_down = (num_experts, hidden, two_i // 2)
        if tuple(self.down.shape) != expected_down:
            raise ValueError(f"down must be {expected_down} to match gate_up, got {tuple(self.down.shape)}")
        if self.float_dtype is not None and getattr(self.down, "dtype", self.float_dtype) != self.float_dtype:
            raise ValueError(f"down dtype {self.down.dtype} differs from gate_up dtype {self.gate_up.dtype}")
        for name, bias, shape in (
            ("gate_up_bias", self.gate_up_bias, (num_experts, two_i)),
            ("down_bias", self.down_bias, (num_experts, hidden)),
        ):
            if bias is not None and tuple(bias.shape) != shape:
                raise ValueError(f"{name} must be {shape}, got {tuple(bias.shape)}")


def combine_fp32(out_sorted: torch.Tensor, plan: RoutingPlan, hidden: int) -> torch.Tensor:
    """Router-weighted sum of sorted slot outputs [S, H] back into token order, in float32: [T, H]."""
    y = torch.zeros(plan.num_tokens, hidden, dtype=torch.float32, device=out_sorted.device)
    y.index_add_(0, plan.token_index, out_sorted.float() * plan.weights[:, None])
    return y


def combine(out_sorted: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Router-weighted sum of sorted slot outputs [S, H] back into token order, in out_sorted's dtype.

    Unsorting into [T, k, H] and one batched [1, k] x [k, H] product per token accumulates in fp32
    inside the GEMM and costs a fraction of an fp32 index_add (a single pass over the outputs).
    """
    num_tokens, top_k = plan.num_tokens, plan.top_k
    if plan.num_slots != num_tokens * top_k:  # expert-parallel sentinels were dropped
        return combine_fp32(out_sorted, plan, out_sorted.shape[1]).to(out_sorted.dtype)
    position = torch.empty_like(plan.slot_of)
    position[plan.slot_of] = torch.arange(plan.num_slots, device=out_sorted.device)  # [S] slot -> sorted
    hidden = out_sorted.shape[1]  # spelled out, not -1: a view of zero tokens cannot infer it
    per_token = out_sorted.index_select(0, position).view(num_tokens, top_k, hidden)  # [T, k, H]
    weights = plan.weights[position].view(num_tokens, 1, top_k).to(out_sorted.dtype)  # [T, 1, k]
    return torch.bmm(weights, per_token).view(num_tokens, hidden)


def _groups(plan: RoutingPlan) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each non-empty group, as Python ints (one host sync)."""
    experts = plan.group_experts.tolist()
    starts = plan.group_starts.tolist()
    counts = plan.group_counts.tolist()
    return [(e, s, s + c) for e, s, c in zip(experts, starts, counts, strict=True)]


def experts_reference(x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights) -> torch.Tensor:
    """Oracle: a per-expert loop in float32. x: [T, H] -> [T, H] in x's dtype."""
    xs = x.float()[plan.token_index]  # [S, H]
    out = torch.empty(plan.num_slots, w.hidden_size, dtype=torch.float32, device=x.device)
    for e, start, end in _groups(plan):
        h = xs[start:end] @ dequantize_matrix(w.gate_up[e], torch.float32).T  # [n, 2I]
        if w.gate_up_bias is not None:
            h = h + w.gate_up_bias[e].float()
        o = apply_glu(h, w.glu) @ dequantize_matrix(w.down[e], torch.float32).T  # [n, H]
        if w.down_bias is not None:
            o = o + w.down_bias[e].float()
        out[start:end] = o
    return combine_fp32(out, plan, w.hidden_size).to(x.dtype)


def experts_differentiable(x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights) -> torch.Tensor:
    """The torch backend's computation in plain differentiable operations (no ``out=``, no native calls): what
    ``experts_forward`` runs when gradients are wanted. Low-bit experts are dequantized (gradients reach x and
    the router weights, not the quantized values). x: [T, H] -> [T, H] in x's dtype."""
    xs = x.index_select(0, plan.token_index)  # [S, H]
    # Zeros, so that rows outside the groups (none in a plan make_plan built) are defined.
    out = xs.new_zeros(plan.num_slots, w.hidden_size)  # [S, H]
    for e, start, end in _groups(plan):
        gate_up_bias = None if w.gate_up_bias is None else w.gate_up_bias[e].to(x.dtype)
        down_bias = None if w.down_bias is None else w.down_bias[e].to(x.dtype)
        h = F.linear(xs[start:end], dequantize_matrix(w.gate_up[e], x.dtype), gate_up_bias)  # [n, 2I]
        out[start:end] = F.linear(apply_glu(h, w.glu), dequantize_matrix(w.down[e], x.dtype), down_bias)  # [n, H]
    return combine(out, plan)


def needs_grad(x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights) -> bool:
    """Whether autograd records this call: grad mode is on and x, the router weights or an expert tensor
    requires grad."""
    if not torch.is_grad_enabled():
        return False
    tensors = (x, plan.weights, w.gate_up, w.down, w.gate_up_bias, w.down_bias)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _grouped_mm(
    a: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    groups: list[tuple[int, int, int]],
    packed: list[torch.Tensor] | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[start:end] = a[start:end] @ weight[e].T (+ bias[e]) for each group. a: [S, K] -> out [S, N].

    ``out`` defaults to a fresh tensor whose rows outside the groups are left unset. Low-bit experts run
    ``matmul_transposed`` one at a time (the pure-torch fallback of the kernel).
    """
    if out is None:
        out = a.new_empty(a.shape[0], weight.shape[1])
    for e, start, end in groups:
        b = None if bias is None else bias[e].to(a.dtype)
        if packed is not None:
            out[start:end] = packed_linear(a[start:end], packed[e], b)
            continue
        if isinstance(weight[e], QuantizedWeight):  # weight-only low-bit GEMM, or dequantize (matmul_transposed)
            out[start:end] = matmul_transposed(a[start:end], weight[e])
            if b is not None:
                out[start:end] += b
            continue
        w = dequantize_matrix(weight[e], a.dtype)
        if b is None:
            torch.mm(a[start:end], w.T, out=out[start:end])
        else:
            torch.addmm(b, a[start:end], w.T, out=out[start:end])
    return out


def experts_torch(
    x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights, out_sorted: torch.Tensor | None = None
) -> torch.Tensor:
    """One GEMM per non-empty group over contiguous sorted rows (oneDNN-packed weights when present).

    Args:
        x: [T, H] hidden states.
        plan: the routing plan; with ``out_sorted``, possibly only some of a plan's groups (a plan whose
            ``group_*`` fields are a subset of the whole plan's and whose experts index ``w``).
        w: the expert weights.
        out_sorted: [S, H] in x's dtype, or None. When given, the down projection writes the plan's groups'
            rows into it, the other rows are left as they are, and it is returned uncombined. Running a plan's
            groups in consecutive parts into one ``out_sorted`` and then ``combine(out_sorted, plan)`` with the
            whole plan gives bit for bit what one call gives (the expert offload does this).

    Returns:
        [T, H] in x's dtype, or ``out_sorted`` when given.
    """
    expected = (plan.num_slots, w.hidden_size)
    if out_sorted is not None and (tuple(out_sorted.shape) != expected or out_sorted.dtype != x.dtype):
        got = f"{tuple(out_sorted.shape)} in {out_sorted.dtype}"
        raise ValueError(f"out_sorted must be {expected} in {x.dtype}, got {got}")
    groups = _groups(plan)
    packed = w.packed if w.packed is not None and x.dtype == w.float_dtype else None
    xs = x.index_select(0, plan.token_index)  # [S, H]
    # A part still computes on all S rows as one call does: elementwise kernels split their work (vector
    # body, scalar tail, threads) by the tensor's shape, so the activation only rounds each row the same way
    # over a tensor of the same shape. Zeros keep the rows of the other parts' groups defined.
    h_out = None if out_sorted is None else xs.new_zeros(xs.shape[0], 2 * w.intermediate_size)
    h = _grouped_mm(xs, w.gate_up, w.gate_up_bias, groups, packed and packed.gate_up, h_out)  # [S, 2I]
    act = apply_glu(h, w.glu)  # [S, I]
    out = _grouped_mm(act, w.down, w.down_bias, groups, packed and packed.down, out_sorted)  # [S, H]
    return out if out_sorted is not None else combine(out, plan)


def grouped_mm_supports(x: torch.Tensor, w: ExpertWeights) -> bool:
    """Whether ``experts_grouped_mm`` can run this input: plain float stacks of x's dtype, and a torch with it."""
    return (
        hasattr(torch, "_grouped_mm")
        and isinstance(w.gate_up, torch.Tensor)
        and isinstance(w.down, torch.Tensor)
        and x.dtype == w.float_dtype
        and x.dtype in (torch.bfloat16, torch.float32)
    )


def experts_grouped_mm(x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights) -> torch.Tensor:
    """torch's ``_grouped_mm``: one call per projection over all E experts, empty experts given no rows.

    The plan's groups must tile its sorted rows in ascending expert order, as ``make_plan`` builds them.
    """
    if not grouped_mm_supports(x, w):
        raise ValueError("grouped_mm needs plain bf16/fp32 expert stacks of the hidden states' dtype")
    counts = torch.zeros(w.num_experts, dtype=torch.int32)
    counts[plan.group_experts] = plan.group_counts.to(torch.int32)
    offsets = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each expert's group
    xs = x.index_select(0, plan.token_index)  # [S, H]
    row_expert = plan.group_experts.repeat_interleave(plan.group_counts)  # [S]
    h = torch._grouped_mm(xs, w.gate_up.transpose(1, 2), offs=offsets)  # [S, 2I]
    if w.gate_up_bias is not None:
        h = h + w.gate_up_bias.to(h.dtype)[row_expert]
    out = torch._grouped_mm(apply_glu(h, w.glu).to(x.dtype), w.down.transpose(1, 2), offs=offsets)  # [S, H]
    if w.down_bias is not None:
        out = out + w.down_bias.to(out.dtype)[row_expert]
    return combine(out, plan)


def fuses_glu(plan: RoutingPlan, w: ExpertWeights) -> bool:
    """Whether ``experts_native`` fuses the gated activation into the gate/up projection for this plan: as
    measured faster on this host for the case, else from ``FUSED_GLU_MIN_ROWS_PER_GROUP`` rows per group."""
    if not native.fuses_glu(w.glu):
        return False
    measured = _measured_best(plan, w, ("native-fused", "native-unfused"))
    if measured is not None:
        return measured == "native-fused"
    return plan.num_slots >= FUSED_GLU_MIN_ROWS_PER_GROUP * plan.num_groups


def experts_native(
    x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights, out: torch.Tensor | None = None, fused: bool | None = None
) -> torch.Tensor:
    """The AVX-512 grouped kernel; the down projection scatters straight into token order.

    Prefill-sized plans fuse the gated activation into the gate/up projection, so the [S, 2I] float32
    gate/up output is never materialised.

    A one-token plan without ``out`` runs as one native call (``native.token_experts``), bit for bit the same.

    ``out`` ([T, H] float32) accumulates the result instead of a fresh zero tensor, and ``fused`` overrides
    the fusion choice: running a plan's groups in consecutive parts into one ``out``, each part fused as the
    whole plan would be (``fuses_glu``), adds exactly what one call would (the expert offload does this).
    """
    if plan.num_tokens == 1 and out is None and native.fuses_glu(w.glu) and x.is_contiguous():
        # Decode: the same computation in one native call instead of ~8 torch operations.
        return native.token_experts(
            x, plan.group_experts, plan.weights, w.gate_up, w.down, w.glu,
            gate_up_bias=w.gate_up_bias, down_bias=w.down_bias,
        )  # fmt: skip
    xs = x.index_select(0, plan.token_index)  # [S, H]
    group_args = (plan.group_experts, plan.group_starts, plan.group_counts)
    if fuses_glu(plan, w) if fused is None else fused:
        act = native.grouped_glu(xs, w.gate_up, *group_args, glu=w.glu, bias=w.gate_up_bias)  # [S, I]
    else:
        h = native.grouped_gemv(xs, w.gate_up, *group_args, bias=w.gate_up_bias)  # [S, 2I] fp32
        act = native.glu(h, w.glu, x.dtype) if native.fuses_glu(w.glu) else apply_glu(h, w.glu).to(x.dtype)  # [S, I]
    y = torch.zeros(plan.num_tokens, w.hidden_size, dtype=torch.float32, device=x.device) if out is None else out
    native.grouped_gemv(
        act, w.down, *group_args, bias=w.down_bias, out=y,
        scatter_index=plan.token_index, scatter_weight=plan.weights,
    )  # fmt: skip
    return y.to(x.dtype)


def native_supports(x: torch.Tensor, w: ExpertWeights) -> bool:
    """Whether the native kernel can run this input (CPU, bf16/fp32, library built for this CPU)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and (not isinstance(w.gate_up, torch.Tensor) or w.gate_up.is_contiguous())
        and (not isinstance(w.down, torch.Tensor) or w.down.is_contiguous())
        and native.is_available()
    )


def routes_token_natively(x: torch.Tensor, router_weight: torch.Tensor, glu: GluSpec) -> bool:
    """Whether the native kernel routes one token x [1, H] by softmax top-k over ``router_weight`` [E, H]
    (``route_token``): a CPU bf16/fp32 token, a contiguous router, an activation the kernel computes (so the
    choice is the one ``moe_token`` makes), and the kernel built for this CPU."""
    return (
        x.dim() == 2
        and x.shape[0] == 1
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and x.is_contiguous()
        and router_weight.is_contiguous()
        and native.fuses_glu(glu)
        and native.is_available()
    )


def route_token(
    x: torch.Tensor, router_weight: torch.Tensor, routing: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's softmax top-k routing in one native call (``routes_token_natively``): weights [1, k]
    float32 and ids [1, k] int64."""
    return native.route_token(x, router_weight, routing.top_k, routing.renormalize, routing.routed_scaling_factor)


def fused_token_supported(
    x: torch.Tensor, router_weight: torch.Tensor, routing: RoutingConfig, w: ExpertWeights
) -> bool:
    """Whether ``moe_token`` can run: softmax top-k routing done natively, and experts the kernel reads."""
    return routing.mode == "softmax_topk" and routes_token_natively(x, router_weight, w.glu) and native_supports(x, w)


def moe_token(x: torch.Tensor, router_weight: torch.Tensor, routing: RoutingConfig, w: ExpertWeights) -> torch.Tensor:
    """Decode's one-token path: router, softmax top-k routing and the experts of x [1, H] in one native call
    instead of ~25 small torch operations (``fused_token_supported`` says where). Returns [1, H] in x's
    dtype."""
    y, _, _ = native.moe_token(
        x, router_weight, routing.top_k, w.gate_up, w.down, w.glu,
        renormalize=routing.renormalize, scaling=routing.routed_scaling_factor,
        gate_up_bias=w.gate_up_bias, down_bias=w.down_bias,
    )  # fmt: skip
    return y


def experts_auto(x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights) -> torch.Tensor:
    """The implementation measured fastest on this host for the case, else native where it supports the
    input, else torch."""
    return select_backend(x, plan, w)(x, plan, w)


BACKENDS: dict[str, Callable[[torch.Tensor, RoutingPlan, ExpertWeights], torch.Tensor]] = {
    "auto": experts_auto,
    "reference": experts_reference,
    "torch": experts_torch,
    "native": experts_native,
    "grouped_mm": experts_grouped_mm,
}


def _unpacked_torch(x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights) -> torch.Tensor:
    return experts_torch(x, plan, replace(w, packed=None))


# The tuning table's expert implementations as backends.
IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor, RoutingPlan, ExpertWeights], torch.Tensor]] = {
    "native-fused": functools.partial(experts_native, fused=True),
    "native-unfused": functools.partial(experts_native, fused=False),
    "torch": _unpacked_torch,
    "torch-packed": experts_torch,
    "torch-grouped_mm": experts_grouped_mm,
}


def applicable_implementations(x: torch.Tensor, w: ExpertWeights) -> tuple[str, ...]:
    """The keys of ``IMPLEMENTATIONS`` that can run this input."""
    impls = ["torch"]
    if w.packed is not None and x.dtype == w.float_dtype:
        impls.append("torch-packed")
    if grouped_mm_supports(x, w):
        impls.append("torch-grouped_mm")
    if native_supports(x, w):
        impls.append("native-unfused")
        if native.fuses_glu(w.glu):
            impls.append("native-fused")
    return tuple(impls)


def _measured_best(plan: RoutingPlan, w: ExpertWeights, allowed: tuple[str, ...]) -> str | None:
    """The fastest of ``allowed`` measured on this host for this plan's case, or None."""
    table = tuning.active_table()
    if table is None or plan.num_groups == 0:
        return None
    fmt = tuning.format_key(w.gate_up)
    if fmt is None:
        return None
    rows = plan.num_slots / plan.num_groups
    key = tuning.case_key("experts", fmt, (w.hidden_size, w.intermediate_size), rows, torch.get_num_threads())
    return table.best(key, allowed)


def rules_backend(
    x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights
) -> Callable[[torch.Tensor, RoutingPlan, ExpertWeights], torch.Tensor]:
    """``auto``'s choice where nothing was measured: the native kernel (which picks its decode or prefill path
    per group), except oneDNN-packed weights in ``PACKED_TORCH_ROWS_PER_GROUP``, and torch where the kernel
    cannot run."""
    if not native_supports(x, w):
        return experts_torch
    low, high = PACKED_TORCH_ROWS_PER_GROUP
    if w.packed is not None and low <= plan.num_slots / max(plan.num_groups, 1) < high:
        return experts_torch
    return experts_native


def select_backend(
    x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights
) -> Callable[[torch.Tensor, RoutingPlan, ExpertWeights], torch.Tensor]:
    """The backend ``auto`` uses for this input: the fastest applicable implementation measured on this host
    for (format, shape, rows per expert, threads), else ``rules_backend``."""
    measured = _measured_best(plan, w, applicable_implementations(x, w))
    return IMPLEMENTATIONS[measured] if measured is not None else rules_backend(x, plan, w)


def get_backend(name: str) -> Callable[[torch.Tensor, RoutingPlan, ExpertWeights], torch.Tensor]:
    """Look up an expert backend by name; unknown names raise ValueError listing the valid ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown expert backend {name!r}; expected one of {', '.join(BACKENDS)}") from None


def experts_forward(x: torch.Tensor, plan: RoutingPlan, w: ExpertWeights, backend: str = "auto") -> torch.Tensor:
    """Run the routed experts and combine their outputs in token order.

    Args:
        x: [T, H] bf16 / fp32 / fp16 hidden states.
        plan: the routing plan for these tokens.
        w: the expert weights (same dtype as x when they are float).
        backend: a key of ``BACKENDS``.

    Returns:
        [T, H] in x's dtype. When autograd records the call (``needs_grad``), every backend but ``reference``
        (itself differentiable) runs ``experts_differentiable`` instead, so gradients are never dropped.
    """
    fn = get_backend(backend)
    w.validate()
    if x.dim() != 2 or x.shape[1] != w.hidden_size:
        raise ValueError(f"expected hidden states [tokens, {w.hidden_size}], got shape {tuple(x.shape)}")
    if w.float_dtype is not None and x.dtype != w.float_dtype:
        raise ValueError(f"hidden states are {x.dtype} but the expert weights are {w.float_dtype}")
    if plan.num_tokens != x.shape[0]:
        raise ValueError(f"the routing plan is for {plan.num_tokens} tokens but {x.shape[0]} were given")
    if backend != "reference" and needs_grad(x, plan, w):
        # The other backends write into preallocated outputs or run native code, which autograd cannot follow.
        return experts_differentiable(x, plan, w)
    if backend == "native" and not native_supports(x, w):
        raise ValueError(
            "the native backend needs CPU bf16/fp32 inputs, contiguous weights and an AVX-512 BF16 and VNNI CPU "
            "with the compiled kernel (reinstall moerun to build it); use backend='auto' or 'torch'"
        )
    return fn(x, plan, w)
