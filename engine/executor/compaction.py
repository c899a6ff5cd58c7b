"""Stores the loaded model's host pieces (CG and CC) compact, each in the memory its bf16 weights held.

Runs once after loading: every host piece whose shapes allow it (engine/model/compact_weights.py)
is encoded by the C++ encoder into the start of its own page-locked storage, so no memory is
allocated twice and streaming stays at pinned speed. Host RAM does not shrink; the bytes the CPU
and the PCIe copies read at every token do (12 bits a value instead of 16).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.model.compact_weights import max_region_bytes
from engine.model.decoder import DecoderModel
from engine.model.ffn import FFNUnit, UnitSlice
from engine.model.moe import MoEBlock
from engine.placement.plan import PieceKind

logger = logging.getLogger(__name__)
HOST_KINDS = (PieceKind.CG, PieceKind.CC)


@dataclass(frozen=True)
class CompactionReport:
    pieces: int  # host pieces stored compact
    kept_bf16: int  # host pieces left bf16 (shapes, dtype or exceptions did not allow it)
    bf16_bytes: int  # the compact pieces' bytes as bf16
    compact_bytes: int  # and as stored
    exceptions: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.compact_bytes / self.bf16_bytes if self.bf16_bytes else 1.0

    def describe(self) -> str:
        return (f"{self.pieces} host pieces compact ({self.bf16_bytes / 2**30:.2f} -> {self.compact_bytes / 2**30:.2f} "
                f"GiB read per pass, {self.ratio:.3f}; {self.exceptions} exceptions), {self.kept_bf16} kept bf16, "
                f"{self.seconds:.1f} s")


def host_pieces(model: DecoderModel) -> list[UnitSlice]:
    pieces = []
    for layer in model.layers:
        ffn = layer.ffn
        units = [ffn] if isinstance(ffn, FFNUnit) else []
        if isinstance(ffn, MoEBlock):
            units = list(ffn.experts) + ([ffn.shared_expert] if ffn.shared_expert is not None else [])
        pieces += [p for unit in units for p in unit.slices if p.kind in HOST_KINDS]
    return pieces


def compact_host_pieces(model: DecoderModel, show_progress: bool = False) -> CompactionReport:
    """Stores every host piece that allows it compact (needs the C++ cpu kernels)."""
    from engine.cpu_kernels.compact import compact_piece

    start = time.perf_counter()
    pieces = host_pieces(model)
    done = kept = bf16_bytes = compact_bytes = exceptions = 0
    iterator = pieces
    if show_progress:
        from tqdm import tqdm

        iterator = tqdm(pieces, desc="compact host weights", unit="piece")
    for piece in iterator:
        flat = piece.packed
        values = piece.gate_up.numel() + piece.down.numel()
        result = None
        if flat is not None and flat.dtype == torch.bfloat16 and flat.device.type == "cpu":
            region = flat.view(torch.uint8)
            if region.numel() >= max_region_bytes(values):
                result = compact_piece(piece.gate_up, piece.down, region)
        if result is None:
            kept += 1
            continue
        bf16_bytes += piece.num_bytes
        piece.store_compact(result)
        done += 1
        compact_bytes += result.num_bytes
        exceptions += result.num_exceptions
    report = CompactionReport(done, kept, bf16_bytes, compact_bytes, exceptions, time.perf_counter() - start)
    logger.info("compact host weights: %s", report.describe())
    return report
