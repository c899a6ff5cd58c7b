"""Token assignment: which host pieces a step computes on the CPU and which it streams."""

from __future__ import annotations

import torch

from engine.executor.token_assignment import DispatchRates, assign
from engine.model.ffn import FFNUnit, UnitSlice

RATES = DispatchRates(cpu_bytes_s=60e9, cpu_flops=2e12, pcie_bytes_s=50e9, cpu_job_overhead_s=0.0)
HIDDEN = 64


def _unit(kinds: list[str], rows: int = 32) -> FFNUnit:
    slices = [UnitSlice(i * rows, (i + 1) * rows, torch.zeros(2 * rows, HIDDEN), torch.zeros(HIDDEN, rows), kind)
              for i, kind in enumerate(kinds)]
    return FFNUnit(rows * len(kinds), slices)


def _items(num_tokens: int, kinds: list[str], num_units: int = 2):
    return [(_unit(kinds), torch.zeros(num_tokens, HIDDEN)) for _ in range(num_units)]


def test_fixed_rule_follows_the_plan() -> None:
    out = assign(None, _items(300, ["GG", "CG", "CC", "CC"]), RATES)
    assert [p.kind for _, p in out.on_gpu] == ["GG", "GG"]
    assert [p.kind for _, p in out.streamed] == ["CG", "CG"]
    assert len(out.on_cpu) == 4


def test_balance_keeps_the_plan_in_decode_and_streams_more_in_prefill() -> None:
    kinds = ["GG", "CG", "CG", "CC", "CC", "CC"]
    decode = assign("balance", _items(1, kinds), RATES)
    assert len(decode.on_cpu) == 6 and len(decode.streamed) == 4  # the plan's split, untouched
    prefill = assign("balance", _items(512, kinds), RATES)
    assert len(prefill.streamed) > 4 and len(prefill.on_cpu) < 6
    assert len(prefill.on_cpu) + len(prefill.streamed) == 10 and len(prefill.on_gpu) == 2
    cpu_s = sum(RATES.cpu_s(p, 512) for _, p in prefill.on_cpu)
    pcie_s = sum(RATES.stream_s(p) for _, p in prefill.streamed)
    all_streamed_s = sum(RATES.stream_s(p) for _, p in prefill.on_cpu + prefill.streamed)
    assert max(cpu_s, pcie_s) < all_streamed_s  # better than streaming everything


def test_balance_moves_work_to_the_cpu_when_streaming_is_the_bottleneck() -> None:
    slow_pcie = DispatchRates(cpu_bytes_s=60e9, cpu_flops=2e12, pcie_bytes_s=5e9, cpu_job_overhead_s=0.0)
    out = assign("balance", _items(64, ["CG"] * 6), slow_pcie)
    assert out.on_cpu, "some streamed pieces should move to the CPU"


def test_prefill_counts_the_driving_threads_work_for_each_streamed_piece() -> None:
    """Small pieces stream no faster than the driving thread handles them: with that work counted
    (stream_host_s), prefill streams fewer pieces; decode is not affected."""
    from dataclasses import replace

    kinds = ["GG", "CG", "CG", "CC", "CC", "CC"]
    piece = _unit(kinds).slices[1]
    host = replace(RATES, stream_host_s=4 * RATES.stream_s(piece))
    assert host.prefill_stream_s(piece) == 4 * RATES.stream_s(piece) and host.stream_s(piece) == RATES.stream_s(piece)
    plain, counted = assign("balance", _items(512, kinds), RATES), assign("balance", _items(512, kinds), host)
    assert len(counted.streamed) < len(plain.streamed)
    assert len(counted.on_cpu) + len(counted.streamed) == 10
    assert len(assign("balance", _items(1, kinds), host).streamed) == 4  # decode: the plan's split


def test_fiddler_sends_few_tokens_to_the_cpu_and_many_to_the_gpu() -> None:
    few = assign("fiddler", _items(1, ["CC", "CC", "CG"]), RATES)
    assert len(few.on_cpu) == 6 and not few.streamed
    many = assign("fiddler", _items(1000, ["CC", "CC", "CG"]), RATES)
    assert len(many.streamed) == 6 and not many.on_cpu
