"""The CPU side of the partition: CC pieces computed by a worker thread while the thread that
drives the GPU goes on enqueuing GPU work.

All CC pieces of one layer are handed over as one job. The math runs in the optimised kernels of
`engine.cpu_kernels` when they are available (bf16), else in torch's own CPU linear algebra.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from array import array
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.cpu_kernels import SliceJob, prepare_slice_jobs, set_num_threads
from engine.cpu_kernels.cpu_info import default_num_threads
from engine.cpu_kernels.runner import PendingJobs, submit_records, torch_takes
from engine.cpu_kernels.slice_job import (
    WeightFields,
    activation_fields,
    activations_ready,
    compact_weight_fields,
    record,
    weight_fields,
    weights_ready,
)
from engine.executor.accelerator import now_s
from engine.executor.timeline import StepTimeline
from engine.model.ffn import UnitSlice

logger = logging.getLogger(__name__)

MAX_KEPT_RECORDS = 16384  # kept job records (then all dropped and kept anew); ~200 B each


@dataclass
class CpuJob:
    item: int  # which work item (unit + tokens) this piece belongs to
    x: torch.Tensor  # [num_tokens, hidden] host activations
    piece: UnitSlice  # a host-resident slice
    row: int  # its partial output goes to rows [row, row + num_tokens) of the batch's `out`


@dataclass
class CpuBatch:
    """All CC jobs of one layer; their outputs are row blocks of `out`, destined for rows `dest`
    of the layer's accumulator."""

    jobs: list[CpuJob]
    out: torch.Tensor  # [num_rows, hidden] fp32 host, contiguous
    dest: torch.Tensor  # [num_rows] int64 host
    dest_device: torch.Tensor | None = None  # `dest` on the device already (kept destinations)
    start_s: float = 0.0  # when the CPU computed it (perf_counter clock), set when it is done
    end_s: float = 0.0
    kept: bool = False  # its buffers are kept ones (decode): its jobs' C++ records are kept too

    def out_of(self, job: CpuJob) -> torch.Tensor:
        return self.out[job.row : job.row + job.x.shape[0]]


def _torch_jobs(batch: CpuBatch, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for job in batch.jobs:
        piece = job.piece
        gate_up, down = piece.compact.decompact() if piece.compact is not None else (piece.gate_up, piece.down)
        gate, up = F.linear(job.x, gate_up).chunk(2, dim=-1)
        batch.out_of(job).copy_(F.linear(act(gate) * up, down))


class _Kernels:
    """The C++ kernels for the pool's jobs: submitted to their own driver thread when every job of a
    batch runs there, else prepared here and run on the pool's Python worker."""

    def __init__(self, activation: str, num_threads: int | None) -> None:
        if num_threads is not None:
            set_num_threads(num_threads)
        self.activation = activation
        # id(piece) -> its weight_fields, or None when the kernels do not read its weights
        self._weights: dict[int, WeightFields | None] = {}
        # a kept batch's job -> its record as packed int64 bytes (appended with one copy, where
        # extending by a tuple of ints converts each: ~2.5 us a job): key (piece id, activations'
        # address and rows, output address)
        self._records: dict[tuple[int, int, int, int], bytes] = {}
        self.record_hits = 0

    def weight_fields(self, piece: UnitSlice) -> WeightFields | None:
        key = id(piece)
        if key not in self._weights:  # pieces live as long as the model: their fields do not change
            if piece.compact is not None:
                self._weights[key] = compact_weight_fields(piece.compact)
            else:
                ready = weights_ready(piece.gate_up, piece.down)
                self._weights[key] = weight_fields(piece.gate_up, piece.down) if ready else None
        return self._weights[key]

    def start(self, batch: CpuBatch, signal: tuple[int, int] | None = None) -> PendingJobs | None:
        """The submitted batch, or None when some job needs torch (or the batch is large enough that
        torch's GEMMs are faster here: runner.torch_takes). The records are built from the
        pieces' kept fields and pointer arithmetic on the batch's output (this runs every layer);
        a kept batch's jobs (the same buffers every decode layer) find their records kept.
        `signal`: (address, value) stored once the jobs are over (runner.submit_records)."""
        out = batch.out
        if out.dtype != torch.float32 or not out.is_contiguous() or torch_takes(
                (j.x.shape[0] for j in batch.jobs), (j.piece.compact is not None for j in batch.jobs)):
            return None
        row_bytes = out.element_size() * out.shape[1]
        out_ptr, hidden = out.data_ptr(), out.shape[1]
        records = array("q")
        for job in batch.jobs:
            x, job_out = job.x, out_ptr + row_bytes * job.row
            key = (id(job.piece), x.data_ptr(), x.shape[0], job_out) if batch.kept else None
            kept = self._records.get(key) if key is not None else None
            if kept is not None:
                self.record_hits += 1
                records.frombytes(kept)
                continue
            weights = self.weight_fields(job.piece)
            if weights is None or not activations_ready(x):
                return None
            job_record = record(activation_fields(x), weights, job_out, hidden)
            if key is not None:
                if len(self._records) >= MAX_KEPT_RECORDS:
                    self._records.clear()
                self._records[key] = array("q", job_record).tobytes()
            records.extend(job_record)
        address, value = signal if signal is not None else (0, 0)
        return submit_records(records, len(batch.jobs), self.activation, address, value)

    def prepare(self, batch: CpuBatch) -> Callable[[], None]:
        jobs = [SliceJob(j.x, j.piece.gate_up, j.piece.down, batch.out_of(j), j.piece.compact) for j in batch.jobs]
        return prepare_slice_jobs(jobs, self.activation, check=False)


class _Submitted:
    """A batch running on the kernels' driver thread; `result()` waits for it (the GIL released)."""

    def __init__(self, pool: CpuPool, batch: CpuBatch, pending: PendingJobs, timeline: StepTimeline | None,
                 signalled: bool = False) -> None:
        self._pool, self._batch, self._pending, self._timeline = pool, batch, pending, timeline
        self._done = False
        self.signalled = signalled  # its end is stored at the signal's address (CpuPool.submit)

    @property
    def batch(self) -> CpuBatch:
        """The batch (its outputs are complete only after `result()` or the signal)."""
        return self._batch

    def result(self) -> CpuBatch:
        if not self._done:
            start, end = self._pending.wait()
            self._done = True
            self._pool.account(self._batch, start, end, self._timeline)
            if self._timeline is not None:  # traced steps: the submit call, and the driver picking the job up
                pending = self._pending
                self._timeline.cpu_interval("cpu_submit", pending.called_s, pending.queued_s)
                self._timeline.cpu_interval("cpu_queue", pending.queued_s, start)
        return self._batch

    def __del__(self) -> None:
        # the kernels write into the batch's buffers: never free them under a running job
        if not self._done:
            with contextlib.suppress(RuntimeError):
                self._pending.wait()


CpuResult = Future[CpuBatch] | _Submitted  # .result() -> CpuBatch


class CpuPool:
    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], activation: str,
                 num_threads: int | None = None) -> None:
        self.num_threads = num_threads or default_num_threads()
        # The worker holds the GIL only briefly per layer, but with the default 5 ms switch interval
        # the thread driving the GPU could wait that long to get it back.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._act = act
        self._kernels = _Kernels(activation, num_threads)
        self.use_driver = True  # False: every batch on the Python worker (A/B in benchmarks)
        # Thread counts are per OS thread in OpenMP: set it in the worker itself.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scheinfer-cpu",
                                          initializer=torch.set_num_threads, initargs=(self.num_threads,))
        self.busy_s = 0.0

    @property
    def activation(self) -> str:
        return self._kernels.activation

    def weight_fields(self, piece: UnitSlice) -> WeightFields | None:
        """The piece's weight fields for the C++ kernels' records (kept), or None when they do not
        read its weights."""
        return self._kernels.weight_fields(piece)

    def submit(self, batch: CpuBatch, inputs_ready: torch.cuda.Event | None,
               timeline: StepTimeline | None = None, signal: tuple[int, int] | None = None) -> CpuResult:
        """Starts the batch. bf16 jobs that the C++ kernels take go straight to their driver thread
        once the inputs have landed (this thread waits for the device-to-host copy: it is enqueued
        right after the GPU work this thread already waited for). Others: the Python part is done
        here, the compute on the worker, which waits for the inputs itself. `signal`: (address,
        value) that the driver stores when the batch is over; only batches on the driver signal
        (the result's `signalled`)."""
        jobs = batch.jobs
        bf16 = all(j.x.dtype == torch.bfloat16 for j in jobs)
        if bf16 and self.use_driver:
            if inputs_ready is not None:
                inputs_ready.synchronize()
                inputs_ready = None
            pending = self._kernels.start(batch, signal)
            if pending is not None:
                return _Submitted(self, batch, pending, timeline, signalled=signal is not None)
        if bf16:
            compute = self._kernels.prepare(batch)
        else:
            def compute() -> None:
                _torch_jobs(batch, self._act)
        return self._worker.submit(self._run, batch, compute, inputs_ready, timeline)

    def _run(self, batch: CpuBatch, compute: Callable[[], None], inputs_ready: torch.cuda.Event | None,
             timeline: StepTimeline | None) -> CpuBatch:
        if inputs_ready is not None:
            inputs_ready.synchronize()  # the activations' device-to-host copies have landed
        start = now_s()
        with torch.inference_mode():
            compute()
        self.account(batch, start, now_s(), timeline)
        return batch

    def account(self, batch: CpuBatch, start_s: float, end_s: float, timeline: StepTimeline | None) -> None:
        """Adds a finished batch's compute time to the busy meter and the step's timeline."""
        batch.start_s, batch.end_s = start_s, end_s
        self.busy_s += end_s - start_s
        if timeline is not None:
            timeline.cpu_interval("cpu", start_s, end_s, f"{len(batch.jobs)} CC pieces")

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True)
