"""Per-step timeline: busy intervals of the CPU pool, the copy stream (PCIe) and the compute stream.

GPU intervals are CUDA events resolved after the step against a reference event recorded at
the step's start; on the CPU stand-in they are host times. Exported as Chrome trace JSON and
summarised as busy fractions and overlap.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.executor.accelerator import Accelerator, now_s

RESOURCES = ("cpu", "pcie", "gpu")
# also traced, not resources: "host" (the driving thread in the executor), "cpu_submit" and "cpu_queue"
# (a CPU job's submit call, and its wait for the driver thread), "gpu_piece" (one streamed piece's compute)
Mark = torch.cuda.Event | float | None


@dataclass(frozen=True)
class Interval:
    resource: str
    start_s: float  # from the step's start
    end_s: float
    label: str = ""


@dataclass(frozen=True)
class StepTrace:
    index: int
    kind: str
    start_s: float  # host clock at the step's start
    duration_s: float
    intervals: tuple[Interval, ...]

    def busy_s(self, resource: str) -> float:
        return _union_length([(i.start_s, i.end_s) for i in self.intervals if i.resource == resource])

    def overlap_s(self) -> float:
        """Time during which at least two resources were busy at once (host intervals are not a resource)."""
        spans = [i for i in self.intervals if i.resource in RESOURCES]
        edges = sorted([(i.start_s, 1) for i in spans] + [(i.end_s, -1) for i in spans])
        busy, last, total = 0, 0.0, 0.0
        for t, delta in edges:
            if busy >= 2:
                total += t - last
            busy, last = busy + delta, t
        return total


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class StepTimeline:
    """Collects one step's intervals; `finish()` resolves them (synchronising the device)."""

    def __init__(self, accelerator: Accelerator, index: int, kind: str) -> None:
        self.accelerator, self.index, self.kind = accelerator, index, kind
        self.start_s = now_s()
        self._reference = accelerator.record(accelerator.compute_stream, timing=True)
        self._pending: list[tuple[str, Mark, Mark, str]] = []

    def cpu_interval(self, resource: str, start_s: float, end_s: float, label: str = "") -> None:
        self._pending.append((resource, start_s, end_s, label))

    def gpu_interval(self, resource: str, start: Mark, end: Mark, label: str = "") -> None:
        self._pending.append((resource, start, end, label))

    def last_end(self, resource: str) -> Mark:
        """The end mark of the latest interval of `resource` recorded so far (None: none yet)."""
        ends = [end for r, _, end, _ in self._pending if r == resource]
        return ends[-1] if ends else None

    def _resolve(self, mark: Mark) -> float:
        if isinstance(mark, float):
            return mark - self.start_s
        assert mark is not None and self._reference is not None
        return self._reference.elapsed_time(mark) / 1000.0

    def finish(self) -> StepTrace:
        self.accelerator.synchronize()
        duration = now_s() - self.start_s
        intervals = tuple(Interval(r, self._resolve(a), self._resolve(b), label)
                          for r, a, b, label in self._pending if a is not None and b is not None)
        return StepTrace(self.index, self.kind, self.start_s, duration, intervals)


def elapsed_s(start: Mark, end: Mark) -> float | None:
    """Seconds from mark `start` to mark `end` (host times, or events of one device); None while the
    end event has not happened yet."""
    if isinstance(start, float) and isinstance(end, float):
        return end - start
    if isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event) and end.query():
        return start.elapsed_time(end) / 1000.0
    return None


def host_mark(accelerator: Accelerator, stream: torch.cuda.Stream | None) -> Mark:
    """An event on `stream` when there is a GPU, else the host time now."""
    return accelerator.record(stream, timing=True) if accelerator.is_cuda else now_s()


@dataclass
class TraceRecorder:
    steps: list[StepTrace] = field(default_factory=list)
    max_steps: int = 100_000

    def add(self, step: StepTrace) -> None:
        if len(self.steps) < self.max_steps:
            self.steps.append(step)

    def summary(self) -> dict[str, float]:
        """Busy fraction of each resource and overlap fraction over all recorded steps."""
        total = sum(s.duration_s for s in self.steps) or 1.0
        out = {f"{r}_busy": sum(s.busy_s(r) for s in self.steps) / total for r in RESOURCES}
        out["overlap"] = sum(s.overlap_s() for s in self.steps) / total
        out["seconds"] = total
        return out

    def chrome_trace(self) -> dict:
        t0 = self.steps[0].start_s if self.steps else 0.0
        events = []
        for step in self.steps:
            base_us = (step.start_s - t0) * 1e6
            events.append({"name": f"step {step.index} ({step.kind})", "ph": "X", "pid": 0, "tid": "step",
                           "ts": base_us, "dur": step.duration_s * 1e6})
            for i in step.intervals:
                events.append({"name": i.label or i.resource, "ph": "X", "pid": 0, "tid": i.resource,
                               "ts": base_us + i.start_s * 1e6, "dur": (i.end_s - i.start_s) * 1e6})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.chrome_trace()))


class BusyMeter:
    """Busy seconds of one resource from (start, end) marks of work that runs one piece at a time
    (a stream), added up once the marks have completed: no synchronisation needed. Marks that are
    only the meter's go back to `release` (an event free list) once read; completed marks are read
    as new ones arrive, so they do not pile up between two reads of `busy_s`."""

    def __init__(self, release: Callable[..., None] | None = None) -> None:
        self._pending: deque[tuple[Mark, Mark, bool]] = deque()
        self._release = release
        self.busy_s = 0.0

    def add(self, start: Mark, end: Mark, shared: bool = False) -> None:
        """`shared`: the marks are read elsewhere too (a traced step's timeline): not released."""
        if start is not None and end is not None:
            self._pending.append((start, end, shared))
            if len(self._pending) > 8:
                self.collect()

    def collect(self) -> float:
        while self._pending:
            start, end, shared = self._pending[0]
            seconds = elapsed_s(start, end)
            if seconds is None:
                break
            self.busy_s += seconds
            if self._release is not None and not shared:
                self._release(start, end)
            self._pending.popleft()
        return self.busy_s
