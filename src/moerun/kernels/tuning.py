"""Kernel choice by measurement: a table of measured times per case, cached per host.

A *case* is one kind of work at one size: the routed experts of a layer (``experts``: gate/up, activation
and down for one group of rows) or one dense projection (``linear``), in one weight format, at one matrix
shape, for a bucket of rows (rows per expert for ``experts``, rows of x for ``linear``) and a thread count.
For each case the table holds the median milliseconds of every implementation that was measured (per group
for ``experts``, per call for ``linear``). ``auto`` picks the fastest applicable implementation from it and
falls back to fixed rules where nothing was measured; the performance model (``moerun.perf.predict``) reads
the same times.

The table lives in ``tuning.json`` in moerun's cache directory, one entry per host fingerprint (CPU model,
a digest of its flags, usable cores, moerun and torch versions, whether the native kernel loads), so a
table measured on one machine is never used on another. Writes are whole-or-nothing and serialised with
a lock, so two processes tuning at once both keep their cases.

Shape legend: E experts, H hidden, I expert intermediate, N output features, K input features.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..files import cache_directory, file_written_whole, locked
from ..quant.formats import ExpertMatrices, QuantizedWeight, Weight

# Bumped whenever the measurement method changes, so that tables taken the old way are measured again.
TABLE_FORMAT = 1
KINDS = ("experts", "linear")
# Implementations of the routed experts: the native kernel with the gated activation fused into the
# gate/up projection or not, one torch GEMM per group (plain or oneDNN-packed weights), torch's grouped_mm.
EXPERT_IMPLS = ("native-fused", "native-unfused", "torch", "torch-packed", "torch-grouped_mm")
# Implementations of a dense projection: the native kernel (one group of one "expert"), or torch's GEMM
# (after dequantizing a low-bit matrix).
LINEAR_IMPLS = ("native", "torch")
# Rows are bucketed by powers of two; a case is measured at the bucket's row count.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Set to 0 to ignore measured tables (auto then uses its fixed rules).
DISABLE_ENV = "MOERUN_TUNING"


def rows_bucket(rows: float) -> int:
    """The bucket of ``rows`` (> 0): the nearest power of two in log scale, within ``ROW_BUCKETS``."""
    if not rows > 0:
        return ROW_BUCKETS[0]
    exponent = round(math.log2(rows))
    return min(max(2**exponent, ROW_BUCKETS[0]), ROW_BUCKETS[-1])


def format_key(weight: Weight) -> str | None:
    """The format part of a case key: ``bfloat16``/``float32`` for a float stack or matrix, the
    ``QuantFormat`` name (``int8``, ``int4-g32``, ...) for a low-bit one; None for experts of mixed formats."""
    if isinstance(weight, ExpertMatrices):
        keys = {format_key(m) for m in weight.matrices}
        return keys.pop() if len(keys) == 1 else None
    if isinstance(weight, QuantizedWeight):
        return weight.format.name
    return str(weight.dtype).removeprefix("torch.")


def case_key(kind: str, fmt: str, shape: tuple[int, int], rows: int, threads: int) -> str:
    """The table key of a case; ``shape`` is (H, I) for ``experts`` and (N, K) for ``linear``."""
    if kind not in KINDS:
        raise ValueError(f"unknown case kind {kind!r}; expected one of {', '.join(KINDS)}")
    return f"{kind}|{fmt}|{shape[0]}x{shape[1]}|r{rows_bucket(rows)}|t{threads}"


def parse_case_key(key: str) -> tuple[str, str, tuple[int, int], int, int]:
    """(kind, format, shape, rows bucket, threads) of a key made by :func:`case_key`; ValueError if malformed."""
    try:
        kind, fmt, shape, rows, threads = key.split("|")
        a, b = shape.split("x")
        if kind not in KINDS or rows[0] != "r" or threads[0] != "t":
            raise ValueError
        return kind, fmt, (int(a), int(b)), int(rows[1:]), int(threads[1:])
    except ValueError:
        raise ValueError(f"malformed tuning case key {key!r}") from None


def _cpu_info() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = frozenset(line.split(":", 1)[1].split())
    return model or platform.processor() or platform.machine() or "unknown", flags


@dataclass(frozen=True)
class Fingerprint:
    """What a measured table is valid for; any difference means the table is measured again."""

    cpu: str
    flags: str  # sha256 prefix of the sorted CPU flags
    cores: int
    moerun_version: str
    torch_version: str
    native: bool

    def key(self) -> str:
        return (
            f"{self.cpu} | flags {self.flags} | {self.cores} cores | moerun {self.moerun_version} | "
            f"torch {self.torch_version} | native {'yes' if self.native else 'no'}"
        )


def host_fingerprint() -> Fingerprint:
    """This host's fingerprint (reads /proc/cpuinfo; cheap)."""
    from ..version import __version__
    from . import native

    model, flags = _cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return Fingerprint(model, digest, cores, __version__, str(torch.__version__), native.is_available())


def default_table_path() -> Path:
    """``tuning.json`` in moerun's cache directory (``$MOERUN_CACHE_DIR``, else ``$XDG_CACHE_HOME/moerun``,
    else ``~/.cache/moerun``)."""
    return cache_directory() / "tuning.json"


class TuningTable:
    """Measured milliseconds per case and implementation, for one host.

    Attributes:
        cases: case key -> {implementation: median ms}.
    """

    def __init__(self, cases: dict[str, dict[str, float]] | None = None) -> None:
        self.cases: dict[str, dict[str, float]] = {}
        for key, times in (cases or {}).items():
            self.add(key, times)

    def add(self, key: str, times: dict[str, float]) -> None:
        """Record (or replace) a case's times; ValueError for a malformed key, implementation or time."""
        kind = parse_case_key(key)[0]
        known = EXPERT_IMPLS if kind == "experts" else LINEAR_IMPLS
        clean = {}
        for impl, ms in times.items():
            if impl not in known:
                raise ValueError(f"unknown {kind} implementation {impl!r} in case {key!r}")
            if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0):
                raise ValueError(f"case {key!r}: time of {impl} must be positive and finite, got {ms!r}")
            clean[impl] = float(ms)
        if not clean:
            raise ValueError(f"case {key!r} has no measured implementation")
        self.cases[key] = clean

    def __len__(self) -> int:
        return len(self.cases)

    def __contains__(self, key: str) -> bool:
        return key in self.cases

    def best(self, key: str, allowed: Iterable[str]) -> str | None:
        """The fastest measured implementation of the case among ``allowed``; None if none was measured."""
        times = self.cases.get(key)
        if not times:
            return None
        candidates = [(ms, impl) for impl, ms in times.items() if impl in set(allowed)]
        return min(candidates)[1] if candidates else None

    def time_ms(
        self, kind: str, fmt: str, shape: tuple[int, int], rows: float, threads: int, allowed: Iterable[str]
    ) -> float | None:
        """Milliseconds of the fastest allowed implementation at ``rows`` (any positive number), interpolated
        log-log between the two nearest measured buckets (extrapolated linearly in rows past the largest);
        None when no bucket of the case was measured."""
        allowed = set(allowed)
        points = []
        for bucket in ROW_BUCKETS:
            times = self.cases.get(case_key(kind, fmt, shape, bucket, threads), {})
            best = min((ms for impl, ms in times.items() if impl in allowed), default=None)
            if best is not None:
                points.append((bucket, best))
        if not points:
            return None
        if rows <= points[0][0]:
            return points[0][1]
        if rows >= points[-1][0]:  # beyond the largest bucket time grows in proportion to the rows
            return points[-1][1] * rows / points[-1][0]
        for (r0, t0), (r1, t1) in zip(points, points[1:], strict=False):
            if r0 <= rows <= r1:
                f = math.log(rows / r0) / math.log(r1 / r0)
                return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
        return points[-1][1]  # unreachable: the points are sorted and rows lies within them

    def to_dict(self) -> dict:
        return {"cases": self.cases}


@dataclass
class _TableFile:
    """The cache file's content: host fingerprint key -> (fingerprint, cases)."""

    hosts: dict[str, dict]

    @classmethod
    def read(cls, path: Path) -> _TableFile:
        """The file's hosts; none (with a warning, if the file exists) when it cannot be used."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls({})
        except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 decoding errors
            warnings.warn(f"ignoring the tuning cache {path}: {e}", stacklevel=3)
            return cls({})
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("hosts"), dict):
            warnings.warn(f"ignoring the tuning cache {path}: not a format-{TABLE_FORMAT} tuning table", stacklevel=3)
            return cls({})
        return cls(data["hosts"])

    def table(self, fingerprint: Fingerprint, path: Path) -> TuningTable:
        entry = self.hosts.get(fingerprint.key())
        if entry is None:
            return TuningTable()
        try:
            return TuningTable(entry["cases"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            warnings.warn(f"ignoring this host's entry in the tuning cache {path}: {e}", stacklevel=3)
            return TuningTable()


def load_table(path: Path | None = None, fingerprint: Fingerprint | None = None) -> TuningTable:
    """The table measured on this host (empty when none was); a corrupt file is ignored with a warning."""
    path = path if path is not None else default_table_path()
    fingerprint = fingerprint if fingerprint is not None else host_fingerprint()
    return _TableFile.read(path).table(fingerprint, path)


def _update_host(
    path: Path | None, fingerprint: Fingerprint | None, update: Callable[[dict, TuningTable], None]
) -> None:
    """Read-modify-write of this host's entry under the lock; the file is written whole or not at all."""
    path = path if path is not None else default_table_path()
    fingerprint = fingerprint if fingerprint is not None else host_fingerprint()
    with locked(path):
        content = _TableFile.read(path)
        table = content.table(fingerprint, path)
        entry = content.hosts.get(fingerprint.key())
        overheads = entry.get("overheads") if isinstance(entry, dict) else None
        entry = {"fingerprint": asdict(fingerprint), "overheads": overheads if isinstance(overheads, dict) else {}}
        update(entry, table)
        entry["cases"] = table.cases
        content.hosts[fingerprint.key()] = entry
        with file_written_whole(path) as f:
            json.dump({"format": TABLE_FORMAT, "hosts": content.hosts}, f, indent=1, sort_keys=True)
    active_table.cache_clear()


def save_cases(
    cases: dict[str, dict[str, float]], path: Path | None = None, fingerprint: Fingerprint | None = None
) -> None:
    """Merge measured cases into this host's table on disk: locked, and written whole or not at all."""

    def update(entry: dict, table: TuningTable) -> None:
        for key, times in cases.items():
            table.add(key, times)

    _update_host(path, fingerprint, update)


def save_overheads(
    threads: int, overheads: dict[str, float], path: Path | None = None, fingerprint: Fingerprint | None = None
) -> None:
    """Store the per-call overheads measured at ``threads`` threads (``moerun.perf.predict``) beside the cases."""

    def update(entry: dict, table: TuningTable) -> None:
        entry["overheads"][f"t{threads}"] = dict(overheads)

    _update_host(path, fingerprint, update)


def load_overheads(threads: int, path: Path | None = None, fingerprint: Fingerprint | None = None) -> dict | None:
    """The overheads stored for ``threads`` threads on this host, or None."""
    path = path if path is not None else default_table_path()
    fingerprint = fingerprint if fingerprint is not None else host_fingerprint()
    entry = _TableFile.read(path).hosts.get(fingerprint.key())
    if not isinstance(entry, dict) or not isinstance(entry.get("overheads"), dict):
        return None
    found = entry["overheads"].get(f"t{threads}")
    return found if isinstance(found, dict) else None


@functools.cache
def active_table() -> TuningTable | None:
    """The table ``auto`` consults: this host's, read once per process; None when empty or disabled
    (``MOERUN_TUNING=0``). Saving cases through :func:`save_cases` makes the next call read it again."""
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    table = load_table()
    return table if len(table) else None
