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


def cxx_flags() -> list[str]:
    """g++ flags of the CPU kernels (C++20: torch 2.13's headers are written for it). No ``-march``: the
    build targets the compiler's default (any x86-64 CPU), and the AVX2 and AVX-512 variants of the
    kernels get their instruction sets from the target pragmas of ``csrc/cpu/isa_*.cpp``; which variant
    runs is chosen at run time (``csrc/cpu/dispatch.cpp``), so a build runs on any CPU of its
    architecture whatever machine compiled it."""
    return ["-O3", "-fopenmp", "-std=c++20"]


def cpu_sources(with_module: bool = True) -> list[str]:
    """Absolute paths of the CPU build's translation units, sorted, which is also the order setuptools links
    them in (it sorts an extension's sources). The instruction-set variants are named
    ``cpu/isa_<level>_<name>.cpp`` so that the default one links before the AVX ones: the linker keeps the
    first copy of an inline function that several translation units emit, and this order makes it one that
    every CPU can run (``csrc/cpu/kernels/variant.h``)."""
    files = glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
    if not with_module:
        files = [f for f in files if os.path.abspath(f) != MODULE_SOURCE]
    return sorted(files)


def cuda_sources() -> list[str]:
    """Absolute paths of the CUDA kernels and their torch glue, sorted (CUDA builds only)."""
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))


def headers() -> list[str]:
    """Every file the CPU build includes, the kernel sources of ``cpu/kernels/`` too (each variant
    includes them; part of the first-import build's cache key)."""
    return sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "cpu", "*.h"))
                  + glob.glob(os.path.join(CSRC, "cpu", "kernels", "*")))
