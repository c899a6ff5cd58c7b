"""A one-token decode layer's CPU job, submitted before its routing is known and started by the GPU.

Without it a decode layer's CPU job starts only after a round trip through the thread that drives
the GPU: the GPU copies the routing to the host, that thread wakes, reads it, builds the layer's
work items, assigns pieces and submits the job (~0.15 ms a layer on the H100 machine, with the
CPU idle meanwhile, on the critical path of every layer). Here, while the GPU still runs the
layer's attention and routing, the thread submits a job holding the CPU pieces of every expert
that each top-k position could route to (per position, an expert's pieces as `decode_split`
gives them: they depend on the expert alone). The GPU stream stores a gate value right after its
copies of the routing ids and the activations; the kernels' driver thread, waiting on it, picks
the routed experts' records and starts at once (scheinfer_submit_routed). The executor later reads
the routing as before and computes the other pieces on the GPU.

The job's outputs are placed row after row in a buffer of its own (one for all layers: a layer's
job writes it only after the GPU passed the previous layer's copy out of it, stream order). A job
that is never consumed (an error, a forward that ends early) is given up (`cancel`) and writes
nothing.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.cpu_kernels.runner import RoutedGate, submit_routed_records
from engine.cpu_kernels.slice_job import activation_fields, activations_ready, record
from engine.executor.accelerator import Accelerator
from engine.executor.cpu_pool import CpuBatch, CpuJob, CpuPool, _Submitted
from engine.executor.gate_copies import GateCopies, GatePlan, choice_entries
from engine.executor.stream_signal import StreamSignal
from engine.executor.timeline import StepTimeline
from engine.executor.token_assignment import Assignment, decode_split
from engine.model.ffn import UnitSlice
from engine.model.moe import HostRouting, MoEBlock

MAX_KEPT_TABLES = 1024  # (layer, shift, mean streamed, activations) tables kept, then all dropped and kept anew


@dataclass
class _Table:
    """One layer's choices under one shift: each (position, expert)'s split, and the CPU pieces'
    records of all choices in order (choice p * num_experts + e)."""

    splits: list[Assignment]
    records: array
    offsets: array
    expert_of: dict[int, int]  # id(expert unit) -> its index
    max_rows: int  # the most CPU pieces any routing gives the job
    top_k: int
    copies: tuple[array, array] | None  # each choice's streamed pieces' copies (gate_copies.py)


@dataclass
class RoutedLayer:
    """A layer's routed job as submitted (consumed by the executor's call for `layer`)."""

    layer: int
    table: _Table
    num_experts: int
    batch: CpuBatch  # its jobs, rows and destinations filled once the routing is read
    future: _Submitted
    gate_value: int
    signal_value: int
    shift: int  # the decode feedback's shift its splits were made with
    copies: GatePlan | None = None  # its streamed pieces' copies, enqueued at the gate

    def assignment(self, units: list) -> Assignment:
        """The layer's pieces for these routed experts (in position order)."""
        out = Assignment([], [], [])
        for position, unit in enumerate(units):
            split = self.table.splits[position * self.num_experts + self.table.expert_of[id(unit)]]
            out.on_gpu += split.on_gpu
            out.streamed += split.streamed
            out.on_cpu += split.on_cpu
        return out


class RoutedJobs:
    """Builds and submits routed jobs; one gate (a pinned flag the GPU stores), one cancel flag and
    one output buffer for all of them."""

    def __init__(self, accelerator: Accelerator, cpu_pool: CpuPool, gate: StreamSignal) -> None:
        self.accelerator = accelerator
        self.cpu_pool = cpu_pool
        self.gate = gate
        self.cancel_flag = torch.zeros(1, dtype=torch.int64, pin_memory=accelerator.is_cuda)
        self._out: torch.Tensor | None = None
        self._tables: dict[tuple[int, int, int], _Table | None] = {}
        self.submitted = 0  # routed jobs submitted, and of those given up (tests, benchmarks)
        self.cancelled = 0

    @classmethod
    def create(cls, accelerator: Accelerator, cpu_pool: CpuPool) -> RoutedJobs | None:
        gate = StreamSignal.create(accelerator.device) if accelerator.is_cuda else None
        return cls(accelerator, cpu_pool, gate) if gate is not None else None

    def submit(self, layer: int, ffn: MoEBlock, host: HostRouting, shift: int, mean_streamed: float | None,
               stream: torch.cuda.Stream,
               signal: tuple[int, int], timeline: StepTimeline | None,
               gate_copies: GateCopies | None = None, ahead: Sequence[UnitSlice] = ()) -> RoutedLayer | None:
        """The layer's routed job, its gate stored on `stream` after the routing's copies (enqueued
        there already); its experts split as `decode_split` gives them for `shift` and
        `mean_streamed`; None when its pieces or activations do not suit the kernels. With
        `gate_copies`, the job enqueues the routed experts' streamed copies first, but for the
        pieces staged `ahead` (expert look-ahead)."""
        x = host.x[0:1]
        table = self._table(layer, ffn, x, shift, mean_streamed)
        if table is None or table.max_rows == 0:
            return None
        top_k, hidden = host.expert_ids.shape[1], x.shape[1]
        out = self._output(table.max_rows, hidden)
        gate_value = self.gate.next_value()
        where = RoutedGate(host.expert_ids.data_ptr(), top_k, len(ffn.experts), self.gate.address,
                           self.cancel_flag.data_ptr(), gate_value, out.data_ptr(), out.stride(0) * out.element_size())
        copies = None
        if gate_copies is not None and table.copies is not None and len(table.copies[1]):
            copies = gate_copies.plan(*table.copies, gate_value, ahead)
        pending = submit_routed_records(table.records, table.offsets, where, self.cpu_pool.activation, *signal,
                                        copies=copies.plan if copies is not None else None)
        if pending is None:
            if copies is not None:
                gate_copies.discard(copies)  # type: ignore[union-attr]
            return None
        self.gate.store(stream, gate_value)  # after the routing's copies: the job may start
        self.submitted += 1
        batch = CpuBatch([], out, torch.empty(0, dtype=torch.int64), kept=True)
        future = _Submitted(self.cpu_pool, batch, pending, timeline, signalled=True)
        return RoutedLayer(layer, table, len(ffn.experts), batch, future, gate_value, signal[1], shift, copies)

    def fill(self, routed: RoutedLayer, assignment: Assignment, host_x: list[torch.Tensor]) -> None:
        """The batch's jobs and output rows as the driver placed them (the routed experts' CPU
        pieces in order, a row each)."""
        batch = routed.batch
        batch.jobs = [CpuJob(i, host_x[i], piece, row) for row, (i, piece) in enumerate(assignment.on_cpu)]
        batch.out = batch.out[: len(batch.jobs)]

    def cancel(self, routed: RoutedLayer) -> None:
        """Gives the job up (it writes nothing if it has not started) and waits for its end."""
        self.cancel_flag[0] = routed.gate_value
        self.cancelled += 1
        routed.future.result()

    def clear(self) -> None:
        """Drops the kept tables (the pieces' kinds changed: a new plan)."""
        self._tables.clear()

    def _output(self, rows: int, hidden: int) -> torch.Tensor:
        if self._out is None or self._out.shape[0] < rows or self._out.shape[1] != hidden:
            self._out = self.accelerator.host_empty((max(rows, 8), hidden), torch.float32)
        return self._out

    def _table(self, layer: int, ffn: MoEBlock, x: torch.Tensor, shift: int, mean_streamed: float | None) -> _Table | None:
        key = (layer, shift, mean_streamed, x.data_ptr())
        if key in self._tables:
            return self._tables[key]
        if len(self._tables) >= MAX_KEPT_TABLES:
            self._tables.clear()
        table = self._tables[key] = self._build(ffn, x, shift, mean_streamed)
        return table

    def _build(self, ffn: MoEBlock, x: torch.Tensor, shift: int, mean_streamed: float | None) -> _Table | None:
        if not activations_ready(x):
            return None
        top_k, experts = ffn.config.num_experts_per_tok, ffn.experts
        splits, records, offsets = [], array("q"), array("q", [0])
        fields = activation_fields(x)
        hidden = x.shape[1]
        for position in range(top_k):
            for expert in experts:
                split = decode_split(expert, position, top_k, shift, mean_streamed)
                for _, piece in split.on_cpu:
                    weights = self.cpu_pool.weight_fields(piece)
                    if weights is None:
                        return None
                    records.extend(record(fields, weights, 0, hidden))  # the driver places the outputs
                splits.append(split)
                offsets.append(offsets[-1] + len(split.on_cpu))
        most = sum(max(len(splits[p * len(experts) + e].on_cpu) for e in range(len(experts))) for p in range(top_k))
        copies = choice_entries([[piece for _, piece in split.streamed] for split in splits])
        return _Table(splits, records, offsets, {id(unit): e for e, unit in enumerate(experts)}, most, top_k, copies)
