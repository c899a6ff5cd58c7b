"""Decode attention (one query per sequence) in one call of flash attention's varlen kernel.

Every sequence's keys are read where they lie in the cache: the kernel takes the whole layer's
key tensor with each sequence's first slot (`cu_k`) and length (`used`), so a step's attention is
one launch with fixed shapes that a CUDA graph can replay while lengths change. Sequences whose
slots are not one contiguous range are gathered first (eagerly) into a packed tensor: the same
kernel on the same keys.

The kernel's split of the keys (flash-decoding) follows `max_k`, the bound on context lengths the
call is made with: every path that computes a step (graph or eager) passes the same bound, a
power of two (`key_bucket`), so decode results do not depend on the path. For one sequence at
the bounds of this engine's benchmarks (<= 2048 keys: one key block per split) the bits are those
of SDPA's flash kernel on the exact length; with several sequences the split follows the batch
(as GEMMs do), so the last bit of a sequence's attention may depend on its neighbours.

Applies on CUDA, in fp16/bf16, under the "flash" attention kernels, with head dims flash takes,
and when no sequence is longer than a sliding window (the mask is then a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from engine.forward_batch import ForwardBatch, SequenceSpan

MIN_KEY_BUCKET = 256
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def key_bucket(max_context_len: int) -> int:
    """The bound on key lengths a decode step is computed with: a power of two >= the longest context."""
    bucket = MIN_KEY_BUCKET
    while bucket < max_context_len:
        bucket *= 2
    return bucket


def num_key_bounds(max_context_len: int) -> int:
    """How many key bounds a context of up to `max_context_len` tokens can take (256, 512, ...)."""
    return key_bucket(max_context_len).bit_length() - MIN_KEY_BUCKET.bit_length() + 1


@dataclass
class DecodeKeys:
    """Where one decode step's keys are, for one flash call per layer (the same for every layer).

    `index` packs, int32 on the device: cu_q [n + 1] (0..n), cu_k [n + 1] (each sequence's first
    key row; the last entry is not read) and used [n] (its key count)."""

    max_k: int  # key_bucket of the longest context
    index: torch.Tensor  # int32 [3 n + 2]
    gather: torch.Tensor | None = None  # int64 [sum of lengths]: slots to pack first (None: read in place)

    @property
    def num_seqs(self) -> int:
        return (self.index.shape[0] - 2) // 3

    def views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.num_seqs
        return self.index[: n + 1], self.index[n + 1 : 2 * n + 2], self.index[2 * n + 2 :]


def flash_decode_supported(head_dim: int, dtype: torch.dtype, device: torch.device, kernels: str) -> bool:
    return (kernels == "flash" and device.type == "cuda" and dtype in _FLASH_DTYPES
            and head_dim % 8 == 0 and head_dim <= 256 and torch.backends.cuda.is_flash_attention_available())


def decode_keys(batch: ForwardBatch, head_dim: int, sliding_window: int | None, dtype: torch.dtype,
                device: torch.device, kernels: str) -> DecodeKeys | None:
    """The step's DecodeKeys when every sequence has one query and flash decode applies, else None."""
    spans = batch.spans
    if not spans or any(span.query_len != 1 for span in spans):
        return None
    if not flash_decode_supported(head_dim, dtype, device, kernels):
        return None
    max_k = key_bucket(max(span.context_len for span in spans))
    if sliding_window is not None and max_k > sliding_window:
        return None
    values, packed = key_index_values(spans)
    gather = torch.cat([span.context_slots for span in spans]) if packed else None
    index = torch.tensor(values, dtype=torch.int32).pin_memory().to(device, non_blocking=True)
    return DecodeKeys(max_k, index, gather)


def key_index_values(spans: list[SequenceSpan]) -> tuple[list[int], bool]:
    """DecodeKeys.index of these one-query spans as a list, and whether their keys must be packed
    first (some span's slots are not one range: then each span's keys follow the previous one's)."""
    lengths = [span.context_len for span in spans]
    packed = any(span.context_start is None for span in spans)
    starts = list(accumulate(lengths[:-1], initial=0)) if packed else [span.context_start for span in spans]
    return list(range(len(spans) + 1)) + starts + [starts[-1] + lengths[-1]] + lengths, packed


def flash_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, where: DecodeKeys,
                 scale: float) -> torch.Tensor:
    """q [n, heads, dim] (one query per sequence), keys/values [slots, kv_heads, dim] (a layer's
    cache) -> [n, heads, dim]."""
    if where.gather is not None:
        keys, values = keys.index_select(0, where.gather), values.index_select(0, where.gather)
    cu_q, cu_k, used = where.views()
    return torch.ops.aten._flash_attention_forward(q.contiguous(), keys, values, cu_q, cu_k, 1, where.max_k, 0.0,
                                                   False, False, scale=scale, seqused_k=used)[0]
