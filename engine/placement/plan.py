"""PartitionPlan: for every layer and FFN unit, which intermediate ranges are GG, CG or CC.

    GG: stored on the GPU, computed on the GPU
    CG: stored in pinned CPU memory, streamed over PCIe, computed on the GPU
    CC: stored in CPU memory, computed on the CPU (activations travel, weights don't)

A unit's split is three sizes laid out in that order: [0, gg) GG, [gg, gg+cg) CG, [gg+cg, size) CC.
Attention, norms, routers, embeddings and the KV cache always live on the GPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path


class PieceKind(StrEnum):
    GG = "GG"
    CG = "CG"
    CC = "CC"


UnitKey = tuple[int, int]  # (layer, unit): unit is the expert index, or DENSE_MLP / SHARED_EXPERT


@dataclass(frozen=True)
class UnitSplit:
    gg: int
    cg: int
    cc: int

    def __post_init__(self) -> None:
        if min(self.gg, self.cg, self.cc) < 0:
            raise ValueError(f"negative piece size in {self}")

    @property
    def size(self) -> int:
        return self.gg + self.cg + self.cc

    def kind_at(self, row: int) -> PieceKind:
        if row < self.gg:
            return PieceKind.GG
        return PieceKind.CG if row < self.gg + self.cg else PieceKind.CC

    def ranges(self, host_chunk: int | None = None) -> list[tuple[int, int, PieceKind]]:
        """(start, end, kind) of the non-empty pieces. Host rows (CG and CC) are cut into chunks of
        at most `host_chunk` rows, and never across the CG/CC boundary: streamed chunks pipeline
        through the staging ring, and a host chunk can change kind later without moving."""
        out: list[tuple[int, int, PieceKind]] = []
        if self.gg:
            out.append((0, self.gg, PieceKind.GG))
        for begin, end, kind in ((self.gg, self.gg + self.cg, PieceKind.CG), (self.gg + self.cg, self.size, PieceKind.CC)):
            chunk = host_chunk or (end - begin) or 1
            out += [(a, min(a + chunk, end), kind) for a in range(begin, end, chunk)]
        return out


@dataclass(frozen=True)
class PartitionPlan:
    """`splits` maps every FFN unit to its split; `dynamic` names a per-step rule that may move a
    host piece's tokens between CPU and GPU (e.g. "fiddler"); None: kinds are fixed."""

    policy: str
    splits: dict[UnitKey, UnitSplit] = field(default_factory=dict)
    dynamic: str | None = None
    host_chunk: int | None = None  # host (CG/CC) rows are cut into pieces of at most this many rows
    # host bytes read per bf16 byte of host pieces (engine/model/compact_weights.py: < 1 when stored compact)
    host_bytes_ratio: float = 1.0

    def split_of(self, layer: int, unit: int, size: int) -> UnitSplit:
        split = self.splits.get((layer, unit), UnitSplit(size, 0, 0))
        if split.size != size:
            raise ValueError(f"plan gives unit {(layer, unit)} size {split.size}, the model has {size}")
        return split

    def layout(self, layer: int, unit: int, size: int) -> list[tuple[int, int, str | None]]:
        """engine.model.weights.UnitLayout: the slices to build for this unit."""
        return [(a, b, str(k)) for a, b, k in self.split_of(layer, unit, size).ranges(self.host_chunk)]

    def rows_by_kind(self) -> dict[PieceKind, int]:
        totals = dict.fromkeys(PieceKind, 0)
        for split in self.splits.values():
            totals[PieceKind.GG] += split.gg
            totals[PieceKind.CG] += split.cg
            totals[PieceKind.CC] += split.cc
        return totals

    def to_json(self) -> str:
        units = [{"layer": k[0], "unit": k[1], **asdict(v)} for k, v in sorted(self.splits.items())]
        return json.dumps({"policy": self.policy, "dynamic": self.dynamic, "host_chunk": self.host_chunk,
                           "host_bytes_ratio": self.host_bytes_ratio, "units": units}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PartitionPlan:
        raw = json.loads(text)
        splits = {(u["layer"], u["unit"]): UnitSplit(u["gg"], u["cg"], u["cc"]) for u in raw["units"]}
        return cls(raw.get("policy", "manual"), splits, raw.get("dynamic"), raw.get("host_chunk"),
                   raw.get("host_bytes_ratio", 1.0))

    @classmethod
    def from_file(cls, path: str | Path) -> PartitionPlan:
        return cls.from_json(Path(path).read_text())
