"""Builds moerun's native CPU kernel where it can; all package metadata lives in pyproject.toml.

The kernel is optional. Where it cannot be built (no C++ compiler, a compiler without these flags or OpenMP,
a CPU architecture other than x86-64) or ``MOERUN_NATIVE_BUILD=0`` is set, the install goes on without it,
prints one line saying so, and moerun runs its pure-torch backends.
"""

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

COMPILE_FLAGS = [
    "-O3", "-std=c++17", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
    "-mavx512vnni", "-mfma", "-mf16c",
]  # fmt: skip
NOTICE = "moerun: the native kernel was not built ({}); moerun will use its pure-torch backends"


def _skip_reason() -> str | None:
    """Why the build is not even tried, or None."""
    if os.environ.get("MOERUN_NATIVE_BUILD", "1") == "0":
        return "MOERUN_NATIVE_BUILD=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is written for x86-64 with AVX-512, this is {platform.machine() or 'unknown'}"
    return None


class OptionalBuildExt(build_ext):
    """build_ext whose failure is a notice rather than a failed install."""

    def finalize_options(self) -> None:
        super().finalize_options()
        reason = _skip_reason()
        if reason is not None and self.extensions:
            print(NOTICE.format(reason), file=sys.stderr)
            self.extensions = []

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, BaseError, OSError) as e:
            lines = str(e).strip().splitlines()
            print(NOTICE.format(lines[0] if lines else type(e).__name__), file=sys.stderr)


# A plain C-ABI shared library (loaded with ctypes), so building it needs no torch headers.
setup(
    ext_modules=[
        Extension(
            "moerun._moe_cpu",
            sources=["src/moerun/kernels/csrc/moe_cpu.cpp"],
            extra_compile_args=COMPILE_FLAGS,
            extra_link_args=["-fopenmp"],
            language="c++",
            # Also lets setuptools skip copying the missing library into the source tree (editable installs).
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
