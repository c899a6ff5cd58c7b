"""Partition.replan: a plan from another hardware profile over the same resident weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.placement.plan import PieceKind
from tests.engine.placement.conftest import synthetic_profile

PROMPTS = [[5, 9, 13, 22, 40, 41, 42, 7, 8, 100, 3], [3, 4, 250, 17]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SMALL = dict(dtype="float32", show_progress=False, gpu_memory_budget="1.2MB", kv_cache_tokens=256,
             max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=16)


def test_replan_applies_the_profile_and_keeps_results(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    profile_file = tmp_path / "profile.json"
    synthetic_profile().save(profile_file)
    llm = LLM(str(tiny_checkpoints["mixtral"]), policy="adaptive", profile_path=str(profile_file), **SMALL)
    partition = llm.engine.partition
    expected = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
    resident = partition.plan.rows_by_kind()[PieceKind.GG]
    slow_cpu = synthetic_profile(cpu_bytes_s=5e9, pcie_bytes_s=200e9)
    plan = partition.replan(slow_cpu)
    assert partition.plan is plan and partition.profile is slow_cpu
    assert plan.rows_by_kind()[PieceKind.GG] == resident
    assert partition.executor.rates.cpu_bytes_s == 5e9 and partition.executor.rates.pcie_bytes_s == 200e9
    assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=GREEDY)] == expected


def test_replan_refuses_to_move_resident_weights(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["mixtral"]), policy="manual:cg=0", **SMALL)  # fewer rows resident than adaptive
    before = llm.engine.partition.plan
    with pytest.raises(ValueError, match="resident rows"):
        llm.engine.partition.replan(synthetic_profile())
    assert llm.engine.partition.plan is before
