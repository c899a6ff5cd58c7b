"""Triton kernels of the decode graphs, bit for bit the torch operations they replace.

A decode layer's graph runs ~40 kernels of 1-3 us for one token, on the chain between two
layers' FFNs where neither the CPU nor PCIe works (docs/DEVELOPING.md). Three groups of that work
fuse without changing a bit:

- `rotate_into_cache`: rotary embedding of q and k (torch: a negation, a concatenation, two
  products, a sum, each rounded to the model's dtype, for q and for k), v made contiguous, and k
  and v written to the KV cache at the step's slots: 13 kernels -> 1;
- `combine_into_residual`: a one-token MoE layer's combine (its experts' fp32 sums rounded, times
  their routing weights, rounded, summed one expert after the other in top-k order, each sum
  rounded), the residual add, and the sums zeroed for the next layer: 6 kernels -> 1;
- `copy_to_host`: a MoE layer's routed activations and expert ids (and the next layer's guessed
  ids) stored into pinned host memory by one kernel, not two or three copy-engine transfers.

Each product and sum is computed in fp32 and rounded to bf16 where torch's bf16 kernels round (a
product of two bf16 values is exact in fp32, and the rounding between a product and the following
sum keeps the compiler from contracting them into an FMA). The rounding is done on the bits
(`round_to_bf16`): Triton folds a float round trip through bf16 away. The two that compute are
only for bf16 models on CUDA with Triton (fp32 could be contracted; fp16 would need its own
rounding) and power-of-two head sizes; `copy_to_host` takes any dtype. The `*_applies` checks say
when, and the callers take the torch path elsewhere.
Tests: tests/engine/model/test_decode_kernels.py (GPU).
"""

from __future__ import annotations

import torch

FUSED_DTYPES = (torch.bfloat16,)
COMBINE_BLOCK = 1024
TO_HOST_BLOCK = 1024

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


if triton is not None:
    @triton.jit
    def round_to_bf16(x):
        """fp32 x rounded to the nearest bf16 (ties to even), as fp32. With integer operations: the
        compiler folds a float round trip (`x.to(tl.bfloat16).to(tl.float32)`) back into x."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16 << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _rotary_kernel(qkv, cos, sin, slots, q_out, keys, values, qkv_row, key_slot, value_slot,
                       NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)  # q heads, then k heads, then v heads (their order in qkv)
        d = tl.arange(0, HEAD_DIM)
        dtype = qkv.dtype.element_ty
        row = qkv + token * qkv_row + head * HEAD_DIM
        x = tl.load(row + d)
        slot = tl.load(slots + token)
        if head < NUM_HEADS + NUM_KV_HEADS:
            half: tl.constexpr = HEAD_DIM // 2
            partner = tl.load(row + (d + half) % HEAD_DIM).to(tl.float32)
            rotated = tl.where(d < half, -partner, partner)
            c = tl.load(cos + token * HEAD_DIM + d).to(tl.float32)
            s = tl.load(sin + token * HEAD_DIM + d).to(tl.float32)
            out = round_to_bf16(round_to_bf16(x.to(tl.float32) * c) + round_to_bf16(rotated * s)).to(dtype)
            if head < NUM_HEADS:
                tl.store(q_out + (token * NUM_HEADS + head) * HEAD_DIM + d, out)
            else:
                tl.store(keys + slot * key_slot + (head - NUM_HEADS) * HEAD_DIM + d, out)
        else:
            tl.store(values + slot * value_slot + (head - NUM_HEADS - NUM_KV_HEADS) * HEAD_DIM + d, x)

    @triton.jit
    def _weighted_unit(sums, weights, k, j, inside, hidden):
        """Unit k's fp32 sums at columns j rounded, times its routing weight, rounded."""
        unit_sum = round_to_bf16(tl.load(sums + k * hidden + j, mask=inside, other=0.0))
        return round_to_bf16(unit_sum * tl.load(weights + k).to(tl.float32))

    @triton.jit
    def _combine_kernel(sums, weights, residual, ffn_out, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = j < hidden
        dtype = residual.dtype.element_ty
        total = _weighted_unit(sums, weights, 0, j, inside, hidden)
        for k in tl.static_range(1, TOP_K):  # one expert after the other, each sum rounded
            total = round_to_bf16(total + _weighted_unit(sums, weights, k, j, inside, hidden))
        tl.store(ffn_out + j, total.to(dtype), mask=inside)
        before = tl.load(residual + j, mask=inside, other=0.0).to(tl.float32)
        tl.store(residual + j, round_to_bf16(before + total).to(dtype), mask=inside)
        # the sums zeroed for the next layer only once every thread of the program has read them
        # (the store's layout need not give a thread the elements it loaded)
        tl.debug_barrier()
        for k in tl.static_range(TOP_K):
            tl.store(sums + k * hidden + j, tl.zeros((BLOCK,), dtype=tl.float32), mask=inside)

    @triton.jit
    def _to_host_kernel(x, ids, next_ids, host_x, host_ids, host_next, x_numel, ids_numel, x_blocks,
                        HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr):
        """x's blocks, then the ids' (and next ids') blocks, stored into pinned host memory (mapped:
        the stores cross PCIe)."""
        block = tl.program_id(0)
        if block < x_blocks:
            j = block * BLOCK + tl.arange(0, BLOCK)
            tl.store(host_x + j, tl.load(x + j, mask=j < x_numel), mask=j < x_numel)
        else:
            k = (block - x_blocks) * BLOCK + tl.arange(0, BLOCK)
            tl.store(host_ids + k, tl.load(ids + k, mask=k < ids_numel), mask=k < ids_numel)
            if HAS_NEXT:
                tl.store(host_next + k, tl.load(next_ids + k, mask=k < ids_numel), mask=k < ids_numel)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def rotate_into_cache_applies(x: torch.Tensor, head_dim: int, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `rotate_into_cache` can take the QKV projection of activations `x` into this cache layer."""
    return (triton is not None and x.is_cuda and x.dtype in FUSED_DTYPES and _power_of_two(head_dim)
            and head_dim >= 16 and keys.dtype == values.dtype == x.dtype and keys.is_contiguous()
            and values.is_contiguous())


def rotate_into_cache(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                      sin: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q rotated [num_tokens, heads, dim] from the QKV projection; k rotated and v written to the
    cache layer (`keys`, `values`: [slots, kv heads, dim]) at `slots`: what `apply_rotary` on q and k
    and `PagedKVCache.write` do, to the bit, in one launch."""
    num_tokens = qkv.shape[0]
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    grid = (num_tokens, num_heads + 2 * num_kv_heads)
    _rotary_kernel[grid](qkv, cos.contiguous(), sin.contiguous(), slots, q, keys, values, qkv.stride(0),
                         keys.stride(0), values.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
                         HEAD_DIM=head_dim)
    return q


def combine_into_residual_applies(sums: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether `combine_into_residual` can combine these unit sums [top_k, hidden] of one token."""
    return (triton is not None and sums.is_cuda and residual.dtype in FUSED_DTYPES and sums.dtype == torch.float32
            and sums.is_contiguous() and residual.is_contiguous() and residual.shape[0] == 1
            and weights.shape == (1, sums.shape[0]) and weights.is_contiguous())


def combine_into_residual(sums: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor,
                          ffn_out: torch.Tensor) -> None:
    """One token's MoE output from its top-k experts' fp32 sums [top_k, hidden] (top-k order) and
    routing weights [1, top_k] into `ffn_out`, added to `residual`, and the sums zeroed: what
    `MoEBlock.combine_one_token`, the copy, `zero_` and `residual.add_` do, to the bit."""
    hidden = sums.shape[1]
    _combine_kernel[(triton.cdiv(hidden, COMBINE_BLOCK),)](sums, weights, residual, ffn_out, hidden,
                                                         TOP_K=sums.shape[0], BLOCK=COMBINE_BLOCK)


def copy_to_host_applies(x: torch.Tensor, ids: torch.Tensor, host_x: torch.Tensor, host_ids: torch.Tensor) -> bool:
    """Whether `copy_to_host` can store these GPU tensors into these pinned host ones."""
    return (triton is not None and x.is_cuda and ids.is_cuda and host_x.is_pinned() and host_ids.is_pinned()
            and x.is_contiguous() and ids.is_contiguous() and host_x.is_contiguous() and host_ids.is_contiguous()
            and x.dtype == host_x.dtype and ids.dtype == host_ids.dtype
            and x.numel() == host_x.numel() and ids.numel() == host_ids.numel())


def copy_to_host(x: torch.Tensor, ids: torch.Tensor, next_ids: torch.Tensor | None, host_x: torch.Tensor,
                 host_ids: torch.Tensor, host_next: torch.Tensor | None) -> None:
    """`host_x.copy_(x)`, `host_ids.copy_(ids)` (and the next ids, shaped like ids) in one kernel
    that stores into the pinned host tensors itself: no copy-engine transfers (two or three of ~5 us
    each, one after the other, on a decode layer's chain). The host reads them after an event
    recorded behind it; a stream's memory write behind it (a routed job's gate) is fenced after it."""
    has_next = next_ids is not None and host_next is not None
    x_blocks = triton.cdiv(x.numel(), TO_HOST_BLOCK)
    _to_host_kernel[(x_blocks + triton.cdiv(ids.numel(), TO_HOST_BLOCK),)](
        x, ids, next_ids if has_next else ids, host_x, host_ids, host_next if has_next else host_ids,
        x.numel(), ids.numel(), x_blocks, HAS_NEXT=has_next, BLOCK=TO_HOST_BLOCK)
