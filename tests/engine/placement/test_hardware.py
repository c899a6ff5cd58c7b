"""HardwareProfile: tables, JSON round trip, cache files keyed by fingerprint."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from engine.placement.hardware import (
    Fingerprint,
    HardwareProfile,
    LinearTimeTable,
    cached_profile_path,
    load_cached,
    profile_dir,
    roofline_table,
)
from tests.engine.placement.conftest import synthetic_profile


def test_table_interpolates_and_extrapolates() -> None:
    table = LinearTimeTable((1, 10, 100), (1.0, 2.0, 11.0))
    assert table.s_per_byte_at(0) == 0.0
    assert table.s_per_byte_at(0.5) == 1.0
    assert table.s_per_byte_at(10) == pytest.approx(2.0)
    assert table.s_per_byte_at(55) == pytest.approx(6.5)
    assert table.s_per_byte_at(200) == pytest.approx(21.0)  # along the last segment
    assert table.seconds(10, 3.0) == pytest.approx(6.0)
    assert table.bytes_s(10) == pytest.approx(0.5)


def test_table_rejects_bad_points() -> None:
    with pytest.raises(ValueError):
        LinearTimeTable((4, 2), (1.0, 1.0))
    with pytest.raises(ValueError):
        LinearTimeTable((1,), (0.0,))


def test_roofline_table_is_bandwidth_then_compute_bound() -> None:
    table = roofline_table(50e9, 2e12)
    assert table.bytes_s(1) == pytest.approx(50e9)
    assert table.flops(1024) == pytest.approx(2e12)


def test_json_round_trip() -> None:
    for profile in (synthetic_profile(), synthetic_profile(with_gpu=False)):
        profile = replace(profile, notes={"kernel": "avx2", "x": 1.5})
        assert HardwareProfile.from_json(profile.to_json()) == profile


def test_cache_dir_from_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SCHEINFER_PROFILE_DIR", str(tmp_path))
    profile = synthetic_profile()
    assert profile_dir() == tmp_path
    path = profile.save(cached_profile_path(profile.fingerprint))
    assert path.parent == tmp_path and path.name == f"{profile.fingerprint.key}.json"
    assert load_cached(profile.fingerprint) == profile


def test_fingerprint_mismatch_is_not_loaded(tmp_path) -> None:
    profile = synthetic_profile()
    other = Fingerprint("Another CPU", 8, "none", "2.11")
    assert other.key != profile.fingerprint.key
    profile.save(cached_profile_path(other, tmp_path))  # a file under the wrong name
    assert load_cached(other, tmp_path) is None
    assert load_cached(profile.fingerprint, tmp_path) is None  # nothing under its own name
    cached_profile_path(profile.fingerprint, tmp_path).write_text("{ not json")
    assert load_cached(profile.fingerprint, tmp_path) is None


def test_committed_calibration_is_carried_to_the_same_machine(tmp_path) -> None:
    from engine.placement.profiler import with_committed_calibration

    measured = synthetic_profile()
    committed = replace(measured, cpu_layer_overhead_s=5e-4, piece_overhead_s=7e-5, prefill_unit_overhead_s=2e-4,
                        stream_host_s=3e-4, source="committed")
    committed.save(tmp_path / "machine.json")
    carried = with_committed_calibration(measured, tmp_path)
    assert (carried.cpu_layer_overhead_s, carried.piece_overhead_s) == (5e-4, 7e-5)
    assert (carried.prefill_unit_overhead_s, carried.stream_host_s) == (2e-4, 3e-4)
    assert carried.cpu_ffn == measured.cpu_ffn and "calibration" in carried.notes
    stranger = replace(measured, fingerprint=Fingerprint("Other", 4, "none", "2.11"))
    assert with_committed_calibration(stranger, tmp_path) == stranger


def test_a_cached_profile_of_an_older_format_is_measured_again(tmp_path) -> None:
    from engine.placement.hardware import PROFILE_FORMAT

    profile = synthetic_profile()
    path = cached_profile_path(profile.fingerprint, tmp_path)
    replace(profile, profile_format=PROFILE_FORMAT - 1).save(path)
    assert load_cached(profile.fingerprint, tmp_path) is None  # no compact CPU rates yet: stale
    profile.save(path)
    assert load_cached(profile.fingerprint, tmp_path) == profile
    # a profile written before the field existed reads as format 1
    raw = json.loads(profile.to_json())
    del raw["profile_format"]
    assert HardwareProfile.from_json(json.dumps(raw)).profile_format == 1
