"""Decode feedback: a steady imbalance between CPU and PCIe moves decode steps' host pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.executor.decode_feedback import CPU_LATE, DEADBAND, GPU_LATE, WINDOW, DecodeFeedback
from engine.executor.token_assignment import DispatchRates, assign
from engine.model.ffn import FFNUnit, UnitSlice

RATES = DispatchRates(cpu_bytes_s=60e9, cpu_flops=2e12, pcie_bytes_s=50e9, cpu_job_overhead_s=0.0)
HIDDEN = 64
ROWS = 32
EFFECT_S = 1e-3  # what moving one piece changes the imbalance by, in these tests


def _items(kinds: list[str], num_units: int = 2, num_tokens: int = 1):
    def unit() -> FFNUnit:
        slices = [UnitSlice(i * ROWS, (i + 1) * ROWS, torch.zeros(2 * ROWS, HIDDEN), torch.zeros(HIDDEN, ROWS), kind)
                  for i, kind in enumerate(kinds)]
        return FFNUnit(ROWS * len(kinds), slices)

    return [(unit(), torch.zeros(num_tokens, HIDDEN)) for _ in range(num_units)]


def _measure(feedback: DecodeFeedback, imbalance_of_shift, layers: int = 200) -> None:
    """Feeds `layers` decode layers whose imbalance follows from the feedback's current shift."""
    for _ in range(layers):
        feedback.add(feedback.shift, imbalance_of_shift(feedback.shift), EFFECT_S)


def test_a_steady_imbalance_moves_pieces_until_both_sides_finish_together() -> None:
    feedback = DecodeFeedback()
    _measure(feedback, lambda shift: 3.3e-3 - shift * EFFECT_S)  # PCIe ends 3.3 ms after the CPU
    assert feedback.shift == 3 and abs(feedback.imbalance_s) <= DEADBAND * EFFECT_S
    feedback = DecodeFeedback()
    _measure(feedback, lambda shift: -2.2e-3 - shift * EFFECT_S)  # the CPU ends last
    assert feedback.shift == -2


def test_no_move_within_the_band_nor_before_enough_layers() -> None:
    for imbalance in (0.5, -0.5):  # half a piece late either way: within the deadband
        feedback = DecodeFeedback()
        _measure(feedback, lambda shift, imbalance=imbalance: (imbalance - shift) * EFFECT_S)
        assert feedback.shift == 0 and feedback.moves == 0
    feedback = DecodeFeedback()
    _measure(feedback, lambda shift: 5 * EFFECT_S, layers=WINDOW - 1)
    assert feedback.shift == 0


def test_the_asymmetric_band_moves_a_late_gpu_side_sooner_than_a_late_cpu() -> None:
    """Half a piece late: the GPU's side moves a piece to the CPU (the CPU idled with most of host
    DRAM's rate); the CPU's does not move one back (PCIe idled with the smaller part)."""
    feedback = DecodeFeedback()
    feedback.asymmetric = True
    _measure(feedback, lambda shift: (0.5 - shift) * EFFECT_S)
    assert feedback.shift == 1 and feedback.moves == 1
    assert -CPU_LATE * EFFECT_S <= feedback.imbalance_s <= GPU_LATE * EFFECT_S
    feedback.reset()
    assert feedback.asymmetric is True  # a reset keeps the rule
    _measure(feedback, lambda shift: (-0.5 - shift) * EFFECT_S)
    assert feedback.shift == 0


def test_the_effect_of_a_move_is_learned_and_stops_flip_flopping() -> None:
    # the profile says one piece changes the imbalance by 1 ms, it really changes it by 2 ms
    feedback = DecodeFeedback()
    _measure(feedback, lambda shift: 2.7e-3 - shift * 2 * EFFECT_S, layers=400)
    assert feedback.piece_effect_s > 1.5 * EFFECT_S
    assert feedback.moves <= 4 and feedback.shift == 1


def test_measurements_at_an_older_split_are_ignored() -> None:
    feedback = DecodeFeedback(shift=2)
    for _ in range(50):
        feedback.add(0, 10 * EFFECT_S, EFFECT_S)
    assert feedback.shift == 2 and feedback.samples == 0


def test_outlier_layers_do_not_move_pieces() -> None:
    feedback = DecodeFeedback()
    for n in range(10 * WINDOW):  # balanced, but one layer in four is 5 ms late on either side
        feedback.add(feedback.shift, (5e-3 if n % 8 == 0 else -5e-3 if n % 8 == 4 else 0.1e-3), EFFECT_S)
    assert feedback.moves == 0


def test_the_shift_moves_each_items_last_pieces_in_decode_only() -> None:
    kinds = ["GG", "CG", "CG", "CG", "CC", "CC"]
    items = _items(kinds)
    plan = assign("balance", items, RATES)
    assert len(plan.streamed) == 6 and len(plan.on_cpu) == 4
    moved = assign("balance", items, RATES, DecodeFeedback(shift=2))
    assert len(moved.streamed) == 4 and len(moved.on_cpu) == 6 and len(moved.on_gpu) == 2
    third = {id(unit.slices[3]) for unit, _ in items}  # each item's last streamed piece went to the CPU
    assert third <= {id(p) for _, p in moved.on_cpu}
    back = assign("balance", items, RATES, DecodeFeedback(shift=-3))
    assert len(back.streamed) == 9 and len(back.on_cpu) == 1
    assert len(assign("balance", items, RATES, DecodeFeedback(shift=-50)).on_cpu) == 0
    prefill_items = _items(kinds, num_tokens=512)
    with_feedback = assign("balance", prefill_items, RATES, DecodeFeedback(shift=2))
    without = assign("balance", prefill_items, RATES)
    assert [id(p) for _, p in with_feedback.on_cpu] == [id(p) for _, p in without.on_cpu]
    fixed = assign(None, items, RATES, DecodeFeedback(shift=2))
    assert len(fixed.streamed) == 6 and len(fixed.on_cpu) == 4


@pytest.mark.parametrize("uniform", [False, True])
def test_decode_steps_measure_the_imbalance_and_keep_results(uniform: bool, tiny_checkpoints: dict[str, Path]) -> None:
    path = str(tiny_checkpoints["mixtral"])
    prompts = [[5, 9, 13, 22, 40, 41, 42, 7], [3, 4, 250, 17]]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = LLM(path, dtype="float32", show_progress=False).generate(prompt_token_ids=prompts, params=greedy)
    llm = LLM(path, dtype="float32", show_progress=False, gpu_memory_budget="1.2MB", policy="balanced:cg=0.5",
              kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=16)
    executor = llm.engine.runner.executor
    executor.uniform_decode_split = uniform  # streamed pieces alike for every expert of a layer, or by the plan's kinds
    executor.feedback.shift = 3  # as if earlier steps had moved pieces: results must not change
    got = llm.generate(prompt_token_ids=prompts, params=greedy)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert executor.feedback.piece_effect_s > 0 and executor.feedback.layers > 0
    shown = llm.engine.plan_info()["decode_feedback"]  # GET /v1/engine/plan shows it
    assert shown["layers"] == executor.feedback.layers and "shift" in shown
    stats = llm.engine.stats()  # /metrics exports it
    assert (stats.decode_shift, stats.decode_moves, stats.decode_imbalance_s) == (
        executor.feedback.shift, executor.feedback.moves, executor.feedback.imbalance_s)


def test_reset_returns_to_the_plans_split() -> None:
    feedback = DecodeFeedback()
    _measure(feedback, lambda shift: 3.3e-3 - shift * EFFECT_S)
    feedback.reset()
    assert feedback == DecodeFeedback()


def test_a_gated_layer_counts_both_sides_from_the_gate() -> None:
    """Copies enqueued at the GPU's gate (gate_copies.py): the meter's copy side starts at the gate
    mark and its CPU side at the job's start (the gate too), not at the executor's entry."""
    from engine.executor.accelerator import Accelerator
    from engine.executor.decode_feedback import DecodeMeter

    recorded: list[tuple[int, float, float]] = []

    class Recording(DecodeFeedback):
        def add(self, shift: int, imbalance_s: float, piece_effect_s: float) -> None:
            recorded.append((shift, imbalance_s, piece_effect_s))

    meter = DecodeMeter(Accelerator.for_device("cpu"), Recording())
    meter.enter(EFFECT_S, shift=2, gate=10.0)  # the gate's mark: host time 10.0 on a CPU "device"
    meter._layers[-1].end = 10.004  # the copies ended 4 ms after the gate
    meter.cpu_done(end_s=10.003, start_s=10.0)  # the CPU job ran from the gate for 3 ms
    meter.enter(EFFECT_S)  # the next layer resolves this one
    assert len(recorded) == 1
    shift, imbalance_s, effect_s = recorded[0]
    assert shift == 2 and effect_s == EFFECT_S and abs(imbalance_s - 0.001) < 1e-9


def test_gated_layers_report_their_anatomy() -> None:
    """The feedback's summary carries where gated layers' time went: the CPU job and the copies from
    the gate, the period from gate to gate, and how late the driving thread enqueued the GPU's wait."""
    from engine.executor.accelerator import Accelerator
    from engine.executor.decode_feedback import DecodeMeter

    feedback = DecodeFeedback()
    meter = DecodeMeter(Accelerator.for_device("cpu"), feedback)
    for layer in range(5):
        gate = 10.0 + 0.002 * layer  # a layer every 2 ms
        meter.enter(EFFECT_S, shift=0, gate=gate)
        meter._layers[-1].end = gate + 0.0012  # copies land 1.2 ms after the gate
        late = 0.0001 if layer % 2 else -0.0003  # the host enqueued its wait 0.1 ms late on odd layers
        meter.cpu_done(end_s=gate + 0.0015, start_s=gate, enqueued_s=gate + 0.0015 + late)
    meter.enter(EFFECT_S)  # resolves the last one
    summary = feedback.summary()
    assert abs(summary["cpu_ms"] - 1.5) < 1e-6 and abs(summary["copies_ms"] - 1.2) < 1e-6
    assert abs(summary["period_ms"] - 2.0) < 1e-6
    assert abs(summary["host_late"] - 0.4) < 1e-9 and abs(summary["host_lag_ms"] + 0.3) < 1e-6


def test_the_anatomy_keeps_each_layers_imbalance() -> None:
    """Layers the shared shift balances both ways show in the quartiles and by layer index, while
    their median imbalance is near zero."""
    from engine.executor.accelerator import Accelerator
    from engine.executor.decode_feedback import DecodeMeter

    feedback = DecodeFeedback()
    meter = DecodeMeter(Accelerator.for_device("cpu"), feedback)
    for step in range(4):
        for layer in range(4):  # even layers: copies 0.4 ms late; odd ones: the CPU job 0.4 ms late
            gate = 10.0 + 0.01 * step + 0.002 * layer
            meter.enter(EFFECT_S, shift=0, gate=gate, layer=layer)
            meter._layers[-1].end = gate + (0.0014 if layer % 2 == 0 else 0.001)
            meter.cpu_done(end_s=gate + (0.001 if layer % 2 == 0 else 0.0014), start_s=gate)
    meter.enter(EFFECT_S)
    summary = feedback.summary()
    assert abs(summary["imbalance_q1_ms"] + 0.4) < 1e-6 and abs(summary["imbalance_q3_ms"] - 0.4) < 1e-6
    assert abs(summary["imbalance_median_ms"]) < 1e-6
    by_layer = feedback.anatomy.by_layer_ms()
    assert list(by_layer) == [0, 1, 2, 3]
    assert all(abs(v - (0.4 if layer % 2 == 0 else -0.4)) < 1e-6 for layer, v in by_layer.items())


def test_a_frozen_feedback_measures_but_never_moves() -> None:
    feedback = DecodeFeedback(shift=-1)
    feedback.frozen = True
    _measure(feedback, lambda shift: 3.3e-3 - shift * EFFECT_S)
    assert feedback.shift == -1 and feedback.moves == 0
    assert feedback.imbalance_s == pytest.approx(4.3e-3) and feedback.layers == 200
    feedback.reset()
    assert feedback.frozen  # a benchmark's hold outlives the resets of plan changes


def _measure_periods(feedback: DecodeFeedback, imbalance_of_shift, period_of_shift, windows: int) -> list[int]:
    """Feeds `windows` windows of layers with an imbalance and a gate-to-gate period that follow
    from the shift; returns the shift each window ran at."""
    shifts = []
    for _ in range(windows):
        shifts.append(feedback.shift)
        for _ in range(WINDOW):
            shift = feedback.shift
            feedback.add_period(shift, period_of_shift(shift))
            feedback.add(shift, imbalance_of_shift(shift), EFFECT_S)
    return shifts


def _with_period_rule() -> DecodeFeedback:
    feedback = DecodeFeedback()
    feedback.by_period = True  # off by default until the GPU machine measures it
    return feedback


def _imbalance_between_0_and_1(shift: int) -> float:
    """Balance between shifts 0 and 1: at 0 outside the band (moves), at 1 inside it (stays)."""
    return (0.7 - shift) * EFFECT_S


def test_the_period_rule_keeps_the_faster_of_the_two_shifts_around_balance() -> None:
    faster_at_0 = {0: 1.40e-3, 1: 1.50e-3}  # the imbalance alone would settle at 1, the slower one
    feedback = _with_period_rule()
    shifts = _measure_periods(feedback, _imbalance_between_0_and_1, lambda s: faster_at_0.get(s, 2e-3), windows=20)
    assert shifts[:3] == [0, 1, 0] and set(shifts[2:]) == {0}
    assert feedback.period_moves == 1 and feedback.holds == 18
    assert feedback.readings[1].period_s == pytest.approx(1.50e-3)
    feedback.reset()
    assert feedback.by_period and not feedback.readings  # a reset forgets the readings, keeps the rule
    by_imbalance = DecodeFeedback()  # the default: the imbalance alone
    shifts = _measure_periods(by_imbalance, _imbalance_between_0_and_1, lambda s: faster_at_0.get(s, 2e-3), windows=20)
    assert set(shifts[1:]) == {1} and by_imbalance.holds == 0 and by_imbalance.period_moves == 0


def test_the_period_rule_ends_the_flip_between_two_shifts_around_balance() -> None:
    """Balance halfway between shifts 0 and 1, and each window's median moved by the machine's
    state: the imbalance alone flips between the two, the period rule stays at the faster one."""
    import random

    rng = random.Random(7)
    noise = [rng.gauss(0.0, 0.4) * EFFECT_S for _ in range(40)]
    periods = {0: 1.60e-3, 1: 1.45e-3}

    def run(by_period: bool) -> tuple[DecodeFeedback, list[int]]:
        feedback = _with_period_rule()
        feedback.by_period = by_period
        shifts = _measure_periods(feedback, lambda s: (0.5 - s) * EFFECT_S + noise[feedback.windows],
                                  lambda s: periods.get(s, 2e-3), windows=len(noise))
        return feedback, shifts

    by_imbalance, shifts = run(False)
    assert by_imbalance.moves >= 4 and shifts.count(0) >= 8
    feedback, shifts = run(True)
    assert feedback.moves <= 3 and shifts.count(1) >= 36 and shifts[-1] == 1 and feedback.holds > 0


def test_a_large_imbalance_overrules_the_period_rule() -> None:
    """Held at the faster shift, the machine changes: PCIe now ends 3.7 pieces late. The readings
    say nothing about that, so the imbalance moves the split at once."""
    periods = {0: 1.40e-3, 1: 1.50e-3}
    feedback = _with_period_rule()
    _measure_periods(feedback, _imbalance_between_0_and_1, lambda s: periods.get(s, 2e-3), windows=6)
    assert feedback.shift == 0 and feedback.holds > 0
    shifts = _measure_periods(feedback, lambda s: (3.7 - s) * EFFECT_S, lambda s: periods.get(s, 2e-3), windows=6)
    assert shifts[1] >= 3 and shifts[-1] in (3, 4)


def test_one_slow_window_does_not_undo_a_hold() -> None:
    """A shift's reading keeps the median period of its last windows: one window slowed by noise
    (1.60 ms at the faster shift, whose others ran 1.40) does not send the split to the slower one."""
    feedback = _with_period_rule()
    _measure_periods(feedback, _imbalance_between_0_and_1, {0: 1.40e-3, 1: 1.50e-3}.__getitem__, windows=6)
    assert feedback.shift == 0 and len(feedback.readings[0].periods_s) == 3
    shifts = _measure_periods(feedback, _imbalance_between_0_and_1, {0: 1.60e-3, 1: 1.50e-3}.__getitem__, windows=1)
    assert shifts == [0] and feedback.shift == 0 and feedback.readings[0].period_s == pytest.approx(1.40e-3)


def test_an_old_reading_is_measured_again() -> None:
    """After PERIOD_MEMORY windows the neighbour's reading is stale: the imbalance moves the split
    there once, and the period rule brings it back."""
    from engine.executor.decode_feedback import PERIOD_MEMORY

    periods = {0: 1.40e-3, 1: 1.50e-3}
    feedback = _with_period_rule()
    shifts = _measure_periods(feedback, _imbalance_between_0_and_1, periods.__getitem__, windows=3 * PERIOD_MEMORY)
    assert 2 <= shifts.count(1) <= 4 and feedback.period_moves == shifts.count(1)
    assert shifts[-1] == 0


def test_periods_within_the_margin_leave_the_split_to_the_imbalance() -> None:
    feedback = _with_period_rule()
    shifts = _measure_periods(feedback, _imbalance_between_0_and_1, lambda s: 1.5e-3 * (1 + 0.005 * s), windows=10)
    assert set(shifts[1:]) == {1} and feedback.holds == 0 and feedback.period_moves == 0


def test_the_meter_gives_each_period_to_its_layers_shift_within_a_step() -> None:
    """A period runs from a layer's gate to the next layer's, at the first one's shift; the last
    layer's period (into the next step) is left out."""
    from engine.executor.accelerator import Accelerator
    from engine.executor.decode_feedback import DecodeMeter

    periods: list[tuple[int, float, int]] = []

    class Recording(DecodeFeedback):
        def add_period(self, shift: int, period_s: float, rows: int = 1) -> None:
            periods.append((shift, period_s, rows))

    meter = DecodeMeter(Accelerator.for_device("cpu"), Recording())
    gate = 10.0
    for step in range(2):
        for layer in range(3):
            gate += 0.002 if layer else 0.005  # 2 ms a layer, 5 ms across the step boundary
            meter.enter(EFFECT_S, shift=layer, gate=gate, layer=layer, rows=2 + step)
            meter._layers[-1].end = gate + 0.001
            meter.cpu_done(end_s=gate + 0.001, start_s=gate)
    assert [(shift, rows) for shift, _, rows in periods] == [(0, 2), (1, 2), (0, 3), (1, 3)]
    assert all(period == pytest.approx(0.002) for _, period, _ in periods)


def test_another_batch_size_forgets_the_period_readings() -> None:
    """Periods of two batch sizes say nothing about two shifts: a change of the layers' token rows
    drops the readings, and the rule waits for new ones."""
    feedback = _with_period_rule()
    periods = {0: 1.40e-3, 1: 1.50e-3}
    _measure_periods(feedback, _imbalance_between_0_and_1, periods.__getitem__, windows=4)
    assert set(feedback.readings) == {0, 1} and feedback.shift == 0
    feedback.add_period(feedback.shift, 3e-3, rows=4)  # four sequences decode from here on
    assert feedback.readings == {}
    feedback.add_period(feedback.shift, 3e-3, rows=4)
    assert len(feedback._periods) == 2 and feedback.readings == {}  # both at rows 4
