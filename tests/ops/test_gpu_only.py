"""What only a GPU can show: kernel launch counts and copies (torch.profiler, fastdiv.profiling.gpu_work) of
the CUDA kernels (one kernel forward, one backward for n <= 32), no copy for strided inputs and sample_dim=0
on either GPU backend, and what ``python -m fastdiv info`` reports for the CUDA backend.

Marked ``gpu``; skipped without a CUDA device. ``-k "launches or profiler or info or no_copy"`` selects the
whole file.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

import fastdiv
from fastdiv.profiling import gpu_work

from ._helpers import NO_CUDA_KERNELS, acc_of, backends, gpu_randn
from .test_losses import GPU_LAYOUTS, NO_COPY_LAYOUTS, as_batch_first
from conftest import LOSS_CASES, dtype_id

DEVICE = "cuda"
HAS_GPU = torch.cuda.is_available()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")]

needs_cuda_kernels = pytest.mark.skipif(HAS_GPU and not fastdiv.cuda_built(), reason=NO_CUDA_KERNELS)


def forward_backward_work(fn, x: torch.Tensor, grad: torch.Tensor):
    """GPU work of one forward ``fn(x)`` and of its backward with the upstream gradient ``grad``, made
    beforehand: torch.autograd.grad, so neither a ones-seed for the output nor an accumulation into
    x.grad is counted. One unprofiled warm-up call first (module loading, allocator)."""
    torch.autograd.grad(fn(x), x, grad)
    outputs = []
    fwd = gpu_work(lambda: outputs.append(fn(x)))
    bwd = gpu_work(lambda: torch.autograd.grad(outputs[0], x, grad))
    return fwd, bwd


def test_profiler_counts_kernels_only():
    """The counting itself: two elementwise kernels count 2; a device-to-device copy_ of a contiguous
    tensor (a cudaMemcpyAsync, not a kernel) counts as a copy."""
    x = torch.ones(1 << 20, device=DEVICE)
    y = torch.empty_like(x)
    kernels, copies = gpu_work(lambda: x.add(1).mul_(2))
    assert len(kernels) == 2 and not copies, (kernels, copies)
    kernels, copies = gpu_work(lambda: y.copy_(x))
    assert not kernels and len(copies) == 1, (kernels, copies)


def _one_and_one(fwd, bwd, what: str) -> None:
    (fk, fc), (bk, bc) = fwd, bwd
    assert len(fk) == 1 and not fc, f"{what}: forward launched {len(fk)} kernels {fk} and copies {fc}, not one kernel"
    assert len(bk) == 1 and not bc, f"{what}: backward launched {len(bk)} kernels {bk} and copies {bc}, not one kernel"


LAUNCH_CASES = [(2, torch.float32), (10, torch.float32), (10, torch.bfloat16), (10, torch.float16),
                (10, torch.float64), (32, torch.float32), (32, torch.bfloat16)]


@needs_cuda_kernels
@pytest.mark.parametrize("n,dtype", LAUNCH_CASES, ids=[f"n{n}-{dtype_id(t)}" for n, t in LAUNCH_CASES])
def test_launches_dpp_loss(n, dtype):
    """For n <= 32, forward of dpp_loss on the CUDA kernels is one launch and its backward one launch.
    Measured on the fused op itself (reduction='none' with a given [B] upstream gradient): 'mean' and
    'sum' add PyTorch's own reduction kernels around it."""
    x = gpu_randn(128, n, 3072, seed=n, dtype=dtype).requires_grad_()
    grad = torch.rand(128, device=DEVICE, dtype=acc_of(dtype)) + 0.5
    fwd, bwd = forward_backward_work(lambda t: fastdiv.dpp_loss(t, backend="cuda", reduction="none"), x, grad)
    _one_and_one(fwd, bwd, f"dpp_loss n={n} {dtype_id(dtype)}")


@needs_cuda_kernels
@pytest.mark.parametrize("case", [c for c in LOSS_CASES if not c.id.startswith("var-")],
                         ids=[c.id for c in LOSS_CASES if not c.id.startswith("var-")])
def test_launches_gram_heads(case):
    """Every Gram-family head shares the fused gram_loss op: one launch forward, one backward (n = 10)."""
    x = gpu_randn(128, 10, 3072, seed=1).requires_grad_()
    grad = torch.rand(128, device=DEVICE) + 0.5
    fwd, bwd = forward_backward_work(lambda t: case(t, backend="cuda", reduction="none"), x, grad)
    _one_and_one(fwd, bwd, case.id)


@needs_cuda_kernels
def test_launches_sum_reduction_backward():
    """reduction='sum' hands the op's backward a stride-0 expansion of the scalar upstream gradient; the
    pullback reads it in place: still one kernel, no copy of the gradient."""
    x = gpu_randn(128, 10, 3072, seed=2).requires_grad_()
    seed = torch.ones((), device=DEVICE)
    _, bwd = forward_backward_work(lambda t: fastdiv.dpp_loss(t, backend="cuda", reduction="sum"), x, seed)
    kernels, copies = bwd
    assert len(kernels) == 1 and not copies, f"backward of reduction='sum': kernels {kernels}, copies {copies}"


@pytest.mark.parametrize("name", NO_COPY_LAYOUTS)
@pytest.mark.parametrize("backend", backends("cuda", "triton:gpu"))
def test_no_copy_for_strided_and_sample_dim0(backend, name):
    """Strided B and n dims, misaligned rows and sample_dim=0 are read in place: the forward of dpp_loss
    and of concentration_stats does the same GPU work as on a contiguous [B, n, D] tensor, and no
    copy (for the CUDA kernels: exactly one kernel, no memcpy)."""
    shape, make_view, sample_dim = GPU_LAYOUTS[name]
    base = gpu_randn(*shape, seed=5)
    view = make_view(base)
    contiguous = as_batch_first(view, sample_dim)
    calls = {
        "dpp_loss": lambda t, sd: fastdiv.dpp_loss(t, backend=backend, reduction="none", sample_dim=sd),
        "concentration_stats": lambda t, sd: fastdiv.concentration_stats(t, backend=backend, sample_dim=sd),
    }
    for what, call in calls.items():
        call(view, sample_dim), call(contiguous, 1)  # warm-up (Triton compiles each stride specialization)
        k_view, c_view = gpu_work(lambda: call(view, sample_dim))
        k_cont, c_cont = gpu_work(lambda: call(contiguous, 1))
        assert len(k_view) == len(k_cont) and len(c_view) == len(c_cont), (
            f"{what} on the {name} view: kernels {k_view}, copies {c_view}; on a contiguous copy: kernels "
            f"{k_cont}, copies {c_cont}")
        if backend == "cuda" and what == "dpp_loss":
            assert len(k_view) == 1 and not c_view, f"{what} on the {name} view: kernels {k_view}, copies {c_view}"


@needs_cuda_kernels
def test_info_reports_the_cuda_backend(capsys):
    """``python -m fastdiv info`` (fastdiv.cli.main) and fastdiv.info(): CUDA built, 'auto' picks it for
    CUDA tensors, and 'auto' then runs the same kernels as backend='cuda'."""
    from fastdiv.cli import main

    data = fastdiv.info()
    assert data["backends"]["cuda"] is True
    assert data["auto"]["cuda"] == "cuda"
    assert data["cuda_device"] == torch.cuda.get_device_name(0)
    assert main(["info", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["backends"]["cuda"] is True and printed["auto"]["cuda"] == "cuda"
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\s*cuda\s+yes$", text, re.MULTILINE), text
    assert "cuda tensors -> cuda" in text, text
    x = gpu_randn(4, 10, 3072, seed=6)
    assert torch.equal(fastdiv.dpp_loss(x, reduction="none"), fastdiv.dpp_loss(x, backend="cuda", reduction="none"))
