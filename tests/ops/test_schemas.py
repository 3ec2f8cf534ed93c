"""The op registrations: the library's op list (each op has its tests), the Python schemas that define the
Triton namespace against the C++ library, and a CUDA kernel for every op of a CUDA build."""
from __future__ import annotations

import pytest
import torch

from fastdiv._backend import cuda_built

from ._helpers import NO_CUDA_KERNELS, SCHEMAS, requires_extension


@requires_extension
def test_every_op_is_covered():
    """The op list below is the library's: a new op must get its opcheck (test_gram.py, test_rows.py,
    test_eot.py)."""
    ops = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
           if name.startswith("fastdiv::")}
    assert ops == {"gram", "gram_pullback", "gram_loss", "concentration_stats", "normalize", "normalize_pullback",
                   "column_stats", "column_stats_pullback", "eot_step"}


@requires_extension
def test_python_schemas_match_the_cpp_library():
    """fastdiv/ops/schemas.py (used to define the Triton namespace) must not drift from fastdiv/csrc/ops.cpp."""
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.fastdiv, name).default._schema) == f"fastdiv::{schema}"
    cpp_ops = {op for op in dir(torch.ops.fastdiv) if not op.startswith("_") and
               isinstance(getattr(torch.ops.fastdiv, op), torch._ops.OpOverloadPacket)}
    assert cpp_ops == set(SCHEMAS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_op_has_a_cuda_kernel():
    if not cuda_built():
        pytest.skip(NO_CUDA_KERNELS)
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = [name for name in SCHEMAS if not has_kernel(f"fastdiv::{name}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"
