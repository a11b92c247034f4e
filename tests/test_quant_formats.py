"""Low-bit formats: packing, rounding error bounds, sizes and refusals."""

from __future__ import annotations

import pytest
import torch

from moerun.quant.formats import (
    ExpertMatrices,
    QuantFormat,
    concat_rows,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_nbytes,
)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("n", [1, 4, 7])
@pytest.mark.parametrize("k", [128, 2176])  # 2176: whole blocks of 16 groups and a partial one
def test_pack_unpack_roundtrip(group_size, n, k):
    q = torch.randint(0, 16, (3, n, k), dtype=torch.uint8)
    packed = pack_int4(q, group_size)
    assert packed.shape == (3, n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, group_size), q)
    assert torch.equal(unpack_int4(pack_int4(q[1], group_size), group_size), q[1])


def test_int4_layout():
    """Row tiles of 4, blocks of 16 groups, chunks of 8 values: word 2i + t of a row's chunk c holds
    values 8c + 2j + t of group i in nibble j."""
    q = torch.randint(0, 16, (6, 576), dtype=torch.uint8)  # 18 groups of 32: a block of 16, then 2
    flat = pack_int4(q, 32).flatten()

    def word(offset: int) -> int:
        return flat[offset].item() | flat[offset + 1].item() << 8

    def nibbles(row: int, group: int, c: int, t: int) -> int:
        return sum(q[row, 32 * group + 8 * c + 2 * j + t].item() << 4 * j for j in range(4))

    # tile 0 (rows 0-3), block 0: chunk c, row r at (4 c + r) * 64 bytes; word 2i + t at 2 (2i + t)
    assert word((4 * 1 + 2) * 64 + 2 * (2 * 5 + 1)) == nibbles(row=2, group=5, c=1, t=1)
    # tile 0, block 1 (2 groups, 8 bytes per row chunk) after block 0's 4 * 16 * 16 bytes
    assert word(4 * 256 + (4 * 3 + 1) * 8 + 2 * (2 * 1 + 0)) == nibbles(row=1, group=17, c=3, t=0)
    # tile 1 holds rows 4-5 only, from byte 4 * 288
    assert word(4 * 288 + (2 * 0 + 1) * 64 + 2 * 3) == nibbles(row=5, group=1, c=0, t=1)


@pytest.mark.parametrize(
    "fmt", [QuantFormat(8), QuantFormat(4, 32), QuantFormat(4, 128), QuantFormat(4, 64, symmetric=False)]
)
def test_rounding_error_is_within_a_step(fmt):
    """Nearest level: half a step, except symmetric int4's +7 clamp (values of the sign opposite the
    extreme, whose magnitude may reach 8 steps) may be off by up to a whole step."""
    w = torch.randn(4, 6, 256) * 0.1
    q = quantize_weight(w, fmt)
    err = (q.dequantize() - w).abs()
    if fmt.bits == 8:
        step = q.scales.abs()[..., None]
    else:
        step = q.scales.float().abs().repeat_interleave(fmt.group_size, dim=-1)
    # half a step, plus the float16 rounding of the scale (and min) carried over up to 15 levels
    slack = 16 * 2**-11 * step if fmt.bits == 4 else 1e-6
    bound = step if fmt.bits == 4 and fmt.symmetric else step / 2
    assert (err <= bound + slack + 1e-7).all()
    assert (err <= step / 2 + slack + 1e-7).float().mean() > 0.95
    assert q.shape == (4, 6, 256)
    assert q.nbytes == fmt.nbytes(6, 256) * 4


def test_symmetric_int4_uses_minus_eight_for_the_extreme():
    w = torch.zeros(1, 64)
    w[0, 3] = -1.0
    w[0, 5] = 0.5
    q = quantize_weight(w, QuantFormat(4, 64))
    back = q.dequantize()
    assert back[0, 3].item() == -1.0 and back[0, 5].item() == 0.5
    assert torch.equal(unpack_int4(q.qweight, 64)[0, 3], torch.tensor(0, dtype=torch.uint8))  # -8 stored as 0


def test_constant_and_zero_groups():
    w = torch.zeros(2, 64)
    w[1] = 0.25
    for fmt in (QuantFormat(8), QuantFormat(4, 32), QuantFormat(4, 32, symmetric=False)):
        assert torch.allclose(quantize_weight(w, fmt).dequantize(), w)


def test_sizes_match_the_formats():
    assert QuantFormat(4, 32).nbytes(10, 128) == 10 * 64 + 10 * 4 * 2  # 4.5 bits per weight
    assert QuantFormat(4, 32, symmetric=False).nbytes(10, 128) == 10 * 64 + 10 * 4 * 4
    assert QuantFormat(8).nbytes(10, 128) == 10 * 128 + 40
    assert QuantFormat(16).nbytes(10, 128) == 10 * 128 * 2
    mixed = ExpertMatrices(
        [torch.zeros(4, 64, dtype=torch.bfloat16), quantize_weight(torch.randn(4, 64), QuantFormat(8))]
    )
    assert mixed.shape == (2, 4, 64)
    assert weight_nbytes(mixed) == 4 * 64 * 2 + 4 * 64 + 16


def test_refusals():
    with pytest.raises(ValueError, match="bits must be 16, 8 or 4"):
        QuantFormat(3)
    with pytest.raises(ValueError, match="group size"):
        QuantFormat(4, 16)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_weight(torch.randn(4, 96), QuantFormat(4, 32))
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_weight(torch.full((2, 64), float("nan")), QuantFormat(8))
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_weight(torch.randn(2, 64), QuantFormat(16))
    with pytest.raises(ValueError, match="one shape"):
        ExpertMatrices([torch.zeros(4, 64), torch.zeros(4, 128)])


@pytest.mark.parametrize("rows", [(8, 4), (6, 5, 3)])
@pytest.mark.parametrize("fmt", [QuantFormat(8), QuantFormat(4, 32), QuantFormat(4, 64, symmetric=False)])
def test_concat_rows_equals_quantizing_the_stacked_matrix(rows, fmt):
    """Rows of int4 matrices whose row count is not a multiple of the row tile are re-tiled."""
    parts = [torch.randn(n, 128) for n in rows]
    joined = concat_rows([quantize_weight(w, fmt) for w in parts])
    whole = quantize_weight(torch.cat(parts), fmt)
    assert torch.equal(joined.qweight, whole.qweight) and torch.equal(joined.dequantize(), whole.dequantize())


# ---- matmul_transposed: torch's weight-only int8 GEMM, or dequantize ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("n", [48, 40])
@pytest.mark.parametrize(
    "fmt", [QuantFormat(8), QuantFormat(4, 32), QuantFormat(4, 64), QuantFormat(4, 128, False)], ids=str
)
def test_matmul_transposed_equals_the_dequantized_product(
    dtype: torch.dtype, rows: int, n: int, fmt: QuantFormat
) -> None:
    """torch's weight-only int8 and int4 GEMMs (rows not a multiple of 16 padded for int4) equal the
    dequantized product."""
    from moerun.quant.formats import matmul_transposed

    g = torch.Generator().manual_seed(rows)
    w = quantize_weight(torch.randn(n, 128, generator=g) * 0.1, fmt)
    a = torch.randn(rows, 128, generator=g).to(dtype)
    want = a.float() @ w.dequantize(torch.float32).T
    got = matmul_transposed(a, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        got.float(), want, rtol=tolerance, atol=tolerance * max(1.0, want.abs().amax().item() if rows else 1.0)
    )


def test_matmul_transposed_int8_falls_back_to_dequantizing_where_the_op_cannot_run() -> None:
    """float16 activations (the op takes bf16 and fp32) and activations that record gradients take the
    dequantizing path, with the same result."""
    from moerun.quant.formats import matmul_transposed

    w = quantize_weight(torch.randn(16, 64) * 0.1, QuantFormat(8))
    a = torch.randn(3, 64)
    expected = matmul_transposed(a, w)
    a16 = a.to(torch.float16)
    torch.testing.assert_close(matmul_transposed(a16, w), a16 @ w.dequantize(torch.float16).T)
    leaf = a.clone().requires_grad_(True)
    got = matmul_transposed(leaf, w)
    got.sum().backward()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad, w.dequantize(torch.float32).sum(0).expand(3, -1))


def test_int4_conversion_is_made_once_per_matrix_and_kept_by_stack_views() -> None:
    """The torch-layout copy is made on first use (its values once, its scales per dtype); indexing a stack
    shares it; a weight without conversions (a view over an expert cache's slot) dequantizes instead, with the
    same result."""
    from moerun.quant.formats import QuantizedWeight, matmul_transposed

    stack = quantize_weight(torch.randn(3, 32, 64) * 0.1, QuantFormat(4, 32))
    a = torch.randn(2, 64)
    first = matmul_transposed(a, stack[1])
    held = dict(stack.conversions[1])
    assert set(held) == {"int4pack", ("int4pack scales", torch.float32)}
    assert matmul_transposed(a, stack[1]) is not None and all(stack.conversions[1][k] is v for k, v in held.items())
    matmul_transposed(a.bfloat16(), stack[1])
    assert stack.conversions[1]["int4pack"] is held["int4pack"]  # the values are packed once for both dtypes
    assert len(stack.conversions[1]) == 3 and set(stack.conversions) == {1}
    slot_view = QuantizedWeight(stack.format, stack.qweight[1], stack.scales[1], None, 64)
    torch.testing.assert_close(matmul_transposed(a, slot_view), first, rtol=1e-5, atol=1e-5)
    assert slot_view.conversions is None


@pytest.mark.parametrize("n", [3, 64, 97, 256, 301])
@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64-asym"])
def test_int4_conversion_in_parts_equals_one_whole_conversion(n, fmt, monkeypatch) -> None:
    """Rows converted a few at a time lie in torch's layout exactly as one conversion of the padded matrix lays
    them (part size a multiple of the op's row blocks; parts ending inside a row tile, past N, on padding)."""
    from moerun.quant import formats
    from moerun.quant.formats import _int4pack, unpack_int4

    monkeypatch.setattr(formats, "INT4PACK_ROWS", 64)
    w = quantize_weight(torch.randn(n, 128), QuantFormat.parse(fmt))
    padded = -(-n // 16) * 16
    q = torch.full((padded, 128), 8, dtype=torch.int32)
    q[:n] = unpack_int4(w.qweight, w.format.group_size)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    packed, scales_and_zeros = _int4pack(w, torch.float32)
    assert torch.equal(packed, whole)
    assert scales_and_zeros.shape == (128 // w.format.group_size, padded, 2)
    assert not scales_and_zeros[:, n:].any()


@pytest.mark.parametrize("n", [1, 30, 32])  # rows padded to 16 in torch's layout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conversions_nbytes_is_what_the_int4_gemm_keeps(n, dtype) -> None:
    from moerun.quant.formats import conversions_nbytes, matmul_transposed

    stack = quantize_weight(torch.randn(2, n, 128), QuantFormat(4, 64))
    for e in range(2):
        matmul_transposed(torch.randn(3, 128).to(dtype), stack[e])
    held = sum(t.numel() * t.element_size() for per_expert in stack.conversions.values() for t in per_expert.values())
    assert held == conversions_nbytes(stack, dtype)
    assert conversions_nbytes(quantize_weight(torch.randn(n, 128), QuantFormat(8)), dtype) == 0


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64-asym", "int4-g128"])
def test_stacks_are_quantized_and_dequantized_in_pieces_exactly(fmt, monkeypatch) -> None:
    """Large stacks go through quantize_weight and dequantize a few matrices at a time: the same bits as whole,
    with a last piece shorter than the others, and the input left untouched."""
    import moerun.quant.formats as formats

    w = torch.randn(7, 8, 128, dtype=torch.bfloat16)
    whole = quantize_weight(w, QuantFormat.parse(fmt))
    values = whole.dequantize(torch.bfloat16)
    kept = w.clone()
    monkeypatch.setattr(formats, "_PIECE_VALUES", 3 * 8 * 128)  # pieces of 3, 3 and 1 matrices
    pieces = quantize_weight(w, QuantFormat.parse(fmt))
    assert torch.equal(w, kept)
    assert torch.equal(pieces.qweight, whole.qweight) and torch.equal(pieces.scales, whole.scales)
    assert (pieces.mins is None) == (whole.mins is None) and (
        whole.mins is None or torch.equal(pieces.mins, whole.mins)
    )
    assert torch.equal(pieces.dequantize(torch.bfloat16), values)
    bad = w.clone()
    bad[6, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_weight(bad, QuantFormat.parse(fmt))


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64-asym", "int4-g128"])
@pytest.mark.parametrize("shape", [(1, 128), (5, 256), (3, 4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_quantize_then_dequantize_bit_for_bit(fmt, shape, dtype) -> None:
    from moerun.quant.formats import round_trip

    w = (torch.randn(shape) * 0.05).to(dtype)
    w[..., 0, :32] = 0.0  # an all-zero group and row start
    want = quantize_weight(w, QuantFormat.parse(fmt)).dequantize(dtype)
    assert torch.equal(round_trip(w, QuantFormat.parse(fmt), dtype), want)


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g64-asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_weight_writes_the_dequantized_values_in_the_same_pass(fmt, dtype, monkeypatch) -> None:
    """Into another tensor or into w itself (fake quantization in place), whole or in pieces."""
    import moerun.quant.formats as formats

    w = (torch.randn(5, 8, 128) * 0.1).to(dtype)
    want = quantize_weight(w, QuantFormat.parse(fmt))
    values = want.dequantize(dtype)
    for piece_values in (1 << 23, 2 * 8 * 128):
        monkeypatch.setattr(formats, "_PIECE_VALUES", piece_values)
        out = torch.empty_like(w)
        made = quantize_weight(w, QuantFormat.parse(fmt), dequantized=out)
        assert torch.equal(made.qweight, want.qweight) and torch.equal(out, values)
        inplace = w.clone()
        quantize_weight(inplace, QuantFormat.parse(fmt), dequantized=inplace)
        assert torch.equal(inplace, values)
