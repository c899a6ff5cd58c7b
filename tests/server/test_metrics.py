"""ServerMetrics: the engine's partition counters and the decode feedback's gauges."""

from __future__ import annotations

import re

from engine.outputs import EngineStats, StepStats
from server.metrics import ServerMetrics


def _stats(moves: int, shift: int, imbalance_s: float, period_s: float, step_s: float) -> EngineStats:
    return EngineStats(1, 0, 0.1, 10, 12, 0, StepStats("decode", 0, 1, step_s), decode_shift=shift,
                       decode_moves=moves, decode_imbalance_s=imbalance_s, decode_layer_period_s=period_s)


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    assert match is not None, f"{name} not exported"
    return float(match.group(1))


def test_the_decode_feedbacks_state_is_exported() -> None:
    metrics = ServerMetrics()
    metrics.observe_step(0.05, _stats(moves=3, shift=-2, imbalance_s=0.0004, period_s=0.00145, step_s=0.05), False)
    text = metrics.render().decode()
    assert _sample(text, "scheinfer:decode_feedback_shift") == -2
    assert _sample(text, "scheinfer:decode_imbalance_seconds") == 0.0004
    assert _sample(text, "scheinfer:decode_layer_period_seconds") == 0.00145
    assert _sample(text, "scheinfer:decode_feedback_moves_total") == 3
    # a new plan resets the feedback's count: the counter keeps what it had and counts on from there
    metrics.observe_step(0.05, _stats(moves=0, shift=0, imbalance_s=0.0, period_s=0.0, step_s=0.06), False)
    metrics.observe_step(0.05, _stats(moves=2, shift=1, imbalance_s=-0.0001, period_s=0.0015, step_s=0.07), False)
    text = metrics.render().decode()
    assert _sample(text, "scheinfer:decode_feedback_moves_total") == 5
    assert _sample(text, "scheinfer:decode_feedback_shift") == 1
