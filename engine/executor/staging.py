"""A ring of GPU staging buffers that CG pieces are streamed into.

The copy stream fills a slot (after the compute stream released it), records `ready`; the compute
stream waits `ready`, computes, and releases the slot. Enqueue order matters: a slot is released
(its event recorded) before the copy that reuses it is enqueued.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.executor.accelerator import Accelerator
from engine.executor.gpu_unpack import fast_path, unpack_at, unpack_piece
from engine.executor.timeline import BusyMeter, Mark, StepTimeline, host_mark
from engine.model.compact_weights import CompactPiece
from engine.model.ffn import UnitSlice


@dataclass
class StagedSlice:
    gate_up: torch.Tensor
    down: torch.Tensor
    ready: torch.cuda.Event | None
    slot: int
    compact: CompactPiece | None = None  # streamed compact: decode (StagingRing.unpack) before use


class StagingRing:
    """Events: each slot owns a `ready` event (copy done) and a `free` event (compute done), re-recorded
    at every use; a wait enqueued before the re-record still refers to the earlier record. Busy time
    of the copy stream is metered per burst of copies (`begin_burst`/`end_burst`), not per piece:
    two timing events per layer instead of two per piece. A traced step times every piece."""

    def __init__(self, accelerator: Accelerator, num_slots: int, slot_numel: int, dtype: torch.dtype,
                 compact_bytes: int = 0) -> None:
        """compact_bytes: each slot's byte buffer for compact pieces' regions (0: no compact pieces)."""
        self.accelerator = accelerator
        self.num_slots = num_slots
        self.slot_numel = slot_numel
        self.buffers = [torch.empty(slot_numel, dtype=dtype, device=accelerator.device) for _ in range(num_slots)]
        self.compact_buffers = [torch.empty(compact_bytes, dtype=torch.uint8, device=accelerator.device)
                                for _ in range(num_slots if compact_bytes else 0)]
        cuda = accelerator.is_cuda
        self._ready_events = [torch.cuda.Event() if cuda else None for _ in range(num_slots)]
        self._free_events = [torch.cuda.Event() if cuda else None for _ in range(num_slots)]
        self._view_cache: dict[tuple[int, torch.Size, torch.Size], tuple[torch.Tensor, torch.Tensor]] = {}
        # slots decoded by address (gpu_unpack.unpack_at) where Triton runs; else by torch operations
        self.unpack_by_address = cuda and fast_path()
        # (byte buffer, bf16 buffer) addresses of each slot that has a byte buffer (none: no compact pieces)
        self._addresses = [(c.data_ptr(), b.data_ptr()) for c, b in zip(self.compact_buffers, self.buffers, strict=False)]
        self._next = 0
        self._burst_start: Mark = None
        self.bytes_streamed = 0
        self.busy = BusyMeter(accelerator.release)  # seconds the copy stream spent streaming pieces

    @property
    def num_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers) + sum(b.nbytes for b in self.compact_buffers)

    def begin_burst(self, start: Mark = None) -> None:
        """Marks the start of a layer's copies on the copy stream (for the busy meter); `start`: a
        mark recorded there already (before copies enqueued elsewhere: gate_copies.py)."""
        if self._burst_start is None:
            self._burst_start = start if start is not None else host_mark(self.accelerator, self.accelerator.copy_stream)

    def end_burst(self) -> None:
        if self._burst_start is not None:
            self.busy.add(self._burst_start, host_mark(self.accelerator, self.accelerator.copy_stream))
            self._burst_start = None

    def stage(self, piece: UnitSlice, timeline: StepTimeline | None = None) -> StagedSlice:
        """Enqueues the copy of `piece` into the next slot on the copy stream."""
        numel = piece.gate_up.numel() + piece.down.numel()
        if numel > self.slot_numel:
            raise ValueError(f"piece of {numel} values does not fit a staging slot of {self.slot_numel}")
        slot = self._next
        self._next = (self._next + 1) % self.num_slots
        acc = self.accelerator
        buffer = self.buffers[slot]
        gate_up, down = self._views(slot, piece.gate_up.shape, piece.down.shape)
        acc.wait(acc.copy_stream, self._free_events[slot])  # a never-recorded event does not block
        self.begin_burst()
        ready = self._ready_events[slot]
        with acc.on(acc.copy_stream):
            start = host_mark(acc, acc.copy_stream) if timeline is not None else None
            if piece.compact is not None:
                region = piece.compact.region
                if not self.compact_buffers or region.numel() > self.compact_buffers[slot].numel():
                    raise ValueError(f"compact piece of {region.numel()} bytes does not fit the staging slot")
                self.compact_buffers[slot][: region.numel()].copy_(region, non_blocking=True)
            elif piece.packed is not None:
                buffer[:numel].copy_(piece.packed, non_blocking=True)
            else:
                gate_up.copy_(piece.gate_up, non_blocking=True)
                down.copy_(piece.down, non_blocking=True)
            if ready is not None:
                ready.record(acc.copy_stream)
            if timeline is not None:
                timeline.gpu_interval("pcie", start, host_mark(acc, acc.copy_stream))
        self.bytes_streamed += piece.num_bytes
        return StagedSlice(gate_up, down, ready, slot, piece.compact)

    @property
    def next_slot(self) -> int:
        return self._next

    def create_events(self, stream: torch.cuda.Stream) -> None:
        """Records on `stream` the slots' events never recorded yet (CUDA creates an event at its
        first record), so that every handle exists for copies enqueued outside torch
        (gate_copies.py). A recorded one keeps its record: a free event may still stand for
        compute that reads its slot."""
        for event in (*self._ready_events, *self._free_events):
            if event is not None and not event.cuda_event:
                event.record(stream)

    def slot_handles(self) -> list[tuple[int, int, int, int]]:
        """Each slot's (compact region buffer, bf16 buffer, free event, ready event) addresses and
        handles (0 for no region buffer)."""
        return [(self.compact_buffers[k].data_ptr() if self.compact_buffers else 0, self.buffers[k].data_ptr(),
                 self._free_events[k].cuda_event, self._ready_events[k].cuda_event)  # type: ignore[union-attr]
                for k in range(self.num_slots)]

    def adopt(self, piece: UnitSlice, slot: int) -> StagedSlice:
        """`piece` staged in `slot` by a copy enqueued outside the ring (gate_copies.py: after a wait
        for the slot's free event, then its ready event recorded); the ring's next slot follows."""
        gate_up, down = self._views(slot, piece.gate_up.shape, piece.down.shape)
        self._next = (slot + 1) % self.num_slots
        self.bytes_streamed += piece.num_bytes
        return StagedSlice(gate_up, down, self._ready_events[slot], slot, piece.compact)

    def unpack(self, staged: StagedSlice) -> None:
        """Decodes a compact piece's slot into its bf16 views, on the current (compute) stream, after
        the copy landed (the caller waited `ready`)."""
        if staged.compact is None:
            return
        if self.unpack_by_address:
            region_address, out_address = self._addresses[staged.slot]
            unpack_at(region_address, staged.compact, out_address)
        else:
            region = self.compact_buffers[staged.slot][: staged.compact.region.numel()]
            unpack_piece(region, staged.compact, self.buffers[staged.slot])

    def _views(self, slot: int, gate_up_shape: torch.Size, down_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's gate_up and down views for pieces of these shapes (pieces share a few shapes)."""
        key = (slot, gate_up_shape, down_shape)
        views = self._view_cache.get(key)
        if views is None:
            buffer, split = self.buffers[slot], gate_up_shape.numel()
            views = (buffer[:split].view(gate_up_shape), buffer[split : split + down_shape.numel()].view(down_shape))
            self._view_cache[key] = views
        return views

    def release(self, staged: StagedSlice) -> None:
        """The compute stream is done with this slot (call after enqueuing its last use)."""
        event = self._free_events[staged.slot]
        if event is not None:
            event.record(self.accelerator.compute_stream)
