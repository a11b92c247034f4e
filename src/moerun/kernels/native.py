"""ctypes binding of the native AVX-512 grouped GEMV kernel (``csrc/moe_cpu.cpp``).

The library is built by the package install (``setup.py``). It is used only when it loads and the CPU
has AVX-512 BF16; ``MOERUN_DISABLE_NATIVE=1`` turns it off. Everything else falls back to torch.

Shape legend: S sorted rows, K input features, N output features, E experts, G groups, T tokens.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.machinery
import os
from pathlib import Path

import torch

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MOERUN_DISABLE_NATIVE") == "1":
        return None
    if not set(_REQUIRED_CPU_FLAGS) <= _cpu_flags():
        return None
    package_dir = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in glob.glob(str(package_dir / f"_moe_cpu{suffix}")):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            fn = lib.moerun_grouped_gemv
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            # x, x_stride, w, n, k, experts, starts, counts, groups, bias, out, out_stride, index, weight, dtype, nt
            fn.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr] + [ctypes.c_int] * 2
            fn.restype = ctypes.c_int
            return lib
    return None


def is_available() -> bool:
    """Whether the native kernel is built, loadable and supported by this CPU (never raises)."""
    return _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def grouped_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_experts: torch.Tensor,
    group_starts: torch.Tensor,
    group_counts: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scatter_index: torch.Tensor | None = None,
    scatter_weight: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Per-group products of x rows with one expert's weight matrix, in one native call.

    For each group g with expert e and rows s in [start, start + count):
    ``r[s, n] = x[s] . weight[e, n] (+ bias[e, n])``, accumulated in float32. Without scatter,
    ``out[s, n] = r``; with scatter, ``out[scatter_index[s], n] += scatter_weight[s] * r``.

    Args:
        x: [S, K] bf16 or fp32, rows sorted by group, unit stride along K.
        weight: [E, N, K] contiguous, same dtype as x.
        group_experts: [G] int64 expert of each group.
        group_starts: [G] int64 first row of each group.
        group_counts: [G] int64 rows of each group (>= 1).
        bias: [E, N] added to every result, or None.
        out: without scatter an optional [S, N] float32 result tensor; with scatter the required
            [T, N] float32 accumulator.
        scatter_index: [S] int64 destination row of each x row, or None.
        scatter_weight: [S] float32 multiplier of each x row's result (required with scatter_index).
        num_threads: OpenMP threads (default ``torch.get_num_threads()``).

    Returns:
        ``out`` (float32).

    Raises:
        ValueError: the kernel is unavailable, or the arguments do not fit together.
    """
    lib = _library()
    if lib is None:
        raise ValueError("the native kernel is not available (not built, or the CPU lacks AVX-512 BF16)")
    if x.dtype not in _DTYPE_CODES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must both be bfloat16 or float32, got {x.dtype} and {weight.dtype}")
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"x [S, K] and weight [E, N, K] do not match: {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("the native kernel runs on CPU tensors only")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("x rows and weight must be contiguous")
    num_experts, n_rows, _ = weight.shape
    groups = [t.contiguous().long() for t in (group_experts, group_starts, group_counts)]
    if len({t.shape[0] for t in groups}) != 1:
        raise ValueError("group_experts, group_starts and group_counts must have the same length")
    if bias is not None:
        if bias.shape != (num_experts, n_rows):
            raise ValueError(f"bias must be {(num_experts, n_rows)}, got {tuple(bias.shape)}")
        bias = bias.float().contiguous()
    if scatter_index is not None:
        if out is None or scatter_weight is None:
            raise ValueError("scatter needs both scatter_weight and an out accumulator")
        if scatter_index.shape != (x.shape[0],) or scatter_weight.shape != (x.shape[0],):
            raise ValueError(f"scatter_index and scatter_weight must be [{x.shape[0]}]")
        scatter_index = scatter_index.contiguous().long()
        scatter_weight = scatter_weight.contiguous().float()
    elif out is None:
        out = torch.empty(x.shape[0], n_rows, dtype=torch.float32)
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[1] != n_rows or out.stride(1) != 1:
        raise ValueError(f"out must be float32 [rows, {n_rows}] with contiguous rows")
    if scatter_index is None and out.shape[0] != x.shape[0]:
        raise ValueError(f"out must have {x.shape[0]} rows without scatter, got {out.shape[0]}")
    status = lib.moerun_grouped_gemv(
        _ptr(x), x.stride(0), _ptr(weight), n_rows, weight.shape[2],
        *(_ptr(t) for t in groups), groups[0].shape[0],
        _ptr(bias), _ptr(out), out.stride(0), _ptr(scatter_index), _ptr(scatter_weight),
        _DTYPE_CODES[x.dtype], num_threads or torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"native kernel failed with status {status}")
    return out
