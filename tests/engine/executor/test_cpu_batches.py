"""Kept CPU batches: decode layers reuse their batch (and its C++ records) with new activations."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.executor.accelerator import Accelerator
from engine.executor.cpu_batches import DecodeCpuBatches
from engine.executor.cpu_pool import CpuBatch


def _builder(built: list[torch.Tensor]):
    def build(out: torch.Tensor) -> CpuBatch:
        built.append(out)
        return CpuBatch([], out, torch.zeros(out.shape[0], dtype=torch.int64))
    return build


def test_a_key_is_built_once_and_batches_of_one_shape_share_their_output() -> None:
    batches = DecodeCpuBatches(Accelerator.for_device("cpu"), max_kept=2)
    built: list[torch.Tensor] = []
    first = batches.get(((1, 0, 1, 0),), 1, 8, _builder(built))
    assert batches.get(((1, 0, 1, 0),), 1, 8, _builder(built)) is first
    other = batches.get(((2, 0, 1, 0),), 1, 8, _builder(built))
    assert other is not first and other.out.data_ptr() == first.out.data_ptr()  # one buffer per shape
    wider = batches.get(((3, 0, 1, 0), (4, 0, 1, 0)), 2, 8, _builder(built))
    assert wider.out.shape == (2, 8)
    assert (batches.hits, batches.misses, len(built)) == (1, 3, 3)
    batches.get(((1, 0, 1, 0),), 1, 8, _builder(built))  # evicted (two kept at most): built again
    assert batches.misses == 4


def test_decode_reuses_kept_batches_and_keeps_results(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    import engine.executor.partitioned as partitioned

    path = str(tiny_checkpoints["mixtral"])
    prompts = [[5, 9, 13, 22, 40, 41, 42, 7], [3, 4, 250, 17]]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def run() -> tuple[list[list[int]], DecodeCpuBatches]:
        llm = LLM(path, dtype="bfloat16", show_progress=False, gpu_memory_budget="0.5MB", policy="cpu-experts",
                  kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=16)
        outputs = llm.generate(prompt_token_ids=prompts, params=greedy)
        return [o.token_ids for o in outputs], llm.engine.runner.executor._cpu_batches

    kept_tokens, kept = run()
    assert kept.hits > 0 and kept.misses > 0
    monkeypatch.setattr(partitioned, "MAX_KEPT_ROWS", 0)  # every batch built afresh
    fresh_tokens, fresh = run()
    assert fresh.hits == fresh.misses == 0
    assert kept_tokens == fresh_tokens  # the same C++ kernels on the same inputs: the same tokens
