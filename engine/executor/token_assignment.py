"""Token assignment: for one layer's step, where each host piece's routed tokens are computed.

A host piece (CG or CC) lives in page-locked memory, so for any step it can be computed on the
CPU (its tokens' activations travel) or on the GPU (its weights travel). Rules:
    fixed     the plan's kinds (CG streamed, CC on the CPU)
    fiddler   per piece: the CPU when its work there is shorter than streaming it, else stream; no
              overlap (as the cost model's `fiddler` mode)
    balance   the plan's kinds, then pieces move between CPU and PCIe while that shortens the
              slower of the two: prefill (many tokens) with the profile's rates, where it leans to
              streaming, since CPU time grows with tokens and transfer time does not; decode (few
              tokens per piece) by the shift that earlier decode layers' measured imbalance set
              (DecodeFeedback), so that both sides finish together on the machine as it runs

Decode splits are uniform across a layer's experts (`mean_streamed` given): every routed item
streams the same count of host pieces, its first ones in row order, whatever the plan's kinds of
that expert, so that each routing of a layer streams one total. A plan gives a layer's experts
whole host chunks of CG (e.g. Phi-3.5-MoE 24 GiB: 1 or 2 of 1024 rows, alternating), and by the
plan's kinds a top-2 routing streamed 2, 3 or 4 pieces: a spread of two pieces' effect (~1.6 ms)
between routings that no shared shift can balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.executor.decode_feedback import DecodeFeedback
from engine.model.ffn import FFNUnit, UnitSlice
from engine.placement.plan import PieceKind

Placed = list[tuple[int, UnitSlice]]  # (work item index, piece)


@dataclass(frozen=True)
class DispatchRates:
    """Rates of the machine (defaults: DESIGN.md's GPU machine; the profiler supplies measured ones)."""

    cpu_bytes_s: float = 67e9  # CPU reading weights (decode, bandwidth-bound)
    cpu_flops: float = 2.1e12  # CPU bf16 GEMM (prefill, compute-bound)
    pcie_bytes_s: float = 54.6e9  # pinned host->device
    cpu_job_overhead_s: float = 20e-6
    # the driving thread's work for one streamed piece in prefill (its copy, decode and eager
    # partial: ~0.2 ms on the H100 machine, session 13), a floor under the piece's streaming time
    # in prefill's balance; 0: not counted (the default until measured end to end)
    stream_host_s: float = 0.0

    def cpu_s(self, piece: UnitSlice, num_tokens: int) -> float:
        return self.cpu_job_overhead_s + self.cpu_work_s(piece, num_tokens)

    def cpu_work_s(self, piece: UnitSlice, num_tokens: int) -> float:
        """The piece's CPU time within a job (the job's own overhead is paid once per layer)."""
        params = piece.gate_up.numel() + piece.down.numel()
        return max(piece.num_bytes / self.cpu_bytes_s, 2 * num_tokens * params / self.cpu_flops)

    def stream_s(self, piece: UnitSlice) -> float:
        return piece.num_bytes / self.pcie_bytes_s

    def prefill_stream_s(self, piece: UnitSlice) -> float:
        """A piece's streaming time in prefill: its transfer, or the driving thread's work for it
        when that is longer (many small pieces: the thread, not PCIe, bounds the stream)."""
        return max(self.stream_s(piece), self.stream_host_s)

    @property
    def max_bandwidth_bound_tokens(self) -> int:
        """Up to this many tokens per piece the CPU is limited by memory, not arithmetic (bf16)."""
        return int(self.cpu_flops / self.cpu_bytes_s)


@dataclass
class Assignment:
    on_gpu: Placed
    streamed: Placed
    on_cpu: Placed


def _lists(out: Assignment) -> dict:
    # PieceKind is a StrEnum: its members look up by the pieces' kind strings (no kind: resident)
    return {PieceKind.GG: out.on_gpu, PieceKind.CG: out.streamed, PieceKind.CC: out.on_cpu, None: out.on_gpu}


def _by_plan(items: list[tuple[FFNUnit, torch.Tensor]]) -> Assignment:
    out = Assignment([], [], [])
    lists = _lists(out)
    for i, (unit, _) in enumerate(items):
        for piece in unit.slices:
            lists[piece.kind].append((i, piece))
    return out


def assign(rule: str | None, items: list[tuple[FFNUnit, torch.Tensor]], rates: DispatchRates,
           feedback: DecodeFeedback | None = None, mean_streamed: float | None = None) -> Assignment:
    """`mean_streamed`: the layer's streamed pieces per unit under the plan, for uniform decode
    splits (None: decode moves the feedback's shift from the plan's kinds)."""
    out = _by_plan(items)
    if rule is None:
        return out
    tokens = [x.shape[0] for _, x in items]
    host = out.streamed + out.on_cpu
    if rule == "fiddler":
        out.on_cpu = [(i, p) for i, p in host if rates.cpu_work_s(p, tokens[i]) <= rates.stream_s(p)]
        cpu_ids = {id(p) for _, p in out.on_cpu}
        out.streamed = [(i, p) for i, p in host if id(p) not in cpu_ids]
        return out
    if rule == "balance":
        if max(tokens, default=0) > rates.max_bandwidth_bound_tokens:
            _balance(out, {id(p): rates.cpu_s(p, tokens[i]) for i, p in host},
                     {id(p): rates.prefill_stream_s(p) for _, p in host})
        elif feedback is not None and (feedback.shift or mean_streamed is not None):
            out = Assignment([], [], [])
            for i, (unit, _) in enumerate(items):
                split = decode_split(unit, i, len(items), feedback.shift, mean_streamed)
                out.on_gpu += split.on_gpu
                out.streamed += split.streamed
                out.on_cpu += split.on_cpu
        return out
    raise ValueError(f"unknown token-assignment rule {rule!r}")


def shift_share(shift: int, position: int, num_items: int) -> int:
    """How many of a layer's `shift` moved pieces item `position` of `num_items` moves: an equal
    share, the remainder taken by the last items."""
    moved = abs(shift)
    return moved // num_items + (1 if position >= num_items - moved % num_items else 0)


def mean_streamed_pieces(units: list[FFNUnit]) -> float:
    """The plan's streamed (CG) pieces per unit, averaged over a layer's units (its experts)."""
    return sum(sum(piece.kind == PieceKind.CG for piece in unit.slices) for unit in units) / max(len(units), 1)


def layer_streamed(mean_streamed: float, num_items: int, shift: int) -> int:
    """A uniform decode layer's streamed pieces: the plan's mean for `num_items` units, less `shift`."""
    return max(0, round(mean_streamed * num_items) - shift)


def decode_split(unit: FFNUnit, position: int, num_items: int, shift: int,
                 mean_streamed: float | None = None) -> Assignment:
    """What `balance` gives one decode item (index `position` of `num_items`) under the feedback's
    `shift`. With `mean_streamed` (uniform): the item's share of the layer's streamed pieces
    (`layer_streamed`) are its first host pieces in row order, the rest go to the CPU. Without: the
    plan's kinds, then its share of the shift moved from PCIe to the CPU (negative: the other way),
    its last pieces first. Either depends on the item alone, so a CPU job can be prepared for
    every expert a position may route to before the routing is known."""
    out = Assignment([], [], [])
    lists = _lists(out)
    if mean_streamed is not None:
        streamed = shift_share(layer_streamed(mean_streamed, num_items, shift), position, num_items)
        for piece in unit.slices:
            if piece.kind in (PieceKind.CG, PieceKind.CC):
                (out.streamed if len(out.streamed) < streamed else out.on_cpu).append((position, piece))
            else:
                out.on_gpu.append((position, piece))
        return out
    for piece in unit.slices:
        lists[piece.kind].append((position, piece))
    source, target = (out.streamed, out.on_cpu) if shift > 0 else (out.on_cpu, out.streamed)
    take = min(shift_share(shift, position, num_items), len(source))
    if take:
        target.extend(reversed(source[len(source) - take :]))
        del source[len(source) - take :]
    return out


def _balance(out: Assignment, cpu: dict[int, float], pcie: dict[int, float]) -> None:
    """Moves pieces from the busier of CPU and PCIe to the other while the slower one gets faster.
    `cpu`, `pcie`: each host piece's seconds on either side (by id). Pieces whose CPU time is
    largest relative to their transfer time leave the CPU first."""
    cpu_total = sum(cpu[id(p)] for _, p in out.on_cpu)
    pcie_total = sum(pcie[id(p)] for _, p in out.streamed)
    out.on_cpu.sort(key=lambda t: cpu[id(t[1])] / pcie[id(t[1])])  # most CPU-costly last
    out.streamed.sort(key=lambda t: cpu[id(t[1])] / pcie[id(t[1])], reverse=True)  # cheapest on CPU last
    while True:
        if cpu_total > pcie_total and out.on_cpu:
            key = id(out.on_cpu[-1][1])
            if max(cpu_total - cpu[key], pcie_total + pcie[key]) >= cpu_total:
                return
            cpu_total, pcie_total = cpu_total - cpu[key], pcie_total + pcie[key]
            out.streamed.append(out.on_cpu.pop())
        elif pcie_total > cpu_total and out.streamed:
            key = id(out.streamed[-1][1])
            if max(cpu_total + cpu[key], pcie_total - pcie[key]) >= pcie_total:
                return
            cpu_total, pcie_total = cpu_total + cpu[key], pcie_total - pcie[key]
            out.on_cpu.append(out.streamed.pop())
        else:
            return
