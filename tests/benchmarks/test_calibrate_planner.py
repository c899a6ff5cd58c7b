"""calibrate_planner.py: stored profiles read as the profiler now reads them, and points of a run
rebuilt as it ran."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks.calibrate_planner import _consistent, compact_table_like, measured_points
from engine.placement.hardware import roofline_table
from tests.engine.placement.conftest import synthetic_profile


def test_a_profile_without_a_compact_table_gets_the_reference_ratio() -> None:
    reference = replace(synthetic_profile(cpu_bytes_s=100e9),
                        cpu_ffn_compact=roofline_table(120e9, 1.5e12, (1, 64, 512)))
    old = synthetic_profile(cpu_bytes_s=50e9)  # a slower machine, measured before the table existed
    table = compact_table_like(old, reference)
    assert table is not None and table.num_tokens == (1, 64, 512)
    for n in table.num_tokens:  # its own bf16 rate times the reference's compact / bf16 ratio
        ratio = reference.cpu_ffn_compact.s_per_byte_at(n) / reference.cpu_ffn.s_per_byte_at(n)
        assert table.s_per_byte_at(n) == pytest.approx(old.cpu_ffn.s_per_byte_at(n) * ratio)
    assert compact_table_like(old, synthetic_profile()) is None  # a reference without a table
    # a disturbed PCIe reading alone is raised to the one beside the CPU; a measured table is kept
    disturbed = replace(old, pcie_h2d_bytes_s=20e9, pcie_with_cpu_bytes_s=45e9)
    assert _consistent(disturbed, reference).pcie_h2d_bytes_s == 45e9
    assert _consistent(reference, synthetic_profile()).cpu_ffn_compact == reference.cpu_ffn_compact


def test_points_of_a_run_carry_its_model_request_and_rates() -> None:
    stored = synthetic_profile()
    entry = {"decode_s_per_token": 0.1, "by_prompt": {"512": {"prefill_s": 1.0}}, "cg_share": 0.4}
    result = {"model": "mixtral-8x7b", "budget": "24GiB", "prompt_lens": [512], "host_chunk_rows": 512,
              "compact": True, "profile": json.loads(stored.to_json()),
              "policies": {"cpu-experts": entry, "adaptive%200": entry}, "sweep": {"balanced:cg=0.5": entry}}
    reference = replace(stored, cpu_ffn_compact=roofline_table(60e9, 1.2e12, (1, 64, 512)))
    points = dict(measured_points(result, reference))
    # the suffixed adaptive variant is not rebuilt; the fixed policy and the sweep point are
    assert set(points) == {"mixtral-8x7b cpu-experts", "mixtral-8x7b balanced:cg=0.5"}
    point = points["mixtral-8x7b cpu-experts"]
    assert point.decode_s == 0.1 and point.prefill_s == 1.0 and point.prompt_len == 512
    assert point.request.host_chunk_rows == 512 and point.plan.host_bytes_ratio < 1
    assert point.rates.cpu_ffn_compact is not None  # derived from the reference's ratio
    assert measured_points(result, reference, skip=("cpu-experts",))[0][0] == "mixtral-8x7b balanced:cg=0.5"
