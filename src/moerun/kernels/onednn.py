"""Expert weights repacked once into oneDNN's blocked layout, for the prefill GEMMs.

oneDNN re-lays-out the weight matrix on every plain ``torch.mm`` call; with the few dozen rows an
expert sees in prefill that repacking is a large share of the GEMM. Packing once ahead of time
removes it (measured +10-25% GFLOP/s at 16-128 rows on AVX-512 BF16). The packed copy is extra
memory the size of the expert weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# The batch-size hint oneDNN packs for; packed weights stay valid (and exact) for any row count.
_PACK_ROWS_HINT = 64
_PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


@functools.cache
def is_available(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can pack linear weights of ``dtype`` for oneDNN (never raises).

    Packing and applying a tiny matrix, once per dtype, tells: which CPU features a dtype needs is up to
    the torch build (torch 2.x packs bf16 only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT, and refuses otherwise).
    """
    if dtype not in _PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), _PACK_ROWS_HINT)
            packed_linear(torch.zeros(1, 16, dtype=dtype), packed, None)
    except RuntimeError:
        return False
    return True


@dataclass(frozen=True)
class PackedExperts:
    """Per-expert packed gate/up and down weights (opaque oneDNN tensors)."""

    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]


def pack_experts(gate_up: torch.Tensor, down: torch.Tensor) -> PackedExperts:
    """Pack each expert's matrices. gate_up: [E, 2I, H], down: [E, H, I], bf16 or fp32 on CPU.

    Raises:
        ValueError: other dtypes or devices, or a dtype this torch build and CPU cannot pack (``is_available``).
    """
    if gate_up.dtype not in _PACKABLE_DTYPES or gate_up.device.type != "cpu":
        raise ValueError(f"only CPU bf16/fp32 expert weights can be packed, got {gate_up.dtype} on {gate_up.device}")
    if not is_available(gate_up.dtype):
        raise ValueError(
            f"oneDNN cannot pack {gate_up.dtype} weights with this torch build on this CPU (torch's oneDNN packs "
            "bf16 only on CPUs with AVX-512 BW/VL/DQ or AVX-NE-CONVERT); run without prepacking"
        )
    reorder = torch.ops.mkldnn._reorder_linear_weight
    with torch.no_grad():
        return PackedExperts(
            [reorder(w.contiguous(), _PACK_ROWS_HINT) for w in gate_up],
            [reorder(w.contiguous(), _PACK_ROWS_HINT) for w in down],
        )


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [M, K] @ packed [N, K].T (+ bias [N]) -> [M, N], x's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
