"""Stores host pieces compact with the C++ encoder (engine/model/compact_weights.py has the format).

`compact_piece` encodes a piece's bf16 gate_up and down into a uint8 region (at load time, a few
milliseconds a piece with all cores); `unpack_rows` runs the kernels' own decoder (tests).
"""

from __future__ import annotations

import ctypes

import torch

from engine.cpu_kernels import runner
from engine.cpu_kernels.cpu_info import default_num_threads
from engine.model.compact_weights import (
    MAX_EXCEPTION_SHARE,
    NUM_EXPONENTS,
    CompactMatrix,
    CompactPiece,
    choose_base,
    compactable,
    exception_views,
    max_region_bytes,
    region_bytes,
    region_views,
)


def available() -> bool:
    """True when the C++ library (encoder and kernels that read compact weights) is built."""
    return runner.native_library() is not None


REGISTER_DECODE_PATHS = ("avx512_bf16", "amx")


def decodes_in_registers() -> bool:
    """True when decode-sized jobs (1-3 tokens) decode compact rows in registers as they stream
    them: the AVX512-BF16 path, which an AMX CPU also runs for such jobs (AMX itself, for larger
    blocks, decodes each item's rows into a scratch copy, as AVX2 does for every job, which makes
    AVX2's CC pieces slower than reading bf16)."""
    return available() and runner.active_path() in REGISTER_DECODE_PATHS


def _lib() -> ctypes.CDLL:
    built = runner.native_library()
    if built is None:
        raise RuntimeError("compact weights need the C++ cpu kernels, which are not available")
    return built.lib


def _base(weights: torch.Tensor, lib: ctypes.CDLL, threads: int) -> int | None:
    """The matrix's exponent base, or None when more than MAX_EXCEPTION_SHARE of its values would be
    exceptions."""
    rows, k = weights.shape
    if weights.dtype != torch.bfloat16 or not compactable((rows, k)) or weights.stride(1) != 1:
        raise ValueError(f"compact weights need a bf16 [rows, K % 32 == 0] matrix, got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    histogram = torch.zeros(256, dtype=torch.int64)
    lib.scheinfer_exponent_histogram(weights.data_ptr(), rows, k, weights.stride(0), histogram.data_ptr(), threads)
    base = choose_base(histogram)
    exceptions = rows * k - int(histogram[base : base + NUM_EXPONENTS].sum())
    return base if exceptions <= MAX_EXCEPTION_SHARE * rows * k else None


def _encode(weights: torch.Tensor, base: int, low: torch.Tensor, codes: torch.Tensor, lib: ctypes.CDLL,
            threads: int) -> CompactMatrix:
    rows, k = weights.shape
    counts = torch.empty(rows, dtype=torch.int32)
    lib.scheinfer_pack_exponents(weights.data_ptr(), rows, k, weights.stride(0), base, low.data_ptr(),
                                 codes.data_ptr(), counts.data_ptr(), threads)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0)
    total = int(row_ptr[-1])
    cols, values = torch.empty(total, dtype=torch.int32), torch.empty(total, dtype=torch.int16)
    if total:
        lib.scheinfer_pack_exceptions(weights.data_ptr(), rows, k, weights.stride(0), base, row_ptr.data_ptr(),
                                      cols.data_ptr(), values.data_ptr(), threads)
    return CompactMatrix(low, codes, base, row_ptr, cols, values)


def compact_matrix(weights: torch.Tensor, low: torch.Tensor, codes: torch.Tensor,
                   threads: int | None = None) -> CompactMatrix | None:
    """Encodes a bf16 matrix [rows, K] (rows may be strided) into `low` [rows, K] and `codes`
    [rows, K / 2] (contiguous uint8, not overlapping `weights`); None, with nothing written, when
    more than MAX_EXCEPTION_SHARE of its values would be exceptions."""
    lib, threads = _lib(), threads or default_num_threads()
    base = _base(weights, lib, threads)
    return None if base is None else _encode(weights, base, low, codes, lib, threads)


def compact_piece(gate_up: torch.Tensor, down: torch.Tensor, region: torch.Tensor,
                  threads: int | None = None) -> CompactPiece | None:
    """Encodes a piece (gate_up [2n, hidden], down [hidden, n], bf16) into `region` (uint8, at least
    max_region_bytes(values) long; it may be the memory the bf16 weights occupy: they are copied out
    first). None, with nothing written, when a matrix cannot be stored compact."""
    two_n, hidden = gate_up.shape
    n = two_n // 2
    values = gate_up.numel() + down.numel()
    if not (compactable((two_n, hidden)) and compactable((hidden, n))):
        return None
    if region.dtype != torch.uint8 or region.numel() < max_region_bytes(values):
        raise ValueError(f"region of {region.numel()} bytes is too small for {max_region_bytes(values)}")
    lib, threads = _lib(), threads or default_num_threads()
    bases = (_base(gate_up, lib, threads), _base(down, lib, threads))
    if None in bases:
        return None
    source = torch.cat((gate_up.reshape(-1), down.reshape(-1)))  # a copy: region may alias the weights
    source_gu, source_down = source[: gate_up.numel()].view(two_n, hidden), source[gate_up.numel():].view(hidden, n)
    gu_low, dn_low, gu_codes, dn_codes = region_views(region, hidden, n)
    gu = _encode(source_gu, bases[0], gu_low, gu_codes, lib, threads)  # type: ignore[arg-type]
    dn = _encode(source_down, bases[1], dn_low, dn_codes, lib, threads)  # type: ignore[arg-type]
    num_exceptions = gu.num_exceptions + dn.num_exceptions
    index, bits = exception_views(region, values, num_exceptions)
    gu_index, gu_bits = gu.flat_exceptions()
    dn_index, dn_bits = dn.flat_exceptions()
    index.copy_(torch.cat((gu_index, dn_index + gate_up.numel())))
    bits.copy_(torch.cat((gu_bits, dn_bits)))
    return CompactPiece(region[: region_bytes(values, num_exceptions)], gu, dn)


def unpack_rows(matrix: CompactMatrix, r0: int, r1: int, threads: int = 1,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [r0, r1) decoded by the kernels' decoder (bf16 [r1 - r0, K]), on `threads` threads;
    into `out` (contiguous bf16 of that shape) when given."""
    _, k = matrix.shape
    if out is None:
        out = torch.empty(r1 - r0, k, dtype=torch.bfloat16)
    elif out.shape != (r1 - r0, k) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous bf16 {(r1 - r0, k)}, got {out.dtype} {tuple(out.shape)}")
    _lib().scheinfer_unpack_rows(matrix.low.data_ptr(), matrix.low.stride(0), matrix.codes.data_ptr(), matrix.base,
                                 matrix.exc_row_ptr.data_ptr(), matrix.exc_cols.data_ptr(),
                                 matrix.exc_values.data_ptr(), k, r0, r1, out.data_ptr(), threads)
    return out
