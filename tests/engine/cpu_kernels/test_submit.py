"""Jobs submitted without waiting (the C++ driver thread): same results as a blocking call, in
order, with times on perf_counter's clock; None when some job needs torch."""

from __future__ import annotations

import time

import pytest
import torch

from engine.cpu_kernels import available_paths, run_slice_jobs, start_slice_jobs
from engine.cpu_kernels.slice_job import SliceJob, weight_fields
from engine.executor.cpu_pool import CpuBatch, CpuJob, CpuPool
from engine.model.ffn import UnitSlice
from tests.engine.cpu_kernels.helpers import make_job

needs_kernels = pytest.mark.skipif(not available_paths(), reason="no C++ kernel path on this machine")


def _copy(job: SliceJob) -> SliceJob:
    return SliceJob(job.x, job.gate_up, job.down, torch.full_like(job.out, float("nan")))


@needs_kernels
def test_submitted_jobs_equal_a_blocking_call_and_report_their_times() -> None:
    batches = [[make_job(t, 96, n, seed=10 * b + i) for i, (t, n) in enumerate([(1, 40), (3, 33), (2, 64)])]
               for b in range(3)]
    expected = [[_copy(j) for j in jobs] for jobs in batches]
    for jobs in expected:
        run_slice_jobs(jobs)
    before = time.perf_counter()
    pending = [start_slice_jobs(jobs) for jobs in batches]  # three calls queued at once
    assert all(p is not None for p in pending)
    times = [p.wait() for p in reversed(pending)]  # waited out of order
    after = time.perf_counter()
    for jobs, reference in zip(batches, expected, strict=True):
        for job, ref in zip(jobs, reference, strict=True):
            assert torch.equal(job.out, ref.out)
    starts = sorted(start for start, _ in times)
    for start, end in times:
        assert before <= start <= end <= after
    assert starts == [start for start, _ in reversed(times)]  # run in submission order


@needs_kernels
def test_kept_weight_fields_give_the_same_result() -> None:
    jobs = [make_job(2, 64, 32, seed=5, row_pad=3), make_job(1, 64, 7, seed=6)]
    expected = [_copy(j) for j in jobs]
    run_slice_jobs(expected)
    pending = start_slice_jobs(jobs, weights=[weight_fields(j.gate_up, j.down) for j in jobs])
    assert pending is not None
    pending.wait()
    for job, ref in zip(jobs, expected, strict=True):
        assert torch.equal(job.out, ref.out)


def test_jobs_that_need_torch_are_not_submitted(monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(2, 64, 16, seed=7)
    assert start_slice_jobs([job], activation="gelu") is None
    assert start_slice_jobs([SliceJob(job.x.float(), job.gate_up.float(), job.down.float(), job.out)]) is None
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "torch")
    assert start_slice_jobs([job]) is None


@needs_kernels
def test_pool_runs_kernel_batches_on_the_driver_and_others_on_its_worker() -> None:
    pool = CpuPool(torch.nn.functional.silu, "silu", num_threads=2)
    try:
        for dtype, on_driver in ((torch.bfloat16, True), (torch.float32, False)):
            job = make_job(3, 64, 24, seed=8)
            piece = UnitSlice(0, 24, job.gate_up.to(dtype), job.down.to(dtype))
            out = torch.full((3, 64), float("nan"))
            batch = CpuBatch([CpuJob(0, job.x.to(dtype), piece, 0)], out, torch.arange(3))
            result = pool.submit(batch, None)
            assert (type(result).__name__ == "_Submitted") == on_driver
            assert result.result() is batch
            expected = torch.empty_like(out)
            run_slice_jobs([SliceJob(job.x.to(dtype), piece.gate_up, piece.down, expected)])
            assert torch.equal(out, expected)
        assert pool.busy_s > 0
    finally:
        pool.shutdown()


@needs_kernels
def test_signalled_batches_store_their_value_once_done_and_others_never() -> None:
    """The value a GPU stream waits for (engine/executor/stream_signal.py) is stored by the driver
    after the outputs; batches that run on the Python worker are not signalled."""
    pool = CpuPool(torch.nn.functional.silu, "silu", num_threads=2)
    flag = torch.zeros(1, dtype=torch.int64)
    try:
        for dtype, value, on_driver in ((torch.bfloat16, 7, True), (torch.float32, 9, False), (torch.bfloat16, 8, True)):
            job = make_job(2, 64, 24, seed=value)
            piece = UnitSlice(0, 24, job.gate_up.to(dtype), job.down.to(dtype))
            out = torch.full((2, 64), float("nan"))
            batch = CpuBatch([CpuJob(0, job.x.to(dtype), piece, 0)], out, torch.arange(2))
            result = pool.submit(batch, None, signal=(flag.data_ptr(), value))
            assert getattr(result, "signalled", False) == on_driver
            result.result()
            assert not out.isnan().any()
            assert flag.item() == (value if on_driver else 7)
    finally:
        pool.shutdown()
