"""Builds fastdiv, with its C++ CPU kernels (fastdiv._C) compiled now when torch is importable here.

    pip install -e . --no-build-isolation    # against the installed torch: _C is built now (ninja)
    pip install .   /   pip install -e .     # isolated build, no torch in it: the wheel carries the
                                             # C++ sources and the first `import fastdiv` compiles them
                                             # (fastdiv/_jit.py)

fastdiv declares no build-time torch on purpose: an isolated build would install a second torch just to
compile against it, and an extension built against one torch does not load in another.

The CPU kernels are compiled for the compiler's default target plus AVX2 and AVX-512 variants, and the
variant is chosen at run time (fastdiv/csrc/cpu/dispatch.cpp), so the build runs on any x86-64 CPU.
The CUDA kernels are built too when a CUDA toolkit and a CUDA build of torch are both present.

Environment:
  FASTDIV_FORCE_CUDA=1   build the CUDA sources even if torch reports no CUDA device/toolkit
  FASTDIV_NO_CUDA=1      never build them
  TORCH_CUDA_ARCH_LIST, MAX_JOBS   honored as by torch.utils.cpp_extension
"""
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_flags():
    """fastdiv/_build_flags.py by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_fastdiv_build_flags",
                                                  os.path.join(ROOT, "fastdiv", "_build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def extensions_and_commands():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastdiv: torch is not importable in this build environment; the C++ kernels will be compiled "
              "on first import (or build now with `pip install -e . --no-build-isolation`)", file=sys.stderr)
        return [], {}
    flags = _load_build_flags()
    args = dict(
        include_dirs=[flags.CSRC],
        extra_compile_args={"cxx": flags.cxx_flags()},
        extra_link_args=flags.LINK_FLAGS,
    )
    sources = _rel(flags.cpu_sources())
    build_cuda = not _flag("FASTDIV_NO_CUDA") and (
        _flag("FASTDIV_FORCE_CUDA") or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None))
    if build_cuda:
        args["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20"]
        args["define_macros"] = [("FASTDIV_WITH_CUDA", "1")]
        ext = cpp_extension.CUDAExtension("fastdiv._C", sources + _rel(flags.cuda_sources()), **args)
    else:
        ext = cpp_extension.CppExtension("fastdiv._C", sources, **args)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
