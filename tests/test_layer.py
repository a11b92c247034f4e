"""MoELayer: every expert backend against the float32 oracle at awkward shapes, and bad input."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moerun import Experts, MoELayer, RoutingConfig, make_plan
from moerun.kernels import native, onednn
from moerun.kernels.experts import BACKENDS, combine, experts_torch, select_backend

BACKEND_NAMES = [b for b in BACKENDS if b != "native" or native.is_available()]
# bf16 backends round the activation between the GEMMs to bf16; the oracle keeps float32.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_layer(dtype: torch.dtype, **kwargs) -> MoELayer:
    torch.manual_seed(0)
    options = dict(hidden_size=96, intermediate_size=40, num_experts=12, routing=RoutingConfig("softmax_topk", 3))
    options.update(kwargs)
    layer = MoELayer(**options, dtype=dtype)
    layer.reset_parameters(std=0.2)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.2)
    return layer


VARIANTS = {
    "silu": {},
    "gelu_topk1": dict(activation="gelu", routing=RoutingConfig("softmax_topk", 1)),
    "swiglu_clamped_biases": dict(
        activation="swiglu_clamped", swiglu_limit=0.5, expert_bias=True, router_bias=True,
        routing=RoutingConfig("topk_softmax", 2),
    ),
    "grouped_shared_gate": dict(
        routing=RoutingConfig("sigmoid_group_topk", 3, True, 4, 2, 2.5), score_bias=True, router_fp32=True,
        shared_intermediate_size=24, shared_gate=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 2, 100, 600])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@torch.inference_mode()
def test_backend_matches_reference(backend: str, variant: str, tokens: int, dtype: torch.dtype) -> None:
    layer = make_layer(dtype, **VARIANTS[variant])
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    layer.backend = "reference"
    expected = layer(x).float()
    layer.backend = backend
    actual = layer(x)
    assert actual.dtype == dtype and actual.shape == x.shape
    err = (actual.float() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * expected.abs().max().item()


@pytest.mark.skipif(not native.is_available(), reason="native kernel not available")
@pytest.mark.parametrize(("variant", "backend", "one_call"), [
    ("silu", "auto", True), ("silu", "native", True), ("silu", "torch", False), ("gelu_topk1", "auto", False),
    ("swiglu_clamped_biases", "auto", False), ("grouped_shared_gate", "auto", False),
])  # fmt: skip
@torch.inference_mode()
def test_one_token_softmax_topk_takes_one_native_call(monkeypatch, variant: str, backend: str, one_call: bool) -> None:
    """Decode of a softmax top-k layer is one native call (moe_token); other routers, erf-GELU and the
    torch backend take the general path."""
    calls = []
    monkeypatch.setattr(native, "moe_token", lambda *a, real=native.moe_token, **k: calls.append(1) or real(*a, **k))
    layer = make_layer(torch.bfloat16, **VARIANTS[variant], backend=backend)
    layer(torch.randn(1, 96).to(torch.bfloat16))
    assert len(calls) == one_call
    layer(torch.randn(2, 96).to(torch.bfloat16))
    assert len(calls) == one_call


class RecordingExperts(Experts):
    """Delegates to the experts it wraps and records the plans it is called with."""

    def __init__(self, inner: Experts) -> None:
        super().__init__(inner.num_experts, inner.hidden_size, inner.intermediate_size, inner.glu, inner.backend)
        self.inner = inner
        self.plans: list = []

    def forward(self, x: torch.Tensor, plan):
        self.plans.append(plan)
        return self.inner(x, plan)


@pytest.mark.parametrize("tokens", [1, 5, 300])
@pytest.mark.parametrize("variant", ["silu", "grouped_shared_gate", "swiglu_clamped_biases"])
@torch.inference_mode()
def test_the_layer_calls_its_experts_as_a_container(variant: str, tokens: int) -> None:
    """Any Experts implementation stands in for the resident one: the layer routes, makes the plan and calls
    ``experts(x, plan)``; a container without a one-call token path gets every token through ``forward``."""
    layer = make_layer(torch.float32, **VARIANTS[variant])
    x = torch.randn(tokens, 96)
    want = layer(x)
    layer.experts = recording = RecordingExperts(layer.experts)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    (plan,) = recording.plans
    assert plan.num_tokens == tokens and plan.num_slots == tokens * layer.routing.top_k
    with pytest.raises(ValueError, match="not resident"):
        layer.resident  # noqa: B018


@torch.inference_mode()
def test_keeps_leading_dimensions() -> None:
    layer = make_layer(torch.float32)
    x = torch.randn(2, 5, 96)
    assert layer(x).shape == (2, 5, 96)
    torch.testing.assert_close(layer(x)[1], layer(x[1]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(activation="relu2"), "unknown activation 'relu2'"),
        (dict(backend="cuda_magic"), "unknown expert backend 'cuda_magic'"),
        (dict(routing=RoutingConfig("softmax_topk", 13)), "top_k=13"),
        (dict(routing=RoutingConfig("best", 2)), "unknown routing mode"),
        (dict(shared_gate=True), "shared_gate needs a shared expert"),
        (dict(num_experts=0), "must all be >= 1"),
    ],
)
def test_bad_construction_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_layer(torch.float32, **kwargs)


def test_bad_input_is_rejected() -> None:
    layer = make_layer(torch.float32)
    with pytest.raises(ValueError, match=r"expected hidden states \[\.\.\., 96\]"):
        layer(torch.randn(3, 95))
    with pytest.raises(ValueError, match="torch.bfloat16 but the layer's weights are torch.float32"):
        layer(torch.randn(3, 96, dtype=torch.bfloat16))
    x = torch.randn(3, 96)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["silu", "swiglu_clamped_biases"])
@torch.inference_mode()
def test_prepacked_weights_match_reference(variant: str, dtype: torch.dtype) -> None:
    if not onednn.is_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} with this torch build on this CPU (bf16 needs AVX-512 BW/VL/DQ)")
    layer = make_layer(dtype, **VARIANTS[variant])
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(5)).to(dtype)
    layer.backend = "reference"
    expected = layer(x).float()
    layer.backend = "torch"
    layer.resident.prepack()
    assert layer.resident.weights().packed is not None
    err = (layer(x).float() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * expected.abs().max().item()
    layer.resident.unpack()
    assert layer.resident.weights().packed is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_onednn_availability_says_whether_prepack_works(dtype: torch.dtype) -> None:
    """The probe agrees with packing a real layer, and where it says no, prepack refuses with a ValueError."""
    layer = make_layer(dtype)
    if onednn.is_available(dtype):
        layer.resident.prepack()
        assert layer.resident.weights().packed is not None
    else:
        with pytest.raises(ValueError, match="cannot pack|can be packed"):
            layer.resident.prepack()
        assert layer.resident.weights().packed is None


def test_prepack_refuses_where_onednn_cannot_pack(monkeypatch) -> None:
    monkeypatch.setattr(onednn, "is_available", lambda dtype: False)
    layer = make_layer(torch.float32)
    with pytest.raises(ValueError, match=r"oneDNN cannot pack torch\.float32 weights .* run without prepacking"):
        layer.resident.prepack()
    assert layer.resident.weights().packed is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@torch.inference_mode()
def test_zero_tokens_give_zero_rows(backend: str, dtype: torch.dtype) -> None:
    layer = make_layer(dtype, **VARIANTS["grouped_shared_gate"], backend=backend)
    for shape in ((0, 96), (2, 0, 96)):
        y = layer(torch.zeros(shape, dtype=dtype))
        assert y.shape == shape and y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 100, 600])
@pytest.mark.parametrize("part_size", [1, 2, 5])
@pytest.mark.parametrize("variant", ["silu", "swiglu_clamped_biases", "grouped_shared_gate"])
@torch.inference_mode()
def test_torch_backend_in_parts_equals_one_call(variant: str, part_size: int, tokens: int, dtype: torch.dtype) -> None:
    """A plan's groups run in consecutive parts into one sorted buffer, combined once, give bit for bit what one
    call gives (how the expert offload runs more experts than its cache holds), on however many threads."""
    layer = make_layer(dtype, **VARIANTS[variant])
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    weights, ids = layer.select_experts(x)
    plan = make_plan(ids, weights, layer.num_experts)
    w = layer.resident.weights()
    out_sorted = torch.full((plan.num_slots, 96), float("nan"), dtype=dtype)  # rows no part writes would show
    for first in range(0, plan.num_groups, part_size):
        part = slice(first, first + part_size)
        sub = replace(
            plan,
            group_experts=plan.group_experts[part],
            group_starts=plan.group_starts[part],
            group_counts=plan.group_counts[part],
        )
        assert experts_torch(x, sub, w, out_sorted=out_sorted) is out_sorted
    assert torch.equal(combine(out_sorted, plan), experts_torch(x, plan, w))


def test_torch_backend_rejects_a_sorted_buffer_that_does_not_fit() -> None:
    layer = make_layer(torch.float32)
    plan = make_plan(torch.tensor([[0, 1], [1, 2]]), torch.full((2, 2), 0.5), layer.num_experts)
    x, w = torch.randn(2, 96), layer.resident.weights()
    for bad in (torch.empty(3, 96), torch.empty(4, 95), torch.empty(4, 96, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match=r"out_sorted must be \(4, 96\) in torch.float32"):
            experts_torch(x, plan, w, out_sorted=bad)


def test_experts_forward_rejects_mismatches() -> None:
    from moerun import ExpertWeights, experts_forward, make_plan

    layer = make_layer(torch.float32)
    plan = make_plan(torch.tensor([[0, 1]]), torch.ones(1, 2), layer.num_experts)
    w = layer.resident.weights()
    with pytest.raises(ValueError, match="hidden states are torch.bfloat16"):
        experts_forward(torch.randn(1, 96, dtype=torch.bfloat16), plan, w)
    with pytest.raises(ValueError, match="plan is for 1 tokens but 2"):
        experts_forward(torch.randn(2, 96), plan, w)
    with pytest.raises(ValueError, match="down must be"):
        experts_forward(torch.randn(1, 96), plan, ExpertWeights(w.gate_up, w.down[:, :, :-1]))
    with pytest.raises(ValueError, match="unknown expert backend"):
        experts_forward(torch.randn(1, 96), plan, w, backend="magic")


@pytest.mark.skipif(not native.is_available(), reason="native kernel not available")
@pytest.mark.parametrize(("rows_per_group", "packed", "expected"), [
    (1, False, "native"), (16, False, "native"), (64, False, "native"),
    (1, True, "native"), (16, True, "torch"), (64, True, "native"),
])  # fmt: skip
def test_auto_backend_choice(rows_per_group: int, packed: bool, expected: str) -> None:
    layer = make_layer(torch.bfloat16)
    if packed:
        layer.resident.prepack()
    num_experts, top_k = layer.num_experts, layer.routing.top_k
    tokens = rows_per_group * num_experts // top_k
    ids = torch.arange(tokens * top_k).remainder(num_experts).view(tokens, top_k)  # every expert, evenly
    plan = make_plan(ids, torch.full((tokens, top_k), 1.0 / top_k), num_experts)
    x = torch.zeros(tokens, layer.hidden_size, dtype=torch.bfloat16)
    assert select_backend(x, plan, layer.resident.weights()) is BACKENDS[expected]


def _output_and_grads(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's output for x, and the gradients of a fixed random projection of it w.r.t. x and every
    parameter that requires grad."""
    x = x.detach().requires_grad_(True)
    y = layer(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    inputs = {"x": x} | {name: p for name, p in layer.named_parameters() if p.requires_grad}
    # DeepSeek's score bias only steers the choice: its gradient is zero, not part of the graph.
    grads = torch.autograd.grad((y * probe).sum(), list(inputs.values()), allow_unused=True, materialize_grads=True)
    return y.detach(), dict(zip(inputs, grads, strict=True))


@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", [b for b in BACKEND_NAMES if b != "reference"])
def test_gradients_match_reference(backend: str, variant: str, tokens: int) -> None:
    """Outside no_grad every backend records gradients (not a detached output, not an out= error), and they are
    the reference backend's."""
    layer = make_layer(torch.float32, **VARIANTS[variant])
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
    layer.backend = "reference"
    want_y, want = _output_and_grads(layer, x)
    layer.backend = backend
    y, grads = _output_and_grads(layer, x)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(want) and "x" in grads and "experts.gate_up" in grads and "router_weight" in grads
    # Rounding differences scale with the largest gradient: a gradient that is zero in exact arithmetic (top-1
    # routing normalises the weight to 1) holds only such noise.
    atol = 1e-6 * max(g.abs().max().item() for g in want.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=atol, msg=f"gradient of {name}")


@pytest.mark.parametrize("bits", [8, 4])
def test_gradients_reach_inputs_of_quantized_experts(bits: int) -> None:
    from moerun.quant.formats import QuantFormat

    layer = make_layer(torch.float32, hidden_size=128, intermediate_size=64, shared_intermediate_size=64)
    layer.resident.quantize(QuantFormat(bits, 32))
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(3))
    layer.backend = "reference"
    want_y, want = _output_and_grads(layer, x)
    layer.backend = "auto"
    y, grads = _output_and_grads(layer, x)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5)
    atol = 1e-6 * max(g.abs().max().item() for g in want.values())
    for name in ("x", "router_weight", "shared_gate_up", "shared_down"):
        torch.testing.assert_close(grads[name], want[name], rtol=1e-4, atol=atol, msg=f"gradient of {name}")


def test_forward_outside_no_grad_without_grad_parameters_is_plain() -> None:
    """With nothing requiring grad, a forward outside no_grad takes the usual path and records nothing."""
    layer = make_layer(torch.float32).requires_grad_(False)
    x = torch.randn(5, 96)
    with torch.inference_mode():
        want = layer(x)
    assert not layer.records_grad(x)
    y = layer(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, want)


def test_readme_layer_example_records_gradients() -> None:
    """The README's stand-alone layer example, run as written (outside no_grad), gives an output with a
    gradient."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"# 3\. or use the layer on its own\n(.*?)```", readme, re.S)
    assert block is not None, "the README's layer example moved"
    namespace: dict = {"torch": torch, "moerun": __import__("moerun")}
    exec(block.group(1), namespace)
    y, layer = namespace["y"], namespace["layer"]
    assert y.shape == (16, layer.hidden_size) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert y.requires_grad and y.grad_fn is not None
    (grad,) = torch.autograd.grad(y.float().sum(), [layer.router_weight])
    assert grad.abs().sum() > 0
