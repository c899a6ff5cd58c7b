"""Decode layers' CPU batches take kept buffers (shared outputs, kept destination rows) and kept
C++ job records, with the same results as batches built afresh."""

from __future__ import annotations

from pathlib import Path

from engine import LLM, SamplingParams
from engine.executor.accelerator import Accelerator
from engine.executor.cpu_batches import DecodeCpuBuffers


def test_outputs_are_shared_per_shape_and_destinations_kept() -> None:
    buffers = DecodeCpuBuffers(Accelerator.for_device("cpu"), max_destinations=2)
    one = buffers.output(1, 8)
    assert buffers.output(1, 8).data_ptr() == one.data_ptr()  # one buffer per shape
    assert buffers.output(2, 8).shape == (2, 8)
    first = buffers.destination((0, 1))
    assert buffers.destination((0, 1)) is first
    assert first[0].tolist() == [0, 1] and first[1].tolist() == [0, 1]
    buffers.destination((1,))
    assert (buffers.hits, buffers.misses) == (1, 2)
    buffers.destination((2,))  # over the limit: all dropped, kept anew
    assert buffers.destination((0, 1)) is not first
    assert buffers.misses == 4


def test_decode_reuses_kept_records_and_keeps_results(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    import engine.executor.partitioned as partitioned

    path = str(tiny_checkpoints["mixtral"])
    prompts = [[5, 9, 13, 22, 40, 41, 42, 7], [3, 4, 250, 17]]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def run() -> tuple[list[list[int]], DecodeCpuBuffers, int]:
        llm = LLM(path, dtype="bfloat16", show_progress=False, gpu_memory_budget="0.6MB", policy="cpu-experts",
                  kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=16)
        outputs = llm.generate(prompt_token_ids=prompts, params=greedy)
        executor = llm.engine.runner.executor
        return [o.token_ids for o in outputs], executor._cpu_buffers, executor.cpu_pool._kernels.record_hits

    kept_tokens, kept, record_hits = run()
    assert kept.hits > 0 and kept.misses > 0 and record_hits > 0
    monkeypatch.setattr(partitioned, "MAX_KEPT_ROWS", 0)  # every batch built afresh
    fresh_tokens, fresh, fresh_record_hits = run()
    assert fresh.hits == fresh.misses == fresh_record_hits == 0
    assert kept_tokens == fresh_tokens  # the same C++ kernels on the same inputs: the same tokens
