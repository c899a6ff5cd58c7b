"""Streamed pieces of a routed decode layer, copied the moment the GPU's gate opens.

A routed decode layer's CPU job starts from the GPU's gate (routed_job.py), but its streamed
pieces waited for the thread that drives the GPU: it wakes on the routing, builds the layer's
work items, assigns the pieces and enqueues their copies, PCIe idle meanwhile (~0.2-0.25 ms a layer
on the H100 machine, Phi-3.5-MoE 24 GiB: `pcie_start` of decode_profile.py plus the routing's
read). Here the routed job carries a plan of those copies as well: for every expert each top-k
position may route to, the source and size of its streamed pieces (as `decode_split` orders them),
and the staging ring's next slots. The kernels' driver thread, woken by the gate, enqueues the
routed experts' copies on the copy stream through the CUDA driver API (csrc/gate_copies.h) before it
starts the CPU job, then stores `done`. The executor adopts those copies as staged pieces when it
reaches the layer (it waits for `done` first: its own copies must follow them on the stream) and
enqueues the rest as before.

Only with the ring's next slots free (pieces prefetched ahead only on a guess of the layer's experts:
the plan skips those pieces and their slots), pieces that move in one copy (compact
regions or adjacent bf16), and where libcuda has the entry points; `create` returns None elsewhere.
"""

from __future__ import annotations

import ctypes
import logging
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.executor.accelerator import Accelerator
from engine.executor.staging import StagedSlice, StagingRing
from engine.executor.timeline import host_mark
from engine.model.ffn import UnitSlice

logger = logging.getLogger(__name__)

HEAD_FIELDS = 13  # csrc/gate_copies.h: Head
ENTRY_FIELDS = 3  # csrc/gate_copies.h: kEntryFields
STAGED_AHEAD = 2  # csrc/gate_copies.h: kStagedAhead (an entry's kind: no copy, no slot)
ENTRY_POINTS = ("cuMemcpyHtoDAsync_v2", "cuStreamWaitEvent", "cuEventRecord", "cuCtxSetCurrent")
WAIT_S = 10.0  # the driver thread enqueues a layer's copies in tens of microseconds


def piece_entry(piece: UnitSlice) -> tuple[int, int, int] | None:
    """(source address, bytes, 0 compact region / 1 bf16) of a piece that moves in one copy."""
    if piece.compact is not None:
        region = piece.compact.region
        return region.data_ptr(), region.numel(), 0
    if piece.packed is not None:
        return piece.packed.data_ptr(), piece.packed.nbytes, 1
    return None


def choice_entries(streamed: list[list[UnitSlice]]) -> tuple[array, array] | None:
    """(offsets [choices + 1], entries) of each choice's streamed pieces in order; None when one
    does not move in one copy."""
    offsets, entries = array("q", [0]), array("q")
    for pieces in streamed:
        for piece in pieces:
            entry = piece_entry(piece)
            if entry is None:
                return None
            entries.extend(entry)
        offsets.append(offsets[-1] + len(pieces))
    return offsets, entries


def skip_staged_ahead(entries: array, ahead: Sequence[UnitSlice]) -> array:
    """A copy of `entries` whose entries for the pieces in `ahead` (by source) say "staged already"."""
    sources = {entry[0] for entry in map(piece_entry, ahead) if entry is not None}
    out = array("q", entries)
    for k in range(0, len(out), ENTRY_FIELDS):
        if out[k] in sources:
            out[k + 2] = STAGED_AHEAD
    return out


@dataclass
class GatePlan:
    """One layer's copy plan as submitted: the int64 plan the driver reads, the ring slots it fills
    from `first_slot`, and the two marks it records on the copy stream before the first copy (the
    decode meter's entry and the ring's burst start)."""

    plan: array
    first_slot: int
    max_copies: int
    gate_value: int
    starts: tuple[torch.cuda.Event, torch.cuda.Event]


class GateCopies:
    def __init__(self, accelerator: Accelerator, ring: StagingRing, functions: list[int], context: int) -> None:
        self.accelerator = accelerator
        self.ring = ring
        self._functions = functions
        self._context = context
        self.done = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self.adopted = 0  # copies adopted from the driver thread (tests, benchmarks)
        # the ring's slots as the plan lists them: fixed for the ring (its buffers and events are
        # made once, the events' handles exist: `create` recorded them), so built once, not per layer
        self._slots = array("q", [field for slot in ring.slot_handles() for field in slot])

    @classmethod
    def create(cls, accelerator: Accelerator, ring: StagingRing | None) -> GateCopies | None:
        if ring is None or not accelerator.is_cuda:
            return None
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            functions = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0 for name in ENTRY_POINTS]
            context = ctypes.c_void_p(0)
            get_context = lib.cuCtxGetCurrent
            get_context.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            with torch.cuda.device(accelerator.device):
                torch.cuda.init()
                status = get_context(ctypes.byref(context))
        except (OSError, AttributeError) as exc:
            logger.info("streamed decode pieces copied by the driving thread: %s", exc)
            return None
        if status != 0 or not context.value or not all(functions):
            logger.info("streamed decode pieces copied by the driving thread: no CUDA context or entry points")
            return None
        ring.create_events(accelerator.copy_stream)  # the driver records and waits on their handles
        return cls(accelerator, ring, functions, context.value)

    def plan(self, offsets: array, entries: array, gate_value: int, ahead: Sequence[UnitSlice] = ()) -> GatePlan:
        """A plan for the choices' entries (choice_entries), filling the ring's next slots.
        `ahead`: pieces staged already in the slots before them (expert look-ahead, lookahead.py):
        the driver copies none of them again and leaves their slots alone."""
        acc, ring = self.accelerator, self.ring
        starts = (host_mark(acc, acc.copy_stream), host_mark(acc, acc.copy_stream))  # re-recorded at the gate
        first = ring.next_slot
        max_copies = ring.num_slots - len(ahead)
        if ahead:
            entries = skip_staged_ahead(entries, ahead)
        head = [*self._functions, self._context, acc.copy_stream.cuda_stream, starts[0].cuda_event,
                starts[1].cuda_event, self.done.data_ptr(), ring.num_slots, first, max_copies, len(offsets) - 1]
        assert len(head) == HEAD_FIELDS
        plan = array("q", head)
        plan.extend(self._slots)
        plan.extend(offsets)
        plan.extend(entries)
        return GatePlan(plan, first, max_copies, gate_value, starts)

    def adopt(self, plan: GatePlan, streamed: list[tuple[int, UnitSlice]]) -> list[StagedSlice]:
        """The pieces the driver copied (the first of `streamed`, in its order; without the pieces
        staged ahead) as staged slices, once it has enqueued them."""
        deadline = time.perf_counter() + WAIT_S
        while True:
            done = int(self.done[0])
            if done == plan.gate_value:
                break
            if done == -plan.gate_value:
                raise RuntimeError("the routed job's copies failed (its error follows with the job)")
            if time.perf_counter() > deadline:
                raise RuntimeError("the routed job's copies were never enqueued")
        count = min(plan.max_copies, len(streamed))
        staged = [self.ring.adopt(piece, (plan.first_slot + k) % self.ring.num_slots)
                  for k, (_, piece) in enumerate(streamed[:count])]
        self.adopted += count
        return staged

    def discard(self, plan: GatePlan) -> None:
        """A plan not adopted (its job given up): its marks go back."""
        self.accelerator.release(*plan.starts)
