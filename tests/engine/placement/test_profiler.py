"""The profiler on this machine (quick sizes) and the per-machine profile cache."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.placement import profiler
from engine.placement.hardware import HardwareProfile, cached_profile_path, current_fingerprint, load_cached
from engine.placement.profiler import ProfileSizes, load_or_profile, measure_profile
from tests.engine.placement.conftest import synthetic_profile


def test_quick_profile_measures_positive_rates() -> None:
    profile = measure_profile(ProfileSizes.quick(), progress=False)
    assert profile.fingerprint == current_fingerprint()
    assert profile.dram_read_bytes_s > 0 and profile.sync_s > 0 and profile.cpu_threads >= 1
    assert all(s > 0 for s in profile.cpu_ffn.s_per_byte)
    assert profile.cpu_ffn.num_tokens == ProfileSizes.quick().cpu_tokens
    if profile.has_gpu:
        assert profile.pcie_h2d_bytes_s > 0 and profile.gpu_free_bytes > 0
    else:
        assert profile.gpu_ffn is None and profile.pcie_h2d_bytes_s is None and profile.fingerprint.gpu_name == "none"
    assert 0 < profile.measure_s < 30
    assert HardwareProfile.from_json(profile.to_json()) == profile
    from engine.cpu_kernels import compact

    if compact.available() and profile.cpu_path != "torch":  # the kernels read compact pieces: rated too
        assert profile.cpu_ffn_compact is not None
        assert profile.cpu_ffn_compact.num_tokens == profile.cpu_ffn.num_tokens
        assert all(s > 0 for s in profile.cpu_ffn_compact.s_per_byte)
    else:
        assert profile.cpu_ffn_compact is None


def test_torch_path_profiles_no_compact_table(monkeypatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "torch")
    assert measure_profile(ProfileSizes.quick(), progress=False).cpu_ffn_compact is None


@pytest.fixture
def fake_measure(monkeypatch):
    """Replaces the measurement by a counter that returns this machine's fingerprint."""
    calls: list[int] = []

    def measure(sizes=None, progress=True, source=""):
        calls.append(1)
        return replace(synthetic_profile(), fingerprint=current_fingerprint(), created=f"run {len(calls)}")

    monkeypatch.setattr(profiler, "measure_profile", measure)
    return calls


def test_cache_is_reused_until_reprofile(tmp_path, fake_measure) -> None:
    first = load_or_profile(cache_dir=tmp_path, progress=False)
    assert len(fake_measure) == 1
    assert cached_profile_path(current_fingerprint(), tmp_path).is_file()
    assert load_or_profile(cache_dir=tmp_path, progress=False) == first
    assert len(fake_measure) == 1
    again = load_or_profile(reprofile=True, cache_dir=tmp_path, progress=False)
    assert len(fake_measure) == 2 and again.created == "run 2"
    assert load_cached(current_fingerprint(), tmp_path) == again


def test_profile_of_another_machine_is_not_reused(tmp_path, fake_measure) -> None:
    stranger = synthetic_profile()  # another fingerprint, saved under this machine's name
    stranger.save(cached_profile_path(current_fingerprint(), tmp_path))
    profile = load_or_profile(cache_dir=tmp_path, progress=False)
    assert len(fake_measure) == 1 and profile.fingerprint == current_fingerprint()


def test_sizes_for_model() -> None:
    from engine.model.factory import resolve_model_config

    sizes = ProfileSizes.for_model(resolve_model_config("mixtral-8x7b")[0], host_chunk_rows=1024)
    assert (sizes.hidden, sizes.slice_rows, sizes.gpu_rows) == (4096, 1024, 14336)


def test_cpu_time_per_byte_never_falls_as_tokens_grow() -> None:
    assert profiler.non_decreasing_from_right([3.0, 1.0, 2.0, 5.0]) == [1.0, 1.0, 2.0, 5.0]
    assert profiler.non_decreasing_from_right([2.02e-11, 1.23e-11, 1.41e-11, 1.31e-11]) == [1.23e-11, 1.23e-11,
                                                                                          1.31e-11, 1.31e-11]


def test_remeasure_cpu_takes_the_cpu_path_in_force_and_keeps_the_gpu_readings(monkeypatch) -> None:
    base = synthetic_profile()  # its GPU readings are synthetic: they must survive untouched
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "torch")
    again = profiler.remeasure_cpu(base, ProfileSizes.quick(), source="torch path")
    assert again.cpu_path == "torch" and again.source == "torch path"
    assert again.cpu_ffn.num_tokens == ProfileSizes.quick().cpu_tokens and again.cpu_ffn != base.cpu_ffn
    assert all(s > 0 for s in again.cpu_ffn.s_per_byte) and again.cpu_job_latency_s > 0
    assert (again.gpu_ffn, again.pcie_h2d_bytes_s, again.fingerprint) == (base.gpu_ffn, base.pcie_h2d_bytes_s,
                                                                          base.fingerprint)
