"""How the CPU kernels are built and loaded: the shared source/flag list (fastdiv/_build_flags.py), the
first-import build (fastdiv/_jit.py), the wheel's package data and the build capability `info` reports.

The first-import compile itself runs in CI (`.ci/run` tests an x86-64-v3 build made that way); here the
cache key, the switches and the fallback when nothing can be built are checked without compiling."""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys

import pytest
import torch

import fastdiv
from fastdiv import _backend, _build_flags, _jit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPABILITIES = {"AVX512", "AVX2", "SSE4.2", "x86-64 baseline (SSE2)", "non-x86 (compiler default)"}


def test_sources_and_flags():
    with_module = _build_flags.cpu_sources()
    without = _build_flags.cpu_sources(with_module=False)
    assert _build_flags.MODULE_SOURCE in with_module and _build_flags.MODULE_SOURCE not in without
    assert set(with_module) - set(without) == {_build_flags.MODULE_SOURCE}
    names = {os.path.relpath(p, _build_flags.CSRC) for p in without}
    assert {"ops.cpp", "build_info.cpp", os.path.join("cpu", "gram.cpp")} <= names
    assert all(os.path.isfile(p) for p in with_module + _build_flags.headers() + _build_flags.cuda_sources())
    assert _build_flags.cxx_flags("x86-64-v3")[-1] == "-march=x86-64-v3"
    assert not any(f.startswith("-march") for f in _build_flags.cxx_flags(""))


def test_cpu_arch_from_environment(monkeypatch):
    monkeypatch.delenv("FASTDIV_CPU_ARCH", raising=False)
    assert _build_flags.cpu_arch() == "native"
    monkeypatch.setenv("FASTDIV_CPU_ARCH", " x86-64-v2 ")
    assert _build_flags.cpu_arch() == "x86-64-v2" and "-march=x86-64-v2" in _build_flags.cxx_flags()


def test_wheel_carries_every_source():
    """pyproject's package-data globs must match every file under fastdiv/csrc, or an installed wheel
    could not compile its kernels on first import."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["fastdiv"]
    for folder, _, files in os.walk(_build_flags.CSRC):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), _build_flags.PACKAGE_DIR).replace(os.sep, "/")
            # setuptools globs do not cross '/' with '*', as fnmatch on split parts
            assert any(len(p.split("/")) == len(rel.split("/")) and
                       all(fnmatch.fnmatch(a, b) for a, b in zip(rel.split("/"), p.split("/"))) for p in patterns), \
                f"{rel} is not in pyproject.toml's package-data"


def test_wheel_carries_every_python_package():
    """Every folder of fastdiv/ with an __init__.py is a package that pyproject's find rule ships."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        rule = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    shipped = set(setuptools.find_packages(ROOT, include=rule["include"]))
    for folder, _, files in os.walk(_build_flags.PACKAGE_DIR):
        if "__init__.py" in files and "__pycache__" not in folder:
            package = os.path.relpath(folder, ROOT).replace(os.sep, ".")
            assert package in shipped, f"{package} is not shipped by pyproject.toml's packages.find rule"
    assert {"fastdiv", "fastdiv.nn", "fastdiv.attacks", "fastdiv.data"} <= shipped


@pytest.mark.parametrize("value, expected", [("", "fallback"), ("1", "force"), ("on", "force"), ("0", "never"),
                                             ("no", "never")])
def test_jit_mode(monkeypatch, value, expected):
    monkeypatch.setenv("FASTDIV_JIT", value)
    assert _jit.mode() == expected


def test_jit_mode_garbage(monkeypatch):
    monkeypatch.setenv("FASTDIV_JIT", "maybe")
    with pytest.raises(ValueError, match="FASTDIV_JIT must be 1 or 0"):
        _jit.mode()


def test_jit_cache_key(monkeypatch, tmp_path):
    """One folder per torch version, -march and source contents; the same inputs give the same folder."""
    monkeypatch.setenv("FASTDIV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTDIV_CPU_ARCH", "x86-64-v3")
    key = _jit.build_directory("2.13.0")
    assert key == _jit.build_directory("2.13.0") and os.path.dirname(key) == str(tmp_path)
    assert "x86-64-v3" in os.path.basename(key)
    assert _jit.build_directory("2.14.0") != key
    monkeypatch.setenv("FASTDIV_CPU_ARCH", "x86-64-v2")
    assert _jit.build_directory("2.13.0") != key
    monkeypatch.setenv("FASTDIV_CPU_ARCH", "x86-64-v3")
    real_open = open
    source = _build_flags.cpu_sources(with_module=False)[0]

    def edited_open(path, *args, **kwargs):  # the same file list, one source's contents changed
        f = real_open(path, *args, **kwargs)
        if path == source:
            data = f.read() + b"\n// edited\n"
            f.close()
            import io

            return io.BytesIO(data)
        return f

    monkeypatch.setattr("builtins.open", edited_open)
    assert _jit.build_directory("2.13.0") != key


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTDIV_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _jit.cache_root() == os.path.join(str(tmp_path), "fastdiv")
    monkeypatch.setenv("FASTDIV_CACHE_DIR", "relative/dir")
    assert _jit.cache_root() == os.path.abspath("relative/dir")


def test_no_build_and_no_compiling_falls_back_with_a_warning():
    """No fastdiv._C and FASTDIV_JIT=0: import works, warns once with how to build, ops run on 'torch'."""
    code = ("import sys, warnings; sys.modules['fastdiv._C'] = None\n"  # as if the build were absent
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import fastdiv, torch\n"
            "print(fastdiv.extension_built(), fastdiv.default_backend('cpu'), "
            "fastdiv._backend.cpu_build_capability())\n"
            "print([str(x.message) for x in w if 'did not load' in str(x.message)])\n"
            "print(fastdiv.dpp_loss(torch.eye(3)[None]).item())\n")
    env = dict(os.environ, FASTDIV_JIT="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "False torch None"
    assert "FASTDIV_JIT=0" in lines[1] and "pip install -e . --no-build-isolation" in lines[1]
    assert abs(float(lines[2]) - 3 * -torch.log1p(torch.tensor(1e-4)).item()) < 1e-6  # -n log(1 + jitter)


@pytest.mark.skipif(not fastdiv.extension_built(), reason="the CPU kernels did not load")
def test_build_capability_matches_this_cpu():
    """What the loaded kernels were compiled for is known and runs here (a build for more than this CPU
    has would have crashed on the first AVX-512 instruction instead)."""
    capability = _backend.cpu_build_capability()
    assert capability in CAPABILITIES
    info = fastdiv.info()
    assert info["cpu_kernels_built_for"] == capability and info["extension_source"]
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    required = {"AVX512": {"avx512f", "avx512bw", "avx512vl"}, "AVX2": {"avx2", "fma"}, "SSE4.2": {"sse4_2"}}
    if flags:
        assert required.get(capability, set()) <= flags
    assert torch.ops.fastdiv_build.cpu_capability() == capability
