"""Every kernel path against an fp64 reference of the same bf16 weights, and against each other."""

from __future__ import annotations

import pytest
import torch

from engine.cpu_kernels import SliceJob, job_path, run_slice_jobs, set_num_threads
from engine.cpu_kernels.runner import get_tuning, num_threads, set_tuning
from tests.engine.cpu_kernels.helpers import (
    KERNEL_PATHS,
    force_path,
    make_job,
    reference,
    relative_error,
)

# (tokens, hidden, n): odd sizes, sizes that are not multiples of the vector widths, slice
# boundaries anywhere, and shapes that the AMX path takes (>= 16 tokens, multiples of 32).
SHAPES = [
    (1, 64, 1), (1, 100, 7), (2, 257, 33), (3, 96, 65), (4, 31, 5), (5, 1024, 300), (7, 4096, 40),
    (8, 130, 17), (9, 64, 64), (16, 64, 32), (17, 128, 96), (40, 96, 33), (64, 256, 128), (33, 100, 9),
    (48, 512, 320), (20, 1024, 64), (80, 256, 64), (150, 512, 96),
]


@pytest.fixture(autouse=True)
def two_threads():
    """Two pool threads, so that the work items really are shared, even on a 2-core machine."""
    previous = num_threads()
    set_num_threads(2)
    yield
    set_num_threads(previous)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_matches_fp64_reference(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    force_path(monkeypatch, path)
    for i, (tokens, hidden, n) in enumerate(SHAPES):
        job = make_job(tokens, hidden, n, seed=100 + i, row_pad=3 if i % 3 == 0 else 0)
        run_slice_jobs([job])
        assert not job.out.isnan().any(), f"unwritten output at {tokens, hidden, n}"
        # fp32 accumulation only: the reference rounds h to bf16 at the same place.
        assert relative_error(job.out, reference(job, round_h=True)) < 1e-4, (tokens, hidden, n)
        # Against the exact fp64 result: what the bf16 intermediate costs (~1.1e-3 rms).
        assert relative_error(job.out, reference(job, round_h=False)) < 3e-3, (tokens, hidden, n)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_many_jobs_in_one_call(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    force_path(monkeypatch, path)
    hidden = 128
    jobs = [make_job(tokens, hidden, n, seed=200 + i)
            for i, (tokens, n) in enumerate([(1, 64), (3, 33), (0, 64), (20, 96), (2, 0), (8, 7), (32, 64)])]
    run_slice_jobs(jobs)
    for job in jobs:
        assert not job.out.isnan().any()
        assert relative_error(job.out, reference(job, round_h=True)) < 1e-4


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_paths_agree_with_each_other_and_with_torch(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    force_path(monkeypatch, path)
    shapes = [(1, 192, 96), (4, 256, 64), (24, 128, 64)]
    kernel = [make_job(*shape, seed=300 + i) for i, shape in enumerate(shapes)]
    run_slice_jobs(kernel)
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "avx2")
    baseline = [make_job(*shape, seed=300 + i) for i, shape in enumerate(shapes)]
    run_slice_jobs(baseline)
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "torch")
    fallback = [make_job(*shape, seed=300 + i) for i, shape in enumerate(shapes)]
    run_slice_jobs(fallback)
    for k, b, f in zip(kernel, baseline, fallback, strict=True):
        assert relative_error(k.out, b.out.double()) < 1e-4
        # torch rounds gate, up and out to bf16 as well: about 2.5e-3 from fp64.
        assert relative_error(k.out, f.out.double()) < 8e-3


def test_thread_count_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    shapes = [(3, 256, 100), (1, 128, 64), (18, 64, 64)]
    results = []
    for threads in (1, 2, 3):
        set_num_threads(threads)
        jobs = [make_job(*shape, seed=400 + i) for i, shape in enumerate(shapes)]
        run_slice_jobs(jobs)
        results.append([j.out for j in jobs])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# Knobs that change how the work is walked (rows per pass, prefetching, K blocking), never the
# arithmetic of one output element: each must give the default settings' bits exactly.
WALK_SETTINGS = [{"amx_prefetch": 0}, {"amx_prefetch": 1, "amx_k_block": 64, "amx_pack_min_tiles": 1},
                 {"amx_prefill_rows": 256, "amx_rows": 128, "amx_items_per_thread": 1}, {"decode_rows": 4},
                 {"item_bytes": 4096}]


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("settings", WALK_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_walk_settings_do_not_change_the_result(path: str, settings: dict[str, int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    force_path(monkeypatch, path)
    shapes = [(3, 256, 100), (4, 4096, 200), (1, 128, 64), (8, 512, 96), (40, 256, 128), (70, 512, 64)]

    def outputs() -> list[torch.Tensor]:
        jobs = [make_job(*shape, seed=700 + i, row_pad=5 if i % 2 else 0) for i, shape in enumerate(shapes)]
        run_slice_jobs(jobs)
        return [j.out for j in jobs]

    expected = outputs()
    before = {key: get_tuning(key) for key in settings}
    try:
        for key, value in settings.items():
            set_tuning(key, value)
        got = outputs()
    finally:
        for key, value in before.items():
            set_tuning(key, value)
    for shape, a, b in zip(shapes, expected, got, strict=True):
        assert torch.equal(a, b), shape


def test_amx_takes_large_aligned_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    force_path(monkeypatch, "amx")
    amx_min_tokens = get_tuning("amx_min_tokens")
    assert job_path(make_job(64, 128, 64, seed=1)) == "amx"
    if amx_min_tokens > 1:
        assert job_path(make_job(amx_min_tokens - 1, 128, 64, seed=1)) == "avx512_bf16"  # small block
    assert job_path(make_job(64, 100, 64, seed=1)) == "avx512_bf16"  # hidden not a multiple of 32
    assert job_path(make_job(64, 128, 48, seed=1)) == "avx512_bf16"  # n not a multiple of 32


def test_non_bf16_jobs_use_torch_in_their_dtype() -> None:
    gen = torch.Generator().manual_seed(5)
    x, gate_up, down = torch.randn(3, 48, generator=gen), torch.randn(20, 48, generator=gen), torch.randn(48, 10, generator=gen)
    job = SliceJob(x, gate_up, down, torch.full((3, 48), float("nan")))
    run_slice_jobs([job])
    assert job_path(job) == "torch"
    assert relative_error(job.out, reference(job, round_h=False)) < 1e-5


def test_shape_errors_are_reported() -> None:
    job = make_job(2, 64, 8, seed=3)
    with pytest.raises(ValueError, match="down"):
        run_slice_jobs([SliceJob(job.x, job.gate_up, job.down.T, job.out)])
    with pytest.raises(ValueError, match="float32"):
        run_slice_jobs([SliceJob(job.x, job.gate_up, job.down, job.out.bfloat16())])
