"""Decode steps through per-layer segments (CUDA graphs on a GPU) give the eager path's logits bit
for bit: for every architecture, batches of 1 and 3 sequences, a one-token prompt, and (GPU) with
the FFN partitioned over CPU, PCIe and GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model.decode_attention import num_key_bounds
from engine.model.decode_graphs import MAX_GRAPH_TOKENS, DecodeGraphs
from engine.model.factory import resolve_model_config
from engine.placement.memory import decode_graph_bytes, rotary_table_bytes
from engine.placement.planner import build_plan_request
from engine.tools.tiny_checkpoint import write_tiny_checkpoint
from tests.conftest import ARCHS
from tests.engine.executor.test_partition_exactness import random_plan

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
def test_cuda_graphs_captured_again_after_the_kernels_switch(tmp_path: Path) -> None:
    """PhiMoE's graphs take the fused kernels or torch's: switching drops the captured
    graphs (and their memory pool) and captures them again, with the eager path's bits each time."""
    path = str(write_tiny_checkpoint(tmp_path / "phimoe", arch="phimoe", seed=2, dtype="bfloat16"))
    eager = LLM(path, device="cuda", dtype="bfloat16", show_progress=False, decode_graphs=False)
    graphs = LLM(path, device="cuda", dtype="bfloat16", show_progress=False)
    decode_graphs = graphs.engine.runner.model.decode_graphs
    for fused in (True, False, True):
        decode_graphs.fused_kernels = fused
        _assert_same(eager, graphs)
        assert decode_graphs.captured_sizes() == [1, 3]


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_graphs_with_a_partitioned_ffn(seed: int, tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "mixtral", arch="mixtral", seed=1, dtype="bfloat16")
    plan = random_plan(path, seed)  # GG, CG and CC pieces in every layer's experts
    options = dict(device="cuda", dtype="bfloat16", show_progress=False, policy=plan, kv_cache_tokens=256,
                   max_num_batched_tokens=64, max_num_seqs=4)
    eager = LLM(str(path), decode_graphs=False, **options)
    graphs = LLM(str(path), **options)
    _assert_same(eager, graphs)


@pytest.mark.gpu
def test_cuda_graphs_switching_key_bounds_and_layouts(tmp_path: Path) -> None:
    """Steps that go back and forth between sets of graphs of one token count (key bounds 256 and
    512, keys in place or packed) each read the outputs their own graphs wrote."""
    path = str(write_tiny_checkpoint(tmp_path / "mixtral", arch="mixtral", seed=1, dtype="bfloat16"))
    options = dict(device="cuda", dtype="bfloat16", show_progress=False, kv_cache_tokens=2048)
    eager = LLM(path, decode_graphs=False, **options)
    graphs = LLM(path, **options)
    long_prompt = [(7 * k) % 200 + 3 for k in range(300)]  # decode steps at the 512 bound
    rounds = [[PROMPTS[0]], [long_prompt], [PROMPTS[0]], PROMPTS, [long_prompt, PROMPTS[1], PROMPTS[2]], PROMPTS]
    for prompts in rounds:
        tokens, logits = _run(eager, prompts)
        graph_tokens, graph_logits = _run(graphs, prompts)
        assert graph_tokens == tokens
        for step, (a, b) in enumerate(zip(logits, graph_logits, strict=True)):
            assert torch.equal(a, b), f"{len(prompts)} prompts, step {step} differs"
    steps = graphs.engine.runner.model.decode_graphs._steps
    assert sorted(steps[1].layers) == [256, 512]
    assert set(steps[3].outputs) >= {"split", 256}  # packed and in-place steps of three sequences


def test_decode_graph_memory_is_reserved_in_the_budget() -> None:
    config, _ = resolve_model_config("mixtral-8x7b")
    without = build_plan_request(config, 24 << 30, decode_graphs=False).activation_bytes
    with_graphs = build_plan_request(config, 24 << 30).activation_bytes
    extra = with_graphs - without
    assert extra == decode_graph_bytes(config, 2, MAX_GRAPH_TOKENS, num_key_bounds(16384))
    # 36 captured tokens x 32 layers x (q, k, v, h) in bf16 ~ 24 MB, and h again for each of the
    # 7 key bounds up to 16384 tokens ~ 66 MB, in 2 MiB segments
    assert 85e6 < extra < 110e6 and extra % (2 << 20) == 0
    assert decode_graph_bytes(config, 2, MAX_GRAPH_TOKENS) < 40e6
    assert decode_graph_bytes(config, 2, 0) == 0


def test_rotary_tables_are_reserved_in_the_budget() -> None:
    """Counted for the KV cache's longest sequence: Mixtral (32k context) at 16384 KV tokens keeps
    cos/sin tables of 16384 positions, and 8192 beside them while they grow."""
    config, _ = resolve_model_config("mixtral-8x7b")
    short = build_plan_request(config, 24 << 30, kv_cache_tokens=1024).activation_bytes
    longer = build_plan_request(config, 24 << 30, kv_cache_tokens=16384).activation_bytes
    graphs = decode_graph_bytes(config, 2, MAX_GRAPH_TOKENS, num_key_bounds(16384)) - decode_graph_bytes(
        config, 2, MAX_GRAPH_TOKENS, num_key_bounds(1024))
    assert longer - short - graphs == rotary_table_bytes(config, 2, 16384) - rotary_table_bytes(config, 2, 1024)
    assert rotary_table_bytes(config, 2, 16384) == 2 * (16384 + 8192) * 128 * 2


@pytest.mark.parametrize("seed", [0, 1])
def test_segments_with_a_partitioned_ffn_on_the_cpu(seed: int, tmp_path: Path) -> None:
    """The decode path that reads routing ids and activations on the host (expert groups as row
    ranges at batch 1, gathers at batch 3) gives the eager path's logits with CC pieces in the C++
    kernels and GG/CG pieces on the CPU stand-in for the GPU."""
    path = write_tiny_checkpoint(tmp_path / "mixtral", arch="mixtral", seed=1, dtype="bfloat16")
    plan = random_plan(path, seed)
    options = dict(device="cpu", dtype="bfloat16", show_progress=False, policy=plan, kv_cache_tokens=256,
                   max_num_batched_tokens=64, max_num_seqs=4)
    eager = LLM(str(path), **options)
    segmented = LLM(str(path), **options)
    model = segmented.engine.runner.model
    model.decode_graphs = DecodeGraphs(model, capture=False)
    _assert_same(eager, segmented)
    assert model.decode_graphs.captured_sizes() == [1, 3]
    assert segmented.engine.runner.executor.cpu_pool.busy_s > 0  # CC pieces ran


@pytest.mark.parametrize("arch", ["mixtral", "llama"])
def test_graphs_combine_one_token_and_dense_layers(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    """The pre segments combine the unit sums where every step has the same rows (one token through
    experts, any token count through a dense MLP); several tokens through experts combine eagerly.
    Either way the step's logits are those of the plain forward (test above)."""
    llm = LLM(str(tiny_checkpoints[arch]), dtype="float32", show_progress=False)
    model = llm.engine.runner.model
    graphs = model.decode_graphs = DecodeGraphs(model, capture=False)
    _run(llm, PROMPTS)
    _run(llm, PROMPTS[:1])
    steps = graphs._steps
    assert sorted(steps) == [1, 3]
    top_k = model.config.moe.num_experts_per_tok if model.config.moe is not None else None
    one, three = steps[1].segments, steps[3].segments
    assert one.unit_sums is not None
    assert one.unit_rows == [top_k or 1] * len(model.layers)
    if top_k is None:
        assert three.unit_rows == [3] * len(model.layers)
    else:
        assert three.unit_sums is None
    assert not one.unit_sums.any()  # left zeroed for the next step
