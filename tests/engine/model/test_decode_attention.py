"""Decode attention in one flash call: the keys' layout it is given, and (GPU) its results against
SDPA's flash kernel per sequence, read in place or packed, in a graph or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import LLM, SamplingParams
from engine.forward_batch import ForwardBatch, SequenceChunk
from engine.model.decode_attention import (
    DecodeKeys,
    decode_keys,
    flash_decode,
    key_bucket,
    key_index_values,
    num_key_bounds,
)
from engine.tools.tiny_checkpoint import write_tiny_checkpoint

BLOCK = 16


def _batch(block_tables: list[list[int]], lengths: list[int], device: str = "cpu") -> ForwardBatch:
    chunks = [SequenceChunk([7], n - 1, table, True) for table, n in zip(block_tables, lengths, strict=True)]
    return ForwardBatch.build(chunks, BLOCK, device)


def test_key_bucket_is_a_power_of_two_at_least_the_longest_context() -> None:
    assert key_bucket(1) == 256 and key_bucket(256) == 256 and key_bucket(257) == 512
    assert key_bucket(2048) == 2048 and key_bucket(2049) == 4096
    assert [num_key_bounds(n) for n in (1, 256, 257, 4096, 4097)] == [1, 1, 2, 5, 6]  # 256 ... 4096, 8192


def test_key_index_reads_ranges_in_place_and_packs_the_others() -> None:
    in_place = _batch([[4, 5], [1]], [20, 3]).spans
    values, packed = key_index_values(in_place)
    assert not packed
    assert values == [0, 1, 2, 4 * BLOCK, 1 * BLOCK, 1 * BLOCK + 3, 20, 3]  # cu_q, cu_k, used
    mixed = _batch([[4, 5], [2, 0]], [20, 30]).spans  # blocks 2, 0: not one range
    values, packed = key_index_values(mixed)
    assert packed
    assert values == [0, 1, 2, 0, 20, 50, 20, 30]


def test_no_flash_decode_on_the_cpu_or_for_prompts() -> None:
    decode = _batch([[4, 5]], [20])
    assert decode_keys(decode, 64, None, torch.bfloat16, torch.device("cpu"), "flash") is None
    prompt = ForwardBatch.build([SequenceChunk([1, 2, 3], 0, [0], True)], BLOCK, "cpu")
    assert decode_keys(prompt, 64, None, torch.bfloat16, torch.device("cpu"), "flash") is None


def _sdpa_flash(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                             values.transpose(0, 1)[None], scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[613], [600, 17, 1100], [1500, 2048]])
def test_flash_decode_matches_sdpa_flash_in_place_packed_and_in_a_graph(lengths: list[int]) -> None:
    torch.manual_seed(0)
    device, heads, kv_heads, dim = torch.device("cuda"), 32, 8, 128
    num_blocks = 4 * sum(-(-n // BLOCK) for n in lengths)
    keys = torch.randn(num_blocks * BLOCK, kv_heads, dim, device=device, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    q = torch.randn(len(lengths), heads, dim, device=device, dtype=torch.bfloat16)
    scale = dim**-0.5
    first, tables, scattered = 1, [], []
    for n in lengths:  # consecutive blocks, and the same count of blocks every other one
        used = -(-n // BLOCK)
        tables.append(list(range(first, first + used)))
        scattered.append(list(range(first + 2 * used, first + 4 * used, 2)))
        first += 4 * used
    in_place = decode_keys(_batch(tables, lengths, "cuda"), dim, None, torch.bfloat16, device, "flash")
    packed = decode_keys(_batch(scattered, lengths, "cuda"), dim, None, torch.bfloat16, device, "flash")
    assert in_place is not None and in_place.gather is None and packed is not None and packed.gather is not None
    for table, copy in zip(tables, scattered, strict=True):  # the scattered blocks hold the same keys
        for block, to in zip(table, copy, strict=True):
            keys[to * BLOCK : (to + 1) * BLOCK] = keys[block * BLOCK : (block + 1) * BLOCK]
            values[to * BLOCK : (to + 1) * BLOCK] = values[block * BLOCK : (block + 1) * BLOCK]
    got = flash_decode(q, keys, values, in_place, scale)
    assert torch.equal(flash_decode(q, keys, values, packed, scale), got)
    for s, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        rows = slice(table[0] * BLOCK, table[0] * BLOCK + n)
        alone = _sdpa_flash(q[s : s + 1], keys[rows], values[rows], scale)
        if len(lengths) == 1:  # the same kernel, split alike: the same bits
            assert torch.equal(got, alone)
        else:  # the split of the keys follows the batch: the last bit may differ
            torch.testing.assert_close(got[s : s + 1], alone, atol=1e-3, rtol=1.6e-2)
    static = DecodeKeys(in_place.max_k, torch.zeros_like(in_place.index))
    flash_decode(q, keys, values, DecodeKeys(in_place.max_k, in_place.index), scale)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = flash_decode(q, keys, values, static, scale)
    static.index.copy_(in_place.index)
    graph.replay()
    assert torch.equal(replayed, got)


@pytest.mark.gpu
def test_decode_steps_take_one_graph_per_layer_where_keys_are_read_in_place(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "mixtral", arch="mixtral", seed=1, dtype="bfloat16")
    llm = LLM(str(path), device="cuda", dtype="bfloat16", show_progress=False)
    graphs = llm.engine.runner.model.decode_graphs
    assert graphs is not None
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=[[5, 9, 13]], params=params)
    one = graphs._steps[1]
    assert sorted(one.layers) == [256] and not one.pre  # one sequence: its blocks are consecutive
    # three sequences whose blocks interleave once the first outgrows its block: packed, eagerly
    llm.generate(prompt_token_ids=[[5] * 14, [3, 4], [77]], params=params)
    three = graphs._steps[3]
    assert three.layers and three.pre
