"""ctypes binding of the native AVX-512 grouped expert kernel (``csrc/moe_cpu.cpp``): ``grouped_gemv`` for
one projection, ``grouped_glu`` for the gate/up projection fused with the gated activation, ``glu`` for the
activation alone, and for decode ``route_token`` (a token's softmax top-k routing), ``moe_token`` (a token
through a whole MoE layer's routed experts in one call), ``rms_norm`` and ``attention_inputs`` (a decode
position's q/k norms, RoPE and KV-cache writes).

Weights are a float tensor [E, N, K], a ``QuantizedWeight`` stack [E, N, K] (int8 / int4, read packed),
or ``ExpertMatrices`` (each expert its own format). The kernel sees them as a table of E matrix
descriptors, cached per weight.

The library is built by the package install (``setup.py``) and is a plain C ABI over raw data
pointers, so it needs no torch headers. It is used only when it loads and the CPU has AVX-512 BF16 and VNNI;
``MOERUN_DISABLE_NATIVE=1`` turns it off. Callers fall back to torch when ``is_available()`` is False.

Shape legend: S sorted rows, K input features, N output features, E experts, G groups, T tokens.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import torch

from ..quant.formats import ExpertMatrices, QuantizedWeight, Weight
from .activation import GluSpec

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Matrix formats (the Format enum in moe_cpu.cpp); plain float matrices use their dtype code.
_FORMAT_CODES = {8: 2, 4: 3}
_REQUIRED_CPU_FLAGS = frozenset(
    {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni", "fma", "f16c"}
)
# Status codes returned by moerun_grouped_gemv (the enum in moe_cpu.cpp).
_STATUS_MESSAGES = {
    1: "unsupported dtype",
    2: "group_experts has an expert id outside [0, E)",
    3: "a group's rows [start, start + count) fall outside the rows of x",
    4: "scatter_index has a destination row outside the rows of out",
    5: "out has fewer rows than x",
    6: "out of memory for the staging buffers",
    7: "unsupported fused activation",
    8: "the gate/up weight must have an even number of rows",
    9: "a weight matrix's format does not fit (plain weights must share x's dtype; int4 needs K % 64 == 0)",
    10: "router logits contain NaN or infinite values",
}
# Gated activations the kernel fuses into the gate/up projection (the Glu enum in moe_cpu.cpp).
_GLU_CODES = {"silu": 0, "gelu_pytorch_tanh": 1, "swiglu_clamped": 2}


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MOERUN_DISABLE_NATIVE") == "1":
        return None
    # The library is compiled for AVX-512 BF16 and VNNI throughout; loading it elsewhere could fault later.
    if not _REQUIRED_CPU_FLAGS <= _cpu_flags():
        return None
    package_dir = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = package_dir / f"_moe_cpu{suffix}"
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
            fn = lib.moerun_grouped_gemv
            lib.moerun_moe_token  # noqa: B018 - an older build without it is unusable
        except (OSError, AttributeError):
            continue
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [
            ptr, i64, i64,  # x, x rows, x row stride
            ptr, i64, i64, i64,  # matrix table, E, N, K
            ptr, ptr, ptr, i64,  # group experts, starts, counts, G
            ptr,  # bias
            ptr, i64, i64,  # out, out rows, out row stride
            ptr, ptr,  # scatter index, scatter weight
            ctypes.c_int, ctypes.c_int,  # dtype code, threads
        ]  # fmt: skip
        fn.restype = ctypes.c_int
        glu = lib.moerun_grouped_glu
        glu.argtypes = [
            ptr, i64, i64,  # x, x rows, x row stride
            ptr, i64, i64, i64,  # matrix table, E, 2I, K
            ptr, ptr, ptr, i64,  # group experts, starts, counts, G
            ptr,  # bias
            ctypes.c_int, ctypes.c_float, ctypes.c_float,  # activation code, alpha, limit
            ptr, i64,  # act, act row stride
            ctypes.c_int, ctypes.c_int,  # dtype code, threads
        ]  # fmt: skip
        glu.restype = ctypes.c_int
        f32 = ctypes.c_float
        lib.moerun_glu.argtypes = [ptr, i64, i64, i64, ctypes.c_int, f32, f32, ptr, i64, ctypes.c_int]
        lib.moerun_glu.restype = ctypes.c_int
        routing = [ctypes.c_int, ctypes.c_int, f32]  # top_k, renormalize, scaling
        lib.moerun_route_token.argtypes = [ptr, i64, ptr, i64, *routing, ptr, ptr, ctypes.c_int, ctypes.c_int]
        lib.moerun_route_token.restype = ctypes.c_int
        lib.moerun_moe_token.argtypes = [
            ptr, i64, ptr, i64, *routing,  # x, K, router, E, routing
            ptr, i64, ptr, ptr, ptr,  # gate/up table, 2I, gate/up bias, down table, down bias
            ctypes.c_int, f32, f32,  # activation code, alpha, limit
            ptr, ptr, ptr,  # out, ids, weights
            ctypes.c_int, ctypes.c_int,  # dtype code, threads
        ]  # fmt: skip
        lib.moerun_moe_token.restype = ctypes.c_int
        lib.moerun_token_experts.argtypes = [
            ptr, i64, ptr, ptr, ctypes.c_int, i64,  # x, K, ids, weights, k, E
            ptr, i64, ptr, ptr, ptr,  # gate/up table, 2I, gate/up bias, down table, down bias
            ctypes.c_int, f32, f32, ptr,  # activation code, alpha, limit, out
            ctypes.c_int, ctypes.c_int,  # dtype code, threads
        ]  # fmt: skip
        lib.moerun_token_experts.restype = ctypes.c_int
        cint = ctypes.c_int
        lib.moerun_rms_norm.argtypes = [ptr, i64, i64, i64, cint, ptr, cint, f32, ptr, i64, cint]
        lib.moerun_rms_norm.restype = cint
        lib.moerun_attention_inputs.argtypes = [
            ptr, i64, i64, i64,  # qkv, Hq, Hkv, D
            cint, ptr, ptr, cint, f32, f32,  # norm mode, q/k norm weights, their dtype, eps, clip
            ptr, ptr,  # cos, signed sin
            ptr, ptr, i64, ptr, i64, i64,  # q out, keys, key stride, values, value stride, value step
            cint,  # cache dtype
        ]  # fmt: skip
        lib.moerun_attention_inputs.restype = cint
        lib.moerun_softmax.argtypes = [ptr, i64, i64, i64, f32, ptr, i64, cint]
        lib.moerun_softmax.restype = cint
        return lib
    return None


def is_available() -> bool:
    """Whether the native kernel is built, loadable and supported by this CPU (never raises)."""
    try:
        return _library() is not None
    except Exception:
        return False


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _index_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype == torch.int64 and t.dim() == 1 and t.is_cpu and t.is_contiguous():
        return t  # the common case, checked first: this runs on every decode step
    if t.dim() != 1 or not t.is_cpu or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer CPU tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t.to(torch.int64).contiguous()


def _check_status(status: int, function: str) -> None:
    """Raise ValueError naming the problem if a native call returned an error status."""
    if status != 0:
        raise ValueError(f"native {function}: {_STATUS_MESSAGES.get(status, f'status {status}')}")


def _library_or_raise() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise ValueError("the native kernel is not available (not built, disabled, or no AVX-512 BF16 and VNNI)")
    return lib


def _matrix_row(m: torch.Tensor | QuantizedWeight) -> list[int]:
    """The kernel's descriptor of one [N, K] matrix: pointer, scales, mins, format | group size << 8."""
    if isinstance(m, torch.Tensor):
        return [m.data_ptr(), 0, 0, _DTYPE_CODES[m.dtype]]
    mins = 0 if m.mins is None else m.mins.data_ptr()
    return [m.qweight.data_ptr(), m.scales.data_ptr(), mins, _FORMAT_CODES[m.bits] | m.format.group_size << 8]


def _table_key(weight: torch.Tensor | QuantizedWeight) -> tuple:
    """What a stack's descriptor table depends on: its storage addresses, shape and format."""
    if isinstance(weight, torch.Tensor):
        return ("t", weight.data_ptr(), tuple(weight.shape), weight.dtype)
    mins = None if weight.mins is None else weight.mins.data_ptr()
    return ("q", weight.qweight.data_ptr(), weight.scales.data_ptr(), mins, weight.shape, weight.format)


# Descriptor tables by _table_key: the same storage always gives the same table, so a stale entry (memory
# freed and reused for a weight of the same shape and format) is still correct.
_TABLES: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
_TABLE_CACHE_SIZE = 1024


def matrix_table(weight: Weight) -> torch.Tensor:
    """The [E, 4] int64 table of matrix descriptors the kernel reads for a weight of E experts.

    ``ExpertMatrices`` tables are cached on the object (they never change); stacks by storage address.
    """
    if isinstance(weight, ExpertMatrices):
        table = getattr(weight, "_native_table", None)
        if table is None:
            table = torch.tensor([_matrix_row(m) for m in weight.matrices], dtype=torch.int64)
            weight._native_table = table
        return table
    key = _table_key(weight)
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    if isinstance(weight, torch.Tensor):
        num_experts = weight.shape[0]
        table = torch.zeros(num_experts, 4, dtype=torch.int64)
        step = weight.stride(0) * weight.element_size()
        table[:, 0] = torch.arange(num_experts, dtype=torch.int64) * step + weight.data_ptr()
        table[:, 3] = _DTYPE_CODES[weight.dtype]
    else:
        table = torch.tensor([_matrix_row(weight[e]) for e in range(weight.shape[0])], dtype=torch.int64)
    _TABLES[key] = table
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


def _check_weight(x: torch.Tensor, weight: Weight) -> None:
    """Validate a weight of E experts [E, N, K] against x [S, K]."""
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"x and weight must both be bfloat16 or both float32 (or the weight quantized), got {x.dtype}")
    if x.dim() != 2 or len(weight.shape) != 3:
        raise ValueError(f"x must be [S, K] and weight [E, N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[2]:
        raise ValueError(f"K mismatch: x has {x.shape[1]} features, weight rows have {weight.shape[2]}")
    if not x.is_cpu or weight.device.type != "cpu":
        raise ValueError("the native kernel runs on CPU tensors only")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError("x must have unit stride along K (x.stride(1) == 1)")
    if isinstance(weight, torch.Tensor):
        if weight.dtype != x.dtype:
            raise ValueError(f"x and weight must both be bfloat16 or both float32, got {x.dtype} and {weight.dtype}")
        if not weight.is_contiguous():
            raise ValueError("weight must be contiguous")
        return
    matrices = weight.matrices if isinstance(weight, ExpertMatrices) else [weight]
    for m in matrices:
        if isinstance(m, torch.Tensor):
            if m.dtype != x.dtype or not m.is_contiguous():
                raise ValueError(f"unquantized expert matrices must be contiguous {x.dtype} like x, got {m.dtype}")
        elif not all(t.is_contiguous() for t in m.tensors().values()):
            raise ValueError("quantized weight tensors must be contiguous")


def _check_groups_and_bias(
    x: torch.Tensor,
    weight: Weight,
    group_experts: torch.Tensor,
    group_starts: torch.Tensor,
    group_counts: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate x, weight, the group tensors and bias; returns the group tensors and bias as the kernel reads them."""
    _check_weight(x, weight)
    num_experts, n_out, _ = weight.shape
    experts = _index_tensor(group_experts, "group_experts")
    starts = _index_tensor(group_starts, "group_starts")
    counts = _index_tensor(group_counts, "group_counts")
    if not experts.shape[0] == starts.shape[0] == counts.shape[0]:
        raise ValueError(
            f"group_experts, group_starts and group_counts must have the same length, got "
            f"{experts.shape[0]}, {starts.shape[0]} and {counts.shape[0]}"
        )
    return experts, starts, counts, _float_bias(bias, (num_experts, n_out))


def grouped_gemv(
    x: torch.Tensor,
    weight: Weight,
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
    ``out[s, n] = r``; with scatter, ``out[scatter_index[s], n] += scatter_weight[s] * r``, where
    several rows may share a destination row.

    Each selected expert's matrix is read from memory once per call (per 256 rows of a group), split by
    output rows across threads: decode-sized groups stream weight rows, groups of 8 rows or more run
    register tiles over packed rows. Low-bit weights are read packed by the decode path (against x quantized
    to int8 per block: 64 values for int8 weights, min(group size, 64) for int4) and dequantized a tile at a
    time, to x's dtype, by the prefill path.

    Args:
        x: [S, K] bfloat16 or float32, rows sorted by group, unit stride along K (any row stride).
        weight: [E, N, K]: a contiguous tensor of x's dtype, a ``QuantizedWeight`` or ``ExpertMatrices``.
        group_experts: [G] int64 expert id of each group.
        group_starts: [G] int64 first row of x of each group.
        group_counts: [G] int64 number of rows of each group.
        bias: [E, N] added to every result, or None. Pass float32 to skip a per-call conversion.
        out: without scatter, an optional [S, N] float32 result with unit stride along N; rows no group
            covers keep their values (zeros when ``out`` is None). With scatter, the required [T, N]
            float32 accumulator (added to, not cleared).
        scatter_index: [S] int64 destination row in ``out`` of each x row, or None. Only rows that a
            group covers are read (and range-checked).
        scatter_weight: [S] float32 multiplier of each x row's result; required with scatter_index.
        num_threads: threads to use (default ``torch.get_num_threads()``); small problems use fewer.

    Returns:
        ``out``: [S, N] float32, or the [T, N] accumulator with scatter.

    Raises:
        ValueError: the kernel is unavailable, or the arguments do not fit together (dtype, device,
            shape, layout, or an expert / row / destination index out of range).
    """
    lib = _library_or_raise()
    experts, starts, counts, bias = _check_groups_and_bias(x, weight, group_experts, group_starts, group_counts, bias)
    num_rows = x.shape[0]
    num_experts, n_out, k = weight.shape
    if (scatter_index is None) != (scatter_weight is None):
        raise ValueError("scatter_index and scatter_weight must be given together")
    if scatter_index is not None:
        if out is None:
            raise ValueError("scatter needs an out accumulator of shape [T, N]")
        scatter_index = _index_tensor(scatter_index, "scatter_index")
        if scatter_index.shape[0] != num_rows or tuple(scatter_weight.shape) != (num_rows,):
            raise ValueError(
                f"scatter_index and scatter_weight must be [{num_rows}], got "
                f"{tuple(scatter_index.shape)} and {tuple(scatter_weight.shape)}"
            )
        if not scatter_weight.is_cpu:
            raise ValueError("scatter_weight must be a CPU tensor")
        if scatter_weight.dtype != torch.float32 or not scatter_weight.is_contiguous():
            scatter_weight = scatter_weight.to(torch.float32).contiguous()
    elif out is None:
        out = torch.zeros(num_rows, n_out, dtype=torch.float32)
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[1] != n_out or not out.is_cpu:
        raise ValueError(f"out must be a float32 CPU tensor [rows, {n_out}], got {out.dtype} {tuple(out.shape)}")
    if out.stride(1) != 1 and n_out > 1:
        raise ValueError("out must have unit stride along N (out.stride(1) == 1)")
    if scatter_index is None and out.shape[0] != num_rows:
        raise ValueError(f"without scatter, out must have one row per x row ({num_rows}), got {out.shape[0]}")
    status = lib.moerun_grouped_gemv(
        _ptr(x), num_rows, x.stride(0),
        _ptr(matrix_table(weight)), num_experts, n_out, k,
        _ptr(experts), _ptr(starts), _ptr(counts), experts.shape[0],
        _ptr(bias),
        _ptr(out), out.shape[0], out.stride(0),
        _ptr(scatter_index), _ptr(scatter_weight),
        _DTYPE_CODES[x.dtype], num_threads or torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "grouped_gemv")
    return out


def fuses_glu(glu: GluSpec) -> bool:
    """Whether ``grouped_glu`` can fuse this activation (all but erf-GELU)."""
    return glu.activation in _GLU_CODES


def grouped_glu(
    x: torch.Tensor,
    weight: Weight,
    group_experts: torch.Tensor,
    group_starts: torch.Tensor,
    group_counts: torch.Tensor,
    *,
    glu: GluSpec,
    bias: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """The gate/up projection and the gated activation in one native call, for prefill-sized groups.

    For each group g with expert e and rows s: ``act[s] = glu(x[s] @ weight[e].T + bias[e])`` with the
    gate in the first I outputs and the up projection in the last I, computed in float32 and rounded
    once to x's dtype. Rows no group covers are left uninitialised.

    Args:
        x: [S, K] bfloat16 or float32, rows sorted by group, unit stride along K.
        weight: [E, 2I, K], as for ``grouped_gemv``.
        group_experts, group_starts, group_counts: [G] int64, as for ``grouped_gemv``.
        glu: the gated activation; ``fuses_glu(glu)`` must hold.
        bias: [E, 2I] or None.
        num_threads: threads to use (default ``torch.get_num_threads()``).

    Returns:
        act: [S, I] in x's dtype.

    Raises:
        ValueError: the kernel is unavailable, the activation cannot be fused, or the arguments do not
            fit together.
    """
    lib = _library_or_raise()
    if not fuses_glu(glu):
        raise ValueError(f"the native kernel cannot fuse activation {glu.activation!r}; use apply_glu")
    experts, starts, counts, bias = _check_groups_and_bias(x, weight, group_experts, group_starts, group_counts, bias)
    num_experts, two_i, k = weight.shape
    act = torch.empty(x.shape[0], two_i // 2, dtype=x.dtype)
    status = lib.moerun_grouped_glu(
        _ptr(x), x.shape[0], x.stride(0),
        _ptr(matrix_table(weight)), num_experts, two_i, k,
        _ptr(experts), _ptr(starts), _ptr(counts), experts.shape[0],
        _ptr(bias),
        _GLU_CODES[glu.activation], glu.alpha, glu.limit,
        _ptr(act), act.stride(0),
        _DTYPE_CODES[x.dtype], num_threads or torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "grouped_glu")
    return act


def glu(h: torch.Tensor, spec: GluSpec, dtype: torch.dtype) -> torch.Tensor:
    """The gated activation of float32 gate/up rows with the fused kernel's arithmetic (``fuses_glu(spec)``).

    Args:
        h: [S, 2I] float32, gate columns then up columns, unit stride along the columns.
        spec: the activation.
        dtype: bfloat16 or float32, the result's dtype.

    Returns:
        [S, I] in ``dtype``.
    """
    lib = _library_or_raise()
    if not fuses_glu(spec):
        raise ValueError(f"the native kernel cannot compute activation {spec.activation!r}; use apply_glu")
    if h.dtype != torch.float32 or h.dim() != 2 or not h.is_cpu or (h.stride(1) != 1 and h.shape[1] > 1):
        raise ValueError(f"h must be a float32 CPU tensor [S, 2I] with unit column stride, got {tuple(h.shape)}")
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
    act = torch.empty(h.shape[0], h.shape[1] // 2, dtype=dtype)
    status = lib.moerun_glu(
        _ptr(h), h.shape[0], h.shape[1], h.stride(0), _GLU_CODES[spec.activation], spec.alpha, spec.limit,
        _ptr(act), act.stride(0), _DTYPE_CODES[dtype],
    )  # fmt: skip
    _check_status(status, "glu")
    return act


def _check_token_row(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPE_CODES or x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous() or not x.is_cpu:
        raise ValueError(f"x must be one contiguous bfloat16 or float32 CPU row [1, K], got {x.dtype} {tuple(x.shape)}")


def _check_token(x: torch.Tensor, router: torch.Tensor, top_k: int) -> None:
    _check_token_row(x)
    if router.dtype != x.dtype or router.dim() != 2 or router.shape[1] != x.shape[1] or not router.is_contiguous():
        raise ValueError(
            f"the router weight must be a contiguous [E, {x.shape[1]}] {x.dtype} tensor, got {router.dtype} "
            f"{tuple(router.shape)}"
        )
    if not 1 <= top_k <= router.shape[0]:
        raise ValueError(f"top_k must be between 1 and the {router.shape[0]} experts, got {top_k}")


def route_token(
    x: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    renormalize: bool = False,
    scaling: float = 1.0,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_topk routing of one token (``route_topk_softmax`` of its router logits), in one native call.

    The logits are rounded to x's dtype, as a linear layer in that dtype returns them, and the experts are
    chosen as ``torch.topk`` chooses them, equal logits included.

    Args:
        x: [1, K] bfloat16 or float32.
        router: [E, K] router weight of x's dtype.
        top_k: experts per token.
        renormalize: divide the selected probabilities by their sum.
        scaling: multiplier of the weights.
        num_threads: threads to use (default ``torch.get_num_threads()``).

    Returns:
        weights [1, k] float32 and ids [1, k] int64, highest weight first.

    Raises:
        ValueError: the kernel is unavailable, the arguments do not fit, or a logit is not finite.
    """
    lib = _library_or_raise()
    _check_token(x, router, top_k)
    weights = torch.empty(1, top_k, dtype=torch.float32)
    ids = torch.empty(1, top_k, dtype=torch.int64)
    status = lib.moerun_route_token(
        _ptr(x), x.shape[1], _ptr(router), router.shape[0], top_k, int(renormalize), scaling,
        _ptr(ids), _ptr(weights), _DTYPE_CODES[x.dtype], num_threads or torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "route_token")
    return weights, ids


def _check_token_experts(x: torch.Tensor, gate_up: Weight, down: Weight, glu: GluSpec) -> tuple[int, int, int]:
    """Validate one token's expert weights; returns (E, 2I, H)."""
    if not fuses_glu(glu):
        raise ValueError(f"the native kernel cannot compute activation {glu.activation!r}")
    _check_weight(x, gate_up)
    num_experts, two_i, hidden = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit")
    _check_weight(x.new_empty(1, two_i // 2), down)
    return num_experts, two_i, hidden


def token_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: Weight,
    down: Weight,
    glu: GluSpec,
    *,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """One token's routed experts for a given routing in one native call: what ``moe_token`` computes after
    routing, and bit for bit what ``experts_native`` computes on the one-token plan.

    Args:
        x: [1, H] bfloat16 or float32, contiguous.
        ids: [k] int64 expert ids.
        weights: [k] float32 router weights.
        gate_up, down, glu, gate_up_bias, down_bias, num_threads: as for ``moe_token``.

    Returns:
        y [1, H] in x's dtype.
    """
    lib = _library_or_raise()
    _check_token_row(x)
    num_experts, two_i, hidden = _check_token_experts(x, gate_up, down, glu)
    ids = _index_tensor(ids.flatten(), "ids")
    weights = weights.flatten().to(torch.float32).contiguous()
    if weights.shape != ids.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must have one entry per expert")
    gate_up_bias = _float_bias(gate_up_bias, (num_experts, two_i))  # held: see moe_token
    down_bias = _float_bias(down_bias, (num_experts, hidden))
    y = torch.empty_like(x)
    status = lib.moerun_token_experts(
        _ptr(x), hidden, _ptr(ids), _ptr(weights), ids.shape[0], num_experts,
        _ptr(matrix_table(gate_up)), two_i, _ptr(gate_up_bias), _ptr(matrix_table(down)), _ptr(down_bias),
        _GLU_CODES[glu.activation], glu.alpha, glu.limit, _ptr(y),
        _DTYPE_CODES[x.dtype], num_threads or torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "token_experts")
    return y


def _float_bias(bias: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """A bias [E, N] as the kernel reads it (float32, contiguous; a copy only if needed), or None."""
    if bias is None:
        return None
    if tuple(bias.shape) != shape or not bias.is_cpu:
        raise ValueError(f"bias must be a CPU tensor of shape {shape}, got {tuple(bias.shape)}")
    return bias.to(torch.float32).contiguous()


def moe_token(
    x: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    gate_up: Weight,
    down: Weight,
    glu: GluSpec,
    *,
    renormalize: bool = False,
    scaling: float = 1.0,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token through a softmax_topk MoE layer's routed experts in one native call (decode).

    Equal to ``route_token`` followed by the native experts on the one-token plan (gate/up projection,
    ``glu``, down projection combined with the router weights), bit for bit, without the ~25 small torch
    operations between them.

    Args:
        x: [1, H] bfloat16 or float32.
        router: [E, H] router weight of x's dtype.
        top_k: experts per token.
        gate_up: [E, 2I, H] expert weights, as for ``grouped_gemv``.
        down: [E, H, I].
        glu: the gated activation; ``fuses_glu(glu)`` must hold.
        renormalize, scaling: as for ``route_token``.
        gate_up_bias: [E, 2I] or None.
        down_bias: [E, H] or None.
        num_threads: threads to use (default ``torch.get_num_threads()``).

    Returns:
        y [1, H] in x's dtype, weights [1, k] float32 and ids [1, k] int64 (highest weight first).

    Raises:
        ValueError: the kernel is unavailable, or the arguments do not fit together.
    """
    lib = _library_or_raise()
    _check_token(x, router, top_k)
    num_experts, two_i, hidden = _check_token_experts(x, gate_up, down, glu)
    if num_experts != router.shape[0]:
        raise ValueError(f"router {tuple(router.shape)} and gate_up {tuple(gate_up.shape)} do not fit")
    # float32 copies held here: a temporary made inside the call's arguments would be freed before it runs
    gate_up_bias = _float_bias(gate_up_bias, (num_experts, two_i))
    down_bias = _float_bias(down_bias, (num_experts, hidden))
    y = torch.empty_like(x)
    weights = torch.empty(1, top_k, dtype=torch.float32)
    ids = torch.empty(1, top_k, dtype=torch.int64)
    status = lib.moerun_moe_token(
        _ptr(x), hidden, _ptr(router), num_experts, top_k, int(renormalize), scaling,
        _ptr(matrix_table(gate_up)), two_i, _ptr(gate_up_bias), _ptr(matrix_table(down)), _ptr(down_bias),
        _GLU_CODES[glu.activation], glu.alpha, glu.limit,
        _ptr(y), _ptr(ids), _ptr(weights),
        _DTYPE_CODES[x.dtype], num_threads or torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "moe_token")
    return y, weights, ids


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm, ``weight * F.rms_norm(x.float(), eps).to(x.dtype)``, in one native call (decode).

    Args:
        x: [T, N] bfloat16 or float32, unit stride along N.
        weight: [N] bfloat16 or float32, contiguous.
        eps: the epsilon.
        out: [T, N] of the promoted dtype of x and weight, unit stride along N.

    Returns:
        out.
    """
    lib = _library_or_raise()
    if x.dim() != 2 or out.shape != x.shape or weight.shape != x.shape[1:] or not weight.is_contiguous():
        raise ValueError(f"rms_norm needs x and out [T, N] and weight [N], got {tuple(x.shape)}, {tuple(weight.shape)}")
    if out.dtype != torch.promote_types(x.dtype, weight.dtype) or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("out must have x and weight's promoted dtype, and x and out unit stride along N")
    status = lib.moerun_rms_norm(
        _ptr(x), x.shape[0], x.shape[1], x.stride(0), _DTYPE_CODES[x.dtype], _ptr(weight), _DTYPE_CODES[weight.dtype],
        eps, _ptr(out), out.stride(0), _DTYPE_CODES[out.dtype],
    )  # fmt: skip
    _check_status(status, "rms_norm")
    return out


ATTENTION_NORMS = {None: 0, "all_heads": 1, "per_head": 2}


def attention_inputs(
    qkv: torch.Tensor,
    heads: tuple[int, int, int],
    norm: str | None,
    norm_weights: tuple[torch.Tensor | None, torch.Tensor | None],
    eps: float,
    clip: float | None,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    q_out: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """One decode position's attention inputs from its q|k|v projections, in one native call.

    q and k are RMS-normed (``norm``: None, ``all_heads`` or ``per_head``) with ``norm_weights``, q, k and v
    clamped to +-clip (unless None), RoPE applied to q and k (``x cos + rotate_half(x) signed_sin``), all in
    float32; then q is written to ``q_out`` and k and v into the cache, in the cache's dtype.

    Args:
        qkv: [1, (Hq + 2 Hkv) D] float32, contiguous; overwritten.
        heads: (Hq, Hkv, D).
        norm: the q/k normalisation.
        norm_weights: q's and k's norm weights ([Hq D] and [Hkv D], or [D] each per head), or Nones.
        eps, clip: the norm's epsilon and the clamp bound.
        cos, signed_sin: [D] float32 at this position.
        q_out: [Hq, D] contiguous, of the cache dtype.
        keys: [Hkv, D] the position's key rows (unit stride along D), of the cache dtype.
        values: [Hkv, D] the position's value columns (any strides).
    """
    lib = _library_or_raise()
    hq, hkv, d = heads
    if qkv.dtype != torch.float32 or not qkv.is_contiguous() or qkv.numel() != (hq + 2 * hkv) * d:
        raise ValueError(f"qkv must be a contiguous float32 [1, {(hq + 2 * hkv) * d}], got {tuple(qkv.shape)}")
    if not (q_out.dtype == keys.dtype == values.dtype) or q_out.shape != (hq, d) or keys.shape != values.shape:
        raise ValueError("q_out, keys and values must share the cache dtype, with shapes [Hq, D] and [Hkv, D]")
    if keys.stride(1) != 1 or not q_out.is_contiguous() or cos.shape != (d,) or signed_sin.shape != (d,):
        raise ValueError("q_out must be contiguous, keys have unit stride along D, and cos and sin be [D]")
    q_norm, k_norm = norm_weights
    status = lib.moerun_attention_inputs(
        _ptr(qkv), hq, hkv, d,
        ATTENTION_NORMS[norm], _ptr(q_norm), _ptr(k_norm), _DTYPE_CODES[q_norm.dtype] if norm else 0, eps, clip or 0.0,
        _ptr(cos), _ptr(signed_sin),
        _ptr(q_out), _ptr(keys), keys.stride(0), _ptr(values), values.stride(0), values.stride(1),
        _DTYPE_CODES[q_out.dtype],
    )  # fmt: skip
    _check_status(status, "attention_inputs")


def softmax(scores: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(scores * scale, dim=-1)`` into ``out`` (rounded once to its dtype), in one native call.

    Args:
        scores: [R, N] float32, unit stride along N.
        scale: multiplier of the scores, > 0.
        out: [R, N] bfloat16 or float32, unit stride along N.

    Returns:
        out.
    """
    lib = _library_or_raise()
    if scores.dtype != torch.float32 or scores.dim() != 2 or out.shape != scores.shape or out.dtype not in _DTYPE_CODES:
        raise ValueError(f"softmax needs float32 scores and a bf16/fp32 out of one shape, got {tuple(scores.shape)}")
    if scores.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("scores and out must have unit stride along N")
    if not scale > 0:  # the kernel shifts by scale times the row's largest score
        raise ValueError(f"scale must be positive, got {scale}")
    status = lib.moerun_softmax(
        _ptr(scores), scores.shape[0], scores.shape[1], scores.stride(0), scale, _ptr(out), out.stride(0),
        _DTYPE_CODES[out.dtype],
    )  # fmt: skip
    _check_status(status, "softmax")
    return out
