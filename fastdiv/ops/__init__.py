"""torch.library glue for the compiled ops: fake (meta) kernels for torch.compile, autograd formulas
that call the fused pullback kernels, and thin launchers. The C++ schemas live in fastdiv/csrc/ops.cpp; the
Triton backend defines the same ones under the ``fastdiv_triton`` namespace (triton_ops.py)."""
from .._backend import extension_built, triton_installed
from . import eot, gram, rows

if extension_built():
    gram.register("fastdiv")
    rows.register("fastdiv")
    eot.register("fastdiv")

if triton_installed():
    from . import triton_ops

    gram.register(triton_ops.NAMESPACE)
    rows.register(triton_ops.NAMESPACE)
    eot.register(triton_ops.NAMESPACE)
