"""What the CPU offers the kernels: instruction-set flags and physical cores (Linux /proc, /sys)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

# Flags each kernel path needs (names as /proc/cpuinfo spells them).
PATH_FLAGS: dict[str, tuple[str, ...]] = {
    "amx": ("amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512f"),
    "avx512_bf16": ("avx512_bf16", "avx512bw", "avx512vl", "avx512f"),
    "avx2": ("avx2", "fma"),
}


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    flags: frozenset[str]
    num_logical_cpus: int  # usable by this process (affinity mask)
    num_physical_cores: int  # distinct cores among those CPUs

    def supports(self, path: str) -> bool:
        return all(flag in self.flags for flag in PATH_FLAGS[path])

    def missing(self, path: str) -> list[str]:
        return [flag for flag in PATH_FLAGS[path] if flag not in self.flags]


def _physical_cores(cpus: set[int]) -> int:
    cores: set[str] = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


@functools.cache
def cpu_info() -> CpuInfo:
    model_name, flags = "unknown", frozenset[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model_name == "unknown":
                model_name = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    return CpuInfo(model_name, flags, len(cpus), _physical_cores(cpus))


def default_num_threads() -> int:
    """SCHEINFER_CPU_THREADS, else physical cores minus one (the thread driving the GPU keeps one)."""
    value = os.environ.get("SCHEINFER_CPU_THREADS", "").strip()
    if value:
        return max(1, int(value))
    return max(1, cpu_info().num_physical_cores - 1)
