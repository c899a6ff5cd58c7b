from __future__ import annotations

import pytest

from engine.kv_cache import BlockManager, OutOfBlocksError
from engine.kv_cache.paged_cache import slots_for


def test_grow_allocates_just_enough_blocks_and_free_returns_them() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    table: list[int] = []
    bm.grow(table, 5)
    assert len(table) == 2 and bm.num_free_blocks == 8
    bm.grow(table, 8)
    assert len(table) == 2  # still fits
    bm.grow(table, 9)
    assert len(table) == 3 and len(set(table)) == 3
    assert bm.usage == pytest.approx(0.3)
    bm.free(table)
    assert table == [] and bm.num_free_blocks == 10


def test_out_of_blocks_is_an_error_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    table: list[int] = []
    assert not bm.can_grow(table, 9)
    with pytest.raises(OutOfBlocksError):
        bm.grow(table, 9)
    assert table == [] and bm.num_free_blocks == 2


def test_slots_follow_the_block_table() -> None:
    assert slots_for([7, 2], 2, 6, block_size=4) == [30, 31, 8, 9]
