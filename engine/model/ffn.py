"""FFN units: a dense MLP or one expert, evaluated as a sum over slices of its intermediate dim.

    unit(x) = down @ (act(gate @ x) * (up @ x))
            = sum over slices s of down[:, s] @ (act(gate[s] @ x) * (up[s] @ x))

A `UnitSlice` owns the weights of one contiguous range [start, end) of the intermediate
dimension, stored contiguously on one device. A unit is a list of slices covering [0, size);
the CPU/GPU partition splits units into slices of different kinds and places them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.model.compact_weights import CompactPiece

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class UnitSlice:
    """Weights of intermediate range [start, end) of one unit.

    gate_up: [2 * n, hidden] (gate rows then up rows), down: [hidden, n], n = end - start.
    """

    start: int
    end: int
    gate_up: torch.Tensor
    down: torch.Tensor
    kind: str | None = None  # "GG", "CG" or "CC" once partitioned (engine/placement/plan.py)
    # gate_up then down as one flat view when they are adjacent in one storage (one copy streams both)
    packed: torch.Tensor | None = field(default=None, repr=False)
    # host pieces stored compact (engine/model/compact_weights.py); gate_up and down are then meta
    # tensors that keep only the shapes
    compact: CompactPiece | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.packed is None:
            self.packed = adjacent_flat(self.gate_up, self.down)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def device(self) -> torch.device:
        return self.compact.region.device if self.compact is not None else self.gate_up.device

    @property
    def num_bytes(self) -> int:
        """Bytes read to use the piece (its compact region when compact)."""
        return self.compact.num_bytes if self.compact is not None else self.gate_up.nbytes + self.down.nbytes

    def store_compact(self, compact: CompactPiece) -> None:
        """The piece is stored compact from now on (its bf16 memory was overwritten)."""
        self.compact = compact
        self.gate_up = torch.empty(self.gate_up.shape, dtype=self.gate_up.dtype, device="meta")
        self.down = torch.empty(self.down.shape, dtype=self.down.dtype, device="meta")
        self.packed = None

    def partial(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x: [num_tokens, hidden] on this slice's device -> partial output [num_tokens, hidden]."""
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(act(gate) * up, self.down)


def adjacent_flat(*tensors: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of the tensors one after the other when all are contiguous, of one dtype, and
    each starts where the previous one ends in the same storage; else None."""
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for tensor in tensors:
        if (not tensor.is_contiguous() or tensor.dtype != first.dtype
                or tensor.untyped_storage().data_ptr() != storage or tensor.storage_offset() != offset):
            return None
        offset += tensor.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,))


@dataclass
class FFNUnit:
    """A dense MLP or one expert: its slices cover [0, intermediate_size) without overlap."""

    intermediate_size: int
    slices: list[UnitSlice] = field(default_factory=list)

    def check_cover(self) -> None:
        position = 0
        for s in sorted(self.slices, key=lambda s: s.start):
            if s.start != position:
                raise ValueError(f"unit slices leave a gap or overlap at {position}")
            position = s.end
        if position != self.intermediate_size:
            raise ValueError(f"unit slices end at {position}, expected {self.intermediate_size}")

    def __call__(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Sum of every slice's partial output, computed where each slice lives."""
        out: torch.Tensor | None = None
        for s in self.slices:
            part = s.partial(x.to(s.device), act).to(x.device)
            out = part if out is None else out + part
        assert out is not None, "an FFN unit has at least one slice"
        return out
