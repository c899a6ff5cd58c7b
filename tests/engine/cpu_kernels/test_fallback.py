"""The torch fallback: forced by the environment, after a failed build, for other activations."""

from __future__ import annotations

import logging

import pytest

from engine.cpu_kernels import kernel_info, run_slice_jobs, runner
from engine.cpu_kernels.cpu_info import default_num_threads
from tests.engine.cpu_kernels.helpers import make_job, reference, relative_error


def test_forced_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "torch")
    info = kernel_info()
    assert info["path"] == "torch" and "forced" in info["reason"]
    jobs = [make_job(3, 100, 7, seed=1), make_job(1, 64, 33, seed=2), make_job(0, 64, 8, seed=3)]
    run_slice_jobs(jobs)
    for job in jobs[:2]:
        assert relative_error(job.out, reference(job, round_h=False)) < 6e-3


def test_build_failure_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    monkeypatch.setattr(runner, "_state", runner._State())  # forget the library built so far
    monkeypatch.setenv("SCHEINFER_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    with caplog.at_level(logging.WARNING, logger="engine.cpu_kernels.runner"):
        job = make_job(2, 96, 16, seed=4)
        run_slice_jobs([job])
    assert relative_error(job.out, reference(job, round_h=False)) < 6e-3
    info = kernel_info()
    assert info["path"] == "torch" and info["build_error"] and "no kernel path" in info["reason"]
    assert any("build failed" in r.message for r in caplog.records)


def test_other_activations_use_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    job = make_job(2, 64, 16, seed=6)
    run_slice_jobs([job], activation="gelu")
    assert not job.out.isnan().any()


def test_kernel_info_names_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    info = kernel_info()
    assert info["path"] in ("amx", "avx512_bf16", "avx2", "torch")
    assert info["num_threads"] >= 1 and info["reason"]


def test_thread_count_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_THREADS", "5")
    assert default_num_threads() == 5
    monkeypatch.delenv("SCHEINFER_CPU_THREADS")
    assert default_num_threads() >= 1


def test_unknown_path_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "sse")
    with pytest.raises(ValueError, match="SCHEINFER_CPU_KERNEL"):
        kernel_info()
