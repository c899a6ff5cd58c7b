"""Host buffers of decode layers' CPU batches, kept and shared: every decode layer builds a batch
of the same few shapes.

A decode layer's CPU job writes its pieces' partial outputs into one pinned fp32 buffer, whose
rows go to accumulator rows `dest` on the GPU. Allocating both (pinned memory) every layer was a
good part of the time between entering a layer's FFN and the CPU job's start. Here output buffers
are shared by the batches of one row count (one layer's job runs at a time): before a buffer is
handed to the CPU again, the copy out of it must have finished (`consumed`, waited on in
`output`). Destination rows repeat (at batch 1 they are the item indices of the CPU's pieces):
each distinct list is kept, on the host and on the device. Only small batches (decode) take these
buffers; the C++ job records of their pieces are kept by the CPU pool (cpu_pool._Kernels).
"""

from __future__ import annotations

import torch

from engine.executor.accelerator import Accelerator
from engine.executor.cpu_pool import CpuBatch

MAX_KEPT_DESTINATIONS = 4096  # destination lists kept (then all dropped and kept anew); ~100 B each
MAX_KEPT_ROWS = 32  # larger batches (prefill) get fresh buffers: kept ones would pile up


class DecodeCpuBuffers:
    def __init__(self, accelerator: Accelerator, max_destinations: int = MAX_KEPT_DESTINATIONS) -> None:
        self.accelerator = accelerator
        self.max_destinations = max_destinations
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}  # (rows, hidden) -> shared output buffer
        self._consumed: dict[tuple[int, int], torch.cuda.Event | None] = {}  # its last reader's event
        self._destinations: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0  # destination lists found kept
        self.misses = 0

    def output(self, num_rows: int, hidden: int) -> torch.Tensor:
        """The shared output buffer of this shape, once its previous contents were copied out."""
        shape = (num_rows, hidden)
        event = self._consumed.get(shape)
        if event is not None:
            event.synchronize()  # normally long done: the next layer starts after a later sync
        out = self._outputs.get(shape)
        if out is None:
            out = self._outputs[shape] = self.accelerator.host_empty(shape, torch.float32)
        return out

    def destination(self, rows: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` as an int64 tensor on the host and on the device (both kept: never write to them)."""
        kept = self._destinations.get(rows)
        if kept is not None:
            self.hits += 1
            return kept
        self.misses += 1
        if len(self._destinations) >= self.max_destinations:
            self._destinations.clear()
        host = self.accelerator.host_empty((len(rows),), torch.int64)
        host.numpy()[:] = rows
        kept = self._destinations[rows] = (host, host.to(self.accelerator.device, non_blocking=True))
        return kept

    def consumed(self, batch: CpuBatch) -> None:
        """Call after enqueuing the copies out of a batch's output (marks its buffer busy until then)."""
        shape = tuple(batch.out.shape)
        if self._outputs.get(shape) is not None and self._outputs[shape].data_ptr() == batch.out.data_ptr():
            event = self._consumed.get(shape)  # type: ignore[call-overload]
            if event is None:
                self._consumed[shape] = self.accelerator.record(self.accelerator.compute_stream)  # type: ignore[index]
            else:  # re-recorded: `output` waits for its latest record (creating an event costs ~15 us)
                event.record(self.accelerator.compute_stream)
