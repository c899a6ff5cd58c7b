"""The torch fallback: the same math with torch.nn.functional.linear, job after job.

Used when the C++ kernels are unavailable (no compiler, build failure, SCHEINFER_CPU_KERNEL=torch),
for activations other than silu, and for jobs that are not bf16 (computed in their own dtype). Compact weights are decoded first.
For bf16 it rounds like the model's bf16 GPU path: gate and up outputs in bf16, h in bf16.
"""

from __future__ import annotations

import torch.nn.functional as F

from engine.cpu_kernels.slice_job import SliceJob
from engine.model.ffn import ACTIVATIONS


def run_torch_jobs(jobs: list[SliceJob], activation: str) -> None:
    act = ACTIVATIONS[activation]
    for job in jobs:
        if job.x.shape[0] == 0:
            continue
        gate_up, down = job.weights()
        gate, up = F.linear(job.x, gate_up).chunk(2, dim=-1)
        h = (act(gate.float()) * up.float()).to(job.x.dtype)
        job.out.copy_(F.linear(h, down))
