"""Which device and which compute dtype a run uses.

bf16 autocast pays off only where the hardware has fast bf16 matmuls (CUDA with bf16
support, CPUs with AVX512-BF16/AMX); elsewhere it is slower than fp32. CPU flags are
often hidden under a hypervisor, so on CPU a short timed matmul decides when they
are absent. `train.dtype` ("bf16"/"fp32") overrides the choice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much on CPU to be worth its precision loss


@dataclass(frozen=True)
class Hardware:
    device: str   # "cuda" | "mps" | "cpu"
    dtype: str    # "bf16" | "fp32": the autocast dtype (fp32 = no autocast)
    reason: str   # one line for the log: why this dtype

    @property
    def device_index(self) -> str:
        """Where tensors go: this process's own GPU under a multi-process launch (LOCAL_RANK)."""
        import os
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if self.device == "cuda" else self.device

    @property
    def torch_dtype(self):
        import torch
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def autocast(self):
        """A context that runs forward passes in the chosen dtype (a no-op for fp32)."""
        import contextlib

        import torch
        if self.dtype != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16)


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it to the OS.

    A CPU training step allocates and frees the same large activations every step (the head's logits
    alone are hundreds of MB); by default glibc maps each one over 32 MB afresh and trims the heap once
    64 MB lie free, so the next step faults those pages in again and the kernel zeroes them: SmolLM2
    bf16 on the AMX Xeon, the same batch again and again, 65-115k page faults a step, 0 with this,
    and the step ~5 % faster. With no mmap'd chunks and a 2 GiB trim threshold the heap keeps what a
    step used (peak memory unchanged). Process-wide; a no-op off glibc. True where it applied."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # musl and other C libraries: no mallopt, or another name
        return False


def pick_device() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_speedup(size: int = 256, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a square matmul, best of `repeats` (noise from other processes only slows)."""
    import torch

    def best(dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm up kernels
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def detect(requested: str = "auto") -> Hardware:
    """Device and compute dtype for `train.dtype` = auto | bf16 | fp32."""
    device = pick_device()
    if requested in ("bf16", "fp32"):
        return Hardware(device, requested, f"train.dtype = \"{requested}\"")
    if device == "cuda":
        import torch
        if torch.cuda.is_bf16_supported():
            return Hardware(device, "bf16", "CUDA device supports bf16")
        return Hardware(device, "fp32", "CUDA device without bf16 support")
    if device == "mps":
        return Hardware(device, "fp32", "MPS: fp32 (bf16 autocast there is not reliably faster)")
    flags = cpu_flags() & set(BF16_CPU_FLAGS)
    if flags:
        return Hardware(device, "bf16", f"CPU has {', '.join(sorted(flags))}")
    speedup = cpu_bf16_speedup()
    if speedup >= BF16_MIN_SPEEDUP:
        return Hardware(device, "bf16", f"CPU bf16 matmul measured {speedup:.2g}x fp32")
    return Hardware(device, "fp32", f"CPU bf16 matmul measured only {speedup:.2g}x fp32")
