"""The cost model's pieces: shared host memory, overheads, floors and modes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.model.factory import resolve_model_config
from engine.placement.cost_model import CostModel, HostMode, LayerTime, host_modes
from engine.placement.hardware import roofline_table
from engine.placement.memory import GIB
from engine.placement.plan import PartitionPlan, UnitSplit
from engine.placement.planner import build_plan_request, predict
from engine.placement.policies import make_plan, relabel
from tests.engine.placement.conftest import synthetic_profile

MIXTRAL = resolve_model_config("mixtral-8x7b")[0]


def test_cpu_and_pcie_share_host_memory() -> None:
    alone = LayerTime(cpu_s=1.0, pcie_s=1.0, gpu_s=0.0, sync_s=0.0)
    assert alone.total_s == pytest.approx(1.0)
    # both slowed 2x while together: the CPU ends at 2.0 having done its part, PCIe likewise
    shared = LayerTime(cpu_s=1.0, pcie_s=1.0, gpu_s=0.0, sync_s=0.0, cpu_shared_s=2.0, pcie_shared_s=2.0)
    assert shared.total_s == pytest.approx(2.0)
    # the CPU is done at 1.0 (half of PCIe's shared time): PCIe then finishes its half alone
    early = LayerTime(cpu_s=0.5, pcie_s=1.0, gpu_s=0.0, sync_s=0.1, cpu_shared_s=1.0, pcie_shared_s=2.0)
    assert early.total_s == pytest.approx(1.0 + 0.5 + 0.1)
    assert LayerTime(0.0, 1.0, 3.0, 0.0).total_s == pytest.approx(3.0)  # GPU-bound


def test_contention_slows_a_split_plan_only() -> None:
    request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8)
    free = synthetic_profile()
    shared = replace(free, cpu_with_pcie_bytes_s=30e9, pcie_with_cpu_bytes_s=40e9)
    split, _ = make_plan("manual:cg=0.5", request)
    cpu_only = relabel(split, "cpu-experts")
    assert predict(split, MIXTRAL, shared, request).decode_s_per_token > predict(split, MIXTRAL, free, request).decode_s_per_token
    assert predict(cpu_only, MIXTRAL, shared, request).decode_s_per_token == pytest.approx(
        predict(cpu_only, MIXTRAL, free, request).decode_s_per_token)


def test_calibrated_overheads_add_per_layer_and_per_piece() -> None:
    request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8)
    plan, _ = make_plan("manual:cg=0.5", request)
    profile = synthetic_profile()
    base = predict(plan, MIXTRAL, profile, request).decode_s_per_token
    layer = predict(plan, MIXTRAL, replace(profile, layer_overhead_s=1e-3), request).decode_s_per_token
    assert layer - base == pytest.approx(32e-3)
    piece = predict(plan, MIXTRAL, replace(profile, piece_overhead_s=1e-4), request).decode_s_per_token
    pieces_per_expert = 1 + len(plan.splits[(0, 0)].ranges(1024)) - 1  # GG piece + host chunks
    assert piece - base == pytest.approx(32 * 2 * pieces_per_expert * 1e-4, rel=0.01)


def test_compact_host_rows_take_the_cpu_compact_rate_per_bf16_byte() -> None:
    """With a compact table, CC rows cost their bf16 bytes at its rate (prefill decodes them into
    scratch: slower than bf16); without one, their compact bytes at the bf16 rate. PCIe and the
    floor keep the compact bytes and the bf16 rate either way."""
    request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8)
    plan, _ = make_plan("manual:cg=0.5", request)
    assert plan.host_bytes_ratio < 1  # compact by default
    bf16_table = synthetic_profile()
    slower = replace(bf16_table, cpu_ffn_compact=roofline_table(60e9, 1.2e12, (1, 4, 16, 64, 256, 512)))
    old, new = CostModel(MIXTRAL, bf16_table, host_bytes_ratio=0.75), CostModel(MIXTRAL, slower, host_bytes_ratio=0.75)
    split = plan.splits[(0, 0)]
    cc_only = [(0, UnitSplit(split.gg, 0, split.cg + split.cc))]
    latency = old._cpu_latency_s(True)
    row_bytes = old.row_bytes
    for tokens in (1, 128):
        rows = split.cg + split.cc
        assert old.layer_time(0, cc_only, tokens).cpu_s - latency == pytest.approx(
            old.activity(0, 0, tokens)[0] * rows * 0.75 * row_bytes * bf16_table.cpu_ffn.s_per_byte_at(old.activity(0, 0, tokens)[1]))
        assert new.layer_time(0, cc_only, tokens).cpu_s - latency == pytest.approx(
            new.activity(0, 0, tokens)[0] * rows * row_bytes * slower.cpu_ffn_compact.s_per_byte_at(new.activity(0, 0, tokens)[1]))
    assert predict(plan, MIXTRAL, slower, request).prefill_s(512) > predict(plan, MIXTRAL, bf16_table, request).prefill_s(512)
    assert new.layer_time(0, cc_only, 1).pcie_s == old.layer_time(0, cc_only, 1).pcie_s
    assert new.floor_step_s(plan, 512, decode=False) == pytest.approx(old.floor_step_s(plan, 512, decode=False))
    # bf16 host rows ignore the compact table
    assert CostModel(MIXTRAL, slower).layer_time(0, cc_only, 128).cpu_s == CostModel(MIXTRAL, bf16_table).layer_time(
        0, cc_only, 128).cpu_s


def test_streamed_pieces_thread_cost_bounds_prefill_of_small_pieces_only() -> None:
    """The driving thread's work per streamed prefill piece is a resource beside PCIe: it slows a
    prefill of many small pieces, barely one of large pieces, and never decode."""
    profile = replace(synthetic_profile(), stream_host_s=0.4e-3)
    times = {}
    for rows in (256, 1024):
        request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8, host_chunk_rows=rows)
        plan, _ = make_plan("stream", request)
        with_thread, without = predict(plan, MIXTRAL, profile, request), predict(plan, MIXTRAL, synthetic_profile(), request)
        assert with_thread.decode_step_s == pytest.approx(without.decode_step_s)
        times[rows] = with_thread.prefill_s(512) / without.prefill_s(512)
    assert times[256] > 1.3 and times[1024] < times[256]
    # the balance gives the CPU more of a layer when launching the streamed pieces is what bounds it
    request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8, host_chunk_rows=256)
    plan, _ = make_plan("balanced:cg=0.5", request)
    model_thread, model_free = (CostModel(MIXTRAL, p, host_chunk_rows=256, host_bytes_ratio=plan.host_bytes_ratio)
                                for p in (profile, synthetic_profile()))
    splits = model_thread.layer_splits(plan)[0]
    bound = model_thread.layer_time(0, splits, 512, HostMode.ASSIGN, prefill=True)
    free = model_free.layer_time(0, splits, 512, HostMode.ASSIGN, prefill=True)
    assert bound.cpu_s > free.cpu_s and bound.thread_s > 0 and free.thread_s == 0
    assert bound.total_s >= max(bound.cpu_s, bound.thread_s)


def test_prefill_unit_overhead_is_serial_per_unit_used_in_prefill_only() -> None:
    request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8)
    plan, _ = make_plan("manual:cg=0.5", request)
    base, extra = synthetic_profile(), replace(synthetic_profile(), prefill_unit_overhead_s=1e-4)
    assert predict(plan, MIXTRAL, extra, request).decode_step_s == pytest.approx(
        predict(plan, MIXTRAL, base, request).decode_step_s)
    added = predict(plan, MIXTRAL, extra, request).prefill_s(512) - predict(plan, MIXTRAL, base, request).prefill_s(512)
    assert added == pytest.approx(32 * 8 * 1e-4, rel=1e-3)  # 512 tokens use all 8 experts of 32 layers


def test_floors_bound_every_policy() -> None:
    request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8)
    profile = synthetic_profile()
    for policy in ("cpu-experts", "stream", "fiddler", "manual:cg=0.3", "balanced:cg=0.5"):
        plan, _ = make_plan(policy, request)
        p = predict(plan, MIXTRAL, profile, request)
        assert p.floor_decode_s <= p.decode_s_per_token and p.floor_prefill_s(512) <= p.prefill_s(512), policy


def test_the_decode_floor_is_bounded_by_host_dram_shared_by_cpu_and_pcie() -> None:
    request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8)
    plan, _ = make_plan("balanced:cg=0.5", request)
    apart = replace(synthetic_profile(), cpu_with_pcie_bytes_s=None, pcie_with_cpu_bytes_s=None)
    cpu = max(apart.dram_read_bytes_s, 1 / apart.cpu_ffn.s_per_byte[0])
    together = cpu + apart.pcie_h2d_bytes_s
    assert max(cpu, apart.pcie_h2d_bytes_s) < 0.8 * together
    shared = replace(apart, cpu_with_pcie_bytes_s=0.4 * together, pcie_with_cpu_bytes_s=0.4 * together)
    floor_apart = predict(plan, MIXTRAL, apart, request).floor_decode_s
    assert predict(plan, MIXTRAL, shared, request).floor_decode_s == pytest.approx(floor_apart / 0.8)
    # a shared reading below the CPU alone: the CPU alone bounds it
    low = replace(apart, cpu_with_pcie_bytes_s=0.1 * cpu, pcie_with_cpu_bytes_s=0.1 * cpu)
    assert predict(plan, MIXTRAL, low, request).floor_decode_s == pytest.approx(floor_apart * together / cpu)
    # a host that gives both more at once than apart does not lower the floor
    more = replace(apart, cpu_with_pcie_bytes_s=together, pcie_with_cpu_bytes_s=together)
    assert predict(plan, MIXTRAL, more, request).floor_decode_s == pytest.approx(floor_apart)


def test_modes_follow_the_plans_rule() -> None:
    plan = PartitionPlan("x", {(0, 0): UnitSplit(1, 1, 1)})
    assert host_modes(plan) == (HostMode.STATIC, HostMode.STATIC)
    assert host_modes(replace(plan, dynamic="fiddler")) == (HostMode.FIDDLER, HostMode.FIDDLER)
    assert host_modes(replace(plan, dynamic="balance")) == (HostMode.ASSIGN, HostMode.ASSIGN)
    assert host_modes(plan, token_assignment=True) == (HostMode.ASSIGN, HostMode.ASSIGN)
    assert host_modes(replace(plan, dynamic="balance"), token_assignment=False) == (HostMode.STATIC, HostMode.STATIC)


def test_routing_expectations() -> None:
    model = CostModel(MIXTRAL, synthetic_profile())
    assert model.activity(0, 0, 1) == pytest.approx((0.25, 1.0))
    active, tokens = model.activity(0, 0, 512)
    assert active == pytest.approx(1.0) and tokens == pytest.approx(128.0)
    popular = CostModel(MIXTRAL, synthetic_profile(), expert_popularity=((4, 1, 1, 1, 1, 1, 1, 0),))
    assert popular.token_probability(3, 0) == pytest.approx(2 * 4 / 10)
    assert popular.activity(3, 7, 64)[0] == 0.0
    with pytest.raises(ValueError):
        CostModel(MIXTRAL, synthetic_profile(), expert_popularity=((1.0, 2.0),))


def test_calibration_recovers_known_overheads() -> None:
    from engine.placement.planner import MeasuredStep, calibrate_overheads

    request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8)
    truth = replace(synthetic_profile(), layer_overhead_s=4e-4, cpu_layer_overhead_s=6e-4, piece_overhead_s=5e-5,
                    prefill_unit_overhead_s=1.5e-4, stream_host_s=0.5e-3)
    points = []
    for rows in (256, 1024):  # small pieces: the thread's cost per streamed piece shows
        request = build_plan_request(MIXTRAL, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8, host_chunk_rows=rows)
        for policy in ("cpu-experts", "stream", "manual:cg=0.3", "manual:cg=0.6", "balanced:cg=0.5"):
            plan, _ = make_plan(policy, request)
            p = predict(plan, MIXTRAL, truth, request)
            points.append(MeasuredStep(plan, p.decode_step_s, p.prefill_s(512), request=request))
    fitted = calibrate_overheads(synthetic_profile(), MIXTRAL, request, points,
                                 stream_host_grid_s=(0.0, 0.25e-3, 0.5e-3, 0.75e-3))
    assert fitted.layer_overhead_s == pytest.approx(4e-4, rel=1e-3)
    assert fitted.cpu_layer_overhead_s == pytest.approx(6e-4, rel=1e-3)
    assert fitted.piece_overhead_s == pytest.approx(5e-5, rel=1e-3)
    assert fitted.prefill_unit_overhead_s == pytest.approx(1.5e-4, rel=1e-3)
    assert fitted.stream_host_s == 0.5e-3


def test_calibration_fits_runs_of_several_models_and_machines_together() -> None:
    """Each point predicted on its own model, request and machine rates: the overheads they share
    come back however the runs differ (calibrate_planner.py with several results)."""
    from engine.placement.planner import MeasuredStep, calibrate_overheads

    phi, _ = resolve_model_config("phi-3.5-moe")
    overheads = {"layer_overhead_s": 2e-4, "cpu_layer_overhead_s": 3e-4, "piece_overhead_s": 2e-5}
    runs = [(MIXTRAL, synthetic_profile(pcie_bytes_s=40e9)), (phi, synthetic_profile(cpu_bytes_s=90e9))]
    points = []
    for config, rates in runs:
        request = build_plan_request(config, 24 * GIB, kv_cache_tokens=4096, max_num_seqs=8, host_chunk_rows=512)
        for policy in ("cpu-experts", "stream", "manual:cg=0.4"):
            plan, _ = make_plan(policy, request)
            p = predict(plan, config, replace(rates, **overheads), request)
            points.append(MeasuredStep(plan, p.decode_step_s, p.prefill_s(512), config=config, request=request,
                                       rates=rates))
    fitted = calibrate_overheads(synthetic_profile(), MIXTRAL, points[0].request, points, stream_host_grid_s=(0.0, 1e-4))
    for field, value in overheads.items():
        assert getattr(fitted, field) == pytest.approx(value, rel=1e-3)
    assert fitted.pcie_h2d_bytes_s == synthetic_profile().pcie_h2d_bytes_s  # the rates stay the profile's


def test_dispatch_rates_from_a_profile() -> None:
    from engine.placement.planner import dispatch_rates

    rates = dispatch_rates(synthetic_profile())
    assert rates["cpu_bytes_s"] == pytest.approx(48.7e9) and rates["pcie_bytes_s"] == pytest.approx(54.4e9)
    assert rates["cpu_flops"] == pytest.approx(1.89e12)
    assert "pcie_bytes_s" not in dispatch_rates(synthetic_profile(with_gpu=False))
    # compact host pieces: the prefill flop rate of the compact table where the profile has one
    compact = replace(synthetic_profile(), cpu_ffn_compact=roofline_table(60e9, 1.2e12, (1, 64, 512)))
    assert dispatch_rates(compact, compact_host=True)["cpu_flops"] == pytest.approx(1.2e12)
    assert dispatch_rates(compact)["cpu_flops"] == pytest.approx(1.89e12)
    assert dispatch_rates(synthetic_profile(), compact_host=True)["cpu_flops"] == pytest.approx(1.89e12)
