"""The Triton kernels compile for an H100/H200 (sm_90), checked without a GPU.

The interpreter (the triton cases of tests/ops/) runs the kernels' Python, which accepts code that Triton's
compiler rejects (type mismatches in loops, unsupported ops on float64, ...). Here every kernel
specialization that fastdiv launches for a small workload (every loss, every dtype, the fused n <= 32
and the two-launch n > 32 paths, the rows ops, the EOT step) is recorded under the interpreter, then
compiled to a cubin for sm_90 by Triton's own compiler and ptxas (shipped in the triton wheel) in a
subprocess with the interpreter off. The signatures are the launch's argument types; the JIT's value
specializations (ints equal to 1, multiples of 16) are not reproduced, so this checks that the code
compiles, not the exact binary a GPU run would build.

Run as a script (``python tests/test_triton_compile.py SPECS.json``) it compiles the recorded specs and
prints one line per failure, then the registers and local-memory bytes of the worst kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

if __name__ != "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
                   torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}


def _signature(fn, args, kwargs) -> tuple[dict, dict]:
    """(argument types, constexpr values) of one launch, JSON-ready (dtype constexprs as {'dtype': name})."""
    import triton.language as tl

    names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    sig, constexprs = {}, {}
    for name in names:
        value = bound.get(name)
        if "constexpr" in str(fn.__annotations__.get(name, "")) or value is None:
            constexprs[name] = {"dtype": str(value)} if isinstance(value, tl.dtype) else value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + TORCH_TO_TRITON[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return sig, constexprs


def _workload() -> None:
    """Every Triton launch path of fastdiv once per dtype, at small sizes."""
    import fastdiv

    gen = torch.Generator().manual_seed(0)
    losses = list(fastdiv.DIVERSITY_LOSSES.values())
    for dtype in TORCH_TO_TRITON:
        if not dtype.is_floating_point:
            continue
        for n, d in ((5, 40), (33, 20)):  # the fused kernel (n <= 32) and the two-launch path
            x = torch.randn(3, n, d, generator=gen).to(dtype).requires_grad_()
            for loss in losses:
                loss(x, backend="triton").backward()
            fastdiv.normalize(x, backend="triton").sum().backward()
            fastdiv.cosine_gram(x, backend="triton").sum().backward()
            for q in (2.0, float("inf")):
                fastdiv.concentration_stats(x.detach(), q=q, backend="triton")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.rand(4, 50, generator=gen).to(dtype)
        grads = torch.randn(6, 4, 50, generator=gen).to(dtype)
        for norm in ("linf", "l2"):
            for momentum in (None, torch.zeros(4, 50, dtype=acc)):
                fastdiv.eot_step(x, x, grads, alpha=0.01, eps=0.03, norm=norm, momentum=momentum, backend="triton")


@pytest.mark.triton
def test_kernels_compile_for_sm90(tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")
    import fastdiv

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches under TRITON_INTERPRET=1 (on a GPU the suite compiles them for real)")
    if not fastdiv.extension_built():
        pytest.skip("fastdiv._C is not built")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.interpreter import GridExecutor
    except ImportError as e:
        pytest.skip(f"this Triton ({triton.__version__}) lacks the API the check uses: {e}")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel ships no ptxas")

    specs = {}
    launch = GridExecutor.__call__

    def record(self, *args, **kwargs):
        sig, constexprs = _signature(self.fn, args, kwargs)
        spec = [self.fn.__module__, self.fn.__name__, sig, constexprs, kwargs.get("num_warps", 4)]
        specs[json.dumps(spec, sort_keys=True)] = spec
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", record)
    _workload()
    kernels = {spec[1] for spec in specs.values()}
    assert {"_fused_kernel", "_gram_kernel", "_pullback_kernel", "_eot_kernel", "_normalize_kernel"} <= kernels

    path = tmp_path / "specs.json"
    path.write_text(json.dumps(list(specs.values())))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"sm_90 compilation failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert f"{len(specs)}/{len(specs)} compiled" in done.stdout, done.stdout[-4000:]


def _compile_all(path: str) -> int:
    """Compiles the specs in ``path`` for sm_90; returns the number of failures."""
    import importlib
    import re
    import tempfile
    import traceback

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    specs = json.loads(open(path).read())
    failures, worst = 0, {"registers": (0, ""), "local bytes": (0, "")}
    for module, name, sig, constexprs, num_warps in specs:
        fn = getattr(importlib.import_module(module), name)
        values = {k: tl.core.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in constexprs.items()}
        signature = {arg: sig.get(arg, "constexpr") for arg in fn.arg_names}
        what = f"{name} {constexprs} num_warps={num_warps}"
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs=values), target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": num_warps})
        except Exception as e:  # noqa: BLE001 (reported, counted, and the run goes on)
            failures += 1
            print(f"FAILED {what}: {''.join(traceback.format_exception_only(e))[-2000:]}")
            continue
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(kernel.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                       text=True).stdout
            found = re.search(r"REG:(\d+)", usage)
            regs = int(found.group(1)) if found else 0
            local = sum(int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", usage))
            for key, value in (("registers", regs), ("local bytes", local)):
                if value > worst[key][0]:
                    worst[key] = (value, what)
    for key, (value, what) in worst.items():
        print(f"most {key}: {value} ({what})")
    print(f"{len(specs) - failures}/{len(specs)} compiled for sm_90 with triton {triton.__version__}")
    return failures


if __name__ == "__main__":
    sys.exit(1 if _compile_all(sys.argv[1]) else 0)
