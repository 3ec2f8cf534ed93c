"""The run-time choice among the instruction-set variants of the CPU kernels (fastdiv/csrc/cpu/dispatch.cpp):
which variants this CPU can run, FASTDIV_CPU_CAPABILITY, switching in-process, and that the built library
keeps every AVX instruction inside the AVX2 / AVX-512 variants, so a build made on an AVX-512 machine runs
on an AVX2 or older one. The kernels' numerics under each variant: the op tests, which CI runs once per
capability (`.ci/run`), and tests/ops/test_capabilities.py."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fastdiv
from fastdiv import _backend

pytestmark = pytest.mark.skipif(not fastdiv.extension_built(), reason="the CPU kernels did not load")

X86 = os.uname().machine in ("x86_64", "AMD64")


def _cpu_flags() -> set[str]:
    if not os.path.exists("/proc/cpuinfo"):
        return set()
    with open("/proc/cpuinfo") as f:
        return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}


# what each variant needs from the CPU (the checks of dispatch.cpp, in /proc/cpuinfo's names)
REQUIRED = {"default": set(), "avx2": {"avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt"},
            "avx512": {"avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt", "avx512f", "avx512bw", "avx512vl",
                       "avx512dq", "avx512cd"}}


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "FASTDIV_CPU_CAPABILITY"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_supported_variants_are_the_ones_this_cpu_has():
    supported = _backend.cpu_capabilities()
    assert supported[0] == "default" and set(supported) <= set(_backend.CPU_CAPABILITIES)
    assert supported == [c for c in _backend.CPU_CAPABILITIES if c in supported]  # lowest first
    flags = _cpu_flags()
    if X86 and flags:
        assert supported == [c for c in _backend.CPU_CAPABILITIES if REQUIRED[c] <= flags]


def test_default_choice_is_the_best_supported():
    proc = _run("import fastdiv; print(fastdiv._backend.cpu_capability())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [_backend.cpu_capabilities()[-1]]


@pytest.mark.parametrize("capability", _backend.CPU_CAPABILITIES)
def test_environment_override(capability):
    """FASTDIV_CPU_CAPABILITY picks the variant (case and spaces forgiven); one this CPU cannot run fails at
    import with the reason, never silently running another variant."""
    proc = _run("import fastdiv, torch; print(fastdiv._backend.cpu_capability()); "
                "print(fastdiv.info()['cpu_kernels']); "
                "print(float(fastdiv.dpp_loss(torch.eye(3)[None])))", FASTDIV_CPU_CAPABILITY=f" {capability.upper()} ")
    if capability in _backend.cpu_capabilities():
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.split()
        assert lines[:2] == [capability, capability]
        assert abs(float(lines[2]) - 3 * -torch.log1p(torch.tensor(1e-4)).item()) < 1e-6
    else:
        assert proc.returncode != 0
        assert f"this CPU cannot run the {capability} kernels" in proc.stderr


def test_unknown_override_is_an_error():
    proc = _run("import fastdiv", FASTDIV_CPU_CAPABILITY="avx9000")
    assert proc.returncode != 0
    assert "'avx9000' names no CPU capability" in proc.stderr and "default, avx2, avx512" in proc.stderr


def test_switching_in_process():
    before = _backend.cpu_capability()
    x = torch.randn(3, 4, 37, dtype=torch.float64)
    try:
        results = {}
        for capability in _backend.cpu_capabilities():
            _backend.set_cpu_capability(capability)
            assert _backend.cpu_capability() == capability
            results[capability] = fastdiv.dpp_loss(x, reduction="none")
        ref = fastdiv.dpp_loss(x, reduction="none", backend="torch")
        for capability, value in results.items():
            torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12, msg=capability)
        with pytest.raises(ValueError, match="not one of default, avx2, avx512"):
            _backend.set_cpu_capability("neon9")
    finally:
        _backend.set_cpu_capability(before)
    assert _backend.cpu_capability() == before


# AVX (ymm) and AVX-512 (zmm, opmask) register operands in objdump's AT&T syntax
_YMM = re.compile(r"%ymm\d")
_AVX512 = re.compile(r"%zmm\d|%k[1-7]\b|\{%k[0-7]\}")


@pytest.mark.skipif(not X86, reason="the AVX variants exist on x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_avx_instructions_stay_inside_their_variants():
    """Every function of the built library that uses a ymm register belongs to the AVX2 or AVX-512 variant,
    and every one that uses a zmm or opmask register to the AVX-512 one. An inline function that the
    variants' translation units share (libstdc++, c10) must have been kept from the default-target
    translation unit, or an AVX2 CPU would run an AVX-512 instruction through it (link order: see
    fastdiv/csrc/cpu/kernels/variant.h)."""
    path = _backend.EXTENSION_PATH
    assert path and os.path.exists(path)
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    function, offenders, seen = None, [], 0
    for line in out.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        if function is None:
            continue
        if _AVX512.search(line):
            seen += 1
            if "isa_avx512::" not in function:
                offenders.append(("AVX-512", function))
                function = None
        elif _YMM.search(line):
            seen += 1
            if "isa_avx2::" not in function and "isa_avx512::" not in function:
                offenders.append(("AVX", function))
                function = None
    assert seen > 0, "no AVX instruction found: the AVX2 / AVX-512 variants were not compiled in"
    assert not offenders, "AVX code outside the AVX variants:\n" + "\n".join(f"{k}: {f[:160]}" for k, f in offenders)
