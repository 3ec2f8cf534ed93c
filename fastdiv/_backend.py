"""Which compiled kernels exist, and which backend an op runs on.

Backends: 'cpu' (C++ kernels of fastdiv._C), 'cuda' (CUDA kernels of fastdiv._C, CUDA builds only),
'triton' (JIT Triton kernels) and 'torch' (the plain reference of fastdiv.reference). 'auto' picks the
fastest one available for the tensor's device; the environment variable FASTDIV_BACKEND, when set,
replaces 'auto' (never an explicit backend).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` from the fastdiv source tree, or let "
              "the first import compile it (needs a C++ compiler and `pip install ninja`; FASTDIV_JIT unset)")


def _load_extension() -> tuple[str | None, str | None, str | None]:
    """Loads the CPU kernels; returns (where they came from, the library's path, None) or (None, None, why
    they did not load).

    The build made at install (fastdiv._C) is used when present; without one, and with the C++ sources
    at hand, they are compiled on this first import (fastdiv/_jit.py says why and where they are cached).
    """
    from . import _jit

    jit = _jit.mode()
    why = "FASTDIV_JIT=1"
    if jit != "force":
        try:
            from . import _C  # loading the library registers torch.ops.fastdiv.*

            return f"built at install: {_C.__file__}", _C.__file__, None
        except ImportError as exc:  # absent, or present but unloadable (built against another torch, say)
            if jit == "never" or not _jit.sources_present():
                return None, None, f"{exc} (and FASTDIV_JIT=0 or no C++ sources to compile on import)"
            why = "no build at install" if isinstance(exc, ModuleNotFoundError) else f"fastdiv._C did not load: {exc}"
    try:
        library = _jit.load()
        return f"compiled on import ({why}; later imports load the cache): {library}", library, None
    except Exception as exc:  # no compiler, no ninja, a compile error: the 'torch' backend still works
        return None, None, f"compiling the CPU kernels on import failed: {type(exc).__name__}: {exc}"


EXTENSION_SOURCE, EXTENSION_PATH, EXTENSION_ERROR = _load_extension()
if EXTENSION_ERROR is not None:
    warnings.warn(
        f"fastdiv's CPU kernels did not load ({EXTENSION_ERROR}); every op falls back to the slow "
        f"backend='torch'. To get the fused kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


#: The instruction-set variants of the CPU kernels, lowest first (fastdiv/csrc/cpu/isa_*.cpp).
CPU_CAPABILITIES = ("default", "avx2", "avx512")


def cpu_capability() -> str | None:
    """The instruction-set variant of the CPU kernels that runs: 'default', 'avx2' or 'avx512' (None when
    the kernels did not load). Chosen on first use: ``FASTDIV_CPU_CAPABILITY`` when it is set, else the
    best this CPU supports."""
    if EXTENSION_ERROR is not None:
        return None
    return torch.ops.fastdiv_build.cpu_capability()


def cpu_capabilities() -> list[str]:
    """The variants this build holds and this CPU can run, lowest first ([] when the kernels did not load)."""
    if EXTENSION_ERROR is not None:
        return []
    return list(torch.ops.fastdiv_build.cpu_capabilities())


def set_cpu_capability(name: str) -> None:
    """Runs the CPU kernels' ``name`` variant from now on in this process (tests and benchmarks compare
    variants this way). Raises ValueError for a name that is not one of :func:`cpu_capabilities`."""
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"the CPU kernels did not load ({EXTENSION_ERROR})")
    supported = cpu_capabilities()
    if name not in supported:
        known = "one of " + ", ".join(CPU_CAPABILITIES) if name not in CPU_CAPABILITIES else "a capability"
        raise ValueError(f"set_cpu_capability: {name!r} is not {known} this CPU and build support "
                         f"(supported: {', '.join(supported)})")
    torch.ops.fastdiv_build.set_cpu_capability(name)


def _check_capability_override() -> None:
    """Applies FASTDIV_CPU_CAPABILITY at import, so a wrong value fails here with its reason and not at the
    first kernel call. An unknown name or one this CPU cannot run is an error: running other kernels
    than the ones asked for would make any test or timing under the override a silent lie."""
    wanted = os.environ.get("FASTDIV_CPU_CAPABILITY", "").strip().lower()
    if not wanted or EXTENSION_ERROR is not None:
        return
    try:
        cpu_capability()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{first}. Unset FASTDIV_CPU_CAPABILITY or set it to one of: "
                         f"{', '.join(CPU_CAPABILITIES)}") from None


_check_capability_override()


def extension_built() -> bool:
    """True when the C++ CPU kernels loaded (fastdiv._C, or the library compiled on first import)."""
    return EXTENSION_ERROR is None


def cuda_built() -> bool:
    """True when fastdiv._C carries CUDA kernels (registered for the CUDA dispatch key)."""
    return extension_built() and torch._C._dispatch_has_kernel_for_dispatch_key("fastdiv::gram", "CUDA")


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it: that takes ~1 s)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels then run, slowly, on CPU tensors (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_available() -> bool:
    """True when the Triton kernels can run: triton is installed and there is a CUDA device, or the
    interpreter is on."""
    return triton_installed() and (torch.cuda.is_available() or triton_interpreted())


def default_backend(device_type: str) -> str:
    """The backend 'auto' picks for tensors on ``device_type`` (ignoring FASTDIV_BACKEND)."""
    if device_type == "cpu":
        return "cpu" if extension_built() else "torch"
    if device_type == "cuda":
        # The CUDA kernels when the build had a toolkit; else the Triton kernels, which need no build
        # (torch's CUDA wheels bring triton): a CUDA torch without nvcc still gets fused kernels.
        if cuda_built():
            return "cuda"
        return "triton" if triton_installed() else "torch"
    return "torch"


def resolve_backend(backend: str, tensor: torch.Tensor, fn: str) -> str:
    """The concrete backend for running ``fn`` on ``tensor``; raises a clear error if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("FASTDIV_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"FASTDIV_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
        else:
            return default_backend(tensor.device.type)
    if backend == "torch":
        return backend
    if backend == "triton":
        if not triton_installed():
            raise RuntimeError(f"{fn}: backend='triton' needs the triton package (pip install triton)")
        if tensor.device.type != "cuda" and not (tensor.device.type == "cpu" and triton_interpreted()):
            raise ValueError(f"{fn}: backend='triton' runs on CUDA tensors (or on CPU tensors under "
                             f"TRITON_INTERPRET=1), got a tensor on {tensor.device}")
        return backend
    # the compiled backends: each needs tensors on its own device and its kernels in fastdiv._C
    is_built, missing = {
        "cpu": (extension_built, lambda: f"the C++ CPU kernels, which did not load ({EXTENSION_ERROR})"),
        "cuda": (cuda_built, lambda: "fastdiv._C built with CUDA (a CUDA toolkit and a CUDA build of "
                                     "torch at build time)"),
    }[backend]
    if tensor.device.type != backend:
        raise ValueError(f"{fn}: backend={backend!r} runs on {backend.upper()} tensors, got a tensor on "
                         f"{tensor.device}")
    if not is_built():
        raise RuntimeError(f"{fn}: backend={backend!r} needs {missing()}; {BUILD_HINT}")
    return backend
