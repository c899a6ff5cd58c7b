"""The torch fallback: the same math with torch.nn.functional.linear, job after job.

Used when the C++ kernels are unavailable (no compiler, build failure, SCHEINFER_CPU_KERNEL=torch),
for activations other than silu, and for jobs that are not bf16 (computed in their own dtype). Compact weights are decoded first.
For bf16 it rounds like the model's bf16 GPU path: gate and up outputs in bf16, h in bf16.
Also where torch's GEMMs are faster than the kernels (large token blocks on CPUs without AMX:
runner.torch_from_tokens); compact weights are then decoded by the kernels' own decoder, ~100x
faster than the torch reference decoder.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from engine.cpu_kernels.slice_job import SliceJob
from engine.model.ffn import ACTIVATIONS


def run_torch_jobs(jobs: list[SliceJob], activation: str) -> None:
    act = ACTIVATIONS[activation]
    for job in jobs:
        if job.x.shape[0] == 0:
            continue
        gate_up, down = _bf16_weights(job)
        gate, up = F.linear(job.x, gate_up).chunk(2, dim=-1)
        h = (act(gate.float()) * up.float()).to(job.x.dtype)
        job.out.copy_(F.linear(h, down))


def _bf16_weights(job: SliceJob) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up, down) in bf16: compact ones decoded by the C++ decoder where it is built (the same
    bits as the reference decoder), else by job.weights()."""
    piece = job.compact
    if piece is None:
        return job.gate_up, job.down
    from engine.cpu_kernels import compact

    if not compact.available():
        return job.weights()
    threads = torch.get_num_threads()  # the CPU pool's (it sets torch's to the kernels' count)
    gate_up_shape, down_shape = tuple(piece.gate_up.shape), tuple(piece.down.shape)
    gate_up_numel = gate_up_shape[0] * gate_up_shape[1]
    buffer = _decode_buffer(gate_up_numel + down_shape[0] * down_shape[1])
    gate_up = compact.unpack_rows(piece.gate_up, 0, gate_up_shape[0], threads,
                                  out=buffer[:gate_up_numel].view(gate_up_shape))
    down = compact.unpack_rows(piece.down, 0, down_shape[0], threads, out=buffer[gate_up_numel:].view(down_shape))
    return gate_up, down


_decoded = threading.local()  # each thread's decode buffer (the torch path runs on the CPU pool's worker)


def _decode_buffer(numel: int) -> torch.Tensor:
    """This thread's bf16 buffer of at least `numel` values, kept: a fresh one each job would
    fault in its pages again (tens of MB a piece, several ms)."""
    buffer = getattr(_decoded, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _decoded.buffer = torch.empty(numel, dtype=torch.bfloat16)
    return buffer[:numel]
