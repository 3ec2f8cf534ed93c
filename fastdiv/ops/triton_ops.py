"""Defines the ``fastdiv_triton`` op namespace: the schemas of fastdiv/csrc/ops.cpp, implemented by the Triton
launchers of :mod:`fastdiv.triton` for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``
(Triton's interpreter; how the kernels are tested without a GPU)."""
from __future__ import annotations

import torch

from .schemas import SCHEMAS

NAMESPACE = "fastdiv_triton"
_LIB = torch.library.Library(NAMESPACE, "DEF")


def _launcher(name: str):
    def run(*args):
        from .. import triton as kernels  # imports triton itself; only when a kernel first runs

        return getattr(kernels, name)(*args)

    run.__name__ = f"triton_{name}"
    return run


for _name, _schema in SCHEMAS.items():
    _LIB.define(_schema)
    for _key in ("CUDA", "CPU"):
        _LIB.impl(_name, _launcher(_name), _key)
