"""Backend selection (fastdiv._backend), the FASTDIV_BACKEND override, fastdiv.info() and the
``python -m fastdiv info`` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastdiv
from fastdiv import _backend

from conftest import LOSS_CASES, randn

X = randn(2, 3, 4, seed=1).float()


def run_cli(*args: str, env_backend: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTDIV_BACKEND"}
    if env_backend is not None:
        env["FASTDIV_BACKEND"] = env_backend
    return subprocess.run([sys.executable, "-m", "fastdiv", *args], capture_output=True, text=True, env=env,
                          timeout=120)


class Spy:
    """Counts calls of the reference functions and of the compiled-kernel launchers."""

    def __init__(self, monkeypatch):
        from fastdiv.ops import gram, rows

        self.calls: list[str] = []
        for module, names, tag in [
            (fastdiv.reference, ["dpp_loss", "unit_rows", "cosine_gram", "column_variance", "concentration_stats"],
             "torch"),
            (gram, ["gram_loss", "gram", "concentration_stats"], "cpu"),
            (rows, ["normalize", "column_stats"], "cpu"),
        ]:
            for name in names:
                monkeypatch.setattr(module, name, self._wrap(getattr(module, name), tag))

    def _wrap(self, fn, tag):
        def wrapped(*args, **kwargs):
            self.calls.append(tag)
            return fn(*args, **kwargs)

        return wrapped

    def backends(self, call) -> set[str]:
        self.calls.clear()
        call()
        return set(self.calls)


def api_calls(x):
    return [
        lambda: fastdiv.dpp_loss(x),
        lambda: fastdiv.normalize(x),
        lambda: fastdiv.cosine_gram(x),
        lambda: fastdiv.variance_penalty(x),
        lambda: fastdiv.concentration_stats(x),
    ]


def test_backends_constant_and_build_flags():
    assert fastdiv.BACKENDS == ("auto", "cpu", "cuda", "triton", "torch")
    assert fastdiv.extension_built() is True  # this checkout is built (pip install -e .)
    assert _backend.EXTENSION_ERROR is None
    assert fastdiv.triton_available() == (
        _backend.triton_installed() and (torch.cuda.is_available() or _backend.triton_interpreted()))
    assert fastdiv.cuda_built() == torch._C._dispatch_has_kernel_for_dispatch_key("fastdiv::gram", "CUDA")


def test_default_backend():
    assert fastdiv.default_backend("cpu") == "cpu"
    expected = "cuda" if fastdiv.cuda_built() else ("triton" if _backend.triton_installed() else "torch")
    assert fastdiv.default_backend("cuda") == expected
    assert fastdiv.default_backend("mps") == "torch"
    assert fastdiv.default_backend("meta") == "torch"


@pytest.mark.parametrize("cuda,triton,expected", [(True, True, "cuda"), (True, False, "cuda"),
                                                  (False, True, "triton"), (False, False, "torch")])
def test_default_backend_for_cuda_tensors(monkeypatch, cuda, triton, expected):
    """CUDA tensors: the CUDA kernels if built, else Triton if installed, else the reference."""
    monkeypatch.setattr(_backend, "cuda_built", lambda: cuda)
    monkeypatch.setattr(_backend, "triton_installed", lambda: triton)
    assert fastdiv.default_backend("cuda") == expected
    assert fastdiv.default_backend("cpu") == "cpu"  # CPU tensors never go to Triton by default


def test_resolve_backend(monkeypatch):
    assert _backend.resolve_backend("auto", X, "f") == "cpu"
    assert _backend.resolve_backend("cpu", X, "f") == "cpu"
    assert _backend.resolve_backend("torch", X, "f") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve_backend("CPU", X, "f")
    with pytest.raises(ValueError, match=r"f: backend='cuda' runs on CUDA tensors"):
        _backend.resolve_backend("cuda", X, "f")
    if _backend.triton_installed():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _backend.resolve_backend("triton", X, "f") == "triton"  # the interpreter runs CPU tensors
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match=r"f: backend='triton' runs on CUDA tensors "
                                             r"\(or on CPU tensors under TRITON_INTERPRET=1\)"):
            _backend.resolve_backend("triton", X, "f")
    else:
        with pytest.raises(RuntimeError, match="needs the triton package"):
            _backend.resolve_backend("triton", X, "f")
    for value, expected in [("torch", "torch"), ("cpu", "cpu"), ("auto", "cpu"), ("", "cpu"), ("  torch ", "torch")]:
        monkeypatch.setenv("FASTDIV_BACKEND", value)
        assert _backend.resolve_backend("auto", X, "f") == expected, value
        assert _backend.resolve_backend("cpu", X, "f") == "cpu"  # never overrides an explicit backend
    monkeypatch.setenv("FASTDIV_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        _backend.resolve_backend("auto", X, "f")


def test_extension_missing_falls_back_to_torch(monkeypatch):
    """Without fastdiv._C: 'auto' runs the reference, an explicit 'cpu' says how to build."""
    monkeypatch.setattr(_backend, "EXTENSION_ERROR", "No module named 'fastdiv._C'")
    assert fastdiv.extension_built() is False and fastdiv.cuda_built() is False
    assert fastdiv.default_backend("cpu") == "torch"
    assert _backend.resolve_backend("auto", X, "dpp_loss") == "torch"
    with pytest.raises(RuntimeError, match=r"pip install -e \. --no-build-isolation"):
        fastdiv.dpp_loss(X, backend="cpu")
    torch.testing.assert_close(fastdiv.dpp_loss(X), fastdiv.dpp_loss(X, backend="torch"))
    data = fastdiv.info()
    assert data["backends"]["cpu"] is False and data["auto"]["cpu"] == "torch"
    from fastdiv.info import format_info

    assert "the CPU kernels did not load: No module named 'fastdiv._C'" in format_info(data)
    assert "auto picks: cpu tensors -> torch" in format_info(data)


def test_auto_dispatch_uses_kernels(monkeypatch):
    spy = Spy(monkeypatch)
    for call in api_calls(X):
        assert spy.backends(call) == {"cpu"}
    for call in api_calls(X):
        assert "torch" not in spy.backends(call)


@pytest.mark.parametrize("value", ["torch", " torch\n"])
def test_env_override_to_torch(monkeypatch, value):
    spy = Spy(monkeypatch)
    expected = [call() for call in api_calls(X)]
    monkeypatch.setenv("FASTDIV_BACKEND", value)
    for call in api_calls(X):
        assert spy.backends(call) == {"torch"}
    # an explicit backend is never overridden
    assert spy.backends(lambda: fastdiv.dpp_loss(X, backend="cpu")) == {"cpu"}
    got = [call() for call in api_calls(X)]
    torch.testing.assert_close(got[0], expected[0])


def test_env_override_cpu_and_auto(monkeypatch):
    spy = Spy(monkeypatch)
    for value in ("cpu", "auto"):
        monkeypatch.setenv("FASTDIV_BACKEND", value)
        assert spy.backends(lambda: fastdiv.dpp_loss(X)) == {"cpu"}


@pytest.mark.parametrize("value", ["garbage", "CPU", "gpu", "torch,cpu"])
def test_env_garbage_raises(monkeypatch, value):
    monkeypatch.setenv("FASTDIV_BACKEND", value)
    for case in LOSS_CASES:
        with pytest.raises(ValueError, match="FASTDIV_BACKEND"):
            case(X)
    for fn in (fastdiv.normalize, fastdiv.cosine_gram, fastdiv.concentration_stats):
        with pytest.raises(ValueError, match="FASTDIV_BACKEND"):
            fn(X)
    # explicit backends ignore the variable
    fastdiv.dpp_loss(X, backend="cpu")
    fastdiv.dpp_loss(X, backend="torch")


def test_env_cuda_on_cpu_tensor(monkeypatch):
    monkeypatch.setenv("FASTDIV_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda'"):
        fastdiv.mean_cosine_loss(X)
    monkeypatch.setenv("FASTDIV_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((ValueError, RuntimeError), match="backend='triton'"):
        fastdiv.mean_cosine_loss(X)


def test_info_dict(monkeypatch):
    data = fastdiv.info()
    assert data["fastdiv"] == fastdiv.__version__ == "0.1.0"
    assert data["torch"] == torch.__version__
    assert data["backends"] == {"cpu": True, "cuda": fastdiv.cuda_built(), "triton": fastdiv.triton_available(),
                                "torch": True}
    assert data["auto"] == {"cpu": "cpu", "cuda": fastdiv.default_backend("cuda")}
    assert data["extension_error"] is None
    assert data["FASTDIV_BACKEND"] is None
    assert data["threads"] == torch.get_num_threads()
    assert data["cuda_device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    json.dumps(data)  # serializable for `info --json`
    monkeypatch.setenv("FASTDIV_BACKEND", "torch")
    assert fastdiv.info()["FASTDIV_BACKEND"] == "torch"


def test_cli_info_text():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"fastdiv {fastdiv.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "auto picks: cpu tensors -> cpu" in out
    lines = [line.split() for line in out.splitlines()]
    triton_word = "yes" if fastdiv.triton_available() else "no"  # the CLI inherits TRITON_INTERPRET
    assert ["cpu", "yes"] in lines and ["torch", "yes"] in lines and ["triton", triton_word] in lines
    assert "FASTDIV_BACKEND" not in out


def test_cli_info_json_and_env():
    proc = run_cli("info", "--json", env_backend="torch")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["fastdiv"] == fastdiv.__version__
    assert data["backends"]["cpu"] is True
    assert data["auto"]["cpu"] == "cpu"
    assert data["FASTDIV_BACKEND"] == "torch"
    proc = run_cli("info", env_backend="torch")
    assert "FASTDIV_BACKEND=torch overrides 'auto'" in proc.stdout


def test_cli_usage_errors():
    proc = run_cli()
    assert proc.returncode == 2 and "usage" in proc.stderr.lower()
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_error():
    x = torch.randn(2, 3, 4, device="cuda")
    with pytest.raises(ValueError, match="backend='cpu'"):
        fastdiv.dpp_loss(x, backend="cpu")
