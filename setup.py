"""Builds moerun's native CPU kernel; all package metadata lives in pyproject.toml."""

from setuptools import Extension, setup

# A plain C-ABI shared library (loaded with ctypes), so building it needs no torch headers.
setup(
    ext_modules=[
        Extension(
            "moerun._moe_cpu",
            sources=["src/moerun/kernels/csrc/moe_cpu.cpp"],
            extra_compile_args=[
                "-O3", "-std=c++17", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                "-mavx512bf16", "-mavx512vnni", "-mfma", "-mf16c",
            ],
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ]
)
