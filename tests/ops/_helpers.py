"""What the op tests of tests/ops/ share: the backend parameter, the raw-op constants and the tolerances of
comparisons between backends.

The backend parameter: every op test takes ``backend``, one of

- ``cpu``: the C++ CPU kernels of fastdiv._C, on CPU tensors;
- ``torch``: the plain reference (fastdiv/reference.py), on CPU tensors;
- ``triton``: the Triton kernels, on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, which
  tests/conftest.py turns on for the session) or compiled, on CUDA tensors (TRITON_INTERPRET=0 and a GPU);
- ``cuda``: the CUDA kernels of fastdiv._C, on CUDA tensors;

given to ``pytest.mark.parametrize("backend", backends(...))``. Each one carries the skip marks that say why
it cannot run here (fastdiv._C not built, no GPU, no CUDA kernels, triton not installed), the ``gpu`` marker
when it runs on a GPU and the ``triton`` marker for the Triton kernels. ``triton:gpu`` is the Triton backend
in a test sized for a GPU (too slow for the interpreter): it skips while the interpreter is on;
``triton:cpu`` the Triton backend in a test written for CPU tensors: it skips unless the interpreter is on.
A new backend adds one entry to ``_marks`` and ``device_of``; a test runs on it by naming it in
``backends()``.

The op schemas are imported here and nowhere else in the op tests.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastdiv._backend import cuda_built, extension_built, triton_installed, triton_interpreted
from fastdiv.ops.schemas import NAMESPACES, SCHEMAS  # noqa: F401  (SCHEMAS is re-exported to the op tests)

HAS_GPU = torch.cuda.is_available()

# ---------------------------------------------------------------------------------------------------
# the backend parameter
# ---------------------------------------------------------------------------------------------------

NO_EXTENSION = "fastdiv._C is not built"
NO_CUDA_KERNELS = "fastdiv._C has no CUDA kernels (build it with a CUDA toolkit and a CUDA build of torch)"
TRITON_INTERPRETED = ("Triton's interpreter is on (TRITON_INTERPRET=1, tests/conftest.py's default) and this test "
                      "is sized for a GPU: run TRITON_INTERPRET=0 python -m pytest tests/ops -m gpu to test the "
                      "compiled Triton kernels")

requires_extension = pytest.mark.skipif(not extension_built(), reason=NO_EXTENSION)


def _marks(name: str, where: str) -> list:
    if name == "cpu":
        return [requires_extension]
    if name == "torch":
        return []
    if name == "cuda":
        # (conditioned on HAS_GPU: without a GPU "needs a CUDA device" is the reason shown)
        return [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device"),
                pytest.mark.skipif(HAS_GPU and not cuda_built(), reason=NO_CUDA_KERNELS)]
    if name == "triton":
        marks = [pytest.mark.triton, pytest.mark.skipif(not triton_installed(), reason="triton is not installed")]
        if triton_interpreted():
            if where == "gpu":
                marks.append(pytest.mark.skip(reason=TRITON_INTERPRETED if HAS_GPU else "needs a CUDA device"))
        elif where == "cpu":
            marks.append(pytest.mark.skip(reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1"))
        else:
            marks += [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device or "
                                                                           "TRITON_INTERPRET=1")]
        return marks
    raise AssertionError(f"unknown backend {name!r}")


def backends(*specs: str) -> list:
    """pytest params of the named backends (``'triton:gpu'``: the Triton backend only when compiled on a GPU,
    ``'triton:cpu'`` only under the interpreter); the id of each is its backend name."""
    out = []
    for spec in specs:
        name, _, where = spec.partition(":")
        assert where in ("", "gpu", "cpu"), spec
        out.append(pytest.param(name, id=name, marks=_marks(name, where)))
    return out



#: the backend groups the raw-op files (test_gram.py, test_rows.py) run their tests over:
#: the C++ ops' own semantics, on CPU tensors
SEMANTICS = backends("cpu")
#: torch.library.opcheck (the GPU backends on GPU tensors)
OPCHECK = backends("cpu", "cuda", "triton:gpu")
#: launchers compared with the C++ CPU ops on the same data: Triton's under the interpreter, as these tests
#: have always run (their inputs move to device_of(backend), so 'triton' would run them compiled on a GPU too)
LAUNCHERS = backends("triton:cpu")
#: op namespaces on a GPU compared with the C++ CPU ops
GPU_SIDE = backends("cuda", "triton:gpu")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
SHAPES = [(2, 1), (3, 7), (5, 100), (17, 1001)]

def device_of(backend: str) -> str:
    """Where the backend's tensors live: 'cuda' for the CUDA kernels and the compiled Triton kernels."""
    if backend == "cuda" or (backend == "triton" and not triton_interpreted()):
        return "cuda"
    return "cpu"


def on_device(fn, backend: str):
    """``fn`` run on a copy of its CPU argument on the backend's device, with the result moved back to the CPU.
    Both moves are differentiable (and no-ops on the CPU), so conftest's CPU helpers (value_and_grad) drive
    every backend unchanged."""
    device = device_of(backend)
    return lambda t: fn(t.to(device)).cpu()


#: what "as on CPU" compares with: the C++ CPU kernels, or the reference where they are not built
CPU_BACKEND = "cpu" if extension_built() else "torch"

# ---------------------------------------------------------------------------------------------------
# the raw ops
# ---------------------------------------------------------------------------------------------------

HEADS = ["dpp", "mean", "kappa", "max", "smoothmax", "gal", "mean_penalty", "sparsity"]
EPS, JITTER, RHO_MAX = 1e-12, 1e-4, 1.0 - 1e-6
ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

#: (rtol, atol relative to max(1, max |expected|)) of comparisons of a backend's raw ops with the C++ CPU
#: ops: outputs in the accumulation dtype, and outputs in the input's dtype. Half-precision outputs may
#: differ by one unit in the last place: the interpreter rounds fp32 -> bf16 toward zero (GPUs round to
#: nearest even), and fp32 results of a different summation order can land on the other side of a
#: half-precision rounding boundary.
ACC_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-6)}
OUT_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 2e-6), torch.float16: (2e-3, 1e-3),
           torch.bfloat16: (1.6e-2, 8e-3)}


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_tol(dtype: torch.dtype) -> tuple[float, float]:
    return ACC_TOL[acc_of(dtype)]


def make_x(b, n, d, dtype, seed=0, layout="contiguous"):
    """[b, n, d] input; 'transposed' is the [n, b, d] -> [b, n, d] view of a sample-major buffer,
    'sliced' has a row stride of 2 d (every other row of a bigger buffer)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        return torch.randn(n, b, d, generator=gen, dtype=torch.float64).to(dtype).transpose(0, 1)
    if layout == "sliced":
        return torch.randn(b, 2 * n, d, generator=gen, dtype=torch.float64).to(dtype)[:, ::2]
    return torch.randn(b, n, d, generator=gen, dtype=torch.float64).to(dtype)


def gpu_randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A standard normal tensor made on the GPU (the large inputs: no CPU generation and copy)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(*shape, generator=gen, device="cuda", dtype=base).to(dtype)


def check(actual, expected, tol, what=""):
    """Same structure, shape, dtype; contiguous; values within (rtol, atol * scale); NaN where NaN
    (``actual`` may live on another device than ``expected``)."""
    if isinstance(expected, torch.Tensor):
        actual, expected = (actual,), (expected,)
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}[{k}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"{what}[{k}]: dtype {a.dtype} != {e.dtype}"
        assert a.is_contiguous(), f"{what}[{k}]: not contiguous"
        if e.numel() == 0:
            continue
        finite = torch.isfinite(e)
        scale = max(1.0, e.double()[finite].abs().max().item()) if finite.any() else 1.0
        rtol, atol = tol
        torch.testing.assert_close(a.cpu().double(), e.cpu().double(), rtol=rtol, atol=atol * scale, equal_nan=True,
                                   msg=lambda m, k=k: f"{what}[{k}]: {m}")


def close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    """Same shape and dtype, values within (rtol, atol * max(1, max |expected|)), NaN where NaN."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    finite = torch.isfinite(expected)
    scale = max(1.0, expected.double()[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol[0], atol=tol[1] * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def namespace(backend: str):
    """The op namespace of a fused backend: torch.ops.fastdiv (cpu, cuda) or torch.ops.fastdiv_triton."""
    return getattr(torch.ops, NAMESPACES[backend])


def kernels(backend: str):
    """The plain launcher functions of a backend, with the semantics of its ops (fastdiv.triton for 'triton';
    imported here because importing triton takes a second)."""
    if backend == "triton":
        import fastdiv.triton as ft

        return ft
    return namespace(backend)


# ---------------------------------------------------------------------------------------------------
# every raw op of one family on one input, for the comparisons of a backend with the C++ CPU ops
# ---------------------------------------------------------------------------------------------------

#: the raw ops of each family (gram: tests/ops/test_gram.py, rows: tests/ops/test_rows.py)
GRAM_OPS = ("gram", "gram_pullback", "gram_loss", "concentration_stats")
ROW_OPS = ("normalize", "normalize_pullback", "column_stats", "column_stats_pullback")


def op_inputs(x: torch.Tensor, seed: int = 4) -> dict:
    """Coefficients and upstream gradients for every launcher on the CPU tensor x (r, mean, var from the C++
    column_stats op; the last three from the global generator, as they always were)."""
    gen = torch.Generator().manual_seed(seed)
    b, n, d = x.shape
    acc = acc_of(x.dtype)
    a = torch.randn(b, n, n, generator=gen, dtype=torch.float64).to(acc)
    beta = torch.randn(b, n, generator=gen, dtype=torch.float64).to(acc)
    g = torch.randn(b, n, d, generator=gen, dtype=torch.float64).to(x.dtype)
    r, mean, var = torch.ops.fastdiv.column_stats(x, EPS)
    gr, gm, gv = torch.randn_like(r), torch.randn_like(mean), torch.randn_like(var)
    return dict(a=a, beta=beta, g=g, r=r, mean=mean, var=var, gr=gr, gm=gm, gv=gv)


def launcher_results(family: str, backend: str, x: torch.Tensor, e: dict) -> list:
    """(name, backend result, C++ CPU result) for every launcher of the family on the CPU tensor x, the
    backend's launchers running on copies on its device."""
    ft, ops = kernels(backend), torch.ops.fastdiv
    dev = device_of(backend)
    xd = x.to(dev)
    d = {k: v.to(dev) for k, v in e.items()}
    if family == "gram":
        out = [
            ("gram", ft.gram(xd, True), ops.gram(x, True)),
            ("gram_pullback", ft.gram_pullback(xd, d["a"], d["beta"]), ops.gram_pullback(x, e["a"], e["beta"])),
            ("stats", ft.concentration_stats(xd, 3.0, EPS, JITTER, RHO_MAX),
             ops.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX)),
        ]
        for head in HEADS:
            args = (head, EPS, JITTER, 0.0, RHO_MAX)
            out.append((head, ft.gram_loss(xd, *args), ops.gram_loss(x, *args)))
        return out
    assert family == "rows", family
    return [
        ("normalize", ft.normalize(xd, EPS), ops.normalize(x, EPS)),
        ("normalize_pullback", ft.normalize_pullback(xd, d["g"], EPS), ops.normalize_pullback(x, e["g"], EPS)),
        ("column_stats", ft.column_stats(xd, EPS), (e["r"], e["mean"], e["var"])),
        ("column_stats_pullback", ft.column_stats_pullback(xd, d["r"], d["mean"], d["gr"], d["gm"], d["gv"], EPS),
         ops.column_stats_pullback(x, e["r"], e["mean"], e["gr"], e["gm"], e["gv"], EPS)),
    ]


def op_results(family: str, ops, x: torch.Tensor, extras: dict) -> dict:
    """Every raw op of the family in one namespace on x (and the coefficient tensors of ``extras``), by name."""
    e = extras
    if family == "rows":
        return {
            "normalize": ops.normalize(x, EPS),
            "normalize_pullback": ops.normalize_pullback(x, e["g"], EPS),
            "column_stats": ops.column_stats(x, EPS),
            "column_stats_pullback": ops.column_stats_pullback(x, e["r"], e["mean"], e["gr"], e["gm"], e["gv"], EPS),
            "column_stats_pullback-var-only": ops.column_stats_pullback(x, e["r"], e["mean"], None, None, e["gv"],
                                                                        EPS),
        }
    assert family == "gram", family
    out = {
        "gram": ops.gram(x, True),
        "gram_pullback": ops.gram_pullback(x, e["a"], e["beta"]),
        "gram_pullback-no-beta": ops.gram_pullback(x, e["a"], None),
        "gram_pullback-scale": ops.gram_pullback(x, e["a"], e["beta"], e["scale"]),
        # a stride-0 scale: what loss.sum().backward() hands the pullback
        "gram_pullback-expanded-scale": ops.gram_pullback(x, e["a"], None, e["scale"][:1].expand(x.shape[0])),
        "concentration_stats-q3": ops.concentration_stats(x, 3.0, EPS, JITTER, RHO_MAX),
        "concentration_stats-qinf": ops.concentration_stats(x, math.inf, EPS, JITTER, RHO_MAX),
    }
    for head in HEADS:
        out[head] = ops.gram_loss(x, head, EPS, JITTER, 0.0, RHO_MAX)
    out["kappa-p-clamped"] = ops.gram_loss(x, "kappa", EPS, JITTER, 2.5, 0.05)
    return out


def op_extras(x: torch.Tensor, seed: int = 4) -> dict:
    """Coefficients and upstream gradients for the raw ops on x, on the CPU (r and mean from the CPU op)."""
    b, n, d = x.shape
    acc = acc_of(x.dtype)
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, dtype=acc: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    r, mean, _ = torch.ops.fastdiv.column_stats(x, EPS)
    return {"a": rnd(b, n, n), "beta": rnd(b, n), "scale": rnd(b), "g": rnd(b, n, d, dtype=x.dtype), "r": r,
            "mean": mean, "gr": rnd(b, n), "gm": rnd(b, d), "gv": rnd(b, d)}


OP_SHAPES = [(3, 2, 7), (3, 7, 100), (4, 10, 3072), (2, 33, 1001), (2, 40, 3072)]


def check_raw_ops_match_cpu_kernels(family: str, backend: str, dtype: torch.dtype, shape) -> None:
    """Every op of the family in the backend's namespace on its device against torch.ops.fastdiv on CPU
    tensors: same shapes, dtypes, contiguous outputs, values to the accumulation dtype's rounding."""
    from conftest import dtype_id, randn

    dev = device_of(backend)
    x = randn(*shape, seed=sum(shape)).to(dtype)
    x[0, 0, 0] = 0  # sign(0) = 0 in the l1 terms
    extras = op_extras(x)
    want = op_results(family, torch.ops.fastdiv, x, extras)
    got = op_results(family, namespace(backend), x.to(dev), {k: v.to(dev) for k, v in extras.items()})
    for name, expected in want.items():
        actual = got[name]
        pairs = zip(actual, expected) if isinstance(expected, tuple) else [(actual, expected)]
        for k, (a, e) in enumerate(pairs):
            assert a.device.type == torch.device(dev).type and a.is_contiguous(), f"{name}[{k}]"
            tol = OUT_TOL[dtype] if e.dtype == dtype else ACC_TOL[e.dtype]
            close(a, e, tol, f"{name}[{k}] {dtype_id(dtype)} {tuple(shape)}")


def check_raw_ops_strided_input_match_cpu_kernels(family: str, backend: str, dtype: torch.dtype) -> None:
    """The ops read strided B and n dims and misaligned rows in place: the same values as the CPU ops."""
    from conftest import randn

    dev = device_of(backend)
    base = randn(6, 2 * 10, 3073, seed=9).to(dtype)
    views = {"strided-B-n": lambda t: t[::2, ::2, :3072], "misaligned-rows": lambda t: t[:3, :10, 1:],
             "transposed": lambda t: t[:5, :6, :3072].transpose(0, 1)}
    for layout, view in views.items():
        x = view(base)
        assert not x.is_contiguous() and x.stride(2) == 1
        extras = op_extras(x.contiguous())
        want = op_results(family, torch.ops.fastdiv, x, extras)
        got = op_results(family, namespace(backend), view(base.to(dev)), {k: v.to(dev) for k, v in extras.items()})
        for name, expected in want.items():
            pairs = zip(got[name], expected) if isinstance(expected, tuple) else [(got[name], expected)]
            for k, (a, e) in enumerate(pairs):
                tol = OUT_TOL[dtype] if e.dtype == dtype else ACC_TOL[e.dtype]
                close(a, e, tol, f"{layout} {name}[{k}]")


def _degenerate_batch():
    """Zero rows (below the norm floor), duplicate rows (DPP near singular, max ties), fully aligned rows
    (rho above rho_max) and cancelling pairs (rho = 0, below kRhoFloor)."""
    x = make_x(4, 5, 23, torch.float64, seed=13)
    x[0, 1] = 0
    x[0, 3] = 0
    x[1, 2] = x[1, 0]
    x[1, 4] = x[1, 0]
    x[2] = x[2, 0]  # all rows equal: rho = 1 > rho_max
    x[3, 1] = -x[3, 0]  # cancelling pairs: rho = 0 (below kRhoFloor)
    x[3, 3] = -x[3, 2]
    x[3, 4] = 0
    return x


def check_zero_and_duplicate_rows(family: str, backend: str) -> None:
    """The degenerate batch: finite and equal to the CPU ops in fp64; in fp32 finite everywhere, and equal
    to the CPU op where the result is well conditioned."""
    x = _degenerate_batch()
    for name, actual, expected in launcher_results(family, backend, x, op_inputs(x)):
        # -log det of a near-singular C amplifies rounding by cond(C + jitter I) ~ n / jitter
        check(actual, expected, (1e-8, 1e-10), f"degenerate {name}")
        for t in (actual if isinstance(actual, tuple) else (actual,)):
            assert torch.isfinite(t).all(), f"degenerate {name}: non-finite output"
    x32 = x.float()
    for name, actual, expected in launcher_results(family, backend, x32, op_inputs(x32)):
        for t in (actual if isinstance(actual, tuple) else (actual,)):
            assert torch.isfinite(t).all(), f"degenerate fp32 {name}: non-finite output"
        if name == "max":
            _check_max_at_ties(x32, actual, expected)
        elif name not in ("dpp", "stats", "kappa", "mean_penalty"):
            check(actual, expected, (1e-4, 1e-5), f"degenerate fp32 {name}")


def _check_max_at_ties(x: torch.Tensor, actual, expected) -> None:
    """R_max where the largest cosine is tied (duplicate rows, cancelling pairs): which tied pair a kernel
    picks depends on its fp32 summation order (AVX2, AVX-512 and Triton differ), and each choice is a valid
    subgradient. So: the same value, and an A that puts weight only on pairs whose cosine is the maximum up
    to fp32 rounding of a D-term dot product (here 1e-5)."""
    loss, a = (t.cpu() for t in actual[:2])
    check(loss, expected[0], (1e-4, 1e-5), "degenerate fp32 max value")
    xd = x.double()
    norms = xd.norm(dim=-1, keepdim=True)
    u = torch.where(norms > 0, xd / norms.clamp_min(1e-300), torch.zeros_like(xd))
    cos = u @ u.transpose(1, 2)
    off = ~torch.eye(cos.shape[-1], dtype=torch.bool)
    top = cos.masked_fill(~off, -math.inf).amax((1, 2), keepdim=True)
    # the same total weight (scale of the subgradient), wherever it sits
    check(a.double().abs().sum((1, 2)), expected[1].cpu().double().abs().sum((1, 2)), (1e-4, 1e-5),
          "degenerate fp32 max: weight of A")
    support = (a.double() != 0) & off
    assert (cos[support.expand_as(cos)] >= top.expand_as(cos)[support.expand_as(cos)] - 1e-5).all(), \
        "degenerate fp32 max: A weights a pair whose cosine is not the maximum"
