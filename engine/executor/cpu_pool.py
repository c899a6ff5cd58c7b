"""The CPU side of the partition: CC pieces computed by a worker thread while the thread that
drives the GPU goes on enqueuing GPU work.

All CC pieces of one layer are handed over as one job. The math runs in the optimised kernels of
`engine.cpu_kernels` when they are available (bf16), else in torch's own CPU linear algebra.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.cpu_kernels.cpu_info import default_num_threads
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


def _torch_jobs(jobs: list[CpuJob], act: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for job in jobs:
        gate, up = F.linear(job.x, job.piece.gate_up).chunk(2, dim=-1)
        job.out.copy_(F.linear(act(gate) * up, job.piece.down))


def _kernel_preparer(activation: str, num_threads: int | None) -> Callable[[list[CpuJob]], Callable[[], None]] | None:
    """engine.cpu_kernels.prepare_slice_jobs for the pool's jobs when the kernels exist, else None.
    `num_threads` (when given) sizes the kernels' own thread pool; else their default stands
    (SCHEINFER_CPU_THREADS, or physical cores - 1)."""
    try:
        from engine.cpu_kernels import SliceJob, prepare_slice_jobs, set_num_threads
    except ImportError:
        return None
    if num_threads is not None:
        set_num_threads(num_threads)

    def prepare(jobs: list[CpuJob]) -> Callable[[], None]:
        # the executor builds x and out to the pieces' shapes; the pieces are the model's own
        return prepare_slice_jobs([SliceJob(j.x, j.piece.gate_up, j.piece.down, j.out) for j in jobs], activation,
                                  check=False)

    return prepare


class CpuPool:
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], activation: str,
                 num_threads: int | None = None) -> None:
        self.num_threads = num_threads or default_num_threads()
        # The worker holds the GIL only briefly per layer, but with the default 5 ms switch interval
        # the thread driving the GPU could wait that long to get it back.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._act = act
        self._prepare = _kernel_preparer(activation, num_threads)
        # Thread counts are per OS thread in OpenMP: set it in the worker itself.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scheinfer-cpu",
                                          initializer=torch.set_num_threads, initargs=(self.num_threads,))
        self.busy_s = 0.0

    def submit(self, batch: CpuBatch, inputs_ready: torch.cuda.Event | None,
               timeline: StepTimeline | None = None) -> Future[CpuBatch]:
        """Prepares the batch's kernel call on the calling thread (all the Python), then hands the
        call to the worker, which waits for the inputs and computes."""
        jobs = batch.jobs
        if self._prepare is not None and all(j.x.dtype == torch.bfloat16 for j in jobs):
            compute = self._prepare(jobs)
        else:
            def compute() -> None:
                _torch_jobs(jobs, self._act)
        return self._worker.submit(self._run, batch, compute, inputs_ready, timeline)

    def _run(self, batch: CpuBatch, compute: Callable[[], None], inputs_ready: torch.cuda.Event | None,
             timeline: StepTimeline | None) -> CpuBatch:
        if inputs_ready is not None:
            inputs_ready.synchronize()  # the activations' device-to-host copies have landed
        start = now_s()
        with torch.inference_mode():
            compute()
        end = now_s()
        self.busy_s += end - start
        if timeline is not None:
            timeline.cpu_interval("cpu", start, end, f"{len(batch.jobs)} CC pieces")
        return batch

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True)
