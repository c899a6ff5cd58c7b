"""Decode layers' CPU batches, kept and reused: decode steps repeat the same few batches.

A decode layer's CPU job is set by which pieces the CPU takes (its experts' CC pieces, moved by
the feedback's shift), how many tokens each has and where their partial outputs go. Building the
batch (jobs, destination rows, two pinned buffers, the C++ job records) every layer was a good part
of the ~0.3 ms between entering a layer's FFN and the CPU job's start; a kept batch costs a lookup,
its jobs take this layer's activations (the C++ records' activation addresses are refreshed).
Output buffers are shared by the batches of one row count (one layer's job runs at a time):
before a kept batch is handed to the CPU again, the copy out of its buffer must have finished
(`consumed`, waited on in `get`). Only small batches are kept (decode: a few rows per job).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from engine.executor.accelerator import Accelerator
from engine.executor.cpu_pool import CpuBatch

BatchKey = tuple[tuple[int, int, int, int], ...]  # per CPU job: (piece id, its item, the item's rows, its first row)
MAX_KEPT = 4096  # batches kept (least recently used dropped); each is ~1-2 KB of host memory
MAX_KEPT_ROWS = 32  # larger batches (prefill) are built each time: their output buffers would pile up


class DecodeCpuBatches:
    def __init__(self, accelerator: Accelerator, max_kept: int = MAX_KEPT) -> None:
        self.accelerator = accelerator
        self.max_kept = max_kept
        self._kept: OrderedDict[BatchKey, CpuBatch] = OrderedDict()
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}  # (rows, hidden) -> shared output buffer
        self._consumed: dict[tuple[int, int], torch.cuda.Event | None] = {}  # its last reader's event
        self.hits = 0
        self.misses = 0

    def get(self, key: BatchKey, num_rows: int, hidden: int, build: Callable[[torch.Tensor], CpuBatch]) -> CpuBatch:
        """The kept batch for `key`, else `build(output buffer)`'s, kept. Waits until the output
        buffer's previous contents were copied out."""
        shape = (num_rows, hidden)
        event = self._consumed.get(shape)
        if event is not None:
            event.synchronize()  # normally long done: the next layer starts after a later sync
        batch = self._kept.get(key)
        if batch is not None:
            self._kept.move_to_end(key)
            self.hits += 1
            return batch
        self.misses += 1
        out = self._outputs.get(shape)
        if out is None:
            out = self._outputs[shape] = self.accelerator.host_empty(shape, torch.float32)
        batch = build(out)
        self._kept[key] = batch
        if len(self._kept) > self.max_kept:
            self._kept.popitem(last=False)
        return batch

    def consumed(self, batch: CpuBatch) -> None:
        """Call after enqueuing the copies out of a batch's output (marks its buffer busy until then)."""
        shape = tuple(batch.out.shape)
        if self._outputs.get(shape) is not None and self._outputs[shape].data_ptr() == batch.out.data_ptr():
            self._consumed[shape] = self.accelerator.record(self.accelerator.compute_stream)  # type: ignore[index]
