"""Busy meters: busy seconds from marks, marks read as they complete, timing events reused."""

from __future__ import annotations

import pytest
import torch

from engine.executor.accelerator import Accelerator
from engine.executor.timeline import BusyMeter


def test_host_marks_add_up_and_do_not_pile_up() -> None:
    meter = BusyMeter()
    for k in range(100):
        meter.add(float(k), k + 0.5)
    assert len(meter._pending) <= 9  # read as new marks arrive
    assert meter.collect() == pytest.approx(50.0)


@pytest.mark.gpu
def test_read_timing_events_are_reused_unless_shared() -> None:
    acc = Accelerator.for_device("cuda")
    meter = BusyMeter(acc.release)
    start, end = acc.record(acc.compute_stream, timing=True), acc.record(acc.compute_stream, timing=True)
    kept_start, kept_end = acc.record(acc.compute_stream, timing=True), acc.record(acc.compute_stream, timing=True)
    meter.add(start, end)
    meter.add(kept_start, kept_end, shared=True)  # a traced step's timeline reads these later
    torch.cuda.synchronize()
    assert meter.collect() >= 0.0 and not meter._pending
    reused = {id(acc.record(acc.compute_stream, timing=True)) for _ in range(2)}
    assert reused == {id(start), id(end)}
    assert kept_start.elapsed_time(kept_end) >= 0.0
