"""The C++ sources and compiler flags of fastdiv's CPU kernels, defined once for both ways of building
them: ``setup.py`` (at install, against the torch in the environment) and :mod:`fastdiv._jit` (on first
import, when the install built nothing).

This module imports nothing outside the standard library: setup.py loads it by path, in a build
environment where torch (and so the ``fastdiv`` package) may not be importable.
"""
from __future__ import annotations

import glob
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: the C++/CUDA sources ship inside the package, so an installed wheel can still compile them
CSRC = os.path.join(PACKAGE_DIR, "csrc")
#: the Python module init of fastdiv._C; the first-import build loads a plain library and skips it
MODULE_SOURCE = os.path.join(CSRC, "module.cpp")
LINK_FLAGS = ["-fopenmp"]


def cpu_arch() -> str:
    """The ``-march`` value: ``FASTDIV_CPU_ARCH`` (e.g. ``x86-64-v3`` for AVX2, ``x86-64-v2`` for
    SSE4.2), by default ``native``; empty means the compiler's default target (portable x86-64)."""
    return os.environ.get("FASTDIV_CPU_ARCH", "native").strip()


def cxx_flags(arch: str | None = None) -> list[str]:
    """g++ flags of the CPU kernels (C++20: torch 2.13's headers are written for it)."""
    arch = cpu_arch() if arch is None else arch
    return ["-O3", "-fopenmp", "-std=c++20"] + ([f"-march={arch}"] if arch else [])


def cpu_sources(with_module: bool = True) -> list[str]:
    """Absolute paths of the CPU build's translation units, sorted."""
    files = glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
    if not with_module:
        files = [f for f in files if os.path.abspath(f) != MODULE_SOURCE]
    return sorted(files)


def cuda_sources() -> list[str]:
    """Absolute paths of the CUDA kernels and their torch glue, sorted (CUDA builds only)."""
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))


def headers() -> list[str]:
    """Every header the CPU build can include (part of the first-import build's cache key)."""
    return sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "cpu", "*.h")))
