"""Compact weights in the kernels: every path decodes each work item's rows and computes the same
bits as it does from the bf16 weights."""

from __future__ import annotations

import pytest
import torch

from engine.cpu_kernels import SliceJob, run_slice_jobs
from engine.cpu_kernels.runner import job_path
from engine.model.compact_weights import max_region_bytes

from .helpers import KERNEL_PATHS, force_path, make_job

compact = pytest.importorskip("engine.cpu_kernels.compact")
pytestmark = pytest.mark.skipif(not compact.available(), reason="the C++ cpu kernels did not build here")


def compact_twin(job: SliceJob) -> SliceJob:
    """The same job with its weights stored compact (gate_up and down as shape-only meta tensors)."""
    gate_up, down = job.gate_up, job.down
    region = torch.empty(max_region_bytes(gate_up.numel() + down.numel()), dtype=torch.uint8)
    piece = compact.compact_piece(gate_up.contiguous(), down.contiguous(), region)
    assert piece is not None
    meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in (gate_up, down)]
    return SliceJob(job.x, meta[0], meta[1], torch.full_like(job.out, float("nan")), piece)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 20, 64])
def test_compact_jobs_give_the_bf16_jobs_bits(monkeypatch: pytest.MonkeyPatch, path: str, num_tokens: int) -> None:
    force_path(monkeypatch, path)
    plain = [make_job(num_tokens, 128, 64, seed=s, row_pad=32 * (s % 2)) for s in range(3)]
    plain[1].gate_up[5, 7] = 0.0  # exceptions in both matrices
    plain[2].down[3, 9] = 1e-30
    twins = [compact_twin(job) for job in plain]
    run_slice_jobs(plain)
    run_slice_jobs(twins)  # one call: several compact jobs share the work items
    assert job_path(twins[0]) == job_path(plain[0])
    for a, b in zip(plain, twins, strict=True):
        assert torch.equal(a.out, b.out)


def test_torch_path_decodes_compact_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(4, 96, 32, seed=9)
    twin = compact_twin(job)
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "torch")
    run_slice_jobs([job])
    run_slice_jobs([twin])
    assert torch.equal(job.out, twin.out)
