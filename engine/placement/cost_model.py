"""Cost model: predicted time of one engine step over a partition, from a HardwareProfile.

Per layer, the FFN's three resources work at once, so

    layer_s = max(cpu_s, pcie_s, gpu_s) + num_syncs * profile.sync_s
    cpu_s   = CC bytes of the routed units x CPU seconds per byte at their token count
    pcie_s  = CG bytes / pinned bandwidth + one latency per streamed chunk
    gpu_s   = (GG + CG) bytes x GPU seconds per byte at their token count

and a step is the sum over layers plus the attention and LM-head weights read on the GPU.
Syncs per layer: one for MoE routing (the router's choice goes to the host), one to wait for the
CPU's partial sums when the layer has CPU work. Each term is an expectation over the routing:
an expert that a token picks with probability p is active in a step of T tokens with probability
1 - (1 - p)^T and then sees T p / (1 - (1 - p)^T) tokens (uniform routing p = top_k / num_experts,
or a measured popularity).

How host pieces are run, per step (`HostMode`):
    static   CG pieces streamed, CC pieces on the CPU, all at once (the plan's kinds)
    assign   per-step token assignment: each host piece goes to the CPU or is streamed so that
             CPU and PCIe/GPU finish together (a piece may be split between them)
    fiddler  per piece, the cheaper of CPU and streaming; CPU first, then GPU (no overlap)

Not modelled: attention over the KV cache (small next to the weights at these lengths), the
Python/launch overhead of the decoder outside the syncs, and contention between PCIe and CPU for
DRAM (measured to overlap fully on the GPU machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from engine.model.config import ModelConfig
from engine.placement.hardware import HardwareProfile, LinearTimeTable
from engine.placement.memory import bytes_per_row, ffn_units
from engine.placement.plan import PartitionPlan, PieceKind, UnitSplit


class HostMode(StrEnum):
    STATIC = "static"
    ASSIGN = "assign"
    FIDDLER = "fiddler"


@dataclass(frozen=True)
class WorkloadMix:
    """The work a plan is chosen for: requests of `prompt_len` prompt tokens and `new_tokens`
    generated tokens, `batch_size` sequences decoding at once.

    `expert_popularity`: per MoE layer (or one row for every layer), the share of routed
    (token, expert) pairs each expert receives (a row sums to 1); None: uniform routing.
    `token_assignment`: prefill host work is re-assigned per step between CPU and PCIe (the
    executor's token assignment); then the plan's CG/CC split only matters for decode.
    `prefill_chunk_tokens`: the scheduler's prefill chunk (None: a whole prompt in one step)."""

    prompt_len: int = 512
    new_tokens: int = 128
    batch_size: int = 1
    prefill_chunk_tokens: int | None = None
    expert_popularity: tuple[tuple[float, ...], ...] | None = None
    token_assignment: bool = True

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.new_tokens < 0 or self.batch_size < 1:
            raise ValueError(f"invalid workload {self}")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1")

    @property
    def prefill_token_fraction(self) -> float:
        """Share of the processed tokens that are prompt tokens."""
        return self.prompt_len / (self.prompt_len + self.new_tokens)


@dataclass(frozen=True)
class LayerTime:
    cpu_s: float
    pcie_s: float
    gpu_s: float
    sync_s: float
    serial_s: float = 0.0  # work that does not overlap (Fiddler's CPU phase)

    @property
    def total_s(self) -> float:
        return self.serial_s + max(self.cpu_s, self.pcie_s, self.gpu_s) + self.sync_s


@dataclass(frozen=True)
class _HostPiece:
    """Expected cost of one host piece in one step: on the CPU, or streamed and computed on the GPU."""

    cpu_s: float
    pcie_s: float
    gpu_s: float
    kind: PieceKind


class CostModel:
    """Predicts step times of plans for one model on one machine. Pure: no tensors, no clocks."""

    def __init__(self, config: ModelConfig, profile: HardwareProfile, itemsize: int = 2,
                 host_chunk_rows: int | None = 1024,
                 expert_popularity: tuple[tuple[float, ...], ...] | None = None) -> None:
        self.config = config
        self.profile = profile
        self.itemsize = itemsize
        self.host_chunk_rows = host_chunk_rows
        self.row_bytes = bytes_per_row(config, itemsize)
        self._popularity = _check_popularity(config, expert_popularity)
        # Without a GPU the engine's "device" is the CPU itself: copies at DRAM speed, CPU compute.
        self.cpu_table = profile.cpu_ffn
        self.gpu_table: LinearTimeTable = profile.gpu_ffn or profile.cpu_ffn
        self.pcie_bytes_s = profile.pcie_h2d_bytes_s or profile.dram_read_bytes_s
        self.pcie_latency_s = profile.pcie_latency_s or 0.0
        c, h = config, config.hidden_size
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.attention_bytes = ((q + 2 * kv) * h + h * q) * itemsize
        self.lm_head_bytes = c.vocab_size * h * itemsize
        self._rates: dict[tuple[int, int, float], tuple[float, float, float, float]] = {}
        self.units_by_layer: dict[int, list[tuple[int, int]]] = {}
        for layer, unit, size in ffn_units(config):
            self.units_by_layer.setdefault(layer, []).append((unit, size))

    # -- routing ---------------------------------------------------------------------------

    def token_probability(self, layer: int, unit: int) -> float:
        """Probability that one token is routed through `unit` of `layer` (1 for dense/shared)."""
        moe = self.config.moe
        if unit < 0 or moe is None:
            return 1.0
        if self._popularity is None:
            return moe.num_experts_per_tok / moe.num_experts
        row = self._popularity[0] if len(self._popularity) == 1 else self._popularity[layer]
        return min(1.0, row[unit] * moe.num_experts_per_tok)

    def activity(self, layer: int, unit: int, num_tokens: float) -> tuple[float, float]:
        """(probability the unit is used in a step of `num_tokens` tokens, its tokens when used)."""
        p = self.token_probability(layer, unit)
        if p >= 1.0:
            return 1.0, num_tokens
        active = 1.0 - (1.0 - p) ** num_tokens
        return active, (num_tokens * p / active if active > 0 else 0.0)

    def unit_rates(self, layer: int, unit: int, num_tokens: float) -> tuple[float, float, float, float]:
        """(probability of use, tokens when used, CPU and GPU seconds per byte at those tokens), cached."""
        key = (layer, unit, num_tokens)
        rates = self._rates.get(key)
        if rates is None:
            active, tokens = self.activity(layer, unit, num_tokens)
            rates = (active, tokens, self.cpu_table.s_per_byte_at(tokens), self.gpu_table.s_per_byte_at(tokens))
            self._rates[key] = rates
        return rates

    # -- one layer -------------------------------------------------------------------------

    def _host_pieces(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float,
                     overheads: bool = True) -> tuple[list[_HostPiece], float]:
        """Expected host pieces of a layer's units, and the expected GPU time of its GG rows."""
        pieces: list[_HostPiece] = []
        gg_s = 0.0
        latency = self.pcie_latency_s if overheads else 0.0
        for unit, split in splits:
            active, _, cpu_spb, gpu_spb = self.unit_rates(layer, unit, num_tokens)
            if active <= 0:
                continue
            gpu_spb = gpu_spb if overheads else 0.0
            gg_s += active * split.gg * self.row_bytes * gpu_spb
            for begin, end, kind in split.ranges(self.host_chunk_rows):
                if kind is PieceKind.GG:
                    continue
                num_bytes = (end - begin) * self.row_bytes
                pieces.append(_HostPiece(active * num_bytes * cpu_spb,
                                         active * (num_bytes / self.pcie_bytes_s + latency),
                                         active * num_bytes * gpu_spb, kind))
        return pieces, gg_s

    def _syncs_s(self, layer: int, cpu_work: bool) -> float:
        return self.profile.sync_s * (int(self.config.is_moe_layer(layer)) + int(cpu_work))

    def layer_time(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float,
                   mode: HostMode = HostMode.STATIC) -> LayerTime:
        """Expected time of one layer's FFN in a step of `num_tokens` tokens."""
        if mode is HostMode.STATIC:
            return self._static_layer_time(layer, splits, num_tokens)
        pieces, gg_s = self._host_pieces(layer, splits, num_tokens)
        if mode is HostMode.ASSIGN:
            cpu_s, pcie_s, gpu_s = balance(pieces, gg_s)
            return LayerTime(cpu_s, pcie_s, gpu_s, self._syncs_s(layer, cpu_s > 0))
        on_cpu = [p for p in pieces if p.cpu_s <= p.pcie_s]
        streamed = [p for p in pieces if p.cpu_s > p.pcie_s]
        return LayerTime(0.0, sum(p.pcie_s for p in streamed), gg_s + sum(p.gpu_s for p in streamed),
                         self._syncs_s(layer, bool(on_cpu)), serial_s=sum(p.cpu_s for p in on_cpu))

    def _static_layer_time(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float) -> LayerTime:
        """The plan's own kinds, without building pieces (the planner calls this many times)."""
        cpu_s = pcie_s = gpu_s = 0.0
        chunk = self.host_chunk_rows
        row_bytes = self.row_bytes
        for unit, split in splits:
            active, _, cpu_spb, gpu_spb = self.unit_rates(layer, unit, num_tokens)
            if active <= 0:
                continue
            num_cg_chunks = -(-split.cg // chunk) if chunk else int(split.cg > 0)
            cpu_s += active * split.cc * row_bytes * cpu_spb
            pcie_s += active * (split.cg * row_bytes / self.pcie_bytes_s + num_cg_chunks * self.pcie_latency_s)
            gpu_s += active * (split.gg + split.cg) * row_bytes * gpu_spb
        has_cc = any(split.cc for _, split in splits)
        return LayerTime(cpu_s, pcie_s, gpu_s, self._syncs_s(layer, has_cc))

    def layer_floor_s(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float,
                      decode: bool) -> float:
        """The bound no schedule beats: host bytes moved by CPU and PCIe at once, nothing else.
        Decode: the CPU reads at DRAM speed; prefill: at its measured rate at that token count."""
        if decode:
            host_bytes = sum(self.activity(layer, unit, num_tokens)[0] * (s.cg + s.cc) * self.row_bytes
                             for unit, s in splits)
            pcie = self.profile.pcie_h2d_bytes_s or 0.0
            return host_bytes / (self.profile.dram_read_bytes_s + pcie)
        pieces, _ = self._host_pieces(layer, splits, num_tokens, overheads=False)
        if self.profile.pcie_h2d_bytes_s is None:
            return sum(p.cpu_s for p in pieces)
        cpu_s, pcie_s, _ = balance(pieces, 0.0)
        return max(cpu_s, pcie_s)

    # -- whole steps -----------------------------------------------------------------------

    def layer_splits(self, plan: PartitionPlan) -> dict[int, list[tuple[int, UnitSplit]]]:
        return {layer: [(unit, plan.split_of(layer, unit, size)) for unit, size in units]
                for layer, units in self.units_by_layer.items()}

    def step_s(self, plan: PartitionPlan, num_tokens: int, num_seqs: int = 1,
               mode: HostMode = HostMode.STATIC) -> float:
        """Predicted time of one step of `num_tokens` tokens from `num_seqs` sequences."""
        per_layer = self.layer_splits(plan)
        ffn_s = sum(self.layer_time(layer, splits, num_tokens, mode).total_s for layer, splits in per_layer.items())
        return ffn_s + self.non_ffn_s(num_tokens, num_seqs)

    def non_ffn_s(self, num_tokens: int, num_seqs: int) -> float:
        """Attention projections of every layer and the LM head (sampled positions only)."""
        if self.profile.gpu_ffn is None:
            return 0.0
        attention = self.config.num_layers * self.attention_bytes * self.gpu_table.s_per_byte_at(num_tokens)
        return attention + self.lm_head_bytes * self.gpu_table.s_per_byte_at(num_seqs)

    def floor_step_s(self, plan: PartitionPlan, num_tokens: int, decode: bool) -> float:
        return sum(self.layer_floor_s(layer, splits, num_tokens, decode)
                   for layer, splits in self.layer_splits(plan).items())


def prefill_chunks(prompt_len: int, chunk_tokens: int | None) -> list[int]:
    """Token counts of the steps that prefill one prompt."""
    chunk = chunk_tokens or prompt_len
    return [min(chunk, prompt_len - start) for start in range(0, prompt_len, chunk)]


def balance(pieces: list[_HostPiece], gg_s: float) -> tuple[float, float, float]:
    """(cpu_s, pcie_s, gpu_s) when each piece's work goes to the CPU or is streamed, a piece
    possibly split, so that the CPU and the streaming side (PCIe, or GPU compute if slower)
    finish together. Pieces cheapest on the CPU relative to streaming go to the CPU first."""
    if not pieces:
        return 0.0, 0.0, gg_s
    order = sorted(pieces, key=lambda p: p.cpu_s / max(p.pcie_s, 1e-30))
    cpu, pcie, gpu = 0.0, sum(p.pcie_s for p in order), gg_s + sum(p.gpu_s for p in order)
    for piece in order:
        after = (cpu + piece.cpu_s, pcie - piece.pcie_s, gpu - piece.gpu_s)
        if after[0] >= max(after[1], after[2]):
            # the crossing is inside this piece: give the CPU the share `a` that evens the sides
            lo, hi = 0.0, 1.0
            for _ in range(40):
                a = (lo + hi) / 2
                if cpu + a * piece.cpu_s >= max(pcie - a * piece.pcie_s, gpu - a * piece.gpu_s):
                    hi = a
                else:
                    lo = a
            return cpu + hi * piece.cpu_s, pcie - hi * piece.pcie_s, gpu - hi * piece.gpu_s
        cpu, pcie, gpu = after
    return cpu, pcie, gpu


def _check_popularity(config: ModelConfig, popularity: tuple[tuple[float, ...], ...] | None):
    if popularity is None:
        return None
    moe = config.moe
    if moe is None:
        raise ValueError("expert popularity given for a model without experts")
    rows = [tuple(float(v) for v in row) for row in popularity]
    if len(rows) not in (1, config.num_layers) or any(len(r) != moe.num_experts for r in rows):
        raise ValueError(f"expert popularity must be 1 or {config.num_layers} rows of {moe.num_experts} shares")
    normalised = []
    for row in rows:
        total = sum(row)
        if total <= 0 or min(row) < 0:
            raise ValueError("expert popularity shares must be non-negative with a positive sum")
        normalised.append(tuple(v / total for v in row))
    return tuple(normalised)


@dataclass(frozen=True)
class Prediction:
    """Predicted speed of a plan on a profiled machine, next to the floor of that plan.

    Decode: `decode_step_s` per step of `batch_size` sequences; per token, `decode_s_per_token`.
    Prefill of one prompt (in steps of `prefill_chunk_tokens`): `prefill_s(prompt_len)`."""

    policy: str
    decode_step_s: float
    floor_decode_step_s: float
    batch_size: int
    mode: HostMode
    prefill_chunk_tokens: int | None
    model: CostModel = field(repr=False, compare=False)
    plan: PartitionPlan = field(repr=False, compare=False)

    @property
    def decode_s_per_token(self) -> float:
        return self.decode_step_s / self.batch_size

    @property
    def floor_decode_s(self) -> float:
        """Per token, like decode_s_per_token."""
        return self.floor_decode_step_s / self.batch_size

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.decode_s_per_token

    def prefill_s(self, prompt_len: int, mode: HostMode | None = None) -> float:
        """Seconds to prefill one prompt of `prompt_len` tokens (`mode`: how host pieces are run)."""
        mode = mode or self.mode
        return sum(self.model.step_s(self.plan, n, 1, mode)
                   for n in prefill_chunks(prompt_len, self.prefill_chunk_tokens))

    def floor_prefill_s(self, prompt_len: int) -> float:
        return sum(self.model.floor_step_s(self.plan, n, decode=False)
                   for n in prefill_chunks(prompt_len, self.prefill_chunk_tokens))

    def prefill_tok_s(self, prompt_len: int, mode: HostMode | None = None) -> float:
        return prompt_len / self.prefill_s(prompt_len, mode)

    def to_dict(self, prompt_lens: tuple[int, ...] = (512, 2048)) -> dict:
        """JSON-ready (for logs and GET /v1/engine/plan)."""
        return {
            "policy": self.policy, "host_mode": str(self.mode), "batch_size": self.batch_size,
            "decode_s_per_token": self.decode_s_per_token, "decode_tok_s": self.decode_tok_s,
            "floor_decode_s_per_token": self.floor_decode_s, "floor_decode_tok_s": 1.0 / self.floor_decode_s,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "prefill": [{"prompt_len": n, "prefill_s": self.prefill_s(n), "prefill_tok_s": self.prefill_tok_s(n),
                         "floor_prefill_s": self.floor_prefill_s(n),
                         "floor_prefill_tok_s": n / self.floor_prefill_s(n)} for n in prompt_lens],
        }


def host_mode_of(plan: PartitionPlan, token_assignment: bool | None = None) -> HostMode:
    """How the engine runs `plan`'s host pieces: a per-step token-assignment rule (any dynamic
    rule but Fiddler's), Fiddler's rule, or the plan's fixed kinds."""
    if plan.dynamic == "fiddler":
        return HostMode.FIDDLER
    if token_assignment is None:
        token_assignment = plan.dynamic is not None
    return HostMode.ASSIGN if token_assignment else HostMode.STATIC


def predict_plan(plan: PartitionPlan, config: ModelConfig, profile: HardwareProfile, itemsize: int = 2,
                 workload: WorkloadMix | None = None, token_assignment: bool | None = None) -> Prediction:
    """Predicted decode and prefill speed of `plan` (see `predict` for a PlanRequest)."""
    workload = workload or WorkloadMix()
    model = CostModel(config, profile, itemsize, plan.host_chunk, workload.expert_popularity)
    mode = host_mode_of(plan, token_assignment)
    batch = workload.batch_size
    return Prediction(plan.policy, model.step_s(plan, batch, batch, mode),
                      model.floor_step_s(plan, batch, decode=True), batch, mode,
                      workload.prefill_chunk_tokens, model, plan)
