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
    """Whether this CPU multiplies bf16 natively: avx512_bf16 or amx_bf16 on x86, bf16 on Arm
    (/proc/cpuinfo's flags / Features); None where they cannot be read (no /proc, another
    architecture). Without them torch emulates bf16, several times slower than fp32."""
    arch = platform.machine().lower()
    wanted = {"x86_64": {"avx512_bf16", "amx_bf16"}, "amd64": {"avx512_bf16", "amx_bf16"},
              "aarch64": {"bf16"}, "arm64": {"bf16"}}.get(arch)
    if wanted is None:
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    return bool(flags & wanted)


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
    """(peak FLOP/s per device, where it came from): the config, a GPU table, or on the CPU the best
    matmul probe this machine has ever run (cpu_peak): a probe on a busy machine reads low, and a
    peak read low put MFU above 100%."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "train.peak_tflops"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12 * (0.5 if dtype == torch.float32 else 1.0), f"table ({name})"
    return cpu_peak(dtype, dev, probe_seconds)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "rin_scale", "matmul_peak.json")


def cpu_peak(dtype, dev: torch.device, probe_seconds: float = 0.2) -> tuple[float, str]:
    """The best of this probe and every earlier one on this machine (same CPU model, dtype and
    thread count), kept in peak_cache_path(): the figure only rises, so a loaded machine cannot
    lower it. Best effort: an unwritable cache leaves this probe's figure."""
    import json

    key = f"{_cpu_model()}|{str(dtype).replace('torch.', '')}|{torch.get_num_threads()} threads"
    path = peak_cache_path()
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    probe = matmul_peak(dtype, dev, probe_seconds)
    best = max(probe, float(table.get(key, 0.0)))
    if best > float(table.get(key, 0.0)):
        table[key] = best
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(table, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError:
            pass
    return best, f"best matmul probe on this machine, {str(dtype).replace('torch.', '')}"


class Mfu:
    """MFU = achieved / peak, never above 1: a higher reading means the peak is too low (a CPU probe
    on a busy machine, a GPU missing from the table). Clamped, with one warning naming the setting."""

    def __init__(self, peak: float, source: str):
        self.peak, self.source, self.warned = peak, source, False

    def __call__(self, achieved: float) -> tuple[float, str]:
        """(MFU in [0, 1], a warning to log the first time it was clamped, else "")."""
        mfu = achieved / self.peak
        if mfu <= 1.0:
            return mfu, ""
        first, self.warned = not self.warned, True
        return 1.0, (f"warning: {achieved / 1e12:.3g} TFLOP/s per device is above the peak "
                     f"{self.peak / 1e12:.3g} ({self.source}): MFU shown as 100%; set train.peak_tflops to this "
                     f"device's real peak" if first else "")


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
