"""The roofline: a real (quick) measurement, its bound arithmetic, and its on-disk cache."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from moerun.perf import roofline as rl
from moerun.perf.roofline import Roofline, load_or_measure_roofline, measure_roofline

HAND_MADE = Roofline(
    threads=1, read_gbps=10.0, gemm_gflops={"bfloat16": 100.0, "float32": 50.0}, cpu="test cpu",
    torch_version="test", measured_at="2026-01-01T00:00:00+00:00",
)  # fmt: skip


@pytest.fixture
def fake_measure(monkeypatch):
    """Replaces the measurement with an instant one; the list it returns records (threads, quick) per call."""
    calls: list[tuple[int, bool]] = []

    def measure(threads: int, *, quick: bool) -> Roofline:
        calls.append((threads, quick))
        return replace(HAND_MADE, threads=threads, read_gbps=float(len(calls)))

    monkeypatch.setattr(rl, "measure_roofline", measure)
    return calls


def test_quick_measurement_is_positive_and_finite() -> None:
    before = torch.get_num_threads()
    r = measure_roofline(1, quick=True)
    assert torch.get_num_threads() == before
    assert r.threads == 1
    assert set(r.gemm_gflops) == {"bfloat16", "float32"}
    for value in [r.read_gbps, *r.gemm_gflops.values()]:
        assert math.isfinite(value) and value > 0
    assert r.cpu and r.torch_version == str(torch.__version__) and r.measured_at


def test_dict_round_trip_through_json() -> None:
    assert Roofline.from_dict(json.loads(json.dumps(HAND_MADE.to_dict()))) == HAND_MADE


def test_memory_bound() -> None:
    # 1 GB at 10 GB/s takes 0.1 s; 1 GFLOP at 100 GFLOP/s only 0.01 s.
    assert HAND_MADE.time_bound_s(1e9, 1e9, torch.bfloat16) == pytest.approx(0.1)
    assert HAND_MADE.fraction(0.2, 1e9, 1e9, torch.bfloat16) == pytest.approx(0.5)


def test_compute_bound_uses_the_dtype_peak() -> None:
    # 100 GFLOP: 1 s in bf16, 2 s in fp32; the 0.1 GB read takes only 0.01 s.
    assert HAND_MADE.time_bound_s(1e8, 1e11, torch.bfloat16) == pytest.approx(1.0)
    assert HAND_MADE.time_bound_s(1e8, 1e11, torch.float32) == pytest.approx(2.0)
    assert HAND_MADE.fraction(4.0, 1e8, 1e11, torch.float32) == pytest.approx(0.5)
    assert HAND_MADE.fraction(2.0, 1e8, 1e11, torch.float32) == pytest.approx(1.0)


def test_fastest_dtype_bounds_low_bit_arithmetic() -> None:
    assert HAND_MADE.fastest_dtype() == torch.bfloat16
    slow_bf16 = Roofline.from_dict({**HAND_MADE.to_dict(), "gemm_gflops": {"bfloat16": 17.0, "float32": 90.0}})
    assert slow_bf16.fastest_dtype() == torch.float32


def test_bound_rejects_unmeasured_dtype_and_nonpositive_time() -> None:
    with pytest.raises(ValueError, match="float16"):
        HAND_MADE.time_bound_s(1e9, 1e9, torch.float16)
    with pytest.raises(ValueError, match="seconds"):
        HAND_MADE.fraction(0.0, 1e9, 1e9, torch.bfloat16)


def test_cache_round_trip(tmp_path, fake_measure) -> None:
    path = tmp_path / "new dir" / "roofline.json"
    first = load_or_measure_roofline(1, cache_path=path)
    second = load_or_measure_roofline(1, cache_path=path)
    assert second == first
    assert fake_measure == [(1, False)]
    # no temp file left behind, only the lock file that serialises writers
    assert sorted(p.name for p in path.parent.iterdir()) == ["roofline.json", "roofline.json.lock"]

    load_or_measure_roofline(2, cache_path=path)  # another thread count is another entry
    assert load_or_measure_roofline(1, cache_path=path) == first
    assert fake_measure == [(1, False), (2, False)]

    assert load_or_measure_roofline(1, cache_path=path, remeasure=True) != first
    assert len(fake_measure) == 3


def test_quick_entry_does_not_stand_in_for_a_full_one(tmp_path, fake_measure) -> None:
    path = tmp_path / "roofline.json"
    load_or_measure_roofline(1, cache_path=path, quick=True)
    load_or_measure_roofline(1, cache_path=path)
    load_or_measure_roofline(1, cache_path=path, quick=True)  # the full measurement serves quick requests too
    assert fake_measure == [(1, True), (1, False)]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'{"format": 1, "entries": []}',
        b'{"format": 999, "entries": {}}',
    ],
)
def test_corrupt_cache_file_is_remeasured(tmp_path, fake_measure, content: bytes) -> None:
    path = tmp_path / "roofline.json"
    path.write_bytes(content)
    assert load_or_measure_roofline(1, cache_path=path) == replace(HAND_MADE, read_gbps=1.0)
    assert load_or_measure_roofline(1, cache_path=path) == replace(HAND_MADE, read_gbps=1.0)
    assert len(fake_measure) == 1


@pytest.mark.parametrize("field, value", [("read_gbps", -1.0), ("read_gbps", "fast"), ("gemm_gflops", [1.0])])
def test_cache_entry_with_bad_values_is_remeasured(tmp_path, fake_measure, field: str, value: object) -> None:
    path = tmp_path / "roofline.json"
    load_or_measure_roofline(1, cache_path=path)
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    entry["roofline"][field] = value
    path.write_text(json.dumps(data))
    load_or_measure_roofline(1, cache_path=path)
    assert len(fake_measure) == 2


def test_unwritable_cache_still_returns_the_measurement(tmp_path, fake_measure) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not cache"):
        r = load_or_measure_roofline(1, cache_path=blocker / "roofline.json")
    assert r == replace(HAND_MADE, read_gbps=1.0)


def test_default_cache_path_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MOERUN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert rl.default_cache_path() == tmp_path / "home" / ".cache" / "moerun" / "roofline.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rl.default_cache_path() == tmp_path / "xdg" / "moerun" / "roofline.json"
    monkeypatch.setenv("MOERUN_CACHE_DIR", str(tmp_path / "mine"))
    assert rl.default_cache_path() == tmp_path / "mine" / "roofline.json"


def test_zero_threads_is_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="threads"):
        measure_roofline(0, quick=True)
    with pytest.raises(ValueError, match="threads"):
        load_or_measure_roofline(0, cache_path=tmp_path / "roofline.json")
    with pytest.raises(ValueError, match="threads"):
        replace(HAND_MADE, threads=0)


def test_entry_stored_by_another_process_while_measuring_is_kept(tmp_path, monkeypatch) -> None:
    """Two processes measuring at once: the one that stores last keeps the other's entry (no lost update)."""
    path = tmp_path / "roofline.json"

    def measure(threads: int, *, quick: bool) -> Roofline:
        if threads == 1:  # meanwhile another process measures 2 threads and stores its entry
            load_or_measure_roofline(2, cache_path=path)
        return replace(HAND_MADE, threads=threads)

    monkeypatch.setattr(rl, "measure_roofline", measure)
    load_or_measure_roofline(1, cache_path=path)
    assert len(json.loads(path.read_text())["entries"]) == 2
    assert (tmp_path / "roofline.json.lock").exists()
