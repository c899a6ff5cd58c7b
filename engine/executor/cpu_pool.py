"""The CPU side of the partition: CC pieces computed by a worker thread while the thread that
drives the GPU goes on enqueuing GPU work.

All CC pieces of one layer are handed over as one job. The math runs in the optimised kernels of
`engine.cpu_kernels` when they are available (bf16), else in torch's own CPU linear algebra.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.executor.accelerator import now_s
from engine.executor.timeline import StepTimeline
from engine.model.ffn import UnitSlice

logger = logging.getLogger(__name__)


@dataclass
class CpuJob:
    item: int  # which work item (unit + tokens) this piece belongs to
    x: torch.Tensor  # [num_tokens, hidden] host activations
    piece: UnitSlice  # a host-resident slice
    out: torch.Tensor  # [num_tokens, hidden] fp32 host: written with the piece's partial output


@dataclass
class CpuBatch:
    """All CC jobs of one layer; their outputs are row blocks of `out`, destined for rows `dest`
    of the layer's accumulator."""

    jobs: list[CpuJob]
    out: torch.Tensor  # [num_rows, hidden] fp32 host
    dest: torch.Tensor  # [num_rows] int64 host


def default_cpu_threads() -> int:
    """All cores but one: the thread that drives the GPU keeps a core of its own."""
    return max(1, (os.cpu_count() or 2) - 1)


def _torch_jobs(jobs: list[CpuJob], act: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for job in jobs:
        gate, up = F.linear(job.x, job.piece.gate_up).chunk(2, dim=-1)
        job.out.copy_(F.linear(act(gate) * up, job.piece.down))


def _kernel_runner(activation: str):
    """engine.cpu_kernels.run_slice_jobs when it is there (bf16 pieces), else None."""
    try:
        from engine.cpu_kernels import SliceJob, run_slice_jobs
    except ImportError:
        return None

    def run(jobs: list[CpuJob]) -> None:
        # the executor builds x and out to the pieces' shapes; the pieces are the model's own
        run_slice_jobs([SliceJob(j.x, j.piece.gate_up, j.piece.down, j.out) for j in jobs], activation, check=False)

    return run


class CpuPool:
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], activation: str,
                 num_threads: int | None = None) -> None:
        self.num_threads = num_threads or default_cpu_threads()
        # The worker runs a little Python per layer; with the default 5 ms GIL switch interval the
        # thread driving the GPU could wait that long to get the GIL back after each torch call.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._act = act
        self._kernel = _kernel_runner(activation)
        # Thread counts are per OS thread in OpenMP: set it in the worker itself.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scheinfer-cpu",
                                          initializer=torch.set_num_threads, initargs=(self.num_threads,))
        self.busy_s = 0.0

    def submit(self, batch: CpuBatch, inputs_ready: torch.cuda.Event | None,
               timeline: StepTimeline | None = None) -> Future[CpuBatch]:
        return self._worker.submit(self._run, batch, inputs_ready, timeline)

    def _run(self, batch: CpuBatch, inputs_ready: torch.cuda.Event | None,
             timeline: StepTimeline | None) -> CpuBatch:
        jobs = batch.jobs
        if inputs_ready is not None:
            inputs_ready.synchronize()  # the activations' device-to-host copies have landed
        start = now_s()
        with torch.inference_mode():
            use_kernel = self._kernel is not None and all(j.x.dtype == torch.bfloat16 for j in jobs)
            if use_kernel:
                self._kernel(jobs)
            else:
                _torch_jobs(jobs, self._act)
        end = now_s()
        self.busy_s += end - start
        if timeline is not None:
            timeline.cpu_interval("cpu", start, end, f"{len(jobs)} CC pieces")
        return batch

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True)
