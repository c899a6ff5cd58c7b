"""Jobs chosen on the driver thread by a routing written after their submission
(scheinfer_submit_routed): they wait for the gate, run the chosen records with their outputs
placed one after another, give the bits of a plain call, and end (signalled) when given up or when
the routing never comes."""

from __future__ import annotations

import time
from array import array

import pytest
import torch

from engine.cpu_kernels import available_paths, run_slice_jobs
from engine.cpu_kernels.runner import RoutedGate, submit_routed_records
from engine.cpu_kernels.slice_job import SliceJob, describe
from tests.engine.cpu_kernels.helpers import make_job

needs_kernels = pytest.mark.skipif(not available_paths(), reason="no C++ kernel path on this machine")
HIDDEN, EXPERTS, POSITIONS = 64, 4, 2


def _table(x: torch.Tensor) -> tuple[list[list[SliceJob]], array, array]:
    """Per (position, expert) choice its jobs (1 to 3 pieces of the expert, all on activations x),
    their records in one array and the choices' offsets."""
    choices, records, offsets = [], array("q"), array("q", [0])
    for p in range(POSITIONS):
        for e in range(EXPERTS):
            jobs = []
            for k in range(1 + (e + p) % 3):
                job = make_job(1, HIDDEN, 32 + 8 * k, seed=100 * p + 10 * e + k)
                jobs.append(SliceJob(x, job.gate_up, job.down, job.out))
            choices.append(jobs)
            for job in jobs:
                records.extend(describe(job))
            offsets.append(offsets[-1] + len(jobs))
    return choices, records, offsets


def _parts(seed: int):
    """A table of choices on fresh activations, zero ids and flags (gate, cancel, signal), and a
    poisoned output buffer."""
    choices, records, offsets = _table(make_job(1, HIDDEN, 32, seed=seed).x)
    flags = torch.zeros(3, dtype=torch.int64)
    return choices, records, offsets, torch.zeros(POSITIONS, dtype=torch.int64), flags, torch.full((16, HIDDEN), float("nan"))


def _gate(ids: torch.Tensor, flags: torch.Tensor, out: torch.Tensor, value: int, wait_ms: int = 10_000) -> RoutedGate:
    return RoutedGate(ids.data_ptr(), POSITIONS, EXPERTS, flags[0:1].data_ptr(), flags[1:2].data_ptr(), value,
                      out.data_ptr(), out.stride(0) * out.element_size(), wait_ms)


@needs_kernels
def test_a_routed_job_waits_for_its_gate_then_runs_the_chosen_records() -> None:
    choices, records, offsets, ids, flags, out = _parts(1)
    pending = submit_routed_records(records, offsets, _gate(ids, flags, out, 5), signal=flags[2:3].data_ptr(), value=11)
    assert pending is not None
    time.sleep(0.05)
    assert flags[2].item() == 0 and out.isnan().all()  # still waiting for the routing
    ids.copy_(torch.tensor([3, 1]))  # the routing lands, then the gate
    before = time.perf_counter()
    flags[0] = 5
    start, end = pending.wait()
    assert flags[2].item() == 11
    assert before - 0.001 <= start <= end  # its time starts after the gate, not at the submission
    chosen = choices[0 * EXPERTS + 3] + choices[1 * EXPERTS + 1]
    for row, job in enumerate(chosen):
        expected = SliceJob(job.x, job.gate_up, job.down, torch.full((1, HIDDEN), float("nan")))
        run_slice_jobs([expected])
        assert torch.equal(out[row : row + 1], expected.out), f"row {row}"
    assert out[len(chosen) :].isnan().all()


@needs_kernels
def test_a_routed_job_given_up_writes_nothing_and_signals() -> None:
    _, records, offsets, ids, flags, out = _parts(2)
    pending = submit_routed_records(records, offsets, _gate(ids, flags, out, 7), signal=flags[2:3].data_ptr(), value=3)
    assert pending is not None
    flags[1] = 7  # cancelled before its gate
    pending.wait()
    assert flags[2].item() == 3 and out.isnan().all()


@needs_kernels
def test_a_routed_job_whose_routing_never_comes_fails_and_signals() -> None:
    _, records, offsets, ids, flags, out = _parts(3)
    pending = submit_routed_records(records, offsets, _gate(ids, flags, out, 9, wait_ms=50),
                                    signal=flags[2:3].data_ptr(), value=4)
    assert pending is not None
    with pytest.raises(RuntimeError, match="routing never came"):
        pending.wait()
    assert flags[2].item() == 4


@needs_kernels
def test_a_routing_id_out_of_range_fails() -> None:
    _, records, offsets, ids, flags, out = _parts(4)
    ids[1] = EXPERTS
    flags[0] = 1  # the gate is open already
    pending = submit_routed_records(records, offsets, _gate(ids, flags, out, 1))
    assert pending is not None
    with pytest.raises(RuntimeError, match="out of range"):
        pending.wait()
