"""A sequence whose KV slots form one contiguous range is read from the cache as views: the same
attention, bit for bit, as gathering its slots."""

from __future__ import annotations

import dataclasses

import torch

from engine.forward_batch import ForwardBatch, SequenceChunk
from engine.kv_cache.paged_cache import PagedKVCache
from engine.model.attention import AttentionShape, attend

BLOCK = 4


def _batch(block_tables: list[list[int]], cached: int) -> ForwardBatch:
    chunks = [SequenceChunk([7], cached, table, True) for table in block_tables]
    return ForwardBatch.build(chunks, BLOCK, "cpu")


def test_consecutive_blocks_give_a_range_and_others_do_not() -> None:
    spans = _batch([[2, 3, 4], [5, 1, 6], [9, 8]], cached=6).spans
    assert spans[0].context_start == 2 * BLOCK
    assert spans[1].context_start is None  # blocks 5, 1: not consecutive
    assert spans[2].context_start is None
    assert _batch([[9, 3]], cached=3).spans[0].context_start == 9 * BLOCK  # only block 9 is used


def test_views_and_gathers_attend_alike() -> None:
    torch.manual_seed(0)
    shape = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=8)
    cache = PagedKVCache(1, 16, BLOCK, shape.num_kv_heads, shape.head_dim, torch.float32, "cpu")
    cache.keys[0].normal_()
    cache.values[0].normal_()
    batch = _batch([[3, 4, 5], [10, 11]], cached=6)
    assert all(span.context_start is not None for span in batch.spans)
    gathered = dataclasses.replace(batch, spans=[dataclasses.replace(s, context_start=None) for s in batch.spans])
    q = torch.randn(2, shape.num_heads, shape.head_dim)
    k = v = torch.zeros(2, shape.num_kv_heads, shape.head_dim)  # unused: both spans read the cache
    assert torch.equal(attend(q, k, v, shape, 0, batch, cache), attend(q, k, v, shape, 0, gathered, cache))
