"""GPU benchmarks: forward + backward of the losses on CUDA tensors, the fused kernels (``cuda``: the
CUDA kernels of fastdiv._C; ``triton``: the Triton kernels) vs the eager reference (``eager``:
backend='torch', fastdiv/reference.py) vs ``compiled`` (torch.compile of the reference); and the fused
EOT step. Skipped without a CUDA device.

GPU targets, on one H100 / H200. They are read off the results, never asserted:

- bandwidth: forward + backward of dpp_loss at (B=4096, n=10, D=3072) fp32 (size ``gpu-large``) at
  >= 75% of the GPU's peak HBM bandwidth, counting 3 x bytes(X): ``pct_of_peak`` of the
  ``gpu-large-fp32-dpp_loss-cuda`` case;
- bf16: at the same size, bf16 inputs reach >= 1.8x the fp32 throughput: ``inputs_per_s`` of
  ``gpu-large-bf16-dpp_loss-cuda`` over that of ``gpu-large-fp32-dpp_loss-cuda`` (= fp32 median / bf16
  median);
- paper sizes (B=128, n=10, D=784 ``mnist-n10`` and D=3072 ``cifar10``): dpp_loss on the fused kernels
  >= 5x faster than ``eager`` and >= 1.5x faster than ``compiled`` (ratios of the medians);
- launches: for n <= 32, one kernel forward and one kernel backward (``launches_fwd_op`` and
  ``launches_bwd_op`` of the fused cases: the op itself, reduction='none' with a given upstream
  gradient; tests/ops/test_gpu_only.py asserts them).

Timed call, as in test_bench_losses.py: ``grads.grad = None; loss = f(grads); loss.backward()`` with the
default ``reduction='mean'`` (concentration_stats: forward only, under no_grad; EOT: one step).

Timing: CUDA events. ``benchmark.pedantic`` with a pytest-benchmark timer (``cuda_event_timer``, set
with the ``benchmark(timer=...)`` marker) that records a CUDA event on the current stream before and
after each round and synchronizes on the second, so the statistics pytest-benchmark stores (and
benchmarks/report.py reads) are GPU times: from the start event to the end event, launch gaps included,
the host's synchronization excluded. ``FASTDIV_BENCH_CUDA_WARMUP`` warm-up rounds (default 10) run
first and are excluded, after the correctness check and two more untimed calls; ``FASTDIV_BENCH_CUDA_ROUNDS``
rounds (default 100) are timed. pytest-benchmark's own calibration options (--benchmark-min-rounds,
--benchmark-max-time, --benchmark-warmup) do not apply to pedantic runs.

Every benchmark stores in ``benchmark.extra_info``: the case (op, size, B, n, D, dtype, impl), the GPU,
bytes(X), the minimal traffic (3 x bytes(X) forward + backward; 1 x bytes(X) for concentration_stats;
(n + 3) x bytes(x) for an EOT step, + the momentum buffer read and written), median/p10/p90 times, GB/s
against that floor, ``pct_of_peak`` of the GPU's peak HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s,
picked by torch.cuda.get_device_name; absent on other GPUs), ``pct_of_copy`` of a device-to-device copy
measured once per session (``copy_GBps``, read + write bytes, as the CPU benchmarks count it), and the
kernel launches of one forward and one backward counted with torch.profiler.

Matrix (FASTDIV_BENCH_MATRIX, FASTDIV_BENCH_QUICK as in test_bench_losses.py):

- ``default``: dpp_loss x {cuda, triton, eager, compiled} at mnist-n10 and cifar10 (fp32) and at gpu-large
  (fp32 and bf16); every other op x {cuda, triton, eager} at cifar10 fp32; the EOT step (linf, l2,
  MI-FGSM) x {cuda, triton, eager} at B=128, n=10, D=3072. Four torch.compile runs in all.
- ``full``: every op x every size x {fp32, bf16} x all four impls, and the EOT step compiled too.

    python -m pytest benchmarks/test_bench_cuda.py -q --benchmark-only --benchmark-json=.benchmarks/gpu.json
"""
from __future__ import annotations

import functools
import os
import time

import pytest
import torch

import fastdiv
from fastdiv import reference
from fastdiv._backend import cuda_built, triton_installed, triton_interpreted
from fastdiv.profiling import gpu_work

from test_bench_eot import VARIANTS
from test_bench_eot import make_case as make_eot_case
from test_bench_losses import (
    MATRIX,
    OPS,
    QUICK,
    WARMUP_CALLS,
    check,
    compiled_fn,
    eager_fn,
    first_call,
    per_input,
    references,
    run_once,
    timed_step,
    timing_extra,
)

DEVICE = "cuda"
HAS_GPU = torch.cuda.is_available()

SIZES: dict[str, tuple[int, int, int]] = {
    "mnist-n10": (128, 10, 784),
    "cifar10": (128, 10, 3072),
    "gpu-large": (4096, 10, 3072),  # 503 MB in fp32: far beyond the L2 cache, bandwidth-bound
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("cuda", "triton", "eager", "compiled")
EOT_SIZE = "cifar10"  # test_bench_eot.py's (128, 10, (3, 32, 32)): D = 3072
#: peak HBM bandwidth in bytes/s by GPU (docs/design.md §6)
PEAK_HBM = {"H100 SXM": 3.35e12, "H200": 4.8e12}


def _env_int(name: str, default: int, minimum: int) -> int:
    value = int(os.environ.get(name, "").strip() or default)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


ROUNDS = _env_int("FASTDIV_BENCH_CUDA_ROUNDS", 100, 1)
WARMUP_ROUNDS = _env_int("FASTDIV_BENCH_CUDA_WARMUP", 10, 0)


def sync() -> None:
    torch.cuda.synchronize()


class CudaEventTimer:
    """A pytest-benchmark timer measuring GPU time with CUDA events, for ``benchmark.pedantic`` only.

    pytest-benchmark calls its timer once before and once after each round and records the difference.
    Here the first call records a start event on the current stream and returns 0.0; the second records
    an end event, waits for it and returns the elapsed time between the two events in seconds. (Not for
    ``benchmark(fn)``: its timer calibration calls the timer in other patterns.)"""

    __name__ = "cuda_event_timer"

    def __init__(self) -> None:
        self._start = None

    def __call__(self) -> float:
        if self._start is None:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
            return 0.0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        start, self._start = self._start, None
        return start.elapsed_time(end) / 1e3


cuda_event_timer = CudaEventTimer()

pytestmark = [pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device"),
              pytest.mark.benchmark(timer=cuda_event_timer)]


def _impl_skip_reason(impl: str) -> str | None:
    if not HAS_GPU:
        return None  # the module's "needs a CUDA device"
    if impl == "cuda" and not cuda_built():
        return "fastdiv._C has no CUDA kernels (build it with a CUDA toolkit and a CUDA build of torch)"
    if impl == "triton":
        if not triton_installed():
            return "triton is not installed"
        if triton_interpreted():
            return "TRITON_INTERPRET=1 would time Triton's interpreter, not the compiled kernels"
    return None


def _param(*values, impl: str):
    reason = _impl_skip_reason(impl)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(*values, marks=marks, id="-".join(values))


def shape_of(size: str) -> tuple[int, int, int]:
    b, n, d = SIZES[size]
    return (max(2, b // 32), n, d) if QUICK else (b, n, d)


def cases() -> list:
    """(size, dtype, op, impl), ordered so that the cases sharing an input run back to back."""
    if MATRIX == "full":
        combos = [(s, t, o, IMPLS) for s in SIZES for t in DTYPES for o in OPS]
    else:
        combos = [(s, t, "dpp_loss", IMPLS) for s, t in
                  (("mnist-n10", "fp32"), ("cifar10", "fp32"), ("gpu-large", "fp32"), ("gpu-large", "bf16"))]
        combos += [("cifar10", "fp32", o, ("cuda", "triton", "eager")) for o in OPS if o != "dpp_loss"]
    return [_param(s, t, o, i, impl=i) for (s, t, o, impls) in combos for i in impls]


def eot_cases() -> list:
    impls = IMPLS if MATRIX == "full" else ("cuda", "triton", "eager")
    return [_param(v, i, impl=i) for v in VARIANTS for i in impls]


# ---------------------------------------------------------------------------------------------------
# the GPU, its peak and copy bandwidths, launch counts
# ---------------------------------------------------------------------------------------------------


def peak_hbm(device_name: str) -> tuple[str | None, float | None]:
    """(GPU, peak HBM bytes/s) for the GPUs of the targets, by torch.cuda.get_device_name; else (None, None)."""
    if "H200" in device_name:
        return "H200", PEAK_HBM["H200"]
    # the SXM part reports as e.g. "NVIDIA H100 80GB HBM3"; PCIe and NVL parts have other bandwidths
    if "H100" in device_name and "PCIe" not in device_name and "NVL" not in device_name:
        return "H100 SXM", PEAK_HBM["H100 SXM"]
    return None, None


@pytest.fixture(scope="module")
def gpu() -> dict:
    """What every benchmark records about the GPU, and its device-to-device copy bandwidth: best of 10
    ``dst.copy_(src)`` of 1 GiB fp32 timed with CUDA events, counted as read + write (2 x bytes / time)."""
    name = torch.cuda.get_device_name()
    peak_name, peak = peak_hbm(name)
    src = torch.ones(2**28, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": name, "peak": peak_name, "peak_GBps": peak / 1e9 if peak else None,
            "copy_GBps": copy_bytes / best / 1e9, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "timer": "cuda_event"}


def launch_counts(fn, x: torch.Tensor, grad: torch.Tensor | None, suffix: str = "") -> dict:
    """Kernel launches of one forward ``fn(x)`` and, when ``grad`` is given, of its backward with that
    upstream gradient (made beforehand: no ones-seed, and torch.autograd.grad: no accumulation)."""
    outputs = []
    k_fwd, c_fwd = gpu_work(lambda: outputs.append(fn(x)))
    out = {f"launches_fwd{suffix}": len(k_fwd), f"copies_fwd{suffix}": len(c_fwd)}
    if grad is not None:
        k_bwd, c_bwd = gpu_work(lambda: torch.autograd.grad(outputs[0], x, grad))
        out.update({f"launches_bwd{suffix}": len(k_bwd), f"copies_bwd{suffix}": len(c_bwd)})
        if suffix:  # the fused op's own kernels, by name (short), to read a launch count
            out[f"kernels_bwd{suffix}"] = [k[:80] for k in k_bwd]
    if suffix:
        out[f"kernels_fwd{suffix}"] = [k[:80] for k in k_fwd]
    return out


def gpu_timing_extra(benchmark, traffic_bytes: int, batch: int, gpu: dict) -> dict:
    """timing_extra of the CPU benchmarks against the GPU's copy bandwidth, plus inputs/s and % of HBM peak."""
    out = timing_extra(benchmark, traffic_bytes, gpu)
    if out:
        out["inputs_per_s"] = batch / out["median_s"]
        if gpu["peak_GBps"]:
            out["pct_of_peak"] = 100.0 * out["GBps"] / gpu["peak_GBps"]
    return out


def run_pedantic(benchmark, step) -> None:
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


# ---------------------------------------------------------------------------------------------------
# the losses
# ---------------------------------------------------------------------------------------------------


def make_grads(size: str, dtype: str) -> torch.Tensor:
    """test_bench_losses.py's data on the GPU: a shared direction plus noise (cosines ~0.2), row norms
    spread over [0.1, 2.1], fixed seed."""
    b, n, d = shape_of(size)
    gen = torch.Generator(device=DEVICE).manual_seed(1234)
    x = 0.5 * torch.randn(b, 1, d, generator=gen, device=DEVICE) + torch.randn(b, n, d, generator=gen, device=DEVICE)
    x.mul_(0.1 + 2.0 * torch.rand(b, n, 1, generator=gen, device=DEVICE))
    return x.to(DTYPES[dtype])


@functools.lru_cache(maxsize=1)  # one case's input and references alive at a time
def case_data(size: str, dtype: str, op: str):
    """The input, the eager reference's outputs and, for half precision, an fp64 oracle's."""
    x = make_grads(size, dtype).requires_grad_(OPS[op].backward)
    return (x, *references(op, x))


@pytest.mark.parametrize("size,dtype,op,impl", cases())
def test_bench_gpu(benchmark, gpu, size, dtype, op, impl):
    x, eager, oracle = case_data(size, dtype, op)
    b, n, d = x.shape
    backward = OPS[op].backward
    extra = {"op": op, "size": size, "B": b, "n": n, "D": d, "dtype": dtype, "impl": impl, "quick": QUICK,
             "pass": "fwd+bwd" if backward else "fwd", **gpu}
    if impl in ("cuda", "triton"):
        f = functools.partial(OPS[op].public, backend=impl)
    elif impl == "eager":
        f = eager_fn(op)
    else:
        f = compiled_fn(op)
        extra["compile"] = "torch.compile(reference, fullgraph=True, dynamic=False)"
    x = x.detach().requires_grad_(backward)  # a fresh leaf: no .grad from another impl

    f, got = first_call(op, impl, f, x, extra, sync)
    if impl in ("cuda", "triton"):
        got |= per_input(op, x, impl)
    extra.update(check(op, dtype, impl, got, eager, oracle))  # a broken kernel cannot post a time
    for _ in range(WARMUP_CALLS):
        run_once(op, f, x)

    # launches of the timed forward and backward (reduction 'mean'); for the fused impls also of the op
    # alone (reduction='none' with a [B] upstream gradient): what the one-launch target counts
    x.grad = None
    if backward:
        extra.update(launch_counts(f, x, torch.ones((), device=DEVICE)))  # the losses are fp32
        if impl in ("cuda", "triton"):
            op_fn = functools.partial(OPS[op].public, backend=impl, reduction="none")
            extra.update(launch_counts(op_fn, x, torch.rand(b, device=DEVICE) + 0.5, suffix="_op"))
    else:
        with torch.no_grad():
            extra.update(launch_counts(f, x, None))
            if impl in ("cuda", "triton"):
                extra.update(launch_counts(f, x, None, suffix="_op"))

    bytes_x = x.numel() * x.element_size()
    factor = 3 if backward else 1
    extra.update(bytes_x=bytes_x, traffic_factor=factor, traffic_bytes=factor * bytes_x)

    benchmark.group = f"{op} {size} {dtype}"
    run_pedantic(benchmark, timed_step(f, x, backward))
    x.grad = None
    extra.update(gpu_timing_extra(benchmark, factor * bytes_x, b, gpu))
    benchmark.extra_info.update(extra)


# ---------------------------------------------------------------------------------------------------
# the EOT step
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,impl", eot_cases())
def test_bench_gpu_eot(benchmark, gpu, variant, impl):
    """One fastdiv.eot_step at B=128, n=10, D=3072 fp32 (test_bench_eot.py's case, on the GPU)."""
    x, x0, grads, kw = make_eot_case(EOT_SIZE, variant)
    x, x0, grads = x.to(DEVICE), x0.to(DEVICE), grads.to(DEVICE)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    extra = {"op": f"eot_step {variant}", "size": EOT_SIZE, "B": x.shape[0], "n": grads.shape[0],
             "D": x[0].numel(), "dtype": "fp32", "impl": impl, "quick": QUICK, "pass": "step", **gpu}
    if impl in ("cuda", "triton"):
        f = lambda: fastdiv.eot_step(x, x0, grads, backend=impl, **kw)  # noqa: E731
    elif impl == "eager":
        f = lambda: reference.eot_step(x, x0, grads, **kw)  # noqa: E731
    else:
        torch._dynamo.reset()
        compiled = torch.compile(reference.eot_step, fullgraph=True, dynamic=False)
        f = lambda: compiled(x, x0, grads, **kw)  # noqa: E731
        extra["compile"] = "torch.compile(reference.eot_step, fullgraph=True, dynamic=False)"
    t0 = time.perf_counter()
    got = f()  # also compiles
    sync()
    if impl == "compiled":
        extra["compile_s"] = time.perf_counter() - t0
    want = reference.eot_step(x, x0, grads, **kw)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        # l_inf steps are exact up to sign ties of a near-zero mean gradient; allow a few elements
        mismatch = ((g - w).abs() > 1e-5 * max(1.0, w.abs().max().item())).float().mean().item()
        assert mismatch < 1e-4, f"{impl} eot_step {variant}: {mismatch:.2%} of elements differ from the reference"
    for _ in range(WARMUP_CALLS):
        f()
    extra.update(launch_counts(lambda _: f(), x, None))
    n = grads.shape[0]
    traffic = (n + 3) * x.numel() * x.element_size()
    if "momentum" in kw:
        traffic += 2 * kw["momentum"].numel() * 4
    extra["traffic_bytes"] = traffic
    benchmark.group = f"eot_step {variant} {EOT_SIZE} fp32"
    run_pedantic(benchmark, f)
    extra.update(gpu_timing_extra(benchmark, traffic, x.shape[0], gpu))
    benchmark.extra_info.update(extra)
