"""PartitionedExecutor: evaluates a layer's FFN units over their GG, CG and CC pieces at once.

For one layer (all routed experts, or the dense MLP, as one job):
  1. CC pieces: the routed tokens' activations go device->host (pinned, async); a CPU worker
     computes the pieces' partial outputs as soon as they land.
  2. CG pieces: the copy stream streams them into the staging ring, ahead of their use (a ring's
     worth enqueued before the GPU's own pieces, so that PCIe starts at once).
  3. GG pieces, then CG pieces as their copies complete, are computed on the compute stream.
  4. The CPU partials come back host->device and are summed in fp32 with the GPU partials.
The driving thread only waits for the CPU at the end of the layer, where its result is needed;
in decode not even there where streams can wait on the CPU kernels (stream_signal.py): the copy
and the sum are enqueued behind a stream wait for the job's end, and the job is collected at the
next layer (or `flush`).
One-token decode layers start both sides from the GPU: their CPU job and their first streamed
copies are enqueued by the kernels' driver thread the moment the routing lands (routed_job.py,
gate_copies.py); this thread adopts those copies and does the rest.
Which host pieces go to the CPU or over PCIe in a step is token assignment's choice.
Pieces of the next layer that will surely be needed (dense MLP, shared expert) are prefetched.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.executor import host_rows
from engine.executor.accelerator import Accelerator, now_s
from engine.executor.cpu_batches import MAX_KEPT_ROWS, DecodeCpuBuffers
from engine.executor.cpu_pool import CpuBatch, CpuJob, CpuPool, CpuResult, _Submitted
from engine.executor.decode_feedback import DecodeFeedback, DecodeMeter
from engine.executor.gate_copies import GateCopies
from engine.executor.lookahead import LOOKAHEAD_PIECES, LookaheadStats, likely_pieces
from engine.executor.partial_graphs import PartialGraphs
from engine.executor.routed_job import RoutedJobs, RoutedLayer
from engine.executor.staging import StagedSlice, StagingRing
from engine.executor.stream_signal import StreamSignal
from engine.executor.timeline import BusyMeter, StepTimeline, host_mark
from engine.executor.token_assignment import Assignment, DispatchRates, assign, mean_streamed_pieces
from engine.model.decoder import DecoderModel
from engine.model.ffn import FFNUnit, UnitSlice
from engine.model.moe import MoEBlock, Routing
from engine.model.weights import DENSE_MLP, SHARED_EXPERT
from engine.placement.plan import PartitionPlan, PieceKind

MAX_CPU_ROWS_PER_COPY = 1024  # rows of CPU partial outputs moved to the GPU per copy
# copies enqueued before the CPU job is prepared (the rest of the ring after it). 0: the CPU job
# first (session 11, Phi-3.5-MoE 24 GiB: the job starts 0.14 instead of 0.25 ms after the
# executor is entered; the copies still end before it)
FIRST_COPIES = 0
# the decode feedback's GPU side ends when its last streamed piece is computed (True) or copied
METER_GPU_END = True
# decode splits stream the same count of pieces for every routed expert of a layer (True), or move
# the feedback's shift from each expert's plan kinds (token_assignment.py says why)
UNIFORM_DECODE_SPLIT = True


@dataclass
class _CpuInputs:
    """The CPU items' activations on the host (item -> its rows), and the event after which they
    are there (None: already there)."""

    rows: dict[int, torch.Tensor]
    ready: torch.cuda.Event | None


@dataclass
class _Streaming:
    """One layer's streamed pieces: copies not yet enqueued, and those enqueued but not computed."""

    queue: deque[tuple[int, UnitSlice]]
    pending: deque[tuple[int, UnitSlice]]
    staged: deque[StagedSlice]
    # prefetched slots released unused among the ring's slots in use: the ring hands out slots in
    # turn, so each hole keeps one slot of the layer's window from being filled
    holes: int = 0


class PartitionedExecutor:
    def __init__(self, model: DecoderModel, accelerator: Accelerator, cpu_pool: CpuPool,
                 ring: StagingRing | None, dynamic: str | None = None,
                 rates: DispatchRates | None = None) -> None:
        self.model = model
        self.accelerator = accelerator
        self.cpu_pool = cpu_pool
        self.ring = ring
        self.dynamic = dynamic
        self.overlap = dynamic != "fiddler"  # Fiddler runs CPU and transfers one after the other
        self.rates = rates or DispatchRates()
        self.act: Callable[[torch.Tensor], torch.Tensor] = model.act
        self.timeline: StepTimeline | None = None  # set by the runner for traced steps
        self.gpu_busy = BusyMeter(accelerator.release)  # seconds the compute stream spent on FFN pieces
        # decode layers' measured CPU/PCIe imbalance, and the split it set, for the `balance` rule
        self.feedback = DecodeFeedback()
        self.use_feedback = True  # False: decode keeps the plan's kinds (A/B in benchmarks)
        # the decode feedback balances the CPU job's end against the GPU's streamed work's end (its
        # last piece unpacked and computed); False: against the last copy's landing (A/B)
        self.meter_gpu_end = METER_GPU_END
        self._meter = DecodeMeter(accelerator, self.feedback)
        self._cpu_buffers = DecodeCpuBuffers(accelerator)
        self._prefetched: deque[tuple[UnitSlice, StagedSlice, bool]] = deque()  # (piece, slot, a guess)
        # streamed pieces of the next layer's likely experts copied ahead, at most this many a layer
        # (they fill the copy stream while the next layer's attention and routing run; 0: off)
        self.lookahead_pieces = LOOKAHEAD_PIECES
        # decode: the GPU adds the CPU's output rows reading them in pinned host memory (host_rows.py),
        # not through a copy that would queue behind the copy stream's
        self.read_cpu_rows_in_place = True
        self.lookahead_stats = LookaheadStats()
        # decode CPU jobs whose end the compute stream waits for itself (None: no GPU, or no call)
        self.signal = StreamSignal.create(accelerator.device) if accelerator.is_cuda else None
        self.use_signal = True  # False: the driving thread waits for every CPU job (A/B in benchmarks)
        self._deferred: tuple[CpuResult, bool] | None = None  # a signalled CPU job not collected yet
        self._signal_value = 0  # the value the last signalled job stores
        # decode pieces' partials replayed as graphs (`into` given: the decode graphs' static buffers)
        self.partial_graphs = PartialGraphs(accelerator, self._partial)
        # one-token decode layers' CPU jobs submitted before the routing and started by the GPU
        self.routed_jobs = RoutedJobs.create(accelerator, cpu_pool) if self.signal is not None else None
        self.use_routed = True  # False: submitted once the routing is read (A/B in benchmarks)
        self._routed: RoutedLayer | None = None  # a routed job not consumed yet
        # routed jobs also enqueue their layer's first streamed copies at the gate (gate_copies.py)
        self.use_gate_copies = True  # False: the driving thread enqueues them all (A/B in benchmarks)
        self._gate_copies: GateCopies | None = None  # made for the ring in use at the first routed job
        self._uniform_decode_split = UNIFORM_DECODE_SPLIT
        self._mean_streamed: dict[int, float | None] = {}  # by layer, for uniform decode splits

    @property
    def uniform_decode_split(self) -> bool:
        return self._uniform_decode_split

    @uniform_decode_split.setter
    def uniform_decode_split(self, value: bool) -> None:
        """Switching resets the decode feedback: a shift means another split under the other rule."""
        self._uniform_decode_split = value
        self._forget_splits()

    def _forget_splits(self) -> None:
        self.feedback.reset()
        self._mean_streamed.clear()
        if self.routed_jobs is not None:  # their per-expert splits follow the pieces' kinds
            self.routed_jobs.clear()

    def mean_streamed(self, layer: int) -> float | None:
        """The layer's plan streamed pieces per expert, for uniform decode splits (None: the layer's
        splits move the shift from the plan's kinds: not a routed MoE layer, or the rule is off)."""
        if layer not in self._mean_streamed:
            ffn = self.model.layers[layer].ffn
            uniform = self._uniform_decode_split and isinstance(ffn, MoEBlock) and ffn.shared_expert is None
            self._mean_streamed[layer] = mean_streamed_pieces(list(ffn.experts)) if uniform else None
        return self._mean_streamed[layer]

    def apply_plan(self, plan: PartitionPlan) -> None:
        """Re-labels the host pieces (CG <-> CC) and the dynamic rule for `plan` without moving any
        weight. The resident (GG) rows and the host chunking must be those the model was built with."""
        for layer_idx, layer in enumerate(self.model.layers):
            ffn = layer.ffn
            units = [(DENSE_MLP, ffn)] if isinstance(ffn, FFNUnit) else list(enumerate(ffn.experts))
            if isinstance(ffn, MoEBlock) and ffn.shared_expert is not None:
                units.append((SHARED_EXPERT, ffn.shared_expert))
            for unit_id, unit in units:
                split = plan.split_of(layer_idx, unit_id, unit.intermediate_size)
                for piece in unit.slices:
                    kind, last = split.kind_at(piece.start), split.kind_at(piece.end - 1)
                    if kind != last or (kind is PieceKind.GG) != (piece.kind == PieceKind.GG):
                        raise ValueError(f"plan {plan.policy} does not match the built pieces of unit "
                                         f"{(layer_idx, unit_id)} at [{piece.start}, {piece.end})")
                    piece.kind = str(kind)
        self.dynamic = plan.dynamic
        self.overlap = plan.dynamic != "fiddler"
        self._forget_splits()

    # -- one layer ---------------------------------------------------------------------------

    def __call__(self, layer: int, items: list[tuple[FFNUnit, torch.Tensor]],
                 host_x: list[torch.Tensor] | None = None, into: torch.Tensor | None = None,
                 lookahead: list[int] | None = None) -> list[torch.Tensor] | None:
        """Each item's output; `host_x`: the items' activations already on the host (decode steps
        copy them there with the routing), which the CPU's pieces then take without a copy.
        `into`: fp32 zeros [all items' rows, hidden] to sum the outputs in, left there unrounded
        (None is returned): a decode graph rounds and combines them. `lookahead`: the next layer's
        likely experts, whose first streamed pieces are copied ahead (a guess: a wrong one costs a
        copy, never a result)."""
        acc = self.accelerator
        entered_s = now_s()
        # one fp32 accumulator for all items (rows of item i at offsets[i]); views per item
        offsets = [0]
        for _, x in items:
            offsets.append(offsets[-1] + x.shape[0])
        measured = (self.use_feedback and self.dynamic == "balance"
                    and max(x.shape[0] for _, x in items) <= self.rates.max_bandwidth_bound_tokens)
        if self._routed is not None:  # the previous layer's job first: an error leaves this one to flush()
            self._collect_deferred()
        routed = self._take_routed(layer, items, into)
        if routed is not None:
            placed = routed.assignment([unit for unit, _ in items])
            shift = routed.shift
        else:
            shift = self.feedback.shift  # what `assign` reads (a measurement resolved later may move it)
            placed = assign(self.dynamic, items, self.rates, self.feedback if measured else None,
                            self.mean_streamed(layer) if measured else None)
        on_gpu, streamed, on_cpu = placed.on_gpu, placed.streamed, placed.on_cpu
        measured = measured and bool(streamed or on_cpu)  # only under `balance`, so with overlap

        def accumulator() -> torch.Tensor:
            if into is not None:
                return into
            return torch.zeros((offsets[-1], items[0][1].shape[1]), dtype=torch.float32, device=items[0][1].device)

        def begin_streaming(max_copies: int | None = None, adopted: list[StagedSlice] | None = None) -> _Streaming:
            # the decode meter starts before the layer's first copy (copies from the gate: at the
            # gate, the mark the driver recorded first)
            gate = routed.copies.starts if routed is not None and routed.copies is not None else None
            if measured:
                self._enter_meter(items, streamed or on_cpu, shift, gate[0] if gate is not None else None, layer,
                                  offsets[-1])
            elif gate is not None:
                self.accelerator.release(gate[0])
            if gate is not None and self.ring is not None:
                self.ring.begin_burst(gate[1])
            return self._begin_streaming(streamed, max_copies, adopted or [])

        if self.overlap:
            # The CPU's activations leave first (when not on the host yet), then the CPU job and a
            # ring's worth of copies (FIRST_COPIES of them before the job: a staged copy costs the
            # CPU job ~15-50 us of delay). The previous layer's signalled job is collected once
            # this one runs (it is over: this layer's inputs came after it).
            if routed is not None:  # running already (or about to, once the GPU opens its gate)
                assert self.routed_jobs is not None and host_x is not None
                adopted = self._adopt_gate_copies(routed, streamed)  # first: ours follow them
                cpu_future = self._routed_batch(routed, placed, offsets, host_x)
                streaming = begin_streaming(adopted=adopted)
            elif FIRST_COPIES > 0:
                cpu_inputs = self._ship_cpu_inputs(items, on_cpu, host_x)
                self.flush()
                streaming = begin_streaming(FIRST_COPIES)
                cpu_future = self._submit_cpu(items, offsets, on_cpu, cpu_inputs)
                self._fill_ring(streaming)
            else:
                cpu_future = self._submit_cpu(items, offsets, on_cpu, self._ship_cpu_inputs(items, on_cpu, host_x))
                self.flush()
                streaming = begin_streaming()
            sums_all = accumulator()
        else:  # Fiddler: the CPU's pieces, then the transfers
            self.flush()
            sums_all = accumulator()
            cpu_future = self._submit_cpu(items, offsets, on_cpu, self._ship_cpu_inputs(items, on_cpu, host_x))
            if cpu_future is not None:
                self._add_cpu_results(sums_all, cpu_future.result())
                cpu_future = None
            streaming = begin_streaming()
        sums = [sums_all[offsets[i] : offsets[i + 1]] for i in range(len(items))]
        add_partial = self.partial_graphs.add_partial if into is not None else self._add_partial
        start = host_mark(acc, acc.compute_stream)
        for i, piece in on_gpu:
            add_partial(sums[i], items[i][1], piece.gate_up, piece.down)
        self._finish_streaming(streaming, items, sums, add_partial)
        if measured and streamed:  # the GPU side ends with its last streamed piece's compute, not its copy
            self._meter.gpu_side_enqueued(acc.compute_stream if self.meter_gpu_end else None)
        end = host_mark(acc, acc.compute_stream)
        self.gpu_busy.add(start, end, shared=self.timeline is not None)
        if self.timeline is not None:
            self.timeline.gpu_interval("gpu", start, end, f"layer {layer} FFN")
        # before waiting for the CPU (this thread has time then): the next layer's prefetches and
        # the end of this layer's copies for the busy meter
        self._prefetch_next(layer)
        if self.ring is not None:
            self.ring.end_burst()
        if cpu_future is not None and getattr(cpu_future, "signalled", False):
            # the stream waits for the job's end, not this thread: collected at the next layer
            assert self.signal is not None and isinstance(cpu_future, _Submitted)
            self.signal.wait(acc.compute_stream, self._signal_value)
            self._add_cpu_results(sums_all, cpu_future.batch)
            self._deferred = (cpu_future, measured, now_s())
            if lookahead and self.lookahead_pieces > 0:  # the copy stream too: the guesses follow
                self.signal.wait(acc.copy_stream, self._signal_value)
        elif cpu_future is not None:
            batch = cpu_future.result()
            self._add_cpu_results(sums_all, batch)
            if measured:
                self._meter.cpu_done(batch.end_s)
        # the guesses only once the CPU job is done (their copies would take host DRAM from it):
        # after this thread waited for it, or behind the copy stream's wait for its signal, where
        # they fill the chain between this job and the next layer's (PCIe idles there)
        self._prefetch_guessed(layer, lookahead)
        results = None
        if into is None:
            result = sums_all.to(items[0][1].dtype)
            results = [result[offsets[i] : offsets[i + 1]] for i in range(len(items))]
        if self.timeline is not None:
            self.timeline.cpu_interval("host", entered_s, now_s(), f"layer {layer} executor")
        return results

    def flush(self) -> None:
        """Collects the last signalled CPU job (waits for it; raises its error). The model calls it
        at the end of every forward, so that a failed job never goes unnoticed. A routed job not
        consumed by then is given up."""
        if self._routed is not None:
            self._cancel_routed()
        self._collect_deferred()

    def _collect_deferred(self) -> None:
        if self._deferred is None:
            return
        future, measured, enqueued_s = self._deferred
        self._deferred = None
        batch = future.result()
        if measured:  # before the next layer enters the meter: its record is still the last
            self._meter.cpu_done(batch.end_s, batch.start_s, enqueued_s)

    # -- routed jobs (engine/executor/routed_job.py) ------------------------------------------

    def prepare_routed(self, layer: int, ffn: object, routing: Routing) -> None:
        """Called by the decode graphs once a one-token layer's routing and activations are on their
        way to the host (copies enqueued on the compute stream): submits the layer's CPU job for
        every expert each position may route to, started by the GPU once the copies landed."""
        if self._routed is not None:
            self._cancel_routed()
        host = routing.host
        if (self.routed_jobs is None or not self.use_routed or not self.use_signal or not self.overlap
                or not self.cpu_pool.use_driver or not isinstance(ffn, MoEBlock)
                or ffn.shared_expert is not None or host is None or host.ready is None or host.x.shape[0] != 1
                or host.x.dtype != torch.bfloat16 or self.dynamic not in (None, "balance")):
            return
        assert self.signal is not None
        shift = self.feedback.shift if self.use_feedback and self.dynamic == "balance" else 0
        signal_value = self.signal.next_value()
        mean = self.mean_streamed(layer) if self.use_feedback and self.dynamic == "balance" else None
        self._routed = self.routed_jobs.submit(layer, ffn, host, shift, mean, self.accelerator.compute_stream,
                                               (self.signal.address, signal_value), self.timeline,
                                               self._gate_copier(), [piece for piece, _, _ in self._prefetched])

    def _gate_copier(self) -> GateCopies | None:
        """The gate copies for the ring in use, when they can fill its next slots (pieces prefetched
        on a guess of this layer's experts are skipped; others, a shared expert's, are not routed)."""
        if not self.use_gate_copies or self.ring is None or not all(guessed for _, _, guessed in self._prefetched):
            return None
        if self._gate_copies is None or self._gate_copies.ring is not self.ring:
            self._gate_copies = GateCopies.create(self.accelerator, self.ring)
            if self._gate_copies is None:
                self.use_gate_copies = False  # logged once: the driving thread copies
        return self._gate_copies

    def _adopt_gate_copies(self, routed: RoutedLayer, streamed: list[tuple[int, UnitSlice]]) -> list[StagedSlice] | None:
        """The streamed pieces the routed job copied at the gate, as staged (None: it copied none)."""
        if routed.copies is None:
            return None
        assert self._gate_copies is not None
        ahead = {id(piece) for piece, _, _ in self._prefetched}  # the driver skipped them
        return self._gate_copies.adopt(routed.copies, [t for t in streamed if id(t[1]) not in ahead])

    def _take_routed(self, layer: int, items: list[tuple[FFNUnit, torch.Tensor]],
                     into: torch.Tensor | None) -> RoutedLayer | None:
        """The routed job prepared for this layer's items, if any (one that does not match is given up)."""
        routed = self._routed
        if routed is None:
            return None
        if (routed.layer != layer or into is None or len(items) != routed.table.top_k
                or any(x.shape[0] != 1 or id(unit) not in routed.table.expert_of for unit, x in items)):
            self._cancel_routed()
            return None
        self._routed = None
        return routed

    def _routed_batch(self, routed: RoutedLayer, placed: Assignment, offsets: list[int], host_x: list[torch.Tensor]) -> _Submitted:
        """The routed job as this layer's CPU future: its batch's jobs and destination rows filled in."""
        assert self.routed_jobs is not None
        self.routed_jobs.fill(routed, placed, host_x)
        batch = routed.batch
        batch.dest, batch.dest_device = self._cpu_buffers.destination(tuple(offsets[job.item] for job in batch.jobs))
        self._signal_value = routed.signal_value
        return routed.future

    def _cancel_routed(self) -> None:
        routed, self._routed = self._routed, None
        assert routed is not None and self.routed_jobs is not None
        self.routed_jobs.cancel(routed)
        if routed.copies is not None and self._gate_copies is not None:
            self._gate_copies.discard(routed.copies)

    def _enter_meter(self, items: list[tuple[FFNUnit, torch.Tensor]], host: list[tuple[int, UnitSlice]],
                     shift: int, gate: torch.cuda.Event | None = None, layer: int | None = None,
                     rows: int = 1) -> None:
        """Starts measuring a decode layer (before its first copy is enqueued; `gate`: the mark the
        driver recorded at the gate, before copies it enqueued); a host piece's effect by the
        profile: its CPU work (the job's own overhead is paid once) plus its transfer."""
        item, piece = host[0]
        self._meter.enter(self.rates.cpu_work_s(piece, items[item][1].shape[0]) + self.rates.stream_s(piece), shift,
                          gate, layer, rows)

    def _partial(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return self.accelerator.linear_fp32(self.act(gate) * up, down)

    def _add_partial(self, sums_row: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        sums_row += self._partial(x, gate_up, down)

    def _ship_cpu_inputs(self, items: list[tuple[FFNUnit, torch.Tensor]], on_cpu: list[tuple[int, UnitSlice]],
                         host_x: list[torch.Tensor] | None) -> _CpuInputs | None:
        """The CPU items' activations on the host: `host_x` when given, else one device-to-host copy."""
        if not on_cpu:
            return None
        cpu_items = sorted({i for i, _ in on_cpu})
        if host_x is not None:
            return _CpuInputs({i: host_x[i] for i in cpu_items}, None)
        acc = self.accelerator
        x_device = torch.cat([items[i][1] for i in cpu_items]) if len(cpu_items) > 1 else items[cpu_items[0]][1]
        x_host = acc.host_empty(tuple(x_device.shape), x_device.dtype)
        x_host.copy_(x_device, non_blocking=True)
        rows, row = {}, 0
        for i in cpu_items:
            n = items[i][1].shape[0]
            rows[i] = x_host[row : row + n]
            row += n
        return _CpuInputs(rows, acc.record(acc.compute_stream))

    def _submit_cpu(self, items: list[tuple[FFNUnit, torch.Tensor]], offsets: list[int],
                    on_cpu: list[tuple[int, UnitSlice]], inputs: _CpuInputs | None) -> CpuResult | None:
        """Hands all CC pieces of the layer to the CPU worker as one job, writing into one host
        buffer (rows of job k at its offset, destined for the accumulator rows in `dest`). Small
        batches (decode) take kept buffers, and signal their end to the GPU stream where it can
        wait (with overlap; not with look-ahead, whose guessed copies wait for the job's end)."""
        if inputs is None:
            return None
        jobs, dest_rows, row = [], [], 0
        for i, piece in on_cpu:
            n = items[i][1].shape[0]
            jobs.append(CpuJob(i, inputs.rows[i], piece, row))
            dest_rows.extend(range(offsets[i], offsets[i] + n))
            row += n
        hidden = items[0][1].shape[1]
        signal = None
        if row <= MAX_KEPT_ROWS:
            dest, dest_device = self._cpu_buffers.destination(tuple(dest_rows))
            batch = CpuBatch(jobs, self._cpu_buffers.output(row, hidden), dest, dest_device, kept=True)
            if self.signal is not None and self.use_signal and self.overlap:
                self._signal_value = self.signal.next_value()
                signal = (self.signal.address, self._signal_value)
        else:
            dest = self.accelerator.host_empty((row,), torch.int64)
            dest.numpy()[:] = dest_rows
            batch = CpuBatch(jobs, self.accelerator.host_empty((row, hidden), torch.float32), dest)
        return self.cpu_pool.submit(batch, inputs.ready, self.timeline, signal)

    def _add_cpu_results(self, sums_all: torch.Tensor, batch: CpuBatch) -> None:
        """CPU partials summed into their items' rows: in decode read in place from pinned memory by
        one kernel (host_rows.py); else copied host-to-device, a bounded block of rows at a time
        (prefill partials would otherwise need GPU memory proportional to tokens x pieces)."""
        if self.read_cpu_rows_in_place and host_rows.applies(sums_all, batch.dest_device, batch.out):
            host_rows.add_host_rows(sums_all, batch.dest_device, batch.out)  # type: ignore[arg-type]
            self._cpu_buffers.consumed(batch)
            return
        device = self.accelerator.device
        for start in range(0, batch.out.shape[0], MAX_CPU_ROWS_PER_COPY):
            rows = slice(start, start + MAX_CPU_ROWS_PER_COPY)
            dest = batch.dest_device[rows] if batch.dest_device is not None else batch.dest[rows].to(device, non_blocking=True)
            sums_all.index_add_(0, dest, batch.out[rows].to(device, non_blocking=True))
        self._cpu_buffers.consumed(batch)

    def _begin_streaming(self, streamed: list[tuple[int, UnitSlice]], max_copies: int | None = None,
                         adopted: list[StagedSlice] | None = None) -> _Streaming:
        """Enqueues the first copies (prefetched ones first): up to `max_copies`, else a ring's worth.
        `adopted`: streamed pieces staged already by copies from the gate: the first of those not
        prefetched, in order (their slots follow the prefetched ones')."""
        state = _Streaming(deque(), deque(), deque())
        if not streamed:
            self._drop_prefetched()
            return state
        if self.ring is None:
            raise RuntimeError("the plan streams pieces but the executor has no staging ring")
        # prefetched pieces this layer streams are consumed first, in the order they were copied
        # (the ring's); the others (a wrong guess, a plan change) are released
        wanted = {id(piece): (i, piece) for i, piece in streamed}
        while self._prefetched:
            piece, slot, guessed = self._prefetched.popleft()
            entry = wanted.pop(id(piece), None)
            if entry is None:
                assert self.ring is not None
                self.ring.release(slot)
                state.holes += 1
                continue
            state.staged.append(slot)
            state.pending.append(entry)
            self.lookahead_stats.used += guessed
        if adopted:
            rest = [t for t in streamed if id(t[1]) in wanted]
            for entry, slot in zip(rest[: len(adopted)], adopted, strict=True):
                state.staged.append(slot)
                state.pending.append(entry)
                del wanted[id(entry[1])]
        state.queue.extend(t for t in streamed if id(t[1]) in wanted)
        self._drop_prefetched()
        self._fill_ring(state, max_copies)
        return state

    def _fill_ring(self, state: _Streaming, max_copies: int | None = None) -> None:
        """Enqueues copies until the ring is full (or `max_copies` are in flight)."""
        if self.ring is None:
            return
        limit = self.ring.num_slots - state.holes
        limit = limit if max_copies is None else min(max_copies, limit)
        while state.queue and len(state.staged) < limit:
            self._stage_next(state)

    def _stage_next(self, state: _Streaming) -> None:
        assert self.ring is not None
        state.pending.append(state.queue[0])
        state.staged.append(self.ring.stage(state.queue.popleft()[1], self.timeline))

    def _finish_streaming(self, state: _Streaming, items, sums: list[torch.Tensor],
                          add_partial: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
        """Computes each streamed piece once its copy landed; a released slot takes the next copy."""
        acc = self.accelerator
        while state.pending:
            i, _ = state.pending.popleft()
            slot = state.staged.popleft()
            acc.wait(acc.compute_stream, slot.ready)
            start = host_mark(acc, acc.compute_stream) if self.timeline is not None else None
            assert self.ring is not None
            self.ring.unpack(slot)
            add_partial(sums[i], items[i][1], slot.gate_up, slot.down)
            if self.timeline is not None:  # traced steps: each streamed piece's compute (not a resource)
                self.timeline.gpu_interval("gpu_piece", start, host_mark(acc, acc.compute_stream), f"slot {slot.slot}")
            self.ring.release(slot)
            if state.queue:
                self._stage_next(state)

    def _drop_prefetched(self) -> None:
        """Prefetched slots that were not used (a plan change) are released in order."""
        while self._prefetched:
            assert self.ring is not None
            self.ring.release(self._prefetched.popleft()[1])

    def _prefetch_next(self, layer: int) -> None:
        """Streams ahead the CG pieces of the next layer that every token needs."""
        if self.ring is None or layer + 1 >= len(self.model.layers):
            return
        ffn = self.model.layers[layer + 1].ffn
        unit = ffn if isinstance(ffn, FFNUnit) else (ffn.shared_expert if isinstance(ffn, MoEBlock) else None)
        if unit is not None:
            self._prefetch([piece for piece in unit.slices if piece.kind == PieceKind.CG], guessed=False)

    def _prefetch_guessed(self, layer: int, lookahead: list[int] | None) -> None:
        """Streams ahead the first CG pieces of the next layer's likely experts (`lookahead`)."""
        if self.ring is None or not lookahead or self.lookahead_pieces <= 0 or layer + 1 >= len(self.model.layers):
            return
        ffn = self.model.layers[layer + 1].ffn
        if isinstance(ffn, MoEBlock):
            self._prefetch(likely_pieces(ffn, lookahead, self.lookahead_pieces), guessed=True)
            self.ring.end_burst()

    def _prefetch(self, pieces: list[UnitSlice], guessed: bool) -> None:
        assert self.ring is not None
        for piece in pieces:
            if len(self._prefetched) >= self.ring.num_slots:
                return
            self._prefetched.append((piece, self.ring.stage(piece, self.timeline), guessed))
            self.lookahead_stats.staged += guessed
