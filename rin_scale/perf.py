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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str:
    """Make glibc keep the memory torch frees, for the next step to reuse, instead of returning it
    to the OS; returns a line for the log.

    A training step on the CPU allocates and frees the same large buffers every step (activations,
    gradients). glibc serves those over its mmap threshold (at most 32 MB)
    with a fresh mmap and unmaps them on free, and trims the heap's free top: the next step faults
    every page in again, zero-filled. A cifar10 step took 30,000-120,000 page faults (120-480 MB)
    on the AVX-512-BF16 EPYC, and 9% (fp32) / 15% (bf16) less time without them. With no mmap and
    no trim, a step takes none once the heap has settled (a few steps). The process's resident
    memory stays at its peak, which the next step needs anyway.
    Not on a GPU: torch's CUDA allocator already caches. Left alone where the user set glibc's own
    knobs (MALLOC_* or GLIBC_TUNABLES), or where the C library is not glibc (musl, macOS)."""
    import ctypes

    mine = sorted(k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    if mine:
        return f"glibc's malloc as set by {', '.join(mine)}"
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return "the C library's malloc as it is (not glibc)"
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return f"glibc {version}'s malloc as it is (mallopt refused)"
    return f"glibc {version} keeps freed memory for reuse (no mmap, no trim)"


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
