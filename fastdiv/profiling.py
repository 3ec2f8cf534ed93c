"""What a piece of code puts on the GPU: its kernel launches and memcpy/memset operations, from
torch.profiler. Used by the GPU tests and benchmarks to check "one launch forward, one backward".

    kernels, copies = fastdiv.profiling.gpu_work(lambda: fastdiv.dpp_loss(g, reduction="none"))
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def device_work(events) -> tuple[list[str], list[str]]:
    """(kernels, memcpy/memset operations) among torch.profiler events, by name: the device-side events
    of the CUDA activity (``device_type == DeviceType.CUDA``), split by Kineto's activity type. CPU-side
    runtime calls (cudaLaunchKernel, cudaMemcpyAsync: device_type CPU) and GPU annotations do not count."""
    kernels, copies = [], []
    for evt in events:
        if evt.device_type != DeviceType.CUDA:
            continue
        if evt.activity_type == "kernel":
            kernels.append(evt.name)
        elif evt.activity_type in ("gpu_memcpy", "gpu_memset"):
            copies.append(evt.name)
    return kernels, copies


def gpu_work(fn: Callable[[], object]) -> tuple[list[str], list[str]]:
    """Runs ``fn()`` once under torch.profiler (the device synchronized before and after) and returns
    the names of the kernels and of the memcpy/memset operations it put on the GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("fastdiv.profiling.gpu_work needs a CUDA device")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return device_work(prof.events())
