"""What this installation of fastdiv has: versions, built backends, and what 'auto' picks."""
from __future__ import annotations

import os

import torch

from . import _backend


def info() -> dict:
    """A dict describing the installation (printed by ``python -m fastdiv info``)."""
    from . import __version__

    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "fastdiv": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {
            "cpu": _backend.extension_built(),
            "cuda": _backend.cuda_built(),
            "triton": _backend.triton_available(),
            "torch": True,
        },
        "extension_error": _backend.EXTENSION_ERROR,
        "extension_source": _backend.EXTENSION_SOURCE,
        "cpu_kernels": _backend.cpu_capability(),
        "cpu_kernels_supported": _backend.cpu_capabilities(),
        "FASTDIV_CPU_CAPABILITY": os.environ.get("FASTDIV_CPU_CAPABILITY") or None,
        # what ATen detected on this CPU (its own dispatch; ATEN_CPU_CAPABILITY overrides it)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto": {"cpu": _backend.default_backend("cpu"), "cuda": _backend.default_backend("cuda")},
        "FASTDIV_BACKEND": os.environ.get("FASTDIV_BACKEND") or None,
        "threads": torch.get_num_threads(),
    }


def format_info(data: dict) -> str:
    lines = [f"fastdiv {data['fastdiv']}", f"torch {data['torch']}", f"triton {data['triton'] or 'not installed'}",
             f"CUDA device: {data['cuda_device'] or 'none'}", f"CPU threads: {data['threads']}", "backends built:"]
    for name, ok in data["backends"].items():
        lines.append(f"  {name:<7}{'yes' if ok else 'no'}")
    if data["extension_error"]:
        lines.append(f"  (the CPU kernels did not load: {data['extension_error']})")
    else:
        lines.append(f"CPU kernels: {data['extension_source']}")
        chosen = ("FASTDIV_CPU_CAPABILITY" if data["FASTDIV_CPU_CAPABILITY"]
                  else "the best this CPU supports; FASTDIV_CPU_CAPABILITY overrides")
        lines.append(f"CPU kernels run: {data['cpu_kernels']} ({chosen}; this CPU and build support: "
                     f"{', '.join(data['cpu_kernels_supported'])}; ATen's own: {data['cpu_capability']})")
    lines.append(f"auto picks: cpu tensors -> {data['auto']['cpu']}, cuda tensors -> {data['auto']['cuda']}")
    if data["FASTDIV_BACKEND"]:
        lines.append(f"FASTDIV_BACKEND={data['FASTDIV_BACKEND']} overrides 'auto'")
    return "\n".join(lines)
