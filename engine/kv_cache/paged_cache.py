"""The KV tensors: per layer, keys and values in fixed-size blocks addressed by flat slots.

A token at position p of a sequence lives in slot `block_table[p // block_size] * block_size
+ p % block_size`.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @property
    def num_bytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """slots: [num_tokens]; keys/values: [num_tokens, num_kv_heads, head_dim]."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: [context_len] -> keys, values: [context_len, num_kv_heads, head_dim]."""
        return self.keys[layer].index_select(0, slots), self.values[layer].index_select(0, slots)

    def read_range(self, layer: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [start, start + length) as views (no copy): what `read` gives for those slots."""
        return self.keys[layer][start : start + length], self.values[layer][start : start + length]


def slots_for(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat slots of positions [start, end) of a sequence with this block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
