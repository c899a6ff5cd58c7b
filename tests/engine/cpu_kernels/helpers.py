"""Helpers of the CPU kernel tests: random jobs, the fp64 reference, forcing a path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.cpu_kernels import SliceJob, available_paths
from engine.cpu_kernels.cpu_info import cpu_info

KERNEL_PATHS = ("avx2", "avx512_bf16", "amx")


def make_job(num_tokens: int, hidden: int, n: int, seed: int, row_pad: int = 0) -> SliceJob:
    """A random bf16 job; row_pad > 0 makes gate_up and down strided views of wider storage."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16()
    gate_up = (torch.randn(2 * n, hidden + row_pad, generator=gen) * 0.1).bfloat16()[:, :hidden]
    down = (torch.randn(hidden, n + row_pad, generator=gen) * 0.1).bfloat16()[:, :n]
    out = torch.full((num_tokens, hidden), float("nan"))  # poisoned: every element must be written
    return SliceJob(x, gate_up, down, out)


def reference(job: SliceJob, round_h: bool) -> torch.Tensor:
    """fp64 result of the same bf16 operands; round_h rounds the intermediate to bf16 like the kernels."""
    gate, up = (job.x.double() @ job.gate_up.double().T).chunk(2, dim=-1)
    h = F.silu(gate) * up
    if round_h:
        h = h.float().bfloat16().double()
    return h @ job.down.double().T


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    denominator = ref.norm().item()
    return (out.double() - ref).norm().item() / (denominator if denominator > 0 else 1.0)


def force_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Caps the kernels at `path`; skips the test when this CPU cannot run it."""
    if path in KERNEL_PATHS and path not in available_paths():
        missing = cpu_info().missing(path)
        pytest.skip(f"{path} not available here: " + (f"CPU lacks {' '.join(missing)}" if missing else "no build"))
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", path)
