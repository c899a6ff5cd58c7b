"""A layer's CPU outputs added into the GPU's sums straight from pinned host memory.

A decode layer's CPU job leaves its outputs (one fp32 row per CC piece) in pinned host memory.
The GPU used to copy them over (a host-to-device copy on the compute stream) and `index_add_`
them into the layer's sums: that copy goes through a copy engine, behind whatever the copy stream
moves at that moment. Expert look-ahead copies the next layer's pieces exactly then (lookahead.py),
and the small copy waited for a 25 MB one (session 16: the chain between two Phi layers grew by
~0.3 ms). Here one kernel reads the rows over PCIe itself (pinned memory is mapped into the GPU's
address space) and adds them, each sum's rows in their order, as `index_add_` does for up to 16
rows: the same bits (beyond 16, torch's kernel adds with atomics in no fixed order; this one's
order is still fixed).

Only on CUDA with Triton, for fp32 rows and sums; `applies` says when, and the executor keeps the
copy and `index_add_` elsewhere. Tests: tests/engine/executor/test_host_rows.py (GPU).
"""

from __future__ import annotations

import torch

from engine.executor.triton_launch import CachedLauncher

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK = 256  # columns a program adds
MAX_ROWS, MAX_SUMS = 32, 16  # a decode layer's few rows (every program looks at every row: not for prefill)


if triton is not None:
    @triton.jit
    def _add_rows_kernel(sums, dest, rows, num_rows, width, blocks, MAX_ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Program (target, block): sum `target`'s columns of the block plus its rows, in row order.
        The rows' loads do not wait for one another (unrolled, masked by their destination): one
        PCIe round trip, not one a row."""
        target = tl.program_id(0) // blocks
        columns = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < width
        total = tl.load(sums + target * width + columns, mask=inside)
        for row in tl.static_range(MAX_ROWS):
            mine = (tl.load(dest + row, mask=row < num_rows, other=-1) == target) & inside
            value = tl.load(rows + row * width + columns, mask=mine, other=0.0)
            total = tl.where(mine, total + value, total)
        tl.store(sums + target * width + columns, total, mask=inside)


_launch = CachedLauncher(_add_rows_kernel) if triton is not None else None


def applies(sums: torch.Tensor, dest: torch.Tensor | None, rows: torch.Tensor) -> bool:
    """Whether `add_host_rows` can add these (a GPU's fp32 sums, kept destinations on it, pinned rows)."""
    return (_launch is not None and sums.is_cuda and dest is not None and dest.is_cuda
            and dest.dtype == torch.int64 and sums.dtype == torch.float32 and rows.dtype == torch.float32
            and rows.is_pinned() and sums.is_contiguous() and rows.is_contiguous()
            and rows.shape[1:] == sums.shape[1:] and dest.shape[0] >= rows.shape[0]
            and rows.shape[0] <= MAX_ROWS and sums.shape[0] <= MAX_SUMS)


def add_host_rows(sums: torch.Tensor, dest: torch.Tensor, rows: torch.Tensor) -> None:
    """sums.index_add_(0, dest[:len(rows)], rows) on the current stream, reading `rows` where they
    are (pinned host memory). Enqueued: the caller orders it after the rows are written."""
    assert _launch is not None
    width = sums.shape[1]
    blocks = triton.cdiv(width, BLOCK)
    _launch(sums.shape[0] * blocks, sums, dest, rows, rows.shape[0], width, blocks, MAX_ROWS, BLOCK)
