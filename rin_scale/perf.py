"""What the hardware gives: the measured matmul peak, a device's peak FLOP/s (for MFU), memory in use.
The FLOPs a model needs are counted in rin_scale.flops."""
from __future__ import annotations

import os
import platform
import resource
import time

import torch
import torch.nn.functional as F


def matmul_peak(dtype=torch.float32, dev=torch.device("cpu"), seconds: float = 0.2, n: int = 1024) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` on this device (2 n^3 FLOPs per product).

    Through F.linear, the kernel nn.Linear runs: on CPUs without native bf16 (AVX2 only),
    torch.mm in bf16 takes a generic path ~10x slower than linear's oneDNN one, and a probe on the
    wrong op would put MFU above 100%."""
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    F.linear(a, b)  # warm-up: first call pays for kernel selection
    _sync(dev)
    # A GPU syncs every 4th product (each sync drains its queue); the CPU looks at the clock after
    # each: its emulated bf16 takes ~0.35 s a product on an AVX2-only EPYC, and this probe runs at
    # every trainer start.
    every = 4 if dev.type == "cuda" else 1
    count, t0 = 0, time.perf_counter()
    while True:
        F.linear(a, b)
        count += 1
        if count % every == 0:
            _sync(dev)
            dt = time.perf_counter() - t0
            if dt >= seconds:
                return 2 * n**3 * count / dt


def native_cpu_bf16() -> bool | None:
    """Whether this x86 CPU multiplies bf16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo);
    None where the flags cannot tell (another architecture, no /proc). Without them torch emulates
    bf16, several times slower than fp32."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# Dense bf16 peaks (TFLOP/s) by GPU name; the fp32 numbers are TF32 tensor-core peaks.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def device_peak(dev: torch.device, dtype, configured_tflops: float = 0.0, probe_seconds: float = 0.2) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the config, a GPU table, or a probe."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "train.peak_tflops"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12 * (0.5 if dtype == torch.float32 else 1.0), f"table ({name})"
    return matmul_peak(dtype, dev, probe_seconds), f"matmul probe ({str(dtype).replace('torch.', '')})"


def memory_gb(dev: torch.device) -> dict:
    """Peak memory: GPU allocator peak, or this process's max resident set on the CPU."""
    if dev.type == "cuda":
        return {"peak_gb": torch.cuda.max_memory_allocated(dev) / 2**30,
                "reserved_gb": torch.cuda.memory_reserved(dev) / 2**30}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_gb": rss_kb / 2**20}
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            out["rss_gb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        pass
    return out
