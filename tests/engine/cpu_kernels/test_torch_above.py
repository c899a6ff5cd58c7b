"""Large token blocks on CPUs without AMX run torch's GEMMs (runner.torch_from_tokens): the batch
takes the torch path whole, compact weights decoded by the kernels' decoder, the same bits as the
forced torch path; smaller batches keep the kernels' bits."""

from __future__ import annotations

import pytest
import torch

from engine.cpu_kernels import job_path, run_slice_jobs, runner
from engine.cpu_kernels.runner import (
    DEFAULT_TORCH_TOKENS,
    DEFAULT_TORCH_TOKENS_COMPACT,
    TORCH_TOKENS_ENV,
    torch_from_tokens,
    torch_takes,
)

from .helpers import KERNEL_PATHS, make_job

pytestmark = pytest.mark.skipif(not runner.available_paths(), reason="the C++ cpu kernels did not build here")

SHAPES = [(1, 128, 64), (3, 256, 96), (20, 128, 64)]


def _outputs(shapes: list[tuple[int, int, int]], seed: int = 11) -> list[torch.Tensor]:
    jobs = [make_job(*shape, seed=seed + i) for i, shape in enumerate(shapes)]
    run_slice_jobs(jobs)
    return [job.out for job in jobs]


def _active_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Pretends `path` is the best path in force (the kept thresholds forgotten)."""
    monkeypatch.setattr(runner, "_cached_active", lambda: (path, 1 + ("avx2", "avx512_bf16", "amx").index(path), path))
    monkeypatch.setattr(runner._state, "torch_tokens", {})


def test_default_threshold_by_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TORCH_TOKENS_ENV, raising=False)
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    expected = DEFAULT_TORCH_TOKENS if runner.active_path() == "avx512_bf16" else 0
    assert torch_from_tokens() == expected
    for path in KERNEL_PATHS:  # a path asked for by name runs its kernels at every size
        monkeypatch.setenv("SCHEINFER_CPU_KERNEL", path)
        assert torch_from_tokens() == 0 and not torch_takes([4096])
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    _active_path(monkeypatch, "amx")
    assert torch_from_tokens() == 0  # AMX beats oneDNN from 4 tokens on (docs/CPU_KERNELS.md)
    _active_path(monkeypatch, "avx2")
    assert torch_from_tokens() == 0  # torch's bf16 GEMMs are slow without AVX512-BF16
    _active_path(monkeypatch, "avx512_bf16")
    assert torch_from_tokens() == DEFAULT_TORCH_TOKENS
    assert torch_from_tokens(compact=True) == DEFAULT_TORCH_TOKENS_COMPACT > DEFAULT_TORCH_TOKENS  # decoded first
    assert torch_takes([DEFAULT_TORCH_TOKENS]) and not torch_takes([DEFAULT_TORCH_TOKENS], compact=[False, True])
    assert torch_takes([1, DEFAULT_TORCH_TOKENS]) and not torch_takes([DEFAULT_TORCH_TOKENS - 1, 2]) and not torch_takes([])
    monkeypatch.setenv(TORCH_TOKENS_ENV, "0")
    assert torch_from_tokens() == 0
    monkeypatch.setenv(TORCH_TOKENS_ENV, "many")
    with pytest.raises(ValueError, match=TORCH_TOKENS_ENV):
        torch_from_tokens()


def test_a_batch_with_a_large_job_runs_torch_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "torch")
    forced_torch = _outputs(SHAPES)
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    monkeypatch.setenv(TORCH_TOKENS_ENV, "0")
    kernels = _outputs(SHAPES)
    monkeypatch.setenv(TORCH_TOKENS_ENV, "20")  # the largest job has 20 tokens
    routed = _outputs(SHAPES)
    assert job_path(make_job(20, 128, 64, seed=1)) == "torch"
    assert job_path(make_job(19, 128, 64, seed=1)) != "torch"
    assert all(torch.equal(a, b) for a, b in zip(routed, forced_torch, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(routed, kernels, strict=True))  # other rounding
    monkeypatch.setenv(TORCH_TOKENS_ENV, "21")
    assert all(torch.equal(a, b) for a, b in zip(_outputs(SHAPES), kernels, strict=True))


def test_compact_weights_on_the_torch_path_use_the_kernels_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cpu_kernels import compact

    from .test_compact_jobs import compact_twin

    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    monkeypatch.setenv(TORCH_TOKENS_ENV, "1")
    plain = [make_job(24, 128, 64, seed=s) for s in range(2)]
    plain[1].gate_up[5, 7] = 0.0  # an exception to decode
    twins = [compact_twin(job) for job in plain]
    run_slice_jobs(plain)
    run_slice_jobs(twins)
    assert job_path(twins[0]) == "torch"
    assert all(torch.equal(a.out, b.out) for a, b in zip(plain, twins, strict=True))
    decoded: list[int] = []
    real_unpack = compact.unpack_rows

    def counted(matrix, r0: int, r1: int, threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
        decoded.append(r1 - r0)
        return real_unpack(matrix, r0, r1, threads, out)

    monkeypatch.setattr(compact, "unpack_rows", counted)
    run_slice_jobs([compact_twin(plain[0])])
    assert decoded == [128, 128]  # gate_up's 2n rows, down's hidden rows


def test_the_cpu_pool_sends_large_batches_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.executor.cpu_pool import CpuBatch, CpuJob, CpuPool
    from engine.model.ffn import UnitSlice

    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    pool = CpuPool(torch.nn.functional.silu, "silu", num_threads=2)
    try:
        job = make_job(24, 128, 64, seed=3)
        piece = UnitSlice.__new__(UnitSlice)
        piece.gate_up, piece.down, piece.compact = job.gate_up, job.down, None
        for threshold, submitted in (("0", True), ("24", False)):
            monkeypatch.setenv(TORCH_TOKENS_ENV, threshold)
            batch = CpuBatch([CpuJob(0, job.x, piece, 0)], torch.full((24, 128), float("nan")), torch.arange(24))
            result = pool.submit(batch, None)
            assert (type(result).__name__ == "_Submitted") is submitted
            out = result.result().out
            expected = make_job(24, 128, 64, seed=3)
            monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto" if submitted else "torch")
            monkeypatch.setenv(TORCH_TOKENS_ENV, "0")
            run_slice_jobs([expected])
            monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
            assert torch.equal(out, expected.out)
    finally:
        pool.shutdown()


def test_an_engine_prefill_with_large_cpu_batches_keeps_its_logits(tiny_checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end, bf16 CC pieces in the kernels: a 200-token prompt in one prefill step gives CPU
    jobs of up to 200 tokens; with the rule at 1 token they all run torch's GEMMs, with it off
    the kernels; the prompt's logits agree within bf16 rounding (torch rounds gate and up too)."""
    from engine import LLM
    from engine.cpu_kernels import torch_path
    from tests.engine.executor.test_partition_exactness import random_plan

    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    prompt = [(7 * i + 3) % 300 + 1 for i in range(200)]

    def logits(threshold: str) -> tuple[torch.Tensor, int]:
        monkeypatch.setenv(TORCH_TOKENS_ENV, threshold)
        calls = {"n": 0}
        real = torch_path.run_torch_jobs

        def counted(jobs, activation):
            calls["n"] += 1
            return real(jobs, activation)

        monkeypatch.setattr(torch_path, "run_torch_jobs", counted)
        monkeypatch.setattr(runner, "run_torch_jobs", counted)
        path = tiny_checkpoints["mixtral"]
        llm = LLM(str(path), dtype="bfloat16", show_progress=False, policy=random_plan(path, 3), kv_cache_tokens=256,
                  max_num_batched_tokens=256)
        return llm.engine.prompt_logits(prompt).float(), calls["n"]

    kernels, kernel_torch_calls = logits("0")
    routed, routed_torch_calls = logits("1")
    assert kernel_torch_calls == 0 and routed_torch_calls > 0
    assert (routed - kernels).abs().max().item() <= 0.02 * kernels.abs().max().item()  # 0.8% here
