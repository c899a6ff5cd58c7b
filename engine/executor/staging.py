"""A ring of GPU staging buffers that CG pieces are streamed into.

The copy stream fills a slot (after the compute stream released it), records `ready`; the compute
stream waits `ready`, computes, and releases the slot. Enqueue order matters: a slot is released
(its event recorded) before the copy that reuses it is enqueued.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.executor.accelerator import Accelerator
from engine.executor.timeline import BusyMeter, StepTimeline, host_mark
from engine.model.ffn import UnitSlice


@dataclass
class StagedSlice:
    gate_up: torch.Tensor
    down: torch.Tensor
    ready: torch.cuda.Event | None
    slot: int


class StagingRing:
    def __init__(self, accelerator: Accelerator, num_slots: int, slot_numel: int, dtype: torch.dtype) -> None:
        self.accelerator = accelerator
        self.num_slots = num_slots
        self.slot_numel = slot_numel
        self.buffers = [torch.empty(slot_numel, dtype=dtype, device=accelerator.device) for _ in range(num_slots)]
        self._free_events: list[torch.cuda.Event | None] = [None] * num_slots
        self._next = 0
        self.bytes_streamed = 0
        self.busy = BusyMeter()  # seconds the copy stream spent streaming pieces

    @property
    def num_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def stage(self, piece: UnitSlice, timeline: StepTimeline | None = None) -> StagedSlice:
        """Enqueues the copy of `piece` into the next slot on the copy stream."""
        numel = piece.gate_up.numel() + piece.down.numel()
        if numel > self.slot_numel:
            raise ValueError(f"piece of {numel} values does not fit a staging slot of {self.slot_numel}")
        slot = self._next
        self._next = (self._next + 1) % self.num_slots
        acc = self.accelerator
        buffer = self.buffers[slot]
        gate_up = buffer[: piece.gate_up.numel()].view(piece.gate_up.shape)
        down = buffer[piece.gate_up.numel() : numel].view(piece.down.shape)
        acc.wait(acc.copy_stream, self._free_events[slot])
        with acc.on(acc.copy_stream):
            start = host_mark(acc, acc.copy_stream)
            gate_up.copy_(piece.gate_up, non_blocking=True)
            down.copy_(piece.down, non_blocking=True)
            ready = acc.record(acc.copy_stream, timing=True)
        end = ready if ready is not None else host_mark(acc, None)
        self.busy.add(start, end)
        if timeline is not None:
            timeline.gpu_interval("pcie", start, end)
        self.bytes_streamed += piece.num_bytes
        return StagedSlice(gate_up, down, ready, slot)

    def release(self, staged: StagedSlice) -> None:
        """The compute stream is done with this slot (call after enqueuing its last use)."""
        self._free_events[staged.slot] = self.accelerator.record(self.accelerator.compute_stream)
