"""Builds the native engine (llaisys_chat._native); everything else is declared in setup.cfg.

The kernels are compiled for the CPU that builds them (-march=native). Set LLAISYS_PORTABLE=1 to
build for any x86-64 CPU with AVX2 and FMA instead (for a wheel or an image shared between machines),
and LLAISYS_SANITIZE=1 to build with AddressSanitizer and UndefinedBehaviorSanitizer (a Python
process then needs the sanitizer runtime preloaded: tests/test_sanitizers.py shows how).
"""
import os
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup

ParallelCompile("LLAISYS_BUILD_JOBS", default=0).install()


def flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


arch_flags = ["-mavx2", "-mfma", "-mf16c"] if flag("LLAISYS_PORTABLE") else ["-march=native"]
sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
optimize = ["-O1", *sanitize] if flag("LLAISYS_SANITIZE") else ["-O3"]

setup(
    ext_modules=[
        Pybind11Extension(
            "llaisys_chat._native",
            sorted(glob("native/*.cpp") + glob("native/ops/*.cpp")),
            cxx_std=20,
            extra_compile_args=[*optimize, "-fopenmp", *arch_flags],
            extra_link_args=["-fopenmp", *(sanitize if flag("LLAISYS_SANITIZE") else [])],
        )
    ],
)
