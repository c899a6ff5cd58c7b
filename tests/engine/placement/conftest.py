"""Synthetic hardware profiles for planner tests (rates like DESIGN.md's GPU machine)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.placement.hardware import PROFILE_FORMAT, Fingerprint, HardwareProfile, roofline_table

GPU_TOKENS = (1, 16, 64, 256, 1024, 4096)
CPU_TOKENS = (1, 4, 16, 64, 256, 512)


def synthetic_profile(cpu_bytes_s: float = 48.7e9, cpu_flops: float = 1.89e12, pcie_bytes_s: float = 54.4e9,
                      gpu_free_bytes: int = 80 << 30, with_gpu: bool = True) -> HardwareProfile:
    fingerprint = Fingerprint("Synthetic Xeon", 16, "Synthetic GPU" if with_gpu else "none", "2.11")
    profile = HardwareProfile(fingerprint, roofline_table(cpu_bytes_s, cpu_flops, CPU_TOKENS), 15, "torch",
                              dram_read_bytes_s=88.3e9, sync_s=50e-6, source="synthetic",
                              profile_format=PROFILE_FORMAT)
    if not with_gpu:
        return profile
    return replace(profile, pcie_h2d_bytes_s=pcie_bytes_s, pcie_latency_s=10e-6,
                   gpu_ffn=roofline_table(2.8e12, 700e12, GPU_TOKENS), gpu_total_bytes=gpu_free_bytes,
                   gpu_free_bytes=gpu_free_bytes)


@pytest.fixture
def h100_like() -> HardwareProfile:
    return synthetic_profile()
