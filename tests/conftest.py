"""Test-session settings: auto keeps its fixed rules unless a test opts into measured tuning, so results do not
depend on a tuning table a developer's earlier runs left in the user cache.

``pytest --without-native`` runs the test modules whose code has a pure-torch fallback with the native kernel
disabled (``MOERUN_DISABLE_NATIVE=1``), so that a host with AVX-512, where a plain run takes the native paths,
tests the fallback too (the README's test command runs both). Where the kernel does not load anyway, a plain
run already took the fallback everywhere, and ``--without-native`` runs nothing and passes.
"""

import os
from pathlib import Path

import pytest

os.environ["MOERUN_TUNING"] = "0"

# Modules whose tests run model or layer code that takes the native kernel where it loads and torch otherwise.
# Left out: the native kernel's own tests, pure-Python logic, and the timing-bound benchmark and tuning tests.
FALLBACK_MODULES = frozenset(
    {
        "test_eval", "test_generate", "test_hf_equivalence", "test_integration", "test_layer", "test_lean",
        "test_loader", "test_offload", "test_quant_formats", "test_quantized", "test_reference_model",
        "test_routing_stats", "test_fuzz_checkpoint", "test_families",
    }
)  # fmt: skip

_NATIVE_LOADS = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--without-native",
        action="store_true",
        help="run the tests of code with a pure-torch fallback with the native kernel disabled "
        "(MOERUN_DISABLE_NATIVE=1); runs nothing where the kernel does not load anyway",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--without-native"):
        return
    from moerun.kernels import native

    config.stash[_NATIVE_LOADS] = native.is_available()  # before disabling it
    os.environ["MOERUN_DISABLE_NATIVE"] = "1"  # also for the subprocesses tests start
    native._library.cache_clear()


def pytest_report_header(config: pytest.Config) -> str | None:
    if not config.getoption("--without-native"):
        return None
    if config.stash[_NATIVE_LOADS]:
        return f"native kernel disabled (MOERUN_DISABLE_NATIVE=1) for {len(FALLBACK_MODULES)} modules"
    return "the native kernel does not load on this host: the plain run already tested the fallback, nothing to do"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    is_test_module = collection_path.name.startswith("test_") and collection_path.suffix == ".py"
    if not config.getoption("--without-native") or not is_test_module:
        return None
    return not config.stash[_NATIVE_LOADS] or collection_path.stem not in FALLBACK_MODULES


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--without-native") and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
