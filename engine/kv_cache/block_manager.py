"""Block accounting for the paged KV cache. Pure Python: no tensors, testable anywhere."""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Not enough free KV blocks for an allocation."""


class BlockManager:
    """Hands out fixed-size KV blocks; a sequence's block table lists its blocks in order."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks to add to `block_table` so that it holds `num_tokens` tokens."""
        return max(0, self.num_blocks_for(num_tokens) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.num_missing_blocks(block_table, num_tokens) <= len(self._free)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to `block_table` (in place) until it holds `num_tokens` tokens."""
        missing = self.num_missing_blocks(block_table, num_tokens)
        if missing > len(self._free):
            raise OutOfBlocksError(f"need {missing} KV blocks, {len(self._free)} free")
        block_table.extend(self._free.popleft() for _ in range(missing))

    def free(self, block_table: list[int]) -> None:
        """Return every block of `block_table` to the pool and empty the table."""
        self._free.extend(block_table)
        block_table.clear()
