"""Full-size random weights built in memory: fast, deterministic, no checkpoint.

Drawing 47 billion random numbers one by one takes minutes; instead one bank of normal samples
is drawn once, and every tensor is filled from the bank starting at an offset derived from its
name, scaled for its fan-in. Each fill is one multithreaded torch op at memory speed. Tensors
longer than the bank wrap around it. Same seed and config give the same weights.
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


def _fill_from_bank(out: torch.Tensor, bank: torch.Tensor, offset: int, scale: float) -> None:
    flat = out.view(-1) if out.is_contiguous() else None
    if flat is None:  # views of fused tensors are row blocks, hence contiguous; keep a safe path
        tmp = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
        _fill_from_bank(tmp, bank, offset, scale)
        out.copy_(tmp.view(out.shape))
        return
    position, n = 0, flat.numel()
    while position < n:
        start = (offset + position) % bank.numel()
        count = min(n - position, bank.numel() - start)
        torch.mul(bank[start : start + count], scale, out=flat[position : position + count])
        position += count


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
            _fill_from_bank(fill.out, banks[key], offset, scale)
