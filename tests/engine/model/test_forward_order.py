"""The forward enqueues the model's head (final norm, LM head) before it collects the last CPU job,
so that a GPU stream waiting for that job itself (stream_signal.py) runs the head the moment the
job's outputs land; the collection still ends every forward, errors included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.executor.test_partition_exactness import random_plan


def test_the_head_is_enqueued_before_the_last_cpu_job_is_collected(tiny_checkpoints: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_checkpoints["mixtral"]
    llm = LLM(str(path), dtype="float32", show_progress=False, policy=random_plan(path, 0))
    model, executor = llm.engine.runner.model, llm.engine.runner.executor
    assert executor is not None
    events: list[str] = []
    norm, flush = model.final_norm, executor.flush

    def recorded_norm(x: torch.Tensor) -> torch.Tensor:
        events.append("head")
        return norm(x)

    def recorded_flush() -> None:
        events.append("flush")
        flush()

    monkeypatch.setattr(model, "final_norm", recorded_norm)
    monkeypatch.setattr(executor, "flush", recorded_flush)
    llm.generate(prompt_token_ids=[[5, 9, 13]], params=SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    # the executor also collects jobs between layers; each forward's last collection follows its head
    heads = [i for i, event in enumerate(events) if event == "head"]
    assert len(heads) == 3, events  # the prompt and two decode steps
    assert all(events[i + 1] == "flush" for i in heads) and events[-1] == "flush", events


def test_a_failed_head_still_collects_the_last_cpu_job(tiny_checkpoints: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_checkpoints["mixtral"]
    llm = LLM(str(path), dtype="float32", show_progress=False, policy=random_plan(path, 1))
    model, executor = llm.engine.runner.model, llm.engine.runner.executor
    events: list[str] = []
    flush = executor.flush

    def recorded_flush() -> None:
        events.append("flush")
        flush()

    def failing_norm(x: torch.Tensor) -> torch.Tensor:
        events.append("head")
        raise RuntimeError("head failed: injected")

    monkeypatch.setattr(executor, "flush", recorded_flush)
    monkeypatch.setattr(model, "final_norm", failing_norm)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(prompt_token_ids=[[5, 9, 13]], params=SamplingParams(max_tokens=2, ignore_eos=True))
    assert events[-2:] == ["head", "flush"], events
    assert executor._deferred is None and executor._routed is None


def test_the_ab_switches_keep_results(tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`head_before_collect = False` enqueues the head after the last collection (the old order) and
    `rotary_tables = False` computes cos/sin each step; the tokens and logits stay the same."""
    path = tiny_checkpoints["mixtral"]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", show_progress=False, policy=random_plan(path, 2))
    expected = llm.generate(prompt_token_ids=[[5, 9, 13, 22]], params=params)[0].token_ids
    expected_logits = llm.engine.prompt_logits([5, 9, 13, 22])
    model, executor = llm.engine.runner.model, llm.engine.runner.executor
    assert model.rotary._tables  # the default gathers from tables
    model.head_before_collect, model.rotary_tables = False, False
    model.rotary._tables.clear()
    events: list[str] = []
    norm, flush = model.final_norm, executor.flush
    monkeypatch.setattr(model, "final_norm", lambda x: (events.append("head"), norm(x))[1])
    monkeypatch.setattr(executor, "flush", lambda: (events.append("flush"), flush())[1])
    assert llm.generate(prompt_token_ids=[[5, 9, 13, 22]], params=params)[0].token_ids == expected
    assert torch.equal(llm.engine.prompt_logits([5, 9, 13, 22]), expected_logits)
    heads = [i for i, event in enumerate(events) if event == "head"]
    assert heads and all(events[i - 1] == "flush" for i in heads) and events[-1] == "head", events
    assert not model.rotary._tables  # never gathered
