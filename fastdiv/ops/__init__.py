"""torch.library glue for the compiled ops: fake (meta) kernels for torch.compile, autograd formulas
that call the fused pullback kernels, and thin launchers. The C++ schemas live in fastdiv/csrc/ops.cpp; the
Triton backend defines the same ones (schemas.py) under the ``fastdiv_triton`` namespace, below."""
import torch

from .._backend import extension_built, triton_installed
from . import eot, gram, rows
from .schemas import NAMESPACES, SCHEMAS


def _triton_launcher(name: str):
    def run(*args):
        from .. import triton as kernels  # imports triton itself; only when a kernel first runs

        return getattr(kernels, name)(*args)

    run.__name__ = f"triton_{name}"
    return run


def _define_triton_namespace() -> torch.library.Library:
    """The ``fastdiv_triton`` ops: the launchers of :mod:`fastdiv.triton` for CUDA tensors, and for CPU
    tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter; how the kernels are tested without a GPU)."""
    lib = torch.library.Library(NAMESPACES["triton"], "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        for key in ("CUDA", "CPU"):
            lib.impl(name, _triton_launcher(name), key)
    return lib


if extension_built():
    gram.register(NAMESPACES["cpu"])
    rows.register(NAMESPACES["cpu"])
    eot.register(NAMESPACES["cpu"])

if triton_installed():
    _TRITON_LIB = _define_triton_namespace()  # the ops live as long as this Library object
    gram.register(NAMESPACES["triton"])
    rows.register(NAMESPACES["triton"])
    eot.register(NAMESPACES["triton"])
