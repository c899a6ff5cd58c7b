"""Full-size random weights built in memory: fast, deterministic, no checkpoint.

Drawing 47 billion random numbers one by one takes minutes; instead one bank of normal samples
is drawn once, and every tensor is filled from the bank starting at an offset derived from its
name, scaled for its fan-in. Each fill is a few multithreaded torch ops at memory speed. Tensors
longer than the bank wrap around it. Same seed and config give the same weights, however the
model is cut into pieces.
"""

from __future__ import annotations

import math
import zlib

import torch
from tqdm import tqdm

from engine.model.weights import Init, TensorFill

BANK_NUM_VALUES = 1 << 24  # 64 MiB of fp32: larger than L3, small next to one expert


def _bank(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BANK_NUM_VALUES, generator=generator, dtype=torch.float32)


def _fill_region(out: torch.Tensor, bank: torch.Tensor, offset: int, scale: float,
                 num_cols: int, region: tuple[int, int, int, int]) -> None:
    """Fills `out` ([row_end - row_start, col_end - col_start]) with the region of a virtual
    [*, num_cols] tensor whose element (i, j) is bank[(offset + i * num_cols + j) % len(bank)].

    The same element gets the same value whatever slice of the tensor is being filled, so a
    model cut into pieces holds exactly the weights of the uncut model.
    """
    row_start, row_end, col_start, col_end = region
    bank_len = bank.numel()
    i = row_start
    while i < row_end:
        base = (offset + i * num_cols) % bank_len
        dst = out[i - row_start :]
        if base + col_end <= bank_len:  # rows [i, i + num_rows) do not wrap around the bank
            num_rows = min(row_end - i, (bank_len - base - col_end) // num_cols + 1)
            src = bank.as_strided((num_rows, col_end - col_start), (num_cols, 1), base + col_start)
            torch.mul(src, scale, out=dst[:num_rows])
            i += num_rows
        else:  # this one row wraps
            index = (base + torch.arange(col_start, col_end, device=bank.device)) % bank_len
            torch.mul(bank[index], scale, out=dst[0])
            i += 1


def fill_random(fills: list[TensorFill], seed: int = 0, show_progress: bool = True) -> None:
    fp32_bank = _bank(seed)
    banks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # one copy per destination: same-dtype
    for fill in tqdm(fills, desc="random weights", unit="tensor", disable=not show_progress):
        with torch.no_grad():
            if fill.init is Init.ONES:
                fill.out.fill_(1.0)
                continue
            if fill.init is Init.MATRIX:
                scale = 1.0 / math.sqrt(fill.shape[-1])
            elif fill.init is Init.EMBEDDING:
                scale = 1.0
            else:
                scale = 0.02
            offset = zlib.crc32(f"{seed}:{fill.name}".encode()) % BANK_NUM_VALUES
            key = (fill.out.device, fill.out.dtype)  # mixed-dtype ops are ~10x slower than same-dtype
            if key not in banks:
                banks[key] = fp32_bank.to(device=key[0], dtype=key[1])
            num_cols = fill.shape[-1]
            region = fill.region or (0, fill.out.numel() // num_cols, 0, num_cols)
            out = fill.out.view(region[1] - region[0], region[3] - region[2])
            _fill_region(out, banks[key], offset, scale, num_cols, region)
