"""Decodes a streamed compact piece (engine/model/compact_weights.py) in its staging slot.

The copy stream lands the piece's region in the slot's byte buffer; the compute stream decodes it
into the slot's bf16 buffer as [gate_up | down] before the piece's matmuls. One Triton kernel does
it when Triton is available (decode blocks, then exception blocks: an exception's value is written
by its exception block only, so the two kinds of blocks never write the same element); else a
few torch operations.

Merged (`GroupPlace`): prefill computes adjacent streamed pieces of one unit as one piece. Each
piece then decodes straight into its rows of the group's layout, the layout of one piece of all
their rows ([gate rows; up rows] then down [hidden, rows]), so that one partial (two matmuls)
covers the group: the same matrices as a piece built that wide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
    def _group_index(i, split, hidden, rows, group_rows, offset):
        """Where value i of a piece ([gate_up | down] flat) lands in its group's layout."""
        row = i // hidden
        gate_up_at = (row + tl.where(row < rows, offset, group_rows - rows + offset)) * hidden + i % hidden
        j = i - split
        down_at = 2 * group_rows * hidden + (j // rows) * group_rows + offset + j % rows
        return tl.where(i < split, gate_up_at, down_at)

    @triton.jit
    def _unpack_kernel(low_codes, out, exc_index, exc_bits, num_values, split, base_gate_up, base_down,
                       num_exceptions, hidden, rows, group_rows, offset, BLOCK: tl.constexpr,
                       GROUPED: tl.constexpr):
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
            at = _group_index(i, split, hidden, rows, group_rows, offset) if GROUPED else i
            tl.store(out + at, bits.to(tl.int16), mask=inside & (code != 15))  # 15: ESCAPE
        else:
            j = (pid - value_blocks) * BLOCK + tl.arange(0, BLOCK)
            inside = j < num_exceptions
            index = tl.load(exc_index + j, mask=inside, other=0)
            at = _group_index(index, split, hidden, rows, group_rows, offset) if GROUPED else index
            tl.store(out + at, tl.load(exc_bits + j, mask=inside, other=0), mask=inside)


@dataclass(frozen=True)
class GroupPlace:
    """A piece's place in a group of adjacent pieces computed as one: its first row within the
    group (`offset`) and the group's rows."""

    offset: int
    group_rows: int


def group_index(index: torch.Tensor, piece: CompactPiece, place: GroupPlace) -> torch.Tensor:
    """Where values `index` (int64, flat in [gate_up | down]) of `piece` land in the group's layout
    (what the Triton kernel computes)."""
    hidden, rows = piece.gate_up.shape[1], piece.gate_up.shape[0] // 2
    split = piece.gate_up.low.numel()
    row = index // hidden
    gate_up_at = (row + torch.where(row < rows, place.offset, place.group_rows - rows + place.offset)) * hidden + index % hidden
    j = index - split
    down_at = 2 * place.group_rows * hidden + torch.div(j, rows, rounding_mode="floor") * place.group_rows + place.offset + j % rows
    return torch.where(index < split, gate_up_at, down_at)


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


def unpack_at(staged_address: int, piece: CompactPiece, out_address: int, place: GroupPlace | None = None) -> None:
    """`unpack_piece` for a staged region and a bf16 output on the GPU given by their addresses (a
    staging slot's buffers): the same kernel and bits, without the ~5 tensor views a call otherwise
    builds, and launched past Triton's per-call path once compiled (triton_launch.py): a decode
    layer's driving thread decodes several pieces, and its time is the layer's. `place`: into a
    group's layout at `out_address` (the group's first value)."""
    assert _launch_unpack is not None
    values, exceptions = piece.num_values, piece.num_exceptions
    at = values * 3 // 2  # as exception_views: indices (int32), then the exceptions' bits (int16)
    grid_x = -(-values // BLOCK) - (-exceptions // BLOCK)
    _launch_unpack(grid_x, _Pointer(staged_address, torch.uint8), _Pointer(out_address, torch.int16),
                   _Pointer(staged_address + at, torch.int32), _Pointer(staged_address + at + 4 * exceptions, torch.int16),
                   values, piece.gate_up.low.numel(), piece.gate_up.base, piece.down.base, exceptions,
                   *_group_arguments(piece, place), BLOCK, place is not None)


def _group_arguments(piece: CompactPiece, place: GroupPlace | None) -> tuple[int, int, int, int]:
    """(hidden, rows, group rows, offset) of the kernel (unused, all 1, when not grouped)."""
    if place is None:
        return 1, 1, 1, 1
    return piece.gate_up.shape[1], piece.gate_up.shape[0] // 2, place.group_rows, place.offset


def unpack_piece(staged: torch.Tensor, piece: CompactPiece, out: torch.Tensor, place: GroupPlace | None = None) -> None:
    """staged: uint8, the piece's region as copied (same device as `out`); out: bf16, at least
    piece.num_values long, receives [gate_up | down] flat (`place`: the piece's rows of its group's
    layout, `out` being the group's). Enqueued on the current stream."""
    values, exceptions = piece.num_values, piece.num_exceptions
    split = piece.gate_up.low.numel()
    index, bits = exception_views(staged, values, exceptions)
    target = out.view(torch.int16) if place is not None else out[:values].view(torch.int16)
    if triton is not None and staged.is_cuda:
        grid = (triton.cdiv(values, BLOCK) + triton.cdiv(exceptions, BLOCK),)
        _unpack_kernel[grid](staged, target, index, bits, values, split, piece.gate_up.base, piece.down.base,
                             exceptions, *_group_arguments(piece, place), BLOCK=BLOCK, GROUPED=place is not None)
        return
    low, codes = staged[:values], staged[values : values + values // 2]
    decoded = torch.cat((decode_flat(low[:split], codes[: split // 2], piece.gate_up.base),
                         decode_flat(low[split:], codes[split // 2 :], piece.down.base))).view(torch.int16)
    if exceptions:
        decoded[index.to(torch.int64)] = bits
    if place is None:
        target.copy_(decoded)
    else:
        target[group_index(torch.arange(values, device=out.device), piece, place)] = decoded
