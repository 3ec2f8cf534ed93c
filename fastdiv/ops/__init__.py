"""torch.library glue for the compiled ops: fake (meta) kernels for torch.compile, autograd formulas
that call the fused pullback kernels, and thin launchers. The C++ schemas live in csrc/ops.cpp."""
from .._backend import extension_built

if extension_built():
    from . import gram, rows  # noqa: F401  (registers fake kernels and autograd)
