"""Compiles the CPU kernels on first import when the install built none.

``pip install -e . --no-build-isolation`` builds ``fastdiv._C`` against the torch in the environment.
A default ``pip install .`` / ``pip install -e .`` runs setup.py in an isolated build environment
without torch (fastdiv does not declare a build-time torch: that would install a second, possibly
different torch just to compile against, and an extension built against one torch does not load in
another). That install ships the C++ sources instead, and the first ``import fastdiv`` compiles them
here with ``torch.utils.cpp_extension.load`` (ninja, a few minutes on two cores), against the torch that
is actually installed. The library is cached under
``$FASTDIV_CACHE_DIR`` (default ``~/.cache/fastdiv``), keyed by the torch version, the flags and the
sources' contents, so later imports only load it and any change rebuilds it.

``FASTDIV_JIT=1`` uses this path even when ``fastdiv._C`` exists (to test it); ``FASTDIV_JIT=0`` never
compiles on import.
"""
from __future__ import annotations

import hashlib
import os
import sys

from . import _build_flags

LIBRARY_NAME = "fastdiv_cpu"
_DONE = "complete"  # written beside the library once it loaded: a half-linked file is never loaded


def cache_root() -> str:
    explicit = os.environ.get("FASTDIV_CACHE_DIR", "").strip()
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastdiv")


def mode() -> str:
    """'force' (FASTDIV_JIT=1), 'never' (FASTDIV_JIT=0) or 'fallback' (compile only when no build exists)."""
    value = os.environ.get("FASTDIV_JIT", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "force"
    if value in ("0", "false", "no", "off"):
        return "never"
    if value:
        raise ValueError(f"FASTDIV_JIT must be 1 or 0, got {value!r}")
    return "fallback"


def sources_present() -> bool:
    return bool(_build_flags.cpu_sources(with_module=False))


def build_directory(torch_version: str) -> str:
    """The cache folder of this torch version, flag set and source tree."""
    digest = hashlib.sha256()
    digest.update(torch_version.encode())
    digest.update(" ".join(_build_flags.cxx_flags() + _build_flags.LINK_FLAGS).encode())
    for path in _build_flags.cpu_sources(with_module=False) + _build_flags.headers():
        digest.update(os.path.relpath(path, _build_flags.CSRC).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return os.path.join(cache_root(), f"torch{torch_version}-{digest.hexdigest()[:16]}")


def load() -> str:
    """Loads (compiling first if needed) the CPU kernels into torch.ops.fastdiv; returns the library path."""
    import torch
    from torch.utils import cpp_extension

    folder = build_directory(torch.__version__)
    library = os.path.join(folder, f"{LIBRARY_NAME}.so")
    if os.path.exists(os.path.join(folder, _DONE)):
        torch.ops.load_library(library)
        return library
    os.makedirs(folder, exist_ok=True)
    print(f"fastdiv: compiling the CPU kernels (default, AVX2 and AVX-512 variants; once, a few minutes) into "
          f"{folder}", file=sys.stderr, flush=True)
    try:  # the pip package `ninja` puts its binary here, which is not on PATH outside an activated venv
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cpp_extension.load(
        name=LIBRARY_NAME,
        sources=_build_flags.cpu_sources(with_module=False),
        extra_cflags=_build_flags.cxx_flags(),
        extra_ldflags=_build_flags.LINK_FLAGS,
        extra_include_paths=[_build_flags.CSRC],
        build_directory=folder,
        is_python_module=False,
        verbose=False,
    )
    with open(os.path.join(folder, _DONE), "w") as f:
        f.write(torch.__version__ + "\n")
    return library
