"""Builds the native engine (llaisys_chat._native); everything else is declared in setup.cfg.

The kernels are compiled for the CPU that builds them (-march=native). Set LLAISYS_PORTABLE=1 to
build for any x86-64 CPU with AVX2 and FMA instead (for a wheel or an image shared between machines).
"""
import os
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup

ParallelCompile("LLAISYS_BUILD_JOBS", default=0).install()

portable = os.environ.get("LLAISYS_PORTABLE", "") not in ("", "0")
arch_flags = ["-mavx2", "-mfma", "-mf16c"] if portable else ["-march=native"]

setup(
    ext_modules=[
        Pybind11Extension(
            "llaisys_chat._native",
            sorted(glob("native/*.cpp") + glob("native/ops/*.cpp")),
            cxx_std=20,
            extra_compile_args=["-O3", "-fopenmp", *arch_flags],
            extra_link_args=["-fopenmp"],
        )
    ],
)
