"""Weight-only low-bit formats, laid out the way the native kernels read them.

- ``int8``: one symmetric scale per output row. ``qweight`` [..., N, K] int8 in [-127, 127],
  ``scales`` [..., N] float32; ``w = scale * q``.
- ``int4``: one scale per group of G values along K (G = 32, 64 or 128). ``qweight`` [..., N, K/2]
  uint8 with two values per byte, ``scales`` [..., N, K/G] float16, and for the asymmetric variant
  ``mins`` [..., N, K/G] float16. Symmetric: a stored nibble q in [0, 15] stands for q - 8, so
  ``w = s * (q - 8)``; asymmetric: ``w = s * q + min``.

Layouts (what the decode kernel streams; pack_int8 / pack_int4 and their unpack define them): rows go in
tiles of 4 (the last tile may be shorter), and each tile occupies its rows' bytes of ``qweight`` as one
stream, so one pass over memory feeds 4 rows and each vector of x loaded serves all 4. int8: a tile stores
chunks of 64 values (the last may be shorter), each row of the tile in turn. int4: along K, a tile is cut into
blocks of 16 groups (the last block may have fewer, ``ng``), and a block into chunks of 8 values per group;
for each chunk, each row of the tile in turn stores ``2 ng`` 16-bit words, word ``2 i + t`` (group i of the
block) holding in its nibbles j = 0..3 the group's values ``8 c + 2 j + t`` of chunk c (groups of 128 are
laid out as two groups of 64 sharing a scale, see ``lane_group``). A 64-byte load
then splits, by shifts and one mask, into 4 vectors whose 32-bit lanes are value pairs of the 16 groups:
each lane of a dot-product accumulator sees one group only, so one multiply by a vector of 16 scales per
block applies every group's scale.

Scales are float16 for int4 (2 bytes per 32 values at G = 32 keeps the format at 4.5 bits per
weight, as llama.cpp's Q4_0) and float32 for int8 (one per row: negligible).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

INT4_GROUP_SIZES = (32, 64, 128)
# K of an int4 matrix is a multiple of this (and of the group size).
NIBBLE_RUN = 64
# The layouts (see the module docstring): rows per tile; int8 values per chunk; int4 groups per block and
# values per group per chunk.
ROW_TILE = 4
INT8_CHUNK = 64
INT4_BLOCK_GROUPS = 16
INT4_CHUNK = 8
# Values of a stack of matrices quantized or dequantized at once (a few matrices): float32 temporaries of a
# whole stack (GBs) cost more in page faults and memory traffic than the arithmetic.
_PIECE_VALUES = 1 << 23


@dataclass(frozen=True)
class QuantFormat:
    """How one weight matrix is stored.

    Attributes:
        bits: 16 (keep the model's float dtype), 8 or 4.
        group_size: int4 values per scale along K (32, 64 or 128); ignored otherwise.
        symmetric: int4 without a per-group minimum (int8 is always symmetric).
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (16, 8, 4):
            raise ValueError(f"bits must be 16, 8 or 4, got {self.bits}")
        if self.bits == 4 and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")

    @classmethod
    def parse(cls, name: str) -> QuantFormat:
        """The format a ``name`` label stands for (``16``, ``int8``, ``int4-g32``, ``int4-g64-asym``)."""
        if name == "16":
            return cls(16)
        if name == "int8":
            return cls(8)
        parts = name.split("-")
        if len(parts) in (2, 3) and parts[0] == "int4" and parts[1][:1] == "g" and parts[1][1:].isdigit():
            if len(parts) == 2 or parts[2] == "asym":
                return cls(4, int(parts[1][1:]), len(parts) == 2)
        raise ValueError(f"unknown weight format {name!r}; expected 16, int8, int4-gG or int4-gG-asym")

    @property
    def name(self) -> str:
        """Short label: ``16`` (the model's float dtype), ``int8``, ``int4-g32``, ``int4-g32-asym``."""
        if self.bits == 16:
            return "16"
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group_size}" + ("" if self.symmetric else "-asym")

    def supports(self, in_features: int) -> bool:
        """Whether a matrix with K = in_features can take this format."""
        if self.bits == 4:
            return in_features % NIBBLE_RUN == 0 and in_features % self.group_size == 0
        return in_features >= 1

    def nbytes(self, out_features: int, in_features: int, float_bytes: int = 2) -> int:
        """Bytes of an [N, K] matrix in this format (``float_bytes`` per value at 16 bits)."""
        n, k = out_features, in_features
        if self.bits == 16:
            return n * k * float_bytes
        if self.bits == 8:
            return n * k + 4 * n
        groups = k // self.group_size
        return n * k // 2 + n * groups * (2 if self.symmetric else 4)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A matrix [N, K], or a stack of them [E, N, K], in a low-bit format (see the module docstring).

    Attributes:
        format: the storage format (bits 8 or 4).
        qweight: int8 [..., N, K] or uint8 [..., N, K/2], contiguous.
        scales: float32 [..., N] (int8) or float16 [..., N, K/G] (int4), contiguous.
        mins: float16 [..., N, K/G] for asymmetric int4, else None.
        in_features: K.
        conversions: layouts of the same values that torch's own low-bit GEMMs read (``matmul_transposed``),
            made on first use and kept for the weight's lifetime; None where they must not be kept (views
            over an expert cache's slots, which hold other experts later). The values must not change once a
            conversion was made.
    """

    format: QuantFormat
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    in_features: int
    conversions: dict | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape [..., N, K]."""
        return (*self.qweight.shape[:-1], self.in_features)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes held: packed values plus scales (and mins)."""
        tensors = (self.qweight, self.scales, self.mins)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @classmethod
    def empty(
        cls, fmt: QuantFormat, shape: tuple[int, ...], device: torch.device | str | None = None
    ) -> QuantizedWeight:
        """Uninitialised storage for a matrix or stack of logical ``shape`` [..., N, K] (to be read into)."""
        *lead, k = shape
        if not fmt.supports(k) or fmt.bits == 16:
            raise ValueError(f"{fmt.name} cannot store a matrix with K = {k}")
        if fmt.bits == 8:
            return cls(fmt, torch.empty(*lead, k, dtype=torch.int8, device=device),
                       torch.empty(*lead, dtype=torch.float32, device=device), None, k, {})  # fmt: skip
        groups = (*lead, k // fmt.group_size)
        mins = None if fmt.symmetric else torch.empty(groups, dtype=torch.float16, device=device)
        qweight = torch.empty(*lead, k // 2, dtype=torch.uint8, device=device)
        return cls(fmt, qweight, torch.empty(groups, dtype=torch.float16, device=device), mins, k, {})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The storage tensors by name (``qweight``, ``scales`` and, when asymmetric, ``mins``)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        return out

    def __getitem__(self, index: int) -> QuantizedWeight:
        """Matrix ``index`` of a stack [E, N, K] (views, no copy)."""
        if self.qweight.dim() < 3:
            raise IndexError("only a stack of matrices [E, N, K] can be indexed")
        mins = None if self.mins is None else self.mins[index]
        conversions = None if self.conversions is None else self.conversions.setdefault(index, {})
        return QuantizedWeight(
            self.format, self.qweight[index], self.scales[index], mins, self.in_features, conversions
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights as floats: [..., N, K] in ``dtype`` (computed in float32, rounded once)."""
        matrix_values = self.shape[-2] * self.shape[-1]
        if self.qweight.dim() == 3 and matrix_values <= _PIECE_VALUES < self.shape[0] * matrix_values:
            out = torch.empty(self.shape, dtype=dtype, device=self.qweight.device)
            step = _PIECE_VALUES // matrix_values
            for first in range(0, self.shape[0], step):  # in pieces, as quantize_weight
                piece = slice(first, first + step)
                mins = None if self.mins is None else self.mins[piece]
                part = QuantizedWeight(self.format, self.qweight[piece], self.scales[piece], mins, self.in_features)
                out[piece] = part.dequantize(dtype)
            return out
        if self.bits == 8:
            q = unpack_int8(self.qweight).float()
        else:  # [..., N, K/G, G] in [0, 15]
            q = unpack_int4(self.qweight, self.format.group_size).float().unflatten(-1, (-1, self.format.group_size))
        return _dequantize_levels(q, self.format, self.scales, self.mins).to(dtype)


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Matrices [N_i, K] of one format stacked along N (q, k, v into one projection)."""
    fmt, k = weights[0].format, weights[0].in_features
    if any(w.format != fmt or w.in_features != k or w.qweight.dim() != 2 for w in weights):
        raise ValueError("only matrices of one format and K can be concatenated")
    mins = None if fmt.symmetric or fmt.bits == 8 else torch.cat([w.mins for w in weights])
    qweight = torch.cat([w.qweight for w in weights])
    if any(w.qweight.shape[0] % ROW_TILE for w in weights[:-1]):
        # a short last row tile inside the result: the rows after it form new tiles
        if fmt.bits == 4:
            qweight = pack_int4(torch.cat([unpack_int4(w.qweight, fmt.group_size) for w in weights]), fmt.group_size)
        else:
            qweight = pack_int8(torch.cat([unpack_int8(w.qweight) for w in weights]))
    return QuantizedWeight(fmt, qweight, torch.cat([w.scales for w in weights]), mins, k, {})


def _regions(n: int, k: int, col_block: int) -> list[tuple[int, int, int, int, int, int]]:
    """The tiled layouts' regions of an [n, k] matrix: (row0, rows, rows per tile, col0, cols, block width),
    in which every tile has the same rows and every block the same width (at most 2 x 2 regions)."""
    row_split, col_split = n - n % ROW_TILE, k - k % col_block
    rows = [(0, row_split, ROW_TILE), (row_split, n - row_split, n - row_split)]
    cols = [(0, col_split, col_block), (col_split, k - col_split, k - col_split)]
    return [(r0, nr, rt, c0, nc, cb) for r0, nr, rt in rows for c0, nc, cb in cols if nr and nc]


def _tile(values: torch.Tensor, col_block: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Values [..., N, K] in row tiles: each tile's rows hold, one region after another, ``encode`` of the
    region as [..., tiles, rt, blocks, block width] -> bytes [..., tiles, rt * width * blocks * bytes/value]."""
    *lead, n, k = values.shape
    tiles: dict[tuple[int, int], list[torch.Tensor]] = {}  # row region -> its column regions' bytes per tile
    for r0, nr, rt, c0, nc, cb in _regions(n, k, col_block):
        region = values[..., r0 : r0 + nr, c0 : c0 + nc].reshape(*lead, nr // rt, rt, nc // cb, cb)
        tiles.setdefault((r0, nr), []).append(encode(region).reshape(*lead, nr // rt, -1))
    return torch.cat([torch.cat(parts, dim=-1).reshape(*lead, nr, -1) for (_, nr), parts in tiles.items()], dim=-2)


def _untile(
    stored: torch.Tensor, k: int, col_block: int, bytes_per_value: float, decode: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """The inverse of ``_tile``: ``decode(bytes [..., tiles, blocks * rt * ...], tiles, rt, blocks, width)``
    returns the region's values as [..., tiles, rt, blocks, width]."""
    *lead, n, row_bytes = stored.shape
    out = torch.empty(*lead, n, k, dtype=torch.uint8, device=stored.device)
    offsets: dict[int, int] = {}  # bytes of each row region's tiles consumed so far
    for r0, nr, rt, c0, nc, cb in _regions(n, k, col_block):
        tiles = stored[..., r0 : r0 + nr, :].reshape(*lead, nr // rt, rt * row_bytes)
        start, size = offsets.get(r0, 0), int(rt * nc * bytes_per_value)
        offsets[r0] = start + size
        region = decode(tiles[..., start : start + size], nr // rt, rt, nc // cb, cb)
        out[..., r0 : r0 + nr, c0 : c0 + nc] = region.reshape(*lead, nr, nc)
    return out


def lane_group(group_size: int) -> int:
    """The layout's group: groups of 128 are laid out as two of 64 (with one scale), so that a block of 16
    spans 1024 values and fills a K of 1024."""
    return min(group_size, 64)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Values in [0, 15], [..., N, K] any integer dtype (K a multiple of 64 and of ``group_size``) ->
    uint8 [..., N, K/2] in the int4 layout (module docstring)."""
    lead, lane = q.dim() - 2, lane_group(group_size)

    def encode(region: torch.Tensor) -> torch.Tensor:  # [..., T, rt, blocks, ng * lane]
        *dims, rt, blocks, width = region.shape
        # value 8c + 2j + t of lane group i, j = 2 jh + jl -> stored order [T, blocks, c, rt, i, t, jh, jl]
        v = region.reshape(*dims, rt, blocks, width // lane, lane // INT4_CHUNK, 2, 2, 2)
        v = v.permute(*range(lead + 1), lead + 2, lead + 4, lead + 1, lead + 3, lead + 7, lead + 5, lead + 6)
        return v[..., 0] | (v[..., 1] << 4)

    return _tile(q.to(torch.uint8), INT4_BLOCK_GROUPS * lane, encode).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 [..., N, K/2] in the int4 layout -> uint8 [..., N, K] values in [0, 15]."""
    lead, lane = packed.dim() - 2, lane_group(group_size)

    def decode(stored: torch.Tensor, tiles: int, rt: int, blocks: int, width: int) -> torch.Tensor:
        ng, chunks = width // lane, lane // INT4_CHUNK
        s = stored.reshape(*stored.shape[:-2], tiles, blocks, chunks, rt, ng, 2, 2)
        v = torch.stack((s & 0xF, s >> 4), dim=-1)  # [..., T, blocks, c, rt, i, t, jh, jl]
        return v.permute(*range(lead + 1), lead + 3, lead + 1, lead + 4, lead + 2, lead + 6, lead + 7, lead + 5)

    return _untile(packed, 2 * packed.shape[-1], INT4_BLOCK_GROUPS * lane, 0.5, decode)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., N, K] -> int8 [..., N, K] in the int8 layout: row tiles, each storing chunk after chunk of
    INT8_CHUNK values (the last chunk shorter), every row of the tile in turn."""
    return _tile(q, INT8_CHUNK, lambda region: region.transpose(-3, -2)).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """int8 [..., N, K] in the int8 layout -> int8 [..., N, K] in natural order."""

    def decode(stored: torch.Tensor, tiles: int, rt: int, chunks: int, width: int) -> torch.Tensor:
        return stored.reshape(*stored.shape[:-2], tiles, chunks, rt, width).transpose(-3, -2)

    return _untile(packed.view(torch.uint8), packed.shape[-1], INT8_CHUNK, 1, decode).view(torch.int8)


def _check_matrix(w: torch.Tensor, fmt: QuantFormat) -> None:
    if w.dim() < 2 or not w.dtype.is_floating_point:
        raise ValueError(f"expected a floating matrix [..., N, K], got {w.dtype} of shape {tuple(w.shape)}")
    if not fmt.supports(w.shape[-1]):
        raise ValueError(
            f"{fmt.name} needs K to be a multiple of {NIBBLE_RUN} and of the group size {fmt.group_size}, "
            f"got K = {w.shape[-1]}"
        )


def _check_finite(extremes: torch.Tensor) -> None:
    if not torch.isfinite(extremes).all():
        raise ValueError("cannot quantize weights that contain NaN or infinity")


def quantize_weight(w: torch.Tensor, fmt: QuantFormat, dequantized: torch.Tensor | None = None) -> QuantizedWeight:
    """Round a matrix [..., N, K] (any float dtype) to ``fmt`` (bits 8 or 4), nearest level per value.

    int8 scales map each row's largest magnitude to 127. Symmetric int4 maps the group's value of
    largest magnitude to -8 (its sign folded into the scale), so all 16 levels are usable; asymmetric
    int4 spans [min, max] of the group. Scales (and mins) are rounded to their storage dtype before
    the values are, so the stored levels are the nearest for the scales actually kept.

    ``dequantized``, a float tensor of w's shape (w itself allowed), receives ``.dequantize(its dtype)`` of the
    result in the same pass: a format emulated on a float model (fake quantization) and its low-bit weights
    made at once.
    """
    _check_matrix(w, fmt)
    if w.dim() == 3 and w[0].numel() <= _PIECE_VALUES < w.numel():
        # in pieces (_PIECE_VALUES)
        step = _PIECE_VALUES // w[0].numel()
        pieces = range(0, w.shape[0], step)
        outs = [None if dequantized is None else dequantized[first : first + step] for first in pieces]
        parts = [quantize_weight(w[first : first + step], fmt, out) for first, out in zip(pieces, outs, strict=True)]
        mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
        qweight, scales = torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts])
        return QuantizedWeight(fmt, qweight, scales, mins, w.shape[-1], {})
    q, scales, mins = _levels(w, fmt)
    if fmt.bits == 8:
        made = QuantizedWeight(fmt, pack_int8(q.to(torch.int8)), scales, None, w.shape[-1], {})
    else:
        made = QuantizedWeight(fmt, pack_int4(q.flatten(-2), fmt.group_size), scales, mins, w.shape[-1], {})
    if dequantized is not None:
        dequantized.copy_(_dequantize_levels(q, fmt, scales, mins))
    return made


def round_trip(w: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype) -> torch.Tensor:
    """``quantize_weight(w, fmt).dequantize(dtype)``, bit for bit, without packing: [..., N, K] in ``dtype``."""
    _check_matrix(w, fmt)
    if w.dim() == 3 and w[0].numel() <= _PIECE_VALUES < w.numel():
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
        step = _PIECE_VALUES // w[0].numel()
        for first in range(0, w.shape[0], step):  # in pieces (_PIECE_VALUES)
            out[first : first + step] = round_trip(w[first : first + step], fmt, dtype)
        return out
    q, scales, mins = _levels(w, fmt)
    return _dequantize_levels(q, fmt, scales, mins).to(dtype)


def _dequantize_levels(
    q: torch.Tensor, fmt: QuantFormat, scales: torch.Tensor, mins: torch.Tensor | None
) -> torch.Tensor:
    """``_levels``' levels (overwritten) as float32 values [..., N, K], as ``QuantizedWeight.dequantize`` computes
    them."""
    if fmt.bits == 8:
        return q.mul_(scales.float().unsqueeze(-1))
    if mins is None:
        return q.sub_(8.0).mul_(scales.float().unsqueeze(-1)).flatten(-2)
    return q.mul_(scales.float().unsqueeze(-1)).add_(mins.float().unsqueeze(-1)).flatten(-2)


def _levels(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``quantize_weight``'s rounding: (levels as float32 [..., N, K] for int8, [..., N, K/G, G] in [0, 15] for
    int4; scales; mins or None)."""
    if fmt.bits == 16:
        raise ValueError("16 bits is the unquantized model dtype; nothing to quantize")
    # A float32 copy rounded in place. Non-finite weights are caught on the per-row or per-group extremes,
    # which NaN and infinity reach, instead of by a pass over every value.
    w = w.detach().to(torch.float32, copy=True)
    if fmt.bits == 8:
        extreme = w.abs().amax(dim=-1)  # [..., N]
        _check_finite(extreme)
        scales = extreme / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        return w.div_(safe.unsqueeze(-1)).round_().clamp_(-127, 127), scales.contiguous(), None
    groups = w.unflatten(-1, (-1, fmt.group_size))  # [..., N, K/G, G]
    if fmt.symmetric:
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # signed
        _check_finite(extreme)
        scales = (extreme / -8.0).to(torch.float16)
        safe = torch.where(scales != 0, scales.float(), torch.ones_like(extreme))
        return groups.div_(safe.unsqueeze(-1)).round_().clamp_(-8, 7).add_(8), scales.contiguous(), None
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    _check_finite(high - low)
    scales = ((high - low) / 15.0).to(torch.float16)
    mins = low.to(torch.float16)
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(low))
    q = groups.sub_(mins.float().unsqueeze(-1)).div_(safe.unsqueeze(-1)).round_().clamp_(0, 15)
    return q, scales.contiguous(), mins.contiguous()


class ExpertMatrices:
    """One projection of E experts whose matrices [N, K] each have their own format (mixed precision).

    Args:
        matrices: E matrices [N, K], each a float tensor (all of one dtype) or a ``QuantizedWeight``;
            referenced, not copied.

    Raises:
        ValueError: the list is empty or the matrices differ in shape or float dtype.
    """

    def __init__(self, matrices: list[torch.Tensor | QuantizedWeight]) -> None:
        if not matrices:
            raise ValueError("ExpertMatrices needs at least one matrix")
        shapes = {tuple(m.shape) for m in matrices}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"expert matrices must all be [N, K] of one shape, got {sorted(shapes)}")
        dtypes = {m.dtype for m in matrices if isinstance(m, torch.Tensor)}
        if len(dtypes) > 1:
            raise ValueError(f"unquantized expert matrices must share one dtype, got {sorted(map(str, dtypes))}")
        self.matrices = list(matrices)
        self.float_dtype = next(iter(dtypes)) if dtypes else None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.matrices), *self.matrices[0].shape)

    @property
    def device(self) -> torch.device:
        return self.matrices[0].device

    @property
    def nbytes(self) -> int:
        return sum(weight_nbytes(m) for m in self.matrices)

    def __getitem__(self, index: int) -> torch.Tensor | QuantizedWeight:
        return self.matrices[index]


Weight = torch.Tensor | QuantizedWeight | ExpertMatrices


def weight_nbytes(w: Weight) -> int:
    """Bytes a weight holds (packed values and scales for low-bit ones)."""
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes


def matmul_transposed(a: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """a [M, K] @ w[N, K].T -> [M, N] in a's dtype, for a float or a low-bit matrix.

    An int8 matrix runs torch's weight-only int8 GEMM (``aten._weight_int8pack_mm``: int8 weights, per-row
    scales, float activations) on its rows put back in natural order; that reads 1 byte per weight where
    dequantizing reads 1 and writes 2 and 4, and on a CPU without AVX-512 it was 10-30x faster at 1-16 rows.
    An int4 matrix that keeps conversions runs torch's weight-only int4 GEMM on a copy in torch's layout
    made on first use (``_int4pack``; about 1.1x the int4 bytes again): 1 ms against 128 ms dequantized for
    a 2048 x 2048 matrix at one row on a CPU without AVX-512. Other low-bit matrices, and devices or dtypes
    the ops lack, are dequantized to a's dtype first. The scales are used in a's dtype (bf16 scales round as
    the dequantized bf16 weights do).
    """
    if isinstance(w, torch.Tensor):
        return a @ w.to(a.dtype).T
    if w.bits == 8 and _weight_only_matmul_runs(a, "_weight_int8pack_mm"):
        return torch.ops.aten._weight_int8pack_mm(a.contiguous(), unpack_int8(w.qweight), w.scales.to(a.dtype))
    if w.bits == 4 and w.conversions is not None and _int4_matmul_runs(a, w):
        packed, scales_and_zeros = _int4pack(w, a.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(a.contiguous(), packed, w.format.group_size, scales_and_zeros)
        return out[:, : w.shape[0]]
    return a @ w.dequantize(a.dtype).T


# Group sizes torch's weight-only int4 GEMM takes.
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


def _int4_matmul_runs(a: torch.Tensor, w: QuantizedWeight) -> bool:
    return (
        w.qweight.dim() == 2
        and w.format.group_size in INT4PACK_GROUP_SIZES
        and _weight_only_matmul_runs(a, "_weight_int4pack_mm_for_cpu")
    )


# Rows converted at a time to torch's int4 layout: a multiple of the op's row blocks (32 or 64 by the CPU) and of
# ROW_TILE, so that converted parts lie side by side exactly as one conversion would lay them. A whole
# 50k-row output head would need 0.8 GB of int32 values at once.
INT4PACK_ROWS = 256


def _int4pack(w: QuantizedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 matrix [N, K] in the layout of torch's weight-only int4 GEMM (``aten._weight_int4pack_mm_for_cpu``),
    kept in ``w.conversions``: values packed by torch (rows padded to a multiple of 16, as the op needs), made
    once, and per-group (scale, zero) [K/G, N', 2] in ``dtype``, made once per activation dtype, where the op
    computes ``(q - 8) * scale + zero``: zero 0 for symmetric groups, ``min + 8 scale`` else; padded rows
    have scale and zero 0. Values are converted ``INT4PACK_ROWS`` rows at a time into the kept tensor, so the
    conversion needs little memory beyond what it keeps."""
    n, k = w.shape
    rows = -(-n // 16) * 16
    packed = w.conversions.get("int4pack")
    if packed is None:
        packed = torch.empty(rows, k // 2, dtype=torch.uint8)
        for r0 in range(0, rows, INT4PACK_ROWS):
            r1 = min(r0 + INT4PACK_ROWS, rows)
            q = torch.full((r1 - r0, k), 8, dtype=torch.int32)  # padded rows: value 8, scale and zero 0
            if r0 < n:
                q[: min(r1, n) - r0] = unpack_int4(w.qweight[r0 : min(r1, n)], w.format.group_size)
            packed[r0:r1] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        w.conversions["int4pack"] = packed
    key = ("int4pack scales", dtype)
    scales_and_zeros = w.conversions.get(key)
    if scales_and_zeros is None:
        scales_and_zeros = torch.zeros(k // w.format.group_size, rows, 2, dtype=dtype)
        for r0 in range(0, n, INT4PACK_ROWS):  # in parts too: an output head's float scales take 13 MB each
            r1 = min(r0 + INT4PACK_ROWS, n)
            scales = w.scales[r0:r1].float()  # [r, K/G]
            scales_and_zeros[:, r0:r1, 0] = scales.T
            if w.mins is not None:
                scales_and_zeros[:, r0:r1, 1] = (w.mins[r0:r1].float() + 8 * scales).T
        w.conversions[key] = scales_and_zeros
    return packed, scales_and_zeros


def make_int4_layout(w: QuantizedWeight, dtype: torch.dtype) -> int:
    """Make now the torch-layout copies ``matmul_transposed`` would make on first use for an int4 matrix, or for
    each matrix of a stack [E, N, K], with activations in ``dtype`` (a server does this at load, so that no
    request waits for it). Returns the matrices converted; 0 for weights that keep no conversions or that
    torch's int4 GEMM does not take."""
    if w.bits != 4 or w.conversions is None or w.format.group_size not in INT4PACK_GROUP_SIZES:
        return 0
    if w.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return 0
    matrices = [w[e] for e in range(w.shape[0])] if w.qweight.dim() == 3 else [w]
    for m in matrices:
        _int4pack(m, dtype)
    return len(matrices)


def conversions_nbytes(w: QuantizedWeight, dtype: torch.dtype) -> int:
    """Bytes of the copies ``matmul_transposed`` keeps in ``w.conversions`` once it has run an int4 matrix (or
    each matrix of a stack) [..., N, K] with activations in ``dtype`` through torch's int4 GEMM (``_int4pack``);
    0 for formats it dequantizes instead."""
    *lead, n, k = w.shape
    return math.prod(lead) * int4pack_nbytes(w.format, n, k, dtype)


def int4pack_nbytes(fmt: QuantFormat, n: int, k: int, dtype: torch.dtype) -> int:
    """``conversions_nbytes`` of one matrix [n, k] in ``fmt``: packed values and per-group (scale, zero) of the
    rows padded to 16."""
    if fmt.bits != 4 or fmt.group_size not in INT4PACK_GROUP_SIZES:
        return 0
    rows = -(-n // 16) * 16
    return rows * k // 2 + k // fmt.group_size * rows * 2 * dtype.itemsize


def _weight_only_matmul_runs(a: torch.Tensor, op: str) -> bool:
    """Whether torch's weight-only low-bit GEMM ``aten.<op>`` takes activations a: CPU bf16/fp32 [M, K], not
    recorded by autograd (the ops have no backward)."""
    return (
        a.device.type == "cpu"
        and a.dtype in (torch.bfloat16, torch.float32)
        and a.dim() == 2
        and hasattr(torch.ops.aten, op)
        and not (torch.is_grad_enabled() and a.requires_grad)
    )


def dequantize_matrix(w: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """A matrix (or stack) as floats in ``dtype``; float tensors are cast (no copy when already ``dtype``)."""
    return w.to(dtype) if isinstance(w, torch.Tensor) else w.dequantize(dtype)
