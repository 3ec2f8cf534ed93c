"""How the CPU kernels are built and loaded: the shared source/flag list (fastdiv/_build_flags.py), the
first-import build (fastdiv/_jit.py) and the wheel's package data (the run-time choice of instruction set:
tests/test_cpu_dispatch.py).

The first-import compile itself runs in CI (`.ci/run` tests a build made that way); here the cache key, the
switches and the fallback when nothing can be built are checked without compiling."""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys

import pytest
import torch

from fastdiv import _build_flags, _jit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sources_and_flags():
    with_module = _build_flags.cpu_sources()
    without = _build_flags.cpu_sources(with_module=False)
    assert _build_flags.MODULE_SOURCE in with_module and _build_flags.MODULE_SOURCE not in without
    assert set(with_module) - set(without) == {_build_flags.MODULE_SOURCE}
    names = {os.path.relpath(p, _build_flags.CSRC) for p in without}
    assert {"ops.cpp", "build_info.cpp", os.path.join("cpu", "dispatch.cpp")} <= names
    assert all(os.path.isfile(p) for p in with_module + _build_flags.headers() + _build_flags.cuda_sources())
    assert os.path.join(_build_flags.CSRC, "cpu", "kernels", "gram.cpp") in _build_flags.headers()
    # sorted, as setuptools links them: the default variant before the AVX ones (cpu/kernels/variant.h)
    assert without == sorted(without)
    variants = [os.path.basename(p) for p in without if os.path.basename(p).startswith("isa_")]
    assert variants == ["isa_0_default.cpp", "isa_1_avx2.cpp", "isa_2_avx512.cpp"]
    # no -march: the build must run on any CPU of its architecture
    assert not any(f.startswith("-march") for f in _build_flags.cxx_flags())


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
    """One folder per torch version and source contents; the same inputs give the same folder."""
    monkeypatch.setenv("FASTDIV_CACHE_DIR", str(tmp_path))
    key = _jit.build_directory("2.13.0")
    assert key == _jit.build_directory("2.13.0") and os.path.dirname(key) == str(tmp_path)
    assert _jit.build_directory("2.14.0") != key
    real_open = open
    source = os.path.join(_build_flags.CSRC, "cpu", "kernels", "gram.cpp")  # included, not compiled alone

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
            "fastdiv._backend.cpu_capability())\n"
            "print([str(x.message) for x in w if 'did not load' in str(x.message)])\n"
            "print(fastdiv.dpp_loss(torch.eye(3)[None]).item())\n")
    env = dict(os.environ, FASTDIV_JIT="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "False torch None"
    assert "FASTDIV_JIT=0" in lines[1] and "pip install -e . --no-build-isolation" in lines[1]
    assert abs(float(lines[2]) - 3 * -torch.log1p(torch.tensor(1e-4)).item()) < 1e-6  # -n log(1 + jitter)
