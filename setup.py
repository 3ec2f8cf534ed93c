"""Builds fastdiv._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA
build of torch are both present.

    pip install -e . --no-build-isolation

Environment:
  FASTDIV_FORCE_CUDA=1   build the CUDA sources even if torch reports no CUDA device/toolkit
  FASTDIV_NO_CUDA=1      never build them
  FASTDIV_CPU_ARCH       value for -march (default "native"; set it empty for a portable build)
  TORCH_CUDA_ARCH_LIST, MAX_JOBS   honored as by torch.utils.cpp_extension
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _build_cuda() -> bool:
    if _flag("FASTDIV_NO_CUDA"):
        return False
    if _flag("FASTDIV_FORCE_CUDA"):
        return True
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    arch = os.environ.get("FASTDIV_CPU_ARCH", "native").strip()
    # C++20: torch 2.13's headers are written for it (cpp_extension's own default)
    cxx = ["-O3", "-fopenmp", "-std=c++20"] + ([f"-march={arch}"] if arch else [])
    args = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if _build_cuda():
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        args["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20"]
        args["define_macros"] = [("FASTDIV_WITH_CUDA", "1")]
        return [cpp_extension.CUDAExtension("fastdiv._C", sources, **args)]
    return [cpp_extension.CppExtension("fastdiv._C", sources, **args)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
