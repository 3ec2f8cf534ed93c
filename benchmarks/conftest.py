"""Session-wide pieces of the fastdiv benchmarks: the measured CPU copy bandwidth and the machine info.

The copy bandwidth is the yardstick for "% of copy" in the results. It is measured once per session,
before the first benchmark runs, with ``torch.Tensor.copy_`` between two large fp32 buffers
(``FASTDIV_BENCH_COPY_MB`` MiB each, default 1024, never less than 256), best of several repeats, and
counted as read + write bytes: ``2 * bytes / time``. The losses are rated the same way (every byte
read or written counted once, write-allocate reads not counted), against their minimal traffic of
3 x bytes(X) for forward + backward.
"""
from __future__ import annotations

import os
import platform
import time

import pytest
import torch

MIN_COPY_MB = 256
COPY_REPEATS = 10
COPY_CONVENTION = "read+write bytes per second: 2 * bytes(buffer) / best time of dst.copy_(src)"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo (Linux); platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def measure_copy_bandwidth(mib: int, repeats: int = COPY_REPEATS) -> dict:
    """Best-of-``repeats`` bandwidth of an fp32 ``copy_`` of ``mib`` MiB, as read+write bytes/s."""
    numel = mib * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32)  # ones, not empty: touch every page before timing
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst (page faults) stays out of the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    nbytes = src.numel() * src.element_size()
    return {
        "copy_bytes_per_s": 2 * nbytes / best,
        "copy_GBps": 2 * nbytes / best / 1e9,
        "copy_buffer_MiB": mib,
        "copy_repeats": repeats,
        "copy_best_s": best,
        "copy_convention": COPY_CONVENTION,
        "copy_threads": torch.get_num_threads(),
    }


@pytest.fixture(scope="session")
def copy_bandwidth(request) -> dict:
    """Measured once, when the first benchmark asks for it (before any benchmark has run)."""
    mib = max(MIN_COPY_MB, int(os.environ.get("FASTDIV_BENCH_COPY_MB", "1024")))
    result = measure_copy_bandwidth(mib)
    request.config._fastdiv_copy_bandwidth = result
    return result


@pytest.fixture(scope="session")
def machine() -> dict:
    """What each benchmark records about where it ran."""
    return {"cpu_model": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def fastdiv_machine_info(config) -> dict:
    import fastdiv

    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "fastdiv": getattr(fastdiv, "__version__", None),
        "fastdiv_info": fastdiv.info(),
        "command": "python -m pytest " + " ".join(config.invocation_params.args),
        "bench_env": {k: v for k, v in sorted(os.environ.items())
                      if k.startswith("FASTDIV_") or k == "ATEN_CPU_CAPABILITY"},
    }
    copy = getattr(config, "_fastdiv_copy_bandwidth", None)
    if copy is not None:
        info.update(copy)
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    # Runs when the JSON is written (end of session), after the copy bandwidth was measured.
    machine_info["fastdiv"] = fastdiv_machine_info(config)


def pytest_configure(config):
    # raised inside torch.compile's own imports, not by fastdiv: noise in every compiled case
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_report_header(config):
    quick = " QUICK (shrunken sizes, not for results)" if env_flag("FASTDIV_BENCH_QUICK") else ""
    matrix = os.environ.get("FASTDIV_BENCH_MATRIX", "default")
    return (f"fastdiv benchmarks: matrix={matrix}{quick}; cpu={cpu_model()}; "
            f"threads={torch.get_num_threads()}; torch={torch.__version__}")
