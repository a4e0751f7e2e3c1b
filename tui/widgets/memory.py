"""Memory readings: GPU memory per device through NVML (nvidia-ml-py), and host RAM (psutil).

Called from a worker thread; NVML is initialised once and its absence is a reading, not an error.
"""
from __future__ import annotations

import threading

from tui.messages import MemoryReading

_nvml_lock = threading.Lock()
_nvml_state: dict = {}


def _nvml():
    with _nvml_lock:
        if "module" not in _nvml_state:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["module"] = pynvml
            except Exception as exc:  # no driver, no GPU, or no package: report why once
                _nvml_state["module"] = None
                _nvml_state["why"] = type(exc).__name__
        return _nvml_state["module"]


def gpu_memory() -> list[tuple[str, int, int]]:
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(handle)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        out.append((f"GPU{i} {name.decode() if isinstance(name, bytes) else name}", int(info.used), int(info.total)))
    return out


def read_memory() -> MemoryReading:
    import psutil

    vm = psutil.virtual_memory()
    return MemoryReading(gpus=gpu_memory(), host_used=int(vm.total - vm.available), host_total=int(vm.total))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
