"""Compact bf16 weights: 12 bits a value instead of 16, lossless (every value decodes to its bits).

A bf16 value is a sign, an 8-bit exponent and a 7-bit mantissa. A weight matrix uses few exponents,
so each value keeps one low byte (sign << 7 | mantissa) and a 4-bit code for its exponent among 15
consecutive ones [base, base + 15). Values outside them (zeros, subnormals, the rare very large or
very small value) take code 15 and are listed aside with their exact bits: the exceptions.

Host pieces (CG and CC) are read from host DRAM at every decoded token, by the CPU kernels and by
the PCIe copies, and that shared DRAM bounds decode (docs/PLANNER.md). Stored compact they move a
quarter fewer bytes; the CPU kernels decode each work item's rows into cache before reading them
(csrc/compact.cpp) and the GPU decodes a streamed piece in its staging slot (engine/executor/
gpu_unpack.py). Both give back the exact bf16 weights, so results do not change.

Layout of a matrix [rows, K] (K a multiple of 32): low [rows, K] uint8; codes [rows, K / 2] uint8,
where byte j of each 16-byte group g holds the code of value 32 g + j (low nibble) and of value
32 g + 16 + j (high nibble), so 16 bytes give the codes of one 32-value vector. Since K is a
multiple of 32, the same rule holds on the flat index of a whole row-major matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ESCAPE = 15  # the code of an exception
NUM_EXPONENTS = 15  # exponents a matrix codes directly
VECTOR = 32  # values whose codes share one 16-byte group
MAX_EXCEPTION_SHARE = 0.01  # a matrix with more exceptions than this stays bf16
EXCEPTION_BYTES = 6  # an exception in a piece's region: int32 flat index, int16 bits
# What the planner expects a compact piece to move per bf16 byte (12 of 16 bits, and exceptions:
# about 1e-4 of random-normal values, each 6 bytes); the pieces report their exact bytes.
COMPACT_BYTES_RATIO = 0.7505


@dataclass(frozen=True)
class CompactMatrix:
    """One matrix [rows, K] stored compact. exc_*: CSR by row, columns in increasing order."""

    low: torch.Tensor  # uint8 [rows, K]
    codes: torch.Tensor  # uint8 [rows, K // 2]
    base: int
    exc_row_ptr: torch.Tensor  # int32 [rows + 1]
    exc_cols: torch.Tensor  # int32 [E]
    exc_values: torch.Tensor  # int16 [E]: the bf16 bits

    @property
    def shape(self) -> tuple[int, int]:
        return (self.low.shape[0], self.low.shape[1])

    @property
    def num_exceptions(self) -> int:
        return self.exc_cols.numel()

    def flat_exceptions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat index int64, bf16 bits int16) of the exceptions in the row-major matrix."""
        rows = torch.repeat_interleave(torch.arange(self.shape[0], dtype=torch.int64),
                                       (self.exc_row_ptr[1:] - self.exc_row_ptr[:-1]).to(torch.int64))
        return rows * self.shape[1] + self.exc_cols.to(torch.int64), self.exc_values


def compactable(shape: tuple[int, ...]) -> bool:
    """True when a matrix of this shape can be stored compact (rows of whole 32-value vectors)."""
    return len(shape) == 2 and shape[1] > 0 and shape[1] % VECTOR == 0


def exponent_histogram(weights: torch.Tensor) -> torch.Tensor:
    """int64 [256]: how many values of a bf16 tensor have each exponent."""
    bits = weights.reshape(-1).view(torch.int16).to(torch.int32)
    return torch.bincount((bits >> 7) & 0xFF, minlength=256)


def choose_base(histogram: torch.Tensor) -> int:
    """The first of the 15 consecutive exponents (>= 1: exponent 0 is zero or subnormal, always an
    exception) that hold the most values."""
    counts = histogram.to(torch.int64).clone()
    counts[0] = 0
    windows = counts.unfold(0, NUM_EXPONENTS, 1).sum(dim=1)  # windows[b]: exponents [b, b + 15)
    windows[0] = -1
    return int(torch.argmax(windows))


def compact_reference(weights: torch.Tensor, base: int | None = None) -> CompactMatrix:
    """Encodes a bf16 matrix [rows, K] with torch operations (tests; the engine uses the C++ encoder,
    engine/cpu_kernels/compact.py, which writes the same bytes)."""
    if weights.dtype != torch.bfloat16 or not compactable(tuple(weights.shape)):
        raise ValueError(f"compact weights need a bf16 matrix with K % {VECTOR} == 0, got "
                         f"{weights.dtype} {tuple(weights.shape)}")
    if base is None:
        base = choose_base(exponent_histogram(weights))
    rows, k = weights.shape
    bits = weights.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    exponent = (bits >> 7) & 0xFF
    code = exponent - base
    escape = (code < 0) | (code >= NUM_EXPONENTS)
    code = torch.where(escape, torch.full_like(code, ESCAPE), code)
    low = torch.where(escape, torch.zeros_like(bits), ((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8)
    grouped = code.view(rows, k // VECTOR, 2, VECTOR // 2)
    codes = (grouped[:, :, 0, :] | (grouped[:, :, 1, :] << 4)).to(torch.uint8).reshape(rows, k // 2)
    row_ids, cols = torch.nonzero(escape, as_tuple=True)
    counts = torch.bincount(row_ids, minlength=rows)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0)
    values = weights.contiguous().view(torch.int16)[row_ids, cols]
    return CompactMatrix(low, codes, base, row_ptr, cols.to(torch.int32), values.contiguous())


def decode_flat(low: torch.Tensor, codes: torch.Tensor, base: torch.Tensor | int) -> torch.Tensor:
    """bf16 values of flat compact bytes (exceptions come out as +0): low uint8 [n], codes uint8
    [n / 2]; `base` an int or an int32 tensor [n] (several matrices one after the other)."""
    n = low.numel()
    code_bytes = codes.view(-1, 1, VECTOR // 2).to(torch.int32)
    code = torch.cat((code_bytes & 0xF, code_bytes >> 4), dim=1).reshape(n)
    lo = low.to(torch.int32)
    value = ((lo & 0x80) << 8) | ((code + base) << 7) | (lo & 0x7F)
    value = torch.where(code == ESCAPE, torch.zeros_like(value), value)
    return value.to(torch.int16).view(torch.bfloat16)  # int32 -> int16 keeps the low 16 bits


def decompact_reference(matrix: CompactMatrix) -> torch.Tensor:
    """The bf16 matrix back, bit for bit."""
    rows, k = matrix.shape
    out = decode_flat(matrix.low.reshape(-1), matrix.codes.reshape(-1), matrix.base).clone()
    index, values = matrix.flat_exceptions()
    out.view(torch.int16)[index.to(out.device)] = values.to(out.device)
    return out.view(rows, k)


@dataclass
class CompactPiece:
    """A host piece's gate_up [2n, hidden] and down [hidden, n], compact, in one flat uint8 region
    that one copy streams: [gate_up low | down low | gate_up codes | down codes | exception flat
    indices int32 [E] | exception bf16 bits int16 [E]], the flat indices into [gate_up | down] (the
    GPU decoder patches them in; the CPU decoder reads each matrix's CSR lists)."""

    region: torch.Tensor  # uint8 [region_bytes(values) + 6 E]
    gate_up: CompactMatrix
    down: CompactMatrix

    @property
    def num_values(self) -> int:
        return self.gate_up.low.numel() + self.down.low.numel()

    @property
    def num_exceptions(self) -> int:
        return self.gate_up.num_exceptions + self.down.num_exceptions

    @property
    def num_bytes(self) -> int:
        """Bytes read from host memory to use the piece."""
        return self.region.numel()

    def decompact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as bf16 tensors (torch operations: fallbacks and tests)."""
        return decompact_reference(self.gate_up), decompact_reference(self.down)


def region_bytes(num_values: int, num_exceptions: int = 0) -> int:
    """Bytes of a compact piece's region."""
    return num_values * 3 // 2 + EXCEPTION_BYTES * num_exceptions


def max_region_bytes(num_values: int) -> int:
    """The largest region a piece of this many values can have (MAX_EXCEPTION_SHARE exceptions)."""
    return region_bytes(num_values, int(MAX_EXCEPTION_SHARE * num_values))


def region_views(region: torch.Tensor, hidden: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """(gate_up low [2n, hidden], down low [hidden, n], gate_up codes [2n, hidden / 2], down codes
    [hidden, n / 2]) as views of a piece's region."""
    gu, dn = 2 * n * hidden, hidden * n
    return (region[:gu].view(2 * n, hidden), region[gu : gu + dn].view(hidden, n),
            region[gu + dn : gu + dn + gu // 2].view(2 * n, hidden // 2),
            region[gu + dn + gu // 2 : gu + dn + (gu + dn) // 2].view(hidden, n // 2))


def exception_views(region: torch.Tensor, num_values: int, num_exceptions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices int32 [E], bf16 bits int16 [E]) as views of a piece's region (CPU or GPU copy)."""
    at = num_values * 3 // 2  # a multiple of 48: int32-aligned
    index = region[at : at + 4 * num_exceptions].view(torch.int32)
    values = region[at + 4 * num_exceptions : at + EXCEPTION_BYTES * num_exceptions].view(torch.int16)
    return index, values
