"""This machine's roofline, measured rather than assumed: memory read bandwidth and GEMM peak per dtype.

Data-sheet peaks overstate what torch reaches on a given host (VMs, noisy neighbours, power limits, the
torch build), so moerun judges its speed against what torch itself achieves here with the same thread
count. A measurement takes seconds, so it is cached per (CPU, threads, torch version).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import cache_directory, file_written_whole, locked

GEMM_DTYPES = (torch.bfloat16, torch.float32)

# Bumped whenever the measurement method changes, so that numbers taken the old way are re-measured.
_CACHE_FORMAT = 1

# (tokens, in, out) of F.linear: tokens routed to one expert times a typical MoE hidden/intermediate size,
# plus a square GEMM large enough to hide the per-call overhead the small ones still pay.
_GEMM_SHAPES = ((128, 2048, 2048), (256, 2048, 2048), (512, 2048, 2048), (2048, 2048, 2048))
_QUICK_GEMM_SHAPES = ((256, 2048, 2048), (512, 2048, 2048))

# The L3 is tens of MB on current server CPUs; a buffer far larger keeps cache hits out of the figure.
_READ_BYTES = 1 << 30
_QUICK_READ_BYTES = 256 << 20


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_positive_finite(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")


@dataclass(frozen=True)
class Roofline:
    """Measured limits of this host for a given thread count.

    Attributes:
        threads: CPU threads torch used for the measurement.
        read_gbps: Memory read bandwidth in GB/s (1e9 bytes per second).
        gemm_gflops: Best measured GEMM rate in GFLOP/s per dtype name, e.g.
            ``{"bfloat16": ..., "float32": ...}``.
        cpu: CPU model name.
        torch_version: Version of the torch that was measured.
        measured_at: When the measurement was taken, ISO 8601.
    """

    threads: int
    read_gbps: float
    gemm_gflops: dict[str, float]
    cpu: str
    torch_version: str
    measured_at: str

    def __post_init__(self) -> None:
        # A zero or NaN here would make every later fraction meaningless, so refuse it up front (this is
        # also what rejects a cache file with nonsense numbers in it).
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        _check_positive_finite("read_gbps", self.read_gbps)
        for name, gflops in self.gemm_gflops.items():
            _check_positive_finite(f"gemm_gflops[{name!r}]", gflops)

    def to_dict(self) -> dict:
        """The roofline as a JSON-serialisable dict; :meth:`from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Roofline:
        """Builds a roofline from :meth:`to_dict`'s output.

        Raises:
            KeyError: A field is missing.
            TypeError, ValueError, AttributeError: A field has the wrong type or an invalid value.
        """
        return cls(
            threads=int(d["threads"]),
            read_gbps=float(d["read_gbps"]),
            gemm_gflops={str(k): float(v) for k, v in d["gemm_gflops"].items()},
            cpu=str(d["cpu"]),
            torch_version=str(d["torch_version"]),
            measured_at=str(d["measured_at"]),
        )

    def time_bound_s(self, bytes_read: float, flops: float, dtype: torch.dtype) -> float:
        """The roofline lower bound on time: max(bytes / bandwidth, flops / GEMM peak for dtype).

        Args:
            bytes_read: Bytes the work has to read from memory.
            flops: Floating-point operations the work performs.
            dtype: Dtype the arithmetic runs in; selects the GEMM peak.

        Raises:
            ValueError: No GEMM peak was measured for ``dtype``.
        """
        name = _dtype_name(dtype)
        if name not in self.gemm_gflops:
            raise ValueError(f"no GEMM peak measured for {name}; have {', '.join(self.gemm_gflops)}")
        return max(bytes_read / (self.read_gbps * 1e9), flops / (self.gemm_gflops[name] * 1e9))

    def fastest_dtype(self) -> torch.dtype:
        """The dtype of the highest measured GEMM peak: the arithmetic bound of weight-only low-bit GEMMs,
        which widen their weights into whichever float arithmetic the host runs fastest (fp32 on a CPU
        without AVX-512 BF16, where bf16 GEMMs are several times slower)."""
        return getattr(torch, max(self.gemm_gflops, key=self.gemm_gflops.get))

    def bound(self, bytes_read: float, flops: float, dtype: torch.dtype) -> str:
        """Which bound of :meth:`time_bound_s` applies: ``"bandwidth"`` or ``"compute"``."""
        name = _dtype_name(dtype)
        if name not in self.gemm_gflops:
            raise ValueError(f"no GEMM peak measured for {name}; have {', '.join(self.gemm_gflops)}")
        memory_s = bytes_read / (self.read_gbps * 1e9)
        return "bandwidth" if memory_s >= flops / (self.gemm_gflops[name] * 1e9) else "compute"

    def fraction(self, seconds: float, bytes_read: float, flops: float, dtype: torch.dtype) -> float:
        """How close a measured time is to the roofline: time_bound_s / seconds (1.0 = at the roofline).

        Raises:
            ValueError: ``seconds`` is not positive, or no GEMM peak was measured for ``dtype``.
        """
        if not seconds > 0:
            raise ValueError(f"seconds must be positive, got {seconds}")
        return self.time_bound_s(bytes_read, flops, dtype) / seconds


def _resolve_threads(threads: int | None) -> int:
    if threads is None:
        # The affinity mask, unlike cpu_count, excludes cores a container or taskset keeps us off.
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _median_seconds(fn: Callable[[], object], min_reps: int, budget_s: float, max_reps: int = 50) -> float:
    """Median time of fn over at least min_reps calls, more while budget_s lasts, after one warm-up call."""
    fn()  # the first call pays for oneDNN's kernel JIT and first-touch page faults
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure_read_gbps(nbytes: int, reps: int) -> float:
    # Ones rather than torch.empty: every page must be backed before timing starts, and the values must be
    # neither denormals nor NaNs, which some reductions handle slowly.
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    # Which reduction streams fastest depends on the torch build and the CPU, so several are tried and
    # the best kept. int8 sum is left out: it accumulates in int64 and is compute bound.
    reads = [
        buf.sum,
        buf.amax,
        buf.view(torch.bfloat16).sum,
        buf.view(torch.int8).amax,
        buf.view(torch.int64).amax,
    ]
    for read in reads:
        read()
    times: list[list[float]] = [[] for _ in reads]
    # Taking turns, so that a noisy neighbour slows every candidate alike rather than whichever ran then.
    for _ in range(reps):
        for read, ts in zip(reads, times, strict=True):
            t0 = time.perf_counter()
            read()
            ts.append(time.perf_counter() - t0)
    return max(nbytes / statistics.median(ts) for ts in times) / 1e9


def _measure_gemm_gflops(
    dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...], min_reps: int, budget_s: float
) -> float:
    generator = torch.Generator().manual_seed(0)
    best = 0.0
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=generator).to(dtype)
        w = torch.randn(n, k, generator=generator).to(dtype)
        seconds = _median_seconds(lambda x=x, w=w: F.linear(x, w), min_reps, budget_s)
        best = max(best, 2 * m * k * n / seconds / 1e9)
    return best


def measure_roofline(threads: int | None = None, *, quick: bool = False) -> Roofline:
    """Measures this host's memory read bandwidth and GEMM peaks with torch; takes ~10 s (quick: ~2 s).

    Args:
        threads: torch threads to measure with; default all CPUs this process may run on. torch's thread
            count is restored afterwards.
        quick: Smaller buffer, fewer shapes and repetitions: less accurate, for tests and smoke runs.

    Raises:
        ValueError: ``threads`` is less than 1.
    """
    threads = _resolve_threads(threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            if quick:
                read_gbps = _measure_read_gbps(_QUICK_READ_BYTES, reps=3)
                gemm = {_dtype_name(dt): _measure_gemm_gflops(dt, _QUICK_GEMM_SHAPES, 3, 0.05) for dt in GEMM_DTYPES}
            else:
                read_gbps = _measure_read_gbps(_READ_BYTES, reps=7)
                gemm = {_dtype_name(dt): _measure_gemm_gflops(dt, _GEMM_SHAPES, 5, 0.5) for dt in GEMM_DTYPES}
    finally:
        torch.set_num_threads(previous_threads)
    return Roofline(
        threads=threads,
        read_gbps=read_gbps,
        gemm_gflops=gemm,
        cpu=_cpu_model(),
        torch_version=str(torch.__version__),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def default_cache_path() -> Path:
    """Where the roofline cache lives unless told otherwise: ``roofline.json`` in moerun's cache directory
    (``$MOERUN_CACHE_DIR``, else ``$XDG_CACHE_HOME/moerun``, else ``~/.cache/moerun``)."""
    return cache_directory() / "roofline.json"


def _cache_key(cpu: str, threads: int, torch_version: str) -> str:
    return f"{cpu} | {threads} threads | torch {torch_version}"


def _read_cache_entries(path: Path) -> dict:
    """The cache file's entries; none when it is missing, unreadable, not JSON or of another format."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError covers both JSONDecodeError and UnicodeDecodeError
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _cached_roofline(entry: object, quick: bool) -> Roofline | None:
    """The entry's roofline if valid and good enough: a quick measurement never stands in for a full one."""
    if not isinstance(entry, dict) or (entry.get("quick") is not False and not quick):
        return None
    try:
        return Roofline.from_dict(entry["roofline"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _store_cache_entry(path: Path, key: str, entry: dict) -> None:
    """Add or replace one entry: the file is read again and rewritten under the lock, so that an entry another
    process stored while this one measured is kept."""
    with locked(path):
        entries = _read_cache_entries(path)
        entries[key] = entry
        # Whole or not at all, so that a crash or a concurrent reader never sees half a file.
        with file_written_whole(path) as f:
            json.dump({"format": _CACHE_FORMAT, "entries": entries}, f, indent=2)


def load_or_measure_roofline(
    threads: int | None = None,
    *,
    cache_path: Path | None = None,
    remeasure: bool = False,
    quick: bool = False,
) -> Roofline:
    """This host's roofline from the cache, measuring it (and caching the result) when it is not there.

    Entries are keyed by (CPU model, threads, torch version). A corrupt cache file is ignored and replaced;
    when the cache cannot be written, a warning is issued and the measurement is still returned.

    Args:
        threads: torch threads; default all CPUs this process may run on.
        cache_path: JSON cache file; default :func:`default_cache_path`.
        remeasure: Measure even if the cache has an entry, and replace it.
        quick: Accept (and, if measuring, take) a quick measurement; see :func:`measure_roofline`.

    Raises:
        ValueError: ``threads`` is less than 1.
    """
    threads = _resolve_threads(threads)
    path = cache_path if cache_path is not None else default_cache_path()
    key = _cache_key(_cpu_model(), threads, str(torch.__version__))
    if not remeasure:
        cached = _cached_roofline(_read_cache_entries(path).get(key), quick)
        if cached is not None:
            return cached
    roofline = measure_roofline(threads, quick=quick)
    try:
        _store_cache_entry(path, key, {"quick": quick, "roofline": roofline.to_dict()})
    except OSError as e:
        warnings.warn(f"could not cache the roofline in {path}: {e}", stacklevel=2)
    return roofline
