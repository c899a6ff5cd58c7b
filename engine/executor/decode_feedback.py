"""Decode feedback: decode steps move host pieces between the CPU and PCIe until both finish together.

The plan splits each layer's host pieces between the CPU and PCIe from the startup profile, but
when each side really finishes depends on more than the profile's rates: the CPU job starts after
the executor's own host work (and its threads may have to wake up), PCIe starts after the CPU job
was handed over, and each side reads host DRAM while the other does. In decode every layer repeats
the same work, so each one measures the outcome directly: how much later the last copy landed than
the CPU job ended (the imbalance). After a window of layers at the same split, a median imbalance
larger than about half of what moving one piece changes moves pieces (`shift`: how many per layer go from PCIe
to the CPU, relative to the plan; negative: the other way). What one moved piece changes is first
taken from the profile's rates, then from what the moves did.

The imbalance says which way balance lies, not which split is faster: a piece moves the imbalance
by about as much as the band is wide, so the two shifts around balance both sit near its edges and
noise flips between them. Once both neighbours around balance have been measured (their imbalances
on either side of zero), the period rule keeps the one whose layers ran gate to gate in less time
(off by default: DecodeFeedback.by_period; session 19 measured no gain, benchmarks/README.md).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

import torch

from engine.executor.accelerator import Accelerator, now_s
from engine.executor.timeline import Mark, elapsed_s, host_mark

ANATOMY_LAYERS = 512  # layers whose CPU, copy and gate-to-gate times the anatomy keeps (medians)
WINDOW = 24  # layers measured at one split before it may change (their median is the imbalance)
DEADBAND = 0.6  # move once the imbalance exceeds this fraction of one piece's effect (no flip-flop at 0.5)
# The asymmetric rule (off by default: DecodeFeedback.asymmetric): the split stays while the GPU's
# side ends at most GPU_LATE of a piece's effect after the CPU's, or the CPU's at most CPU_LATE
# after the GPU's. While the GPU's side is late the CPU idles, and it reads ~2/3 of what host DRAM
# gives both; while the CPU is late PCIe idles, with ~1/3: a late GPU side costs about twice as
# much, so the band is [-2/3, 1/3] of a piece, widened by 5% against flip-flop.
GPU_LATE = 0.35
CPU_LATE = 0.7
EFFECT_RANGE = 2.0  # a learned piece effect stays within this factor of the profile's
# The period rule (DecodeFeedback.by_period): a shift's reading (its window's median imbalance and
# gate-to-gate period) decides against a neighbour's for PERIOD_MEMORY windows (then the neighbour is
# measured again: the machine may have changed); periods closer than PERIOD_MARGIN of the current
# one leave the decision to the imbalance; a window needs MIN_PERIODS periods to have a reading; a
# reading's period is the median of the shift's last READING_WINDOWS windows within PERIOD_MEMORY.
PERIOD_MEMORY = 32
PERIOD_MARGIN = 0.02
MIN_PERIODS = WINDOW // 2
READING_WINDOWS = 3


@dataclass(frozen=True)
class ShiftReading:
    """What a shift's last window measured: median imbalance and the window's number
    (DecodeFeedback.windows, to tell its age); `periods_s`: the median gate-to-gate period of each
    of its last windows (seconds, oldest first)."""

    imbalance_s: float
    periods_s: tuple[float, ...]
    window: int

    @property
    def period_s(self) -> float:
        return statistics.median(self.periods_s)

    def then(self, imbalance_s: float, period_s: float, window: int) -> ShiftReading:
        """This reading followed by a newer window's (older windows past PERIOD_MEMORY dropped)."""
        kept = self.periods_s if window - self.window <= PERIOD_MEMORY else ()
        return ShiftReading(imbalance_s, (*kept, period_s)[-READING_WINDOWS:], window)


@dataclass
class LayerAnatomy:
    """Where decode layers' time goes, over the last ANATOMY_LAYERS gated layers: the CPU job (gate
    to its end), the copies (gate to the last one landed) and the period from one layer's gate to
    the next one's (the rest of the period is the chain: outputs back, sum, the next layer's graph,
    routing out). Medians in ms, for reports."""

    cpu_s: deque = field(default_factory=lambda: deque(maxlen=ANATOMY_LAYERS))
    copies_s: deque = field(default_factory=lambda: deque(maxlen=ANATOMY_LAYERS))
    period_s: deque = field(default_factory=lambda: deque(maxlen=ANATOMY_LAYERS))
    # when the driving thread had enqueued the layer's wait for its CPU job (the last of the layer's
    # GPU work; the next layer's graph follows) after the job ended: > 0, the GPU waited for the host
    host_lag_s: deque = field(default_factory=lambda: deque(maxlen=ANATOMY_LAYERS))
    # each layer's imbalance (copies minus CPU job, as the feedback sees it), all layers and by
    # layer index: one shift for every layer balances their median, not each layer
    imbalance_s: deque = field(default_factory=lambda: deque(maxlen=ANATOMY_LAYERS))
    by_layer_s: dict[int, deque] = field(default_factory=dict)

    def add_imbalance(self, layer: int | None, imbalance_s: float) -> None:
        self.imbalance_s.append(imbalance_s)
        if layer is not None:
            self.by_layer_s.setdefault(layer, deque(maxlen=ANATOMY_LAYERS // 8)).append(imbalance_s)

    def summary(self) -> dict[str, float]:
        def median_ms(values: deque) -> float:
            return statistics.median(values) * 1e3 if values else 0.0

        late = sum(lag > 0 for lag in self.host_lag_s) / len(self.host_lag_s) if self.host_lag_s else 0.0
        quartiles = statistics.quantiles(self.imbalance_s, n=4) if len(self.imbalance_s) >= 2 else [0.0, 0.0, 0.0]
        return {"cpu_ms": median_ms(self.cpu_s), "copies_ms": median_ms(self.copies_s),
                "period_ms": median_ms(self.period_s), "host_lag_ms": median_ms(self.host_lag_s), "host_late": late,
                "imbalance_q1_ms": quartiles[0] * 1e3, "imbalance_median_ms": median_ms(self.imbalance_s),
                "imbalance_q3_ms": quartiles[2] * 1e3}

    def by_layer_ms(self) -> dict[int, float]:
        """Each layer index's median imbalance, ms (reports: a layer the shared shift leaves off)."""
        return {layer: statistics.median(values) * 1e3 for layer, values in sorted(self.by_layer_s.items())}


@dataclass
class DecodeFeedback:
    """The decode split's state: `shift` pieces per layer moved from PCIe to the CPU, the imbalance
    at that shift (median of a window of layers: seconds the last copy lands after the CPU job
    ends), and what moving one piece changes the imbalance by (`piece_effect_s`, 0: not known yet)."""

    shift: int = 0
    imbalance_s: float = 0.0
    piece_effect_s: float = 0.0
    moves: int = 0
    layers: int = 0  # layers measured in all
    windows: int = 0  # windows completed in all
    period_moves: int = 0  # moves the period rule made (of `moves`)
    holds: int = 0  # windows the period rule kept the shift where the imbalance would have moved it
    readings: dict[int, ShiftReading] = field(default_factory=dict)  # the last reading of each shift
    _window: list[float] = field(default_factory=list)  # this split's layers so far
    _periods: list[float] = field(default_factory=list)  # this split's gate-to-gate periods so far
    _period_rows: int = 1  # the token rows of the layers the readings were measured on
    _before: tuple[int, float] | None = None  # (shift, imbalance) before the last move
    anatomy: LayerAnatomy = field(default_factory=LayerAnatomy)
    # The asymmetric band (True) or DEADBAND both ways (False, the default): on the H100 machine
    # (session 15, Phi-3.5-MoE 24 GiB, `decode_profile.py --band-ab`) the asymmetric band moved
    # pieces twice as often and decoded no faster: 55.7 / 52.2 / 58.7 against 53.5 / 53.5 ms a step.
    # Not a field: a reset keeps it.
    asymmetric = False
    # True: measures but never moves (benchmarks time one shift against another); not a field either
    frozen = False
    # The period rule (module docstring); False: the imbalance alone moves the split. Off: session 19
    # measured no gain on the GPU machine; `partition_bench.py` policy suffix '~period',
    # `decode_profile.py --period-rule-ab` turn it on; not a field either
    by_period = False

    def add_period(self, shift: int, period_s: float, rows: int = 1) -> None:
        """One decode layer's gate-to-gate period (its gate to the next layer's), run at `shift` over
        `rows` (the layer's token rows, all items: another batch size takes another time, so the
        readings of the last one are forgotten). Only gated layers have periods, and today only
        one-token layers are gated (routed jobs), so in the engine `rows` is top_k; a batch of
        several sequences gives no periods and no readings, and the rule leaves it to the imbalance."""
        if rows != self._period_rows:
            self._period_rows = rows
            self.readings.clear()
            self._periods.clear()
        if shift == self.shift:
            self._periods.append(period_s)

    def add(self, shift: int, imbalance_s: float, piece_effect_s: float) -> None:
        """One decode layer's imbalance, measured at `shift`; `piece_effect_s`: what moving one of
        its pieces would change by the profile's rates."""
        if shift != self.shift:  # measured before the last move: says nothing about this split
            return
        if self.piece_effect_s <= 0.0:
            self.piece_effect_s = piece_effect_s
        self.layers += 1
        self._window.append(imbalance_s)
        if len(self._window) < WINDOW:
            return
        self.imbalance_s = statistics.median(self._window)
        self._window.clear()
        self.windows += 1
        if len(self._periods) >= MIN_PERIODS:
            period_s, last = statistics.median(self._periods), self.readings.get(self.shift)
            self.readings[self.shift] = (ShiftReading(self.imbalance_s, (period_s,), self.windows) if last is None
                                         else last.then(self.imbalance_s, period_s, self.windows))
        self._periods.clear()
        if self.frozen:
            return
        if self._before is not None:  # what the last move did, now that its split is measured
            old_shift, old_imbalance = self._before
            observed = (old_imbalance - self.imbalance_s) / (self.shift - old_shift)
            # noise can make one move look like anything: stay within a factor of the profile's
            observed = min(max(observed, piece_effect_s / EFFECT_RANGE), piece_effect_s * EFFECT_RANGE)
            self.piece_effect_s = 0.5 * (self.piece_effect_s + observed)
            self._before = None
        step = self._imbalance_step()
        # the period rule decides between neighbours only: an imbalance of more than a piece and a
        # half says the machine changed since the readings, and the imbalance moves it
        by_period = self._by_period() if abs(step) <= 1 else None
        if by_period:
            self.period_moves += 1
            self._move(1 if self.imbalance_s > 0 else -1)
        elif by_period is False:
            self.holds += step != 0
        elif step:
            self._move(step)

    def _imbalance_step(self) -> int:
        """Pieces the imbalance alone would move (0: inside the band)."""
        effect = self.piece_effect_s
        low, high = (-CPU_LATE * effect, GPU_LATE * effect) if self.asymmetric else (-DEADBAND * effect, DEADBAND * effect)
        if low <= self.imbalance_s <= high:
            return 0
        step = max(1, round(abs(self.imbalance_s - (low + high) / 2) / effect))
        return step if self.imbalance_s > high else -step

    def _by_period(self) -> bool | None:
        """The period rule's decision after a window: True moves one piece toward balance, False
        stays, None leaves it to the imbalance (no recent reading of the neighbour on balance's
        other side, or periods within the margin)."""
        here = self.readings.get(self.shift)
        if not self.by_period or here is None or here.window != self.windows:
            return None
        there = self.readings.get(self.shift + (1 if here.imbalance_s > 0 else -1))
        if there is None or self.windows - there.window > PERIOD_MEMORY or (there.imbalance_s > 0) == (here.imbalance_s > 0):
            return None
        if abs(there.period_s - here.period_s) <= PERIOD_MARGIN * here.period_s:
            return None
        return there.period_s < here.period_s

    def _move(self, step: int) -> None:
        self._before = (self.shift, self.imbalance_s)
        self.shift += step
        self.moves += 1
        self._periods.clear()

    @property
    def samples(self) -> int:
        """Layers measured at the current split since its last decision."""
        return len(self._window)

    def reset(self) -> None:
        """Back to the plan's split (a new plan: a shift of the old one means nothing)."""
        self.__init__()  # type: ignore[misc]

    def summary(self) -> dict[str, float | int]:
        """The state, for logs and benchmark reports."""
        return {"shift": self.shift, "imbalance_ms": self.imbalance_s * 1e3, "piece_effect_ms": self.piece_effect_s * 1e3,
                "moves": self.moves, "period_moves": self.period_moves, "holds": self.holds, "layers": self.layers,
                **self.anatomy.summary()}


@dataclass
class _Layer:
    entered_s: float  # host clock at the executor's entry
    entry: Mark  # the copy stream at the entry
    shift: int
    piece_effect_s: float
    end: Mark = None  # the copy stream after the layer's last copy (None: no copies)
    cpu_end_s: float | None = None  # the CPU job's end (None: no CPU job)
    gated: bool = False  # entered at the GPU's gate: the CPU job's start is the entry time
    index: int | None = None  # the model's layer index (anatomy by layer)
    rows: int = 1  # token rows of all its items


class DecodeMeter:
    """Measures decode layers for a DecodeFeedback. The executor calls `enter` when a layer's
    executor starts, `gpu_side_enqueued` after its last copy (and compute), `cpu_done` with its CPU job's end.
    A layer's copy marks are read at a later layer's entry, once its copies have landed (no wait);
    the copy stream is idle at a decode layer's entry, so its entry mark is the entry's host time."""

    def __init__(self, accelerator: Accelerator, feedback: DecodeFeedback) -> None:
        self.accelerator = accelerator
        self.feedback = feedback
        self._layers: deque[_Layer] = deque()
        self._last_gate_s: float | None = None  # the previous gated layer's gate (host clock)
        self._last_gated: tuple[int | None, int, int] | None = None  # its (index, shift, rows): its period's owner

    def enter(self, piece_effect_s: float, shift: int | None = None, gate: Mark = None, layer: int | None = None,
              rows: int = 1) -> None:
        """`piece_effect_s`: what moving one host piece of this layer would change, by the profile;
        `shift`: the one its pieces were assigned with (None: the feedback's now; measurements
        resolved here may move it, after the layer was assigned). `gate`: a mark recorded on the
        copy stream at the GPU's gate (copies enqueued from there: gate_copies.py); the layer's
        CPU side then counts from its job's start, which is the gate too. `rows`: the layer's token
        rows, all items (the period rule compares periods of like batches only)."""
        shift = self.feedback.shift if shift is None else shift
        self._resolve()
        entry = gate if gate is not None else host_mark(self.accelerator, self.accelerator.copy_stream)
        self._layers.append(_Layer(now_s(), entry, shift, piece_effect_s, gated=gate is not None, index=layer, rows=rows))

    def gpu_side_enqueued(self, stream: torch.cuda.Stream | None = None) -> None:
        """The layer's GPU side is enqueued: its end is marked on the copy stream (the last copy
        landed), or on `stream` (the compute stream: the last streamed piece computed too)."""
        self._layers[-1].end = host_mark(self.accelerator, stream if stream is not None else self.accelerator.copy_stream)

    def cpu_done(self, end_s: float, start_s: float | None = None, enqueued_s: float | None = None) -> None:
        """The layer's CPU job ran from `start_s` to `end_s`; `enqueued_s`: when the GPU's wait for it
        was enqueued (signalled jobs)."""
        layer = self._layers[-1]
        layer.cpu_end_s = end_s
        if enqueued_s is not None:
            self.feedback.anatomy.host_lag_s.append(enqueued_s - end_s)
        if layer.gated and start_s:
            layer.entered_s = start_s
            if self._last_gate_s is not None and start_s > self._last_gate_s:
                self.feedback.anatomy.period_s.append(start_s - self._last_gate_s)
                # the period rule takes a layer's period only up to the next layer of the same step
                # (the last layer's runs into the LM head, sampling and the next step's start)
                if self._last_gated is not None:
                    index, shift, rows = self._last_gated
                    if index is not None and layer.index == index + 1:
                        self.feedback.add_period(shift, start_s - self._last_gate_s, rows)
            self._last_gate_s = start_s
            self._last_gated = (layer.index, layer.shift, layer.rows)

    def _resolve(self) -> None:
        while self._layers:
            layer = self._layers[0]
            copies_s = 0.0 if layer.end is None else elapsed_s(layer.entry, layer.end)
            if copies_s is None:
                return
            self._layers.popleft()
            self.accelerator.release(layer.entry, layer.end)  # only this meter read them
            if layer.end is None and layer.cpu_end_s is None:
                continue  # no host piece in this layer
            cpu_s = 0.0 if layer.cpu_end_s is None else layer.cpu_end_s - layer.entered_s
            if layer.gated:
                self.feedback.anatomy.cpu_s.append(cpu_s)
                self.feedback.anatomy.copies_s.append(copies_s)
                self.feedback.anatomy.add_imbalance(layer.index, copies_s - cpu_s)
            self.feedback.add(layer.shift, copies_s - cpu_s, layer.piece_effect_s)

