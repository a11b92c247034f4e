"""The native grouped GEMV kernel against a float64 torch reference, and its argument validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from moerun.kernels import native
from moerun.kernels.activation import GluSpec, apply_glu
from moerun.quant.formats import ExpertMatrices, QuantFormat, QuantizedWeight, quantize_weight
from moerun.routing import route_topk_softmax

pytestmark = pytest.mark.skipif(
    not native.is_available(),
    reason="native kernel not built, disabled by MOERUN_DISABLE_NATIVE, or the CPU lacks AVX-512 BF16",
)

NUM_EXPERTS = 5
# Decode-sized groups stream weight rows; groups of >= 8 rows take the 4x4 tiles, whose row
# remainders (9 = 8 + 1, 11 = 8 + 3, 70 = a 64-row panel + 4 + 2) each take their own path.
GROUP_COUNTS = ([1], [1, 1, 1], [3, 1, 5], [9, 2, 11, 70], [300])
# Relative to the output's scale: fp32 inputs differ from float64 only by fp32 accumulation; bf16 inputs
# are exact in fp32 products, so the kernel matches fp64 math on the same bf16 values just as closely.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-4}


def make_problem(dtype: torch.dtype, k: int, n: int, counts: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    weight = torch.randn(NUM_EXPERTS, n, k, generator=gen).to(dtype)
    # Distinct experts in a shuffled order: the kernel must not assume sorted expert ids.
    experts = torch.randperm(NUM_EXPERTS, generator=gen)[: len(counts)]
    starts = torch.tensor([0, *itertools.accumulate(counts)][:-1], dtype=torch.int64)
    return x, weight, experts, starts, torch.tensor(counts, dtype=torch.int64), gen


def reference(x, weight, experts, starts, counts, bias=None) -> torch.Tensor:
    """[S, N] float64 per-row results."""
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float64)
    for e, s, c in zip(experts.tolist(), starts.tolist(), counts.tolist(), strict=True):
        out[s : s + c] = x[s : s + c].double() @ weight[e].double().T
        if bias is not None:
            out[s : s + c] += bias[e].double()
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == torch.float32
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= TOLERANCE[dtype] * scale, f"max error {err:.3g} at output scale {scale:.3g}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("counts", GROUP_COUNTS, ids=lambda c: "counts" + "-".join(map(str, c)))
@pytest.mark.parametrize("n", [1, 7, 64, 130])
@pytest.mark.parametrize("k", [32, 64, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_matches_reference(dtype, k, n, counts, with_bias, threads):
    x, weight, experts, starts, counts_t, gen = make_problem(dtype, k, n, counts, seed=k * 1000 + n)
    bias = torch.randn(NUM_EXPERTS, n, generator=gen) if with_bias else None
    expected = reference(x, weight, experts, starts, counts_t, bias)

    out = native.grouped_gemv(x, weight, experts, starts, counts_t, bias=bias, num_threads=threads)
    assert out.shape == (x.shape[0], n)
    assert_close(out, expected, dtype)

    # Scatter: rows fold into fewer destination rows (several rows per destination, as when one
    # token is routed to several experts), accumulating onto what out already holds.
    rows = x.shape[0]
    dest_rows = max(rows // 2, 1)
    index = torch.randint(0, dest_rows, (rows,), generator=gen)
    scale = torch.rand(rows, generator=gen)
    initial = torch.randn(dest_rows, n, generator=gen)
    acc = initial.clone()
    result = native.grouped_gemv(
        x, weight, experts, starts, counts_t, bias=bias, out=acc,
        scatter_index=index, scatter_weight=scale, num_threads=threads,
    )  # fmt: skip
    assert result is acc
    expected_acc = initial.double().index_add(0, index, expected * scale.double()[:, None])
    assert_close(acc, expected_acc, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("counts", [[1, 3], [9, 2, 11, 70], [300]], ids=lambda c: "counts" + "-".join(map(str, c)))
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "swiglu_clamped"])
@pytest.mark.parametrize(("k", "half"), [(64, 7), (100, 32), (1000, 13)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_glu_matches_reference(dtype, k, half, activation, counts, with_bias, threads):
    """grouped_glu == the activation (in float64) of grouped_gemv's gate/up outputs, rounded once to x's dtype.

    grouped_gemv's own accuracy is tested above; comparing with its outputs isolates the fused
    activation (vectorised exp) and the routing of gate and up rows to the right outputs.
    """
    x, weight, experts, starts, counts_t, gen = make_problem(dtype, k, 2 * half, counts, seed=k + half)
    bias = torch.randn(NUM_EXPERTS, 2 * half, generator=gen) if with_bias else None
    glu = GluSpec(activation, limit=2.0)  # a low clamp so that swiglu_clamped's clamps really bite
    gate_up = native.grouped_gemv(x, weight, experts, starts, counts_t, bias=bias, num_threads=threads)
    expected = apply_glu(gate_up.double(), glu)

    act = native.grouped_glu(x, weight, experts, starts, counts_t, glu=glu, bias=bias, num_threads=threads)
    assert act.dtype == dtype and act.shape == (x.shape[0], half)
    scale = max(expected.abs().max().item(), 1.0)
    rounding = 2**-8 if dtype == torch.bfloat16 else 1e-5  # bf16 output: half an ulp of rounding
    assert (act.double() - expected).abs().max().item() <= rounding * scale


def test_fused_glu_refuses_erf_gelu():
    assert not native.fuses_glu(GluSpec("gelu"))
    x, weight, experts, starts, counts, _ = make_problem(torch.bfloat16, 32, 8, [3], seed=0)
    with pytest.raises(ValueError, match="cannot fuse activation 'gelu'"):
        native.grouped_glu(x, weight, experts, starts, counts, glu=GluSpec("gelu"))


def test_fused_glu_odd_gate_up_rows():
    x, weight, experts, starts, counts, _ = make_problem(torch.bfloat16, 32, 7, [3], seed=0)
    with pytest.raises(ValueError, match="even number of rows"):
        native.grouped_glu(x, weight, experts, starts, counts, glu=GluSpec())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_shape_many_threads_and_repeated_expert(dtype):
    """A decode-like call: one row per group, the same expert twice, more threads than cores.

    Big enough (6 MB of weight reads) that the kernel really splits it across threads; it runs
    problems under 256 KB on one thread whatever num_threads says.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2048, generator=gen).to(dtype)
    weight = torch.randn(8, 256, 2048, generator=gen).to(dtype)
    experts = torch.tensor([7, 0, 3, 3, 5, 1])
    starts, counts = torch.arange(6), torch.ones(6, dtype=torch.int64)
    expected = reference(x, weight, experts, starts, counts)
    for threads in (1, 2, 3, 8):
        assert_close(native.grouped_gemv(x, weight, experts, starts, counts, num_threads=threads), expected, dtype)


def test_strided_x_rows_and_partial_groups():
    """x may have padded rows; rows no group covers are left as they were in out."""
    gen = torch.Generator().manual_seed(1)
    padded = torch.randn(5, 80, generator=gen).to(torch.bfloat16)
    x = padded[:, :70]
    weight = torch.randn(3, 9, 70, generator=gen).to(torch.bfloat16)
    experts, starts, counts = torch.tensor([2, 0]), torch.tensor([0, 3]), torch.tensor([2, 2])
    out = torch.full((5, 9), 7.0)
    native.grouped_gemv(x, weight, experts, starts, counts, out=out)
    expected = reference(x, weight, experts, starts, counts)
    assert_close(out[[0, 1, 3, 4]], expected[[0, 1, 3, 4]], torch.bfloat16)
    assert torch.equal(out[2], torch.full((9,), 7.0))


def test_empty_inputs_are_no_ops():
    weight = torch.randn(4, 16, 32).to(torch.bfloat16)
    none = torch.zeros(0, dtype=torch.int64)
    out = native.grouped_gemv(torch.zeros(0, 32, dtype=torch.bfloat16), weight, none, none, none)
    assert out.shape == (0, 16)
    acc = torch.ones(3, 16)
    native.grouped_gemv(
        torch.zeros(0, 32, dtype=torch.bfloat16), weight, none, none, none, out=acc,
        scatter_index=none, scatter_weight=torch.zeros(0),
    )  # fmt: skip
    assert torch.equal(acc, torch.ones(3, 16))


def test_converts_bias_and_index_dtypes():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
    weight = torch.randn(2, 8, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(2, 8, generator=gen).to(torch.bfloat16)
    experts, starts, counts = torch.tensor([1], dtype=torch.int32), torch.tensor([0]), torch.tensor([2])
    out = native.grouped_gemv(x, weight, experts, starts, counts, bias=bias)
    assert_close(out, reference(x, weight, experts.long(), starts, counts, bias.float()), torch.bfloat16)


def _call(**overrides) -> torch.Tensor:
    """grouped_gemv on a small valid bf16 problem (S=3, K=32, E=2, N=4) with some arguments replaced."""
    args = {
        "x": torch.ones(3, 32, dtype=torch.bfloat16),
        "weight": torch.ones(2, 4, 32, dtype=torch.bfloat16),
        "group_experts": torch.tensor([0, 1]),
        "group_starts": torch.tensor([0, 1]),
        "group_counts": torch.tensor([1, 2]),
    }
    args.update(overrides)
    positional = [args.pop(name) for name in ("x", "weight", "group_experts", "group_starts", "group_counts")]
    return native.grouped_gemv(*positional, **args)


def _scatter(index, rows=3, out_rows=2):
    return {"out": torch.zeros(out_rows, 4), "scatter_index": index, "scatter_weight": torch.ones(rows)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"x": torch.ones(3, 32)}, "must both be bfloat16 or both float32"),
        (
            {"x": torch.ones(3, 32, dtype=torch.half), "weight": torch.ones(2, 4, 32, dtype=torch.half)},
            "must both be bfloat16 or both float32",
        ),
        ({"x": torch.ones(32, dtype=torch.bfloat16)}, "must be \\[S, K\\]"),
        ({"x": torch.ones(3, 16, dtype=torch.bfloat16)}, "K mismatch"),
        ({"x": torch.ones(32, 3, dtype=torch.bfloat16).T}, "unit stride along K"),
        ({"weight": torch.ones(2, 32, 4, dtype=torch.bfloat16).transpose(1, 2)}, "weight must be contiguous"),
        ({"group_experts": torch.tensor([0])}, "same length"),
        ({"group_experts": torch.tensor([0.0, 1.0])}, "1-D integer"),
        ({"group_experts": torch.tensor([0, 2])}, "expert id outside"),
        ({"group_experts": torch.tensor([-1, 1])}, "expert id outside"),
        ({"group_counts": torch.tensor([1, 3])}, "outside the rows of x"),
        ({"group_starts": torch.tensor([0, -1])}, "outside the rows of x"),
        ({"bias": torch.zeros(2, 5)}, "bias must be"),
        ({"out": torch.zeros(2, 4)}, "one row per x row"),
        ({"out": torch.zeros(3, 4, dtype=torch.float64)}, "out must be a float32"),
        ({"out": torch.zeros(4, 3).T}, "unit stride along N"),
        ({"scatter_index": torch.zeros(3, dtype=torch.int64)}, "given together"),
        ({"scatter_index": torch.zeros(3, dtype=torch.int64), "scatter_weight": torch.ones(3)}, "needs an out"),
        (_scatter(torch.zeros(2, dtype=torch.int64), rows=2), "must be \\[3\\]"),
        (_scatter(torch.tensor([0, 1, 2])), "destination row outside"),
        (_scatter(torch.tensor([0, -1, 1])), "destination row outside"),
    ],
)
def test_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_bad_call_leaves_out_untouched():
    """Index checks run before any write, so a rejected scatter does not half-update the accumulator."""
    args = _scatter(torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="destination row outside"):
        _call(**args)
    assert torch.equal(args["out"], torch.zeros(2, 4))
    _call(**{**args, "scatter_index": torch.tensor([0, 1, 1])})  # the same call with a valid index does write
    assert torch.equal(args["out"], torch.tensor([[32.0] * 4, [64.0] * 4]))


def test_disable_env_var(monkeypatch):
    native._library.cache_clear()
    try:
        monkeypatch.setenv("MOERUN_DISABLE_NATIVE", "1")
        assert not native.is_available()
        with pytest.raises(ValueError, match="not available"):
            _call()
    finally:
        monkeypatch.delenv("MOERUN_DISABLE_NATIVE")
        native._library.cache_clear()
    assert native.is_available()


# ---- Low-bit weights ----

QUANT_FORMATS = [
    QuantFormat(8),
    QuantFormat(4, 32),
    QuantFormat(4, 64),
    QuantFormat(4, 128, symmetric=False),
]


def quantize_x_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [S, K] as the low-bit decode path sees it: int8 per block of ``block`` values along K, scale
    max|x| / 127, rounded to nearest even; returned dequantized, in float64."""
    rows, k = x.shape
    blocks = torch.nn.functional.pad(x.float(), (0, -k % block)).view(rows, -1, block)
    absmax = blocks.abs().amax(-1, keepdim=True)
    # float32 ops as the kernel's (127.0 / tensor would be a reciprocal times 127: another rounding)
    q = torch.round(blocks * torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax, 0.0))
    return (q.double() * (absmax / 127.0).double()).view(rows, -1)[:, :k]


def quantized_reference(x, qweight: QuantizedWeight, experts, starts, counts, bias=None) -> torch.Tensor:
    """Dequantize-then-matmul in float64, with the roundings the kernel documents: prefill groups (>= 8
    rows) see the weights rounded to x's dtype, decode groups see x quantized to int8 in blocks (64 values
    for int8 weights, min(group size, 64) for int4)."""
    out = torch.zeros(x.shape[0], qweight.shape[1], dtype=torch.float64)
    block = 64 if qweight.bits == 8 else min(qweight.format.group_size, 64)
    for e, s, c in zip(experts.tolist(), starts.tolist(), counts.tolist(), strict=True):
        w = qweight[e].dequantize(torch.float32)
        xs = x[s : s + c]
        if c >= 8:
            w = w.to(x.dtype)
            xs = xs.double()
        else:
            xs = quantize_x_blocks(xs, block)
        out[s : s + c] = xs @ w.double().T
        if bias is not None:
            out[s : s + c] += bias[e].double()
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("counts", [[1], [3, 1, 5], [9, 2, 11, 70]], ids=lambda c: "counts" + "-".join(map(str, c)))
@pytest.mark.parametrize("k", [128, 384, 2176])  # 2176: whole blocks of 16 int4 groups and a partial one
@pytest.mark.parametrize("fmt", QUANT_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_quantized_matches_dequantized_reference(dtype, fmt, k, counts, threads):
    x, weight, experts, starts, counts_t, gen = make_problem(dtype, k, 70, counts, seed=k + fmt.bits)
    qweight = quantize_weight(weight, fmt)
    bias = torch.randn(NUM_EXPERTS, 70, generator=gen)
    expected = quantized_reference(x, qweight, experts, starts, counts_t, bias)
    out = native.grouped_gemv(x, qweight, experts, starts, counts_t, bias=bias, num_threads=threads)
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.parametrize(("fmt", "k"), [(QuantFormat(8), 100), (QuantFormat(4, 32), 576)], ids=["int8", "int4"])
def test_quantized_any_k_and_fused_glu(fmt, k):
    """int8 takes any K (masked tails); grouped_glu dequantizes gate and up tiles (13 up rows start inside
    an int4 row tile)."""
    x, weight, experts, starts, counts_t, _ = make_problem(torch.bfloat16, k, 26, [2, 9, 20], seed=3)
    qweight = quantize_weight(weight, fmt)
    assert_close(
        native.grouped_gemv(x, qweight, experts, starts, counts_t),
        quantized_reference(x, qweight, experts, starts, counts_t),
        torch.bfloat16,
    )
    glu = GluSpec("silu")
    act = native.grouped_glu(x, qweight, experts, starts, counts_t, glu=glu)
    plain = native.grouped_glu(x, qweight.dequantize(torch.bfloat16), experts, starts, counts_t, glu=glu)
    assert torch.equal(act, plain)


def test_mixed_formats_per_expert():
    """ExpertMatrices: each expert in its own format (and plain), in one call."""
    x, weight, experts, starts, counts_t, _ = make_problem(torch.bfloat16, 128, 40, [1, 2, 9, 1, 3], seed=5)
    formats = [QuantFormat(8), QuantFormat(4, 32), None, QuantFormat(4, 128, symmetric=False), QuantFormat(4, 64)]
    matrices = [w if f is None else quantize_weight(w, f) for w, f in zip(weight, formats, strict=True)]
    mixed = ExpertMatrices(matrices)
    out = native.grouped_gemv(x, mixed, experts, starts, counts_t)
    for e, s, c in zip(experts.tolist(), starts.tolist(), counts_t.tolist(), strict=True):
        single = matrices[e]
        stack = single.unsqueeze(0) if isinstance(single, torch.Tensor) else QuantizedWeight(
            single.format, single.qweight[None], single.scales[None],
            None if single.mins is None else single.mins[None], single.in_features,
        )  # fmt: skip
        zero = torch.zeros(1, dtype=torch.int64)
        alone = native.grouped_gemv(x[s : s + c], stack, zero, zero, torch.tensor([c]))
        torch.testing.assert_close(out[s : s + c], alone, rtol=0, atol=0)


def test_quantized_format_errors():
    x = torch.ones(3, 96, dtype=torch.bfloat16)
    qweight = quantize_weight(torch.randn(2, 4, 128), QuantFormat(4, 32))
    with pytest.raises(ValueError, match="K mismatch"):
        native.grouped_gemv(x, qweight, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    mixed = ExpertMatrices([torch.ones(4, 96, dtype=torch.float32), torch.ones(4, 96, dtype=torch.float32)])
    with pytest.raises(ValueError, match="must be contiguous torch.bfloat16 like x"):
        native.grouped_gemv(x, mixed, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))


# ---- One token through a whole MoE layer (decode) ----


@pytest.mark.parametrize(("num_experts", "top_k"), [(64, 8), (128, 2), (8, 2), (60, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_route_token_chooses_like_torch_topk(dtype, num_experts, top_k):
    """Logits drawn from 5 values tie constantly; the kernel must pick and order experts as torch.topk does
    (selection for k * 64 > E, partial sort otherwise)."""
    gen = torch.Generator().manual_seed(num_experts + top_k)
    values = torch.tensor([-1.0, 0.125, 0.25, 0.5, 2.0])
    x = torch.zeros(1, 64, dtype=dtype)
    x[0, 0] = 1  # logits = the router's first column, exactly
    for _ in range(100):
        router = torch.zeros(num_experts, 64, dtype=dtype)
        router[:, 0] = values[torch.randint(0, 5, (num_experts,), generator=gen)]
        weights, ids = native.route_token(x, router, top_k)
        expected_weights, expected_ids = route_topk_softmax(torch.nn.functional.linear(x, router), top_k, False)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_route_token_rounds_logits_and_scales(dtype):
    gen = torch.Generator().manual_seed(7)
    router = torch.randn(16, 200, generator=gen).to(dtype)
    for _ in range(20):
        x = torch.randn(1, 200, generator=gen).to(dtype)
        weights, ids = native.route_token(x, router, 3, renormalize=True, scaling=2.5)
        logits = torch.nn.functional.linear(x.double(), router.double()).to(dtype)  # rounded once, as F.linear
        expected_weights, expected_ids = route_topk_softmax(logits, 3, True)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(weights, expected_weights * 2.5, rtol=1e-5, atol=0)  # fp32 sums differ


# "mixed": experts cycling through plain, int8 and int4, so one token's x is quantized per format in turn.
MOE_TOKEN_FORMATS = [None, QuantFormat(8), QuantFormat(4, 32), QuantFormat(4, 128, symmetric=False), "mixed"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation", ["silu", "swiglu_clamped"])
@pytest.mark.parametrize("fmt", MOE_TOKEN_FORMATS, ids=lambda f: "plain" if f is None else getattr(f, "name", f))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_moe_token_equals_route_then_native_experts(dtype, fmt, activation, threads):
    """Bit for bit what route_token, make_plan and experts_native's general path (taken with ``out``) compute,
    and token_experts with the same routing (the path offloaded experts take)."""
    from moerun.kernels.experts import ExpertWeights, experts_native
    from moerun.routing import make_plan

    gen = torch.Generator().manual_seed(11)
    num_experts, hidden, top_k = 12, 256, 4
    half = 70 if fmt is None or fmt == QuantFormat(8) else 128  # int4 needs K % 64 == 0 (down's K is half)
    router = (torch.randn(num_experts, hidden, generator=gen) * 0.2).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * half, hidden, generator=gen) * 0.1).to(dtype)
    down = (torch.randn(num_experts, hidden, half, generator=gen) * 0.1).to(dtype)
    if fmt == "mixed":
        cycle = [None, QuantFormat(8), QuantFormat(4, 32)]
        gate_up, down = (
            ExpertMatrices([m if cycle[e % 3] is None else quantize_weight(m, cycle[e % 3]) for e, m in enumerate(w)])
            for w in (gate_up, down)
        )
    elif fmt is not None:
        gate_up, down = quantize_weight(gate_up, fmt), quantize_weight(down, fmt)
    biases = activation == "swiglu_clamped"
    w = ExpertWeights(
        gate_up, down,
        torch.randn(num_experts, 2 * half, generator=gen).to(dtype) if biases else None,  # converted per call
        torch.randn(num_experts, hidden, generator=gen).to(dtype) if biases else None,
        GluSpec(activation, limit=0.5),
    )  # fmt: skip
    for _ in range(5):
        x = torch.randn(1, hidden, generator=gen).to(dtype)
        y, weights, ids = native.moe_token(
            x, router, top_k, w.gate_up, w.down, w.glu, renormalize=True,
            gate_up_bias=w.gate_up_bias, down_bias=w.down_bias, num_threads=threads,
        )  # fmt: skip
        expected_weights, expected_ids = native.route_token(x, router, top_k, renormalize=True)
        assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)
        plan = make_plan(ids, weights, num_experts)
        expected = experts_native(x, plan, w, out=torch.zeros(1, hidden))
        assert y.dtype == dtype and torch.equal(y, expected)
        routed = native.token_experts(
            x, plan.group_experts, plan.weights, w.gate_up, w.down, w.glu,
            gate_up_bias=w.gate_up_bias, down_bias=w.down_bias, num_threads=threads,
        )  # fmt: skip
        assert torch.equal(routed, expected) and torch.equal(experts_native(x, plan, w), expected)


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "swiglu_clamped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_glu_matches_apply_glu(dtype, activation):
    h = torch.randn(5, 2 * 37, generator=torch.Generator().manual_seed(1)) * 3
    spec = GluSpec(activation, limit=2.0)
    act = native.glu(h, spec, dtype)
    assert act.dtype == dtype
    torch.testing.assert_close(act.float(), apply_glu(h, spec).to(dtype).float(), rtol=1e-2, atol=1e-5)


def test_token_validation_errors():
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    router = torch.ones(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one contiguous bfloat16 or float32 CPU row"):
        native.route_token(torch.ones(2, 64, dtype=torch.bfloat16), router, 2)
    with pytest.raises(ValueError, match="router weight must be a contiguous"):
        native.route_token(x, router.float(), 2)
    with pytest.raises(ValueError, match="top_k must be between 1 and the 8 experts"):
        native.route_token(x, router, 9)
    with pytest.raises(ValueError, match="router logits contain NaN or infinite values"):
        native.route_token(x, torch.full((8, 64), float("inf"), dtype=torch.bfloat16), 2)
    gate_up, down = torch.ones(8, 10, 64, dtype=torch.bfloat16), torch.ones(8, 64, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        native.moe_token(x, router, 2, gate_up, down, GluSpec())
    with pytest.raises(ValueError, match="group_experts has an expert id outside"):
        native.token_experts(
            x, torch.tensor([0, 8]), torch.ones(2), gate_up, torch.ones(8, 64, 5, dtype=torch.bfloat16), GluSpec()
        )
    with pytest.raises(ValueError, match="cannot compute activation 'gelu'"):
        native.moe_token(x, router, 2, gate_up, down[..., :5], GluSpec("gelu"))
    with pytest.raises(ValueError, match="cannot compute activation 'gelu'"):
        native.glu(torch.ones(1, 4), GluSpec("gelu"), torch.float32)


# ---- Decode glue: RMS norm, attention inputs ----


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                  (torch.float32, torch.float32)])  # fmt: skip
def test_rms_norm_matches_transformers_formula(x_dtype, w_dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 200, generator=gen) * 4).to(x_dtype)
    weight = torch.randn(200, generator=gen).to(w_dtype)
    expected = weight * torch.nn.functional.rms_norm(x.float(), (200,), eps=1e-6).to(x_dtype)
    out = native.rms_norm(x, weight, 1e-6, torch.empty_like(expected))
    tolerance = 1e-5 if expected.dtype == torch.float32 else 1e-2  # bf16: an ulp where the sums round apart
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="promoted dtype"):
        native.rms_norm(x, weight, 1e-6, torch.empty(3, 200, dtype=torch.float64))


def _torch_attention_inputs(qkv, hq, hkv, d, norm, q_norm, k_norm, clip, cos, sin, dtype):
    """The lean runner's torch formulation: norms, clamp, RoPE, then the cache dtype."""
    from moerun.runtime.lean import apply_rope, rms_norm

    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
    if norm == "all_heads":
        q, k = rms_norm(q, q_norm, 1e-6), rms_norm(k, k_norm, 1e-6)
    elif norm == "per_head":
        q = rms_norm(q.view(hq, d), q_norm, 1e-6).flatten()[None]
        k = rms_norm(k.view(hkv, d), k_norm, 1e-6).flatten()[None]
    if clip is not None:
        q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
    return (apply_rope(q.view(hq, d), cos, sin).to(dtype), apply_rope(k.view(hkv, d), cos, sin).to(dtype),
            v.view(hkv, d).to(dtype))  # fmt: skip


@pytest.mark.parametrize(("norm", "clip"), [(None, None), ("all_heads", 0.8), ("per_head", None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_attention_inputs_match_the_torch_formulation(dtype, norm, clip):
    gen = torch.Generator().manual_seed(4)
    hq, hkv, d, capacity, pos = 4, 2, 16, 8, 5
    qkv = torch.randn(1, (hq + 2 * hkv) * d, generator=gen)
    widths = {"all_heads": (hq * d, hkv * d), "per_head": (d, d), None: (1, 1)}[norm]
    q_norm, k_norm = (torch.randn(n, generator=gen).to(dtype) for n in widths)
    angles = torch.rand(d, generator=gen) * 3
    cos, sin = angles.cos(), torch.cat((-angles.sin()[: d // 2], angles.sin()[d // 2 :]))
    expected_q, expected_k, expected_v = _torch_attention_inputs(qkv, hq, hkv, d, norm, q_norm, k_norm, clip, cos,
                                                                 sin, dtype)  # fmt: skip
    keys = torch.zeros(hkv, capacity, d, dtype=dtype)
    values = torch.zeros(hkv, d, capacity, dtype=dtype)
    q_out = torch.empty(hq, d, dtype=dtype)
    native.attention_inputs(qkv, (hq, hkv, d), norm, (q_norm, k_norm) if norm else (None, None), 1e-6, clip, cos,
                            sin, q_out, keys[:, pos], values[:, :, pos])  # fmt: skip
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for got, want in ((q_out, expected_q), (keys[:, pos], expected_k), (values[:, :, pos], expected_v)):
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)
    assert keys[:, :pos].abs().sum() == 0 and values[..., pos + 1 :].abs().sum() == 0  # only position pos written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_softmax_matches_torch(dtype):
    scores = torch.randn(5, 77, generator=torch.Generator().manual_seed(3)) * 10
    out = torch.full((5, 80), 7.0, dtype=dtype)
    native.softmax(scores, 0.3, out[:, :77])
    expected = torch.softmax(scores * 0.3, dim=-1).to(dtype)
    torch.testing.assert_close(out[:, :77].float(), expected.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-7)  # fmt: skip
    assert (out[:, 77:] == 7.0).all()  # past the row's n values nothing is written
    with pytest.raises(ValueError, match="scale must be positive"):
        native.softmax(scores, -0.3, out[:, :77])
