"""Paged KV cache: block accounting (pure Python) apart from the tensors."""

from engine.kv_cache.block_manager import BlockManager, OutOfBlocksError
from engine.kv_cache.paged_cache import PagedKVCache

__all__ = ["BlockManager", "OutOfBlocksError", "PagedKVCache"]
