"""ForwardBatch: everything one model forward needs, for a flattened batch of sequences.

Tokens of all scheduled sequences are concatenated: prefill chunks (many tokens) and decode
tokens (one per sequence) alike. Each sequence contributes `query_len` tokens at positions
[context_len - query_len, context_len).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.kv_cache.paged_cache import slots_for


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's part of the step (input to ForwardBatch.build)."""

    token_ids: list[int]  # the tokens computed this step
    num_cached_tokens: int  # tokens of this sequence already in the KV cache
    block_table: list[int]
    needs_logits: bool  # the last token's logits are sampled


@dataclass
class SequenceSpan:
    query_start: int  # offset of this sequence's first token in the flat batch
    query_len: int
    context_len: int  # KV length after this step
    block_table: list[int]  # the blocks holding positions [0, context_len)
    block_size: int
    device: torch.device | str
    # the first slot when those slots are one contiguous range (the cache is then read as a view)
    context_start: int | None = None
    _context_slots: torch.Tensor | None = field(default=None, repr=False)

    @property
    def context_slots(self) -> torch.Tensor:
        """[context_len] flat KV slots of positions [0, context_len), made at the first use (a decode
        step whose blocks are one range reads the cache as a view and never needs them)."""
        if self._context_slots is None:
            slots = slots_for(self.block_table, 0, self.context_len, self.block_size)
            self._context_slots = torch.tensor(slots, dtype=torch.long, device=self.device)
        return self._context_slots


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    slots: torch.Tensor  # [num_tokens] KV slot each token is written to
    spans: list[SequenceSpan]
    logits_indices: torch.Tensor  # [num_logits] flat indices of the tokens whose logits are needed
    long_context: torch.Tensor | None = None  # [num_tokens] bool, for longrope (set by the model)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, chunks: list[SequenceChunk], block_size: int, device: torch.device | str) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[SequenceSpan] = []
        logits_indices: list[int] = []
        for chunk in chunks:
            start, query_len = chunk.num_cached_tokens, len(chunk.token_ids)
            end = start + query_len
            used_blocks = chunk.block_table[: -(-end // block_size)]
            first = used_blocks[0] * block_size if _consecutive(chunk.block_table, end, block_size) else None
            spans.append(SequenceSpan(len(input_ids), query_len, end, used_blocks, block_size, device, first))
            input_ids.extend(chunk.token_ids)
            positions.extend(range(start, end))
            slots.extend(slots_for(chunk.block_table, start, end, block_size))
            if chunk.needs_logits:
                logits_indices.append(len(input_ids) - 1)
        # the four index lists in one host tensor and one copy (on a GPU: pinned, not waited for)
        values = torch.tensor(input_ids + positions + slots + logits_indices, dtype=torch.long)
        if torch.device(device).type == "cuda":
            values = values.pin_memory().to(device, non_blocking=True)
        else:
            values = values.to(device)
        n = len(input_ids)
        return cls(values[:n], values[n : 2 * n], values[2 * n : 3 * n], spans, values[3 * n :])


def _consecutive(block_table: list[int], num_tokens: int, block_size: int) -> bool:
    """True when the blocks holding the first `num_tokens` positions follow each other in the cache."""
    used = -(-num_tokens // block_size)
    return all(block_table[k + 1] == block_table[k] + 1 for k in range(used - 1))
