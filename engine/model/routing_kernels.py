"""PhiMoE's sparsemixer routing of a decode step in one Triton kernel, bit for bit the torch path's.

A decode layer's graph routes one token per sequence; in torch (`moe.sparsemixer`, then the ids
sorted for the graphs) that is ~25 kernels of ~1-3 us each for 16 logits a token: ~60 us a layer
on the H100 machine, on the chain between two layers' FFNs where neither the CPU nor PCIe works.
Here one program per token does it all, and the result is the torch path's to the bit:

- every elementwise step (`threshold - scores`, the division by the clamped scale, IEEE division
  in both: `div_rn`) is computed in fp32 and rounded to bf16 where torch's bf16 kernels round (on
  the bits: decode_kernels.round_to_bf16), and the jitter test compares with `2 * jitter_eps`
  rounded to that dtype (torch's scalar comparison converts the scalar to the tensor's dtype first);
- the softmax is PyTorch's persistent warp softmax for <= 32 values (one value a lane): fp32 max,
  `expf(x - max)` (libdevice's, as CUDA's `std::exp`), the sum as the warp's butterfly (lane
  offsets W/2, ..., 2, 1: here halves of the row added level by level, each level one addition per
  value, so the same additions in the same order), IEEE division, rounded;
- ties in a maximum take the lowest index, as torch's `max(dim)`.

The ids come out in increasing order with their weights alongside (what the decode graphs use).
Only on CUDA with Triton, for bf16 or fp32 logits and 2..32 experts (`fused_sparsemixer_applies`);
elsewhere the caller takes the torch path. Tests: tests/engine/model/test_routing_kernels.py (GPU).
"""

from __future__ import annotations

import torch

from engine.model.moe import Routing

MAX_EXPERTS = 32  # one warp: the persistent softmax's butterfly covers the whole row

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from engine.model.decode_kernels import round_to_bf16
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


if triton is not None:
    @triton.jit
    def _warp_sum(values, WIDTH: tl.constexpr):
        """The sum of WIDTH (a power of two >= 2) values in the order of a warp's butterfly
        reduction: lane i adds lane i ^ WIDTH/2 first, so the row's halves are added level by level."""
        x = values
        if WIDTH >= 32:
            x = tl.sum(tl.reshape(x, (2, 16)), axis=0)
        if WIDTH >= 16:
            x = tl.sum(tl.reshape(x, (2, 8)), axis=0)
        if WIDTH >= 8:
            x = tl.sum(tl.reshape(x, (2, 4)), axis=0)
        if WIDTH >= 4:
            x = tl.sum(tl.reshape(x, (2, 2)), axis=0)
        return tl.sum(x, axis=0)

    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
        """fp32 x rounded to the logits' dtype (bf16: to the nearest, ties to even), back in fp32."""
        if tl.bfloat16 == DTYPE:
            x = round_to_bf16(x)
        return x

    @triton.jit
    def _pick_weight(scores, candidates, threshold, chosen, offsets, twice_eps, DTYPE: tl.constexpr,
                     WIDTH: tl.constexpr):
        """One sparsemixer pick's weight: the softmax over the candidates whose relative gap to
        `threshold` is within 2 eps (the rest masked), taken at the chosen expert."""
        factor = tl.maximum(tl.abs(scores), threshold)
        gap = _round(threshold - scores, DTYPE)
        relative = _round(tl.math.div_rn(gap, factor), DTYPE)
        masked = tl.where(relative > twice_eps, float("-inf"), candidates)
        peak = tl.max(masked, axis=0)
        exps = libdevice.exp(masked - peak)
        total = _warp_sum(exps, WIDTH)
        probs = _round(tl.math.div_rn(exps, total), DTYPE)
        return tl.sum(tl.where(offsets == chosen, probs, 0.0), axis=0)

    @triton.jit
    def _sparsemixer_kernel(logits, ids_out, weights_out, num_experts, row_stride, twice_eps,
                            WIDTH: tl.constexpr):
        row = tl.program_id(0)
        offsets = tl.arange(0, WIDTH)
        scores = tl.load(logits + row * row_stride + offsets, mask=offsets < num_experts,
                         other=float("-inf")).to(tl.float32)
        dtype = logits.dtype.element_ty
        first = tl.argmax(scores, axis=0, tie_break_left=True)
        first_weight = _pick_weight(scores, scores, tl.max(scores, axis=0), first, offsets, twice_eps, dtype, WIDTH)
        rest = tl.where(offsets == first, float("-inf"), scores)
        second = tl.argmax(rest, axis=0, tie_break_left=True)
        second_weight = _pick_weight(scores, rest, tl.max(rest, axis=0), second, offsets, twice_eps, dtype, WIDTH)
        first_low = first < second
        tl.store(ids_out + 2 * row, tl.where(first_low, first, second).to(tl.int64))
        tl.store(ids_out + 2 * row + 1, tl.where(first_low, second, first).to(tl.int64))
        tl.store(weights_out + 2 * row, tl.where(first_low, first_weight, second_weight).to(dtype))
        tl.store(weights_out + 2 * row + 1, tl.where(first_low, second_weight, first_weight).to(dtype))


def fused_sparsemixer_applies(logits: torch.Tensor) -> bool:
    """Whether `sparsemixer_in_id_order` can route these logits [num_tokens, num_experts]."""
    return (triton is not None and logits.is_cuda and logits.dim() == 2 and logits.stride(1) == 1
            and 2 <= logits.shape[1] <= MAX_EXPERTS
            and logits.dtype in (torch.bfloat16, torch.float32))


def sparsemixer_in_id_order(logits: torch.Tensor, jitter_eps: float) -> Routing:
    """`moe.sparsemixer(logits, jitter_eps)` with each token's two experts in increasing id order
    (weights alongside), in one kernel launch: the same bits (module docstring). Check
    `fused_sparsemixer_applies(logits)` first."""
    num_tokens, num_experts = logits.shape
    ids = torch.empty((num_tokens, 2), dtype=torch.int64, device=logits.device)
    weights = torch.empty((num_tokens, 2), dtype=logits.dtype, device=logits.device)
    # torch compares a tensor with a Python scalar after converting the scalar to the tensor's dtype
    twice_eps = torch.tensor(2 * jitter_eps, dtype=logits.dtype).item()
    width = max(2, triton.next_power_of_2(num_experts))
    _sparsemixer_kernel[(num_tokens,)](logits, ids, weights, num_experts, logits.stride(0), twice_eps, WIDTH=width)
    return Routing(ids, weights)
