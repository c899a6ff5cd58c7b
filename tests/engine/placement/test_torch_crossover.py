"""The profiler measures, per machine, where torch's GEMMs beat the kernels (CPUs without AMX),
keeps it in the profile, and the engine hands it to the CPU path (runner.set_measured_torch_tokens)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.cpu_kernels import runner
from engine.cpu_kernels.runner import (
    DEFAULT_TORCH_TOKENS,
    DEFAULT_TORCH_TOKENS_COMPACT,
    TORCH_TOKENS_ENV,
    measured_torch_tokens,
    torch_from_tokens,
)
from engine.placement import profiler
from engine.placement.hardware import HardwareProfile, current_fingerprint
from engine.placement.profiler import ProfileSizes, measure_profile, torch_crossover, use_measured_crossover
from tests.engine.placement.conftest import synthetic_profile

TOKENS = (1, 8, 64, 128, 256, 512)


def test_crossover_is_where_torch_wins_from_there_on() -> None:
    kernels = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert torch_crossover(TOKENS, kernels, {64: 1.2, 128: 0.8, 256: 0.6, 512: 0.5}) == 128
    assert torch_crossover(TOKENS, kernels, {64: 0.9, 128: 0.8, 256: 0.6, 512: 0.5}) == 64
    # a win at 128 that is lost at 256 is noise or a cache effect: only 512 on
    assert torch_crossover(TOKENS, kernels, {64: 1.2, 128: 0.8, 256: 1.1, 512: 0.5}) == 512
    assert torch_crossover(TOKENS, kernels, {64: 1.2, 128: 1.3, 256: 1.1, 512: 1.05}) == 0  # never
    # within the margin (TORCH_WIN_MARGIN) is not a win
    assert torch_crossover(TOKENS, kernels, {128: 0.99, 256: 0.97, 512: 0.9}) == 512
    assert torch_crossover(TOKENS, kernels, {}) == 0


def _pretend_avx512(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TORCH_TOKENS_ENV, raising=False)
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    monkeypatch.setattr(runner, "_cached_active", lambda: ("avx512_bf16", 2, "avx512_bf16"))
    monkeypatch.setattr(runner._state, "torch_tokens", {})
    monkeypatch.setattr(runner._state, "measured_torch_tokens", (None, None))


def test_measured_crossover_replaces_the_default_and_the_environment_wins(monkeypatch) -> None:
    _pretend_avx512(monkeypatch)
    assert (torch_from_tokens(), torch_from_tokens(compact=True)) == (DEFAULT_TORCH_TOKENS, DEFAULT_TORCH_TOKENS_COMPACT)
    with measured_torch_tokens(64, None):
        assert (torch_from_tokens(), torch_from_tokens(compact=True)) == (64, DEFAULT_TORCH_TOKENS_COMPACT)
        assert runner.torch_takes([64]) and not runner.torch_takes([63])
        with measured_torch_tokens(0, 512):
            assert (torch_from_tokens(), torch_from_tokens(compact=True)) == (0, 512)
            assert not runner.torch_takes([4096])
        assert torch_from_tokens() == 64  # restored
        monkeypatch.setenv(TORCH_TOKENS_ENV, "32")
        assert (torch_from_tokens(), torch_from_tokens(compact=True)) == (32, 32)
        assert not runner.torch_route_applies()
    monkeypatch.delenv(TORCH_TOKENS_ENV)
    assert torch_from_tokens() == DEFAULT_TORCH_TOKENS
    monkeypatch.setattr(runner, "_cached_active", lambda: ("amx", 3, "amx"))
    monkeypatch.setattr(runner._state, "torch_tokens", {})
    with measured_torch_tokens(64, 64):  # never on AMX, whatever a profile says
        assert torch_from_tokens() == 0 and not runner.torch_route_applies()


def test_engine_takes_the_crossover_only_from_a_profile_of_this_cpu(monkeypatch) -> None:
    _pretend_avx512(monkeypatch)
    here = replace(synthetic_profile(), fingerprint=current_fingerprint(), cpu_torch_from_tokens=256,
                   cpu_torch_from_tokens_compact=0)
    assert use_measured_crossover(here)
    assert (torch_from_tokens(), torch_from_tokens(compact=True)) == (256, 0)
    runner.set_measured_torch_tokens(None, None)
    elsewhere = replace(here, fingerprint=replace(here.fingerprint, cpu_model="another CPU"))
    assert not use_measured_crossover(elsewhere) and torch_from_tokens() == DEFAULT_TORCH_TOKENS
    assert not use_measured_crossover(replace(here, cpu_torch_from_tokens=None))
    assert HardwareProfile.from_json(here.to_json()) == here
    assert "bf16 from 256 tokens, compact never" in here.describe()


def test_quick_profile_measures_the_crossover_where_the_rule_applies(monkeypatch) -> None:
    """On this machine: a crossover among the candidate token counts where the best path is
    AVX512-BF16 (the dev machine's AMD EPYC), None elsewhere; the table is then the faster path's."""
    monkeypatch.delenv(TORCH_TOKENS_ENV, raising=False)
    sizes = replace(ProfileSizes.quick(), cpu_tokens=(1, 8, 64, 128))
    readings: list[profiler.CpuReading] = []
    measure = profiler.measure_cpu_ffn

    def keep(*args, **kwargs):
        readings.append(measure(*args, **kwargs))
        return readings[-1]

    monkeypatch.setattr(profiler, "measure_cpu_ffn", keep)
    profile = measure_profile(sizes, progress=False)
    if not runner.torch_route_applies():
        assert profile.cpu_torch_from_tokens is None and readings[0].torch_from_tokens is None
        return
    first = readings[0]
    assert profile.cpu_torch_from_tokens == first.torch_from_tokens in (0, 64, 128)
    assert first.kernels_s_per_byte and all(s > 0 for s in first.kernels_s_per_byte)
    assert [s > 0 for s in first.torch_s_per_byte] == [n >= profiler.TORCH_CANDIDATE_MIN_TOKENS for n in sizes.cpu_tokens]
    chosen = [t if first.torch_from_tokens and n >= first.torch_from_tokens else k
              for n, k, t in zip(sizes.cpu_tokens, first.kernels_s_per_byte, first.torch_s_per_byte, strict=True)]
    assert list(first.table.s_per_byte) == profiler.non_decreasing_from_right(chosen)
    if profile.cpu_ffn_compact is not None:
        assert profile.cpu_torch_from_tokens_compact == readings[1].torch_from_tokens in (0, 64, 128)
    assert runner._state.measured_torch_tokens == (None, None)  # measuring leaves the runner as it was
