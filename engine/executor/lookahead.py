"""Expert look-ahead: which streamed pieces of the next layer to copy before its routing is known.

A decode layer's copies end before its CPU job and its GPU work do, and the next layer's copies
cannot start before its routing is read: the copy stream idles across every layer boundary. A
guess of the next layer's experts (MoEBlock.likely_experts: the next router applied to the
residual stream one FFN and one attention early, computed in the decode graph with the routing)
lets the executor copy the first streamed pieces of those experts into free staging slots in
that idle time. A right guess is a copy the next layer no longer waits for (the decode feedback
then moves pieces from the CPU to PCIe); a wrong one costs a copy on an idle bus. Results never
depend on it: a prefetched slot holds the same bytes the layer would have copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.model.ffn import UnitSlice
from engine.model.moe import MoEBlock
from engine.placement.plan import PieceKind

# pieces copied ahead per layer; 0 (off) by default: on the H100 machine (session 10) it did not
# pay. Copied before the CPU job finished they took host DRAM from it (Phi-3.5-MoE 24 GiB decode
# 15.4 -> 12.3 tok/s); copied after it, 2 pieces a layer measured 12.95 / 13.81 vs 13.85 / 13.53
# off (hit rate 72-90%), Mixtral 6.97 / 7.99 vs 7.17 / 7.88: within noise
# (benchmarks/results/2026-11-24_s10_lookahead_*). Then the executor had to wait for the CPU job
# (no stream signal, no routed jobs). Since session 15 the guesses are enqueued behind a wait of the
# copy stream for the job's signal, with routed jobs and signals on: the copies fill the chain
# between two layers' CPU jobs (~0.25 ms of idle PCIe a Phi layer). Session 16 measured that with
# 1 piece a layer (hit rate 84-89%): 15.65 / 15.17 vs 18.56 / 17.32 tok/s off, because a layer with
# pieces copied ahead then had no copies from the gate (its other pieces waited for the driving
# thread); since then the gate's copy plan skips the pieces staged ahead (gate_copies.py). With that
# and the CPU rows read in place (host_rows.py): 16.47 / 16.53 vs 16.91 / 16.61 off, no gain.
LOOKAHEAD_PIECES = 0


@dataclass
class LookaheadStats:
    """Counts since the last reset: pieces copied ahead on a guess, and those the next layer used."""

    staged: int = 0
    used: int = 0

    def summary(self) -> dict[str, float | int]:
        return {"staged": self.staged, "used": self.used,
                "hit_rate": self.used / self.staged if self.staged else 0.0}

    def reset(self) -> None:
        self.staged = self.used = 0


def likely_pieces(ffn: MoEBlock, experts: list[int], limit: int) -> list[UnitSlice]:
    """Up to `limit` streamed (CG) pieces of the likely `experts` (most likely first): each expert's
    first CG piece in turn, then their second ones... The decode feedback moves an expert's last
    streamed pieces to the CPU first, so its first ones are the likeliest to be streamed."""
    per_expert = [[p for p in ffn.experts[e].slices if p.kind == PieceKind.CG]
                  for e in experts if 0 <= e < len(ffn.experts)]
    out: list[UnitSlice] = []
    rank = 0
    while len(out) < limit and any(rank < len(pieces) for pieces in per_expert):
        out.extend(pieces[rank] for pieces in per_expert if rank < len(pieces))
        rank += 1
    return out[:limit]
