"""Dense projections over float or low-bit weights: ``linear(x, weight, bias)``.

A low-bit matrix runs on the native kernel as a single group of one "expert" (packed reads for one or a
few rows, dequantized register tiles for many), or is dequantized for torch's GEMM: whichever was measured
faster on this host for the case (``tuning``), the native kernel where nothing was measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.formats import QuantizedWeight, matmul_transposed
from . import native, tuning

_ZERO = torch.zeros(1, dtype=torch.int64)


def as_stack(weight: QuantizedWeight) -> QuantizedWeight:
    """A matrix [N, K] as a stack of one [1, N, K] (views)."""
    mins = None if weight.mins is None else weight.mins[None]
    return QuantizedWeight(weight.format, weight.qweight[None], weight.scales[None], mins, weight.in_features)


def native_is_faster(weight: QuantizedWeight, rows: int) -> bool:
    """Whether the native kernel runs ``rows`` rows against this low-bit matrix faster than dequantize +
    torch's GEMM on this host (True where that was not measured)."""
    table = tuning.active_table()
    if table is None:
        return True
    key = tuning.case_key("linear", weight.format.name, tuple(weight.shape), rows, torch.get_num_threads())
    return table.best(key, tuning.LINEAR_IMPLS) in (None, "native")


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias [N]) -> [..., N] in x's dtype."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if (
        rows.device.type == "cpu"
        and rows.dtype in (torch.bfloat16, torch.float32)
        and native.is_available()
        and native_is_faster(weight, rows.shape[0])
    ):
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        out = native.grouped_gemv(
            rows, as_stack(weight), _ZERO, _ZERO, torch.tensor([rows.shape[0]]),
            bias=None if bias is None else bias[None],
        )  # fmt: skip
        return out.to(x.dtype).view(*x.shape[:-1], -1)
    out = matmul_transposed(rows, weight)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.view(*x.shape[:-1], -1)
