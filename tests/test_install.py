"""Installing moerun: the native kernel is optional (a build that cannot compile it still succeeds, says so in
one line, and gives a moerun that runs its pure-torch backends), and CI runs the tests without the kernel too.

The builds go to temporary directories: the project's environment and source tree are left as they are.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "moerun: the native kernel was not built"
# A compiler that is not there, and one that fails whatever it is given (unsupported flags, no OpenMP).
BROKEN_COMPILERS = {"missing": "/nonexistent/bin/c++", "failing": "false"}


def broken_compiler_env(compiler: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MOERUN_NATIVE_BUILD"}
    env.update({var: compiler for var in ("CC", "CXX", "LDSHARED", "LDCXXSHARED")}, **extra)
    return env


def build_ext(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib")]
    command += ["--build-temp", str(tmp_path / "temp")]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def built_kernels(directory: Path) -> list[Path]:
    return list(directory.rglob("_moe_cpu*")) if directory.exists() else []


@pytest.mark.parametrize("compiler", BROKEN_COMPILERS)
def test_build_without_a_working_compiler_succeeds_with_a_notice(tmp_path, compiler: str) -> None:
    result = build_ext(tmp_path, broken_compiler_env(BROKEN_COMPILERS[compiler]))
    assert result.returncode == 0, result.stderr
    assert sum(NOTICE in line for line in result.stderr.splitlines()) == 1, result.stderr
    assert built_kernels(tmp_path) == []


def test_native_build_can_be_switched_off(tmp_path) -> None:
    result = build_ext(tmp_path, broken_compiler_env("false", MOERUN_NATIVE_BUILD="0"))
    assert result.returncode == 0, result.stderr
    assert f"{NOTICE} (MOERUN_NATIVE_BUILD=0)" in result.stderr
    assert built_kernels(tmp_path) == []


def test_wheel_without_the_kernel_installs_and_runs_on_torch(tmp_path) -> None:
    """pip builds a wheel of a copy of the project with a broken compiler; installed on its own (with this
    environment's torch), moerun imports, reports no native kernel and its layer matches the reference."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    ignore = shutil.ignore_patterns("_moe_cpu*", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", project / "src", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir", "--no-input"]
    env = broken_compiler_env("/nonexistent/bin/c++")
    wheel = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(project)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr
    (built,) = (tmp_path / "dist").glob("moerun-*.whl")
    assert not [n for n in zipfile.ZipFile(built).namelist() if "_moe_cpu" in n and not n.endswith(".cpp")]
    site = tmp_path / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(built)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    check = """
import torch, moerun
from moerun.kernels import native
assert moerun.__file__.startswith(SITE), moerun.__file__
assert not native.is_available()
layer = moerun.MoELayer(64, 32, 8, moerun.RoutingConfig("softmax_topk", 2))
x = torch.randn(5, 64)
with torch.inference_mode():
    y = layer(x)
    layer.backend = "reference"
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
print("ok")
""".replace("SITE", repr(str(site)))
    env = {k: v for k, v in os.environ.items() if k != "MOERUN_DISABLE_NATIVE"} | {"PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_ci_runs_the_tests_with_and_without_the_native_kernel() -> None:
    """The README's test command runs the suite, then the tests with a fallback with the kernel disabled, and
    .ci/run runs exactly that command."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"Run the tests \(this is exactly what `\.ci/run` runs\):\n\n```bash\n(.*)\n```", readme)
    assert match is not None, "the README's test command moved"
    command = match.group(1)
    assert command.endswith(" && pytest && pytest --without-native"), command
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == command


def test_without_native_disables_the_kernel_or_passes_where_it_never_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MOERUN_DISABLE_NATIVE"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--without-native", "--collect-only", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    if "native kernel disabled (MOERUN_DISABLE_NATIVE=1)" in out:
        assert "<Module test_layer.py>" in out and "<Module test_sizes.py>" not in out
    else:
        assert "does not load on this host" in out and "<Module" not in out
