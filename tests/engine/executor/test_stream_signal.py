"""Decode CPU jobs whose end the GPU stream waits for itself (engine/executor/stream_signal.py):
the stream holds until the value is stored, and decoding gives the same bits as waiting on the
host."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.executor.stream_signal import StreamSignal
from tests.engine.executor.test_partition_exactness import bf16_gpu_llm, write_bf16
from tests.engine.model.test_decode_graphs import _assert_same

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def test_no_signal_without_a_gpu(tiny_checkpoints: dict[str, Path]) -> None:
    assert StreamSignal.create(torch.device("cpu")) is None
    llm = LLM(str(tiny_checkpoints["mixtral"]), show_progress=False, policy="manual:cg=0.5")
    assert llm.engine.runner.executor.signal is None
    assert "cpu_signal" not in llm.engine.plan_info()


def _query_until(event: torch.cuda.Event, seconds: float) -> bool:
    """Polls the event (never blocks longer than `seconds`: a stream that never goes on fails the
    test instead of hanging it)."""
    deadline = time.monotonic() + seconds
    while not event.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.mark.gpu
@CUDA
def test_a_stream_waits_until_the_value_is_stored() -> None:
    signal = StreamSignal.create(torch.device("cuda"))
    assert signal is not None
    stream = torch.cuda.Stream()
    x = torch.zeros(4, device="cuda")
    x += 1  # loaded before the wait: a kernel's first launch (lazy module loading) waits for every stream
    torch.cuda.synchronize()
    value = signal.next_value()
    with torch.cuda.stream(stream):
        signal.wait(stream, value)
        x += 1
        done = torch.cuda.Event()
        done.record(stream)
    held = not _query_until(done, 0.05)
    signal.flag[0] = value  # stored as the CPU kernels' driver stores it
    went_on = _query_until(done, 5.0)
    if not went_on:
        signal.flag[0] = 1 << 62  # never leave a stream waiting behind
    assert held and went_on
    assert x.sum().item() == 8
    assert signal.waits == 1


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("arch", ["mixtral", "phimoe", "llama"])
def test_signalled_decode_gives_the_bits_of_host_waits(arch: str, tmp_path: Path) -> None:
    path = write_bf16(tmp_path, arch)

    waiting, signalled = bf16_gpu_llm(path, use_signal=False), bf16_gpu_llm(path, use_signal=True)
    _assert_same(waiting, signalled)
    executor = signalled.engine.runner.executor
    assert executor.signal is not None and executor.signal.waits > 0
    assert waiting.engine.runner.executor.signal.waits == 0
    assert executor._deferred is None  # every forward collected its last job
    assert signalled.engine.plan_info()["cpu_signal"]["waits"] == executor.signal.waits


@pytest.mark.gpu
@CUDA
def test_a_failed_signalled_job_raises_at_the_end_of_the_forward(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU stream goes on (the driver stores the value however the job ends); the error is
    raised by the forward's flush, and the next request runs normally."""
    from engine import SamplingParams
    from engine.cpu_kernels import runner

    llm = bf16_gpu_llm(write_bf16(tmp_path, "mixtral"))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = llm.generate(prompt_token_ids=[[5, 9, 13]], params=params)[0].token_ids
    real_wait = runner.PendingJobs.wait
    calls = {"n": 0}

    def failing_wait(self):
        calls["n"] += 1
        times = real_wait(self)
        if calls["n"] == 3:  # the first decode step's first layer (after the prompt's two layers)
            raise RuntimeError("cpu kernel failed: injected")
        return times

    monkeypatch.setattr(runner.PendingJobs, "wait", failing_wait)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(prompt_token_ids=[[5, 9, 13]], params=params)
    assert llm.engine.runner.executor._deferred is None
    assert llm.engine.runner.executor._routed is None  # a routed job in flight was given up
    monkeypatch.setattr(runner.PendingJobs, "wait", real_wait)
    assert llm.generate(prompt_token_ids=[[5, 9, 13]], params=params)[0].token_ids == expected
