"""Decodes a streamed compact piece (engine/model/compact_weights.py) in its staging slot.

The copy stream lands the piece's region in the slot's byte buffer; the compute stream decodes it
into the slot's bf16 buffer as [gate_up | down] before the piece's matmuls. One Triton kernel does
it when Triton is available (decode blocks, then exception blocks: an exception's value is written
by its exception block only, so the two kinds of blocks never write the same element); else a
few torch operations.
"""

from __future__ import annotations

import logging

import torch

from engine.executor.triton_launch import CachedLauncher
from engine.model.compact_weights import CompactPiece, decode_flat, exception_views

logger = logging.getLogger(__name__)
BLOCK = 4096

try:  # Triton ships with CUDA builds of torch; CPU-only machines use the torch operations
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


if triton is not None:
    @triton.jit
    def _unpack_kernel(low_codes, out, exc_index, exc_bits, num_values, split, base_gate_up, base_down,
                       num_exceptions, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        value_blocks = tl.cdiv(num_values, BLOCK)
        if pid < value_blocks:
            i = pid * BLOCK + tl.arange(0, BLOCK)
            inside = i < num_values
            low = tl.load(low_codes + i, mask=inside, other=0).to(tl.int32)
            code_byte = tl.load(low_codes + num_values + (i // 32) * 16 + i % 16, mask=inside, other=0).to(tl.int32)
            code = (code_byte >> ((i % 32) // 16 * 4)) & 15
            base = tl.where(i < split, base_gate_up, base_down)
            bits = ((low & 0x80) << 8) | ((code + base) << 7) | (low & 0x7F)
            tl.store(out + i, bits.to(tl.int16), mask=inside & (code != 15))  # 15: ESCAPE
        else:
            j = (pid - value_blocks) * BLOCK + tl.arange(0, BLOCK)
            inside = j < num_exceptions
            index = tl.load(exc_index + j, mask=inside, other=0)
            tl.store(out + index, tl.load(exc_bits + j, mask=inside, other=0), mask=inside)


class _Pointer:
    """A pointer argument of the Triton kernel at a raw device address: Triton takes any object with
    `data_ptr()` and `dtype` (as its own TensorWrapper), so no tensor view is built per call."""

    __slots__ = ("address", "dtype")

    def __init__(self, address: int, dtype: torch.dtype) -> None:
        self.address = address
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self.address


def fast_path() -> bool:
    """Whether `unpack_at` can run (Triton present)."""
    return triton is not None


_launch_unpack = CachedLauncher(_unpack_kernel) if triton is not None else None


def unpack_at(staged_address: int, piece: CompactPiece, out_address: int) -> None:
    """`unpack_piece` for a staged region and a bf16 output on the GPU given by their addresses (a
    staging slot's buffers): the same kernel and bits, without the ~5 tensor views a call otherwise
    builds, and launched past Triton's per-call path once compiled (triton_launch.py): a decode
    layer's driving thread decodes several pieces, and its time is the layer's."""
    assert _launch_unpack is not None
    values, exceptions = piece.num_values, piece.num_exceptions
    at = values * 3 // 2  # as exception_views: indices (int32), then the exceptions' bits (int16)
    grid_x = -(-values // BLOCK) - (-exceptions // BLOCK)
    _launch_unpack(grid_x, _Pointer(staged_address, torch.uint8), _Pointer(out_address, torch.int16),
                   _Pointer(staged_address + at, torch.int32), _Pointer(staged_address + at + 4 * exceptions, torch.int16),
                   values, piece.gate_up.low.numel(), piece.gate_up.base, piece.down.base, exceptions, BLOCK)


def unpack_piece(staged: torch.Tensor, piece: CompactPiece, out: torch.Tensor) -> None:
    """staged: uint8, the piece's region as copied (same device as `out`); out: bf16, at least
    piece.num_values long, receives [gate_up | down] flat. Enqueued on the current stream."""
    if triton is not None and staged.is_cuda:
        if not (staged.is_contiguous() and out.is_contiguous()):
            raise ValueError("unpack_piece needs a contiguous staged region and output")
        unpack_at(staged.data_ptr(), piece, out.data_ptr())
        return
    values, exceptions = piece.num_values, piece.num_exceptions
    split = piece.gate_up.low.numel()
    index, bits = exception_views(staged, values, exceptions)
    target = out[:values].view(torch.int16)
    low, codes = staged[:values], staged[values : values + values // 2]
    target[:split].copy_(decode_flat(low[:split], codes[: split // 2], piece.gate_up.base).view(torch.int16))
    target[split:].copy_(decode_flat(low[split:], codes[split // 2 :], piece.down.base).view(torch.int16))
    if exceptions:
        target[index.to(torch.int64)] = bits
