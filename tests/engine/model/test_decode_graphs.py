"""Decode steps through per-layer segments (CUDA graphs on a GPU) give the eager path's logits bit
for bit: for every architecture, batches of 1 and 3 sequences, a one-token prompt, and (GPU) with
the FFN partitioned over CPU, PCIe and GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model.decode_graphs import DecodeGraphs
from engine.tools.tiny_checkpoint import write_tiny_checkpoint
from tests.conftest import ARCHS

PROMPTS = [[5, 9, 13, 22, 40, 41, 42, 7, 8, 100, 3], [3, 4, 250, 17], [77]]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _run(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of every prompt and the logits of every engine step."""
    runner = llm.engine.runner
    steps: list[torch.Tensor] = []
    execute = runner.execute

    def recording(chunks):
        logits = execute(chunks)
        steps.append(logits.detach().cpu().clone())
        return logits

    runner.execute = recording
    try:
        outputs = llm.generate(prompt_token_ids=prompts, params=PARAMS)
    finally:
        runner.execute = execute
    return [o.token_ids for o in outputs], steps


def _assert_same(eager: LLM, graphs: LLM) -> None:
    for prompts in (PROMPTS[:1], PROMPTS):
        tokens, logits = _run(eager, prompts)
        graph_tokens, graph_logits = _run(graphs, prompts)
        assert graph_tokens == tokens
        assert len(graph_logits) == len(logits)
        for step, (a, b) in enumerate(zip(logits, graph_logits, strict=True)):
            assert torch.equal(a, b), f"step {step} differs"


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_segments_match_the_plain_forward(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    eager = LLM(str(tiny_checkpoints[arch]), dtype="float32", show_progress=False)
    segmented = LLM(str(tiny_checkpoints[arch]), dtype="float32", show_progress=False)
    model = segmented.engine.runner.model
    model.decode_graphs = DecodeGraphs(model, capture=False)
    _assert_same(eager, segmented)
    assert model.decode_graphs.captured_sizes() == [1, 3]  # batches of 1 and 3 sequences took this path


def test_prefill_and_large_batches_stay_eager(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["mixtral"]), dtype="float32", show_progress=False)
    model = llm.engine.runner.model
    model.decode_graphs = DecodeGraphs(model, max_tokens=2, capture=False)
    _run(llm, PROMPTS)  # one prefill step, then decode steps of 3 sequences: more than max_tokens
    assert model.decode_graphs.captured_sizes() == []
    _run(llm, PROMPTS[:2])
    assert model.decode_graphs.captured_sizes() == [2]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graphs_match_eager_decoding_bitwise(arch: str, tmp_path: Path) -> None:
    path = str(write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=1, dtype="bfloat16"))
    eager = LLM(path, device="cuda", dtype="bfloat16", show_progress=False, decode_graphs=False)
    graphs = LLM(path, device="cuda", dtype="bfloat16", show_progress=False)
    assert graphs.engine.runner.model.decode_graphs is not None
    _assert_same(eager, graphs)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["balanced:cg=0.5", "cpu-experts"])
def test_cuda_graphs_with_a_partitioned_ffn(policy: str, tmp_path: Path) -> None:
    path = str(write_tiny_checkpoint(tmp_path / "mixtral", arch="mixtral", seed=1, dtype="bfloat16"))
    options = dict(device="cuda", dtype="bfloat16", show_progress=False, gpu_memory_budget="1.1MB", policy=policy,
                   kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=16)
    eager = LLM(path, decode_graphs=False, **options)
    graphs = LLM(path, **options)
    _assert_same(eager, graphs)
