"""Cost model: predicted time of one engine step over a partition, from a HardwareProfile.

Per layer, the FFN's three resources work at once, so

    layer_s = max(cpu_s || pcie_s, gpu_s, thread_s) + sync_s + overhead_s
    cpu_s   = CC bytes of the used units x CPU seconds per byte at their token count
              + one CPU job round trip (activations out, partial sums back); compact host rows
              count their bf16 bytes at the profile's compact rate, where it has one
    pcie_s  = CG bytes / pinned bandwidth + one latency per streamed chunk
    thread_s = in prefill, the driving thread's work for the streamed pieces (profile.stream_host_s
              each): a resource beside PCIe and the GPU, layer_s >= it
    gpu_s   = (GG + CG) bytes x GPU seconds per byte at their token count
    sync_s  = one routing sync per MoE layer
    overhead_s = calibrated serial time: per layer, per layer with CPU work, per piece used, and
                 in prefill per unit used (the driving thread's gathers, scatters and job packing)

`cpu_s || pcie_s`: both read host DRAM, so while both run each goes at its rate measured with
the other running (profile.cpu_with_pcie_bytes_s, pcie_with_cpu_bytes_s); once one is done the
other goes on at its own rate.

and a step is the sum over layers plus the attention and LM-head weights read on the GPU.
Each term is an expectation over the routing: an expert that a token picks with probability p
is used in a step of T tokens with probability 1 - (1 - p)^T and then sees T p / (1 - (1 - p)^T)
tokens (uniform routing p = top_k / num_experts, or a measured popularity).

How host pieces are run, per step (`HostMode`):
    static   CG pieces streamed, CC pieces on the CPU, all at once (the plan's kinds)
    assign   per-step token assignment: each host piece goes to the CPU or is streamed so that
             CPU and PCIe/GPU finish together (a piece may be split between them)
    fiddler  per piece, the cheaper of CPU and streaming; CPU first, then GPU (no overlap)
The executor's "balance" rule keeps the plan's kinds in decode and re-assigns in prefill.

Not modelled: attention over the KV cache (small next to the weights at these lengths), the
next layer's prefetch, and the decoder's own overheads beyond the calibrated per-layer terms.
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
    cpu_s: float  # CPU work alone
    pcie_s: float  # streaming alone
    gpu_s: float
    sync_s: float  # syncs and calibrated overheads: serial, outside the resources
    cpu_shared_s: float = 0.0  # the same CPU work while PCIe streams (0: not slowed)
    pcie_shared_s: float = 0.0  # the same streaming while the CPU works
    serial_s: float = 0.0  # work that does not overlap (Fiddler's CPU phase)
    thread_s: float = 0.0  # the driving thread's work for streamed pieces (prefill)

    @property
    def host_s(self) -> float:
        """CPU and PCIe at once: each at its shared rate until one is done, then the other alone."""
        cpu, pcie = self.cpu_s, self.pcie_s
        if cpu <= 0 or pcie <= 0:
            return max(cpu, pcie)
        cpu_shared, pcie_shared = max(self.cpu_shared_s, cpu), max(self.pcie_shared_s, pcie)
        if cpu_shared <= pcie_shared:
            return cpu_shared + (1 - cpu_shared / pcie_shared) * pcie
        return pcie_shared + (1 - pcie_shared / cpu_shared) * cpu

    @property
    def total_s(self) -> float:
        return self.serial_s + max(self.host_s, self.gpu_s, self.thread_s) + self.sync_s


@dataclass(frozen=True)
class _HostPiece:
    """Expected cost of one host piece in one step: on the CPU, or streamed and computed on the GPU."""

    cpu_s: float
    pcie_s: float
    gpu_s: float
    kind: PieceKind
    cpu_shared_s: float  # cpu_s while PCIe streams
    host_s: float = 0.0  # the driving thread's work when streamed (prefill)


class CostModel:
    """Predicts step times of plans for one model on one machine. Pure: no tensors, no clocks."""

    def __init__(self, config: ModelConfig, profile: HardwareProfile, itemsize: int = 2,
                 host_chunk_rows: int | None = 1024,
                 expert_popularity: tuple[tuple[float, ...], ...] | None = None,
                 host_bytes_ratio: float = 1.0) -> None:
        """host_bytes_ratio: bytes that host pieces move per bf16 byte (compact pieces: ~0.75)."""
        self.config = config
        self.profile = profile
        self.itemsize = itemsize
        self.host_chunk_rows = host_chunk_rows
        self.row_bytes = bytes_per_row(config, itemsize)
        self.host_row_bytes = self.row_bytes * host_bytes_ratio  # what CPU and PCIe read of a host row
        self._popularity = _check_popularity(config, expert_popularity)
        # Without a GPU the engine's "device" is the CPU itself: copies at DRAM speed, CPU compute.
        # Compact host rows run at the CPU's compact rate per bf16 byte where the profile has it
        # (in prefill the decode into scratch costs more than the bytes saved); else as their bytes
        # at the bf16 rate. `cpu_row_bytes`: the bytes of a host row that `cpu_table` rates.
        compact_table = profile.cpu_ffn_compact if host_bytes_ratio < 1 else None
        self.cpu_table = compact_table or profile.cpu_ffn
        self.cpu_row_bytes = self.row_bytes if compact_table is not None else self.host_row_bytes
        self.gpu_table: LinearTimeTable = profile.gpu_ffn or profile.cpu_ffn
        self.pcie_bytes_s = profile.pcie_h2d_bytes_s or profile.dram_read_bytes_s
        self.pcie_latency_s = profile.pcie_latency_s or 0.0
        c, h = config, config.hidden_size
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.attention_bytes = ((q + 2 * kv) * h + h * q) * itemsize
        self.lm_head_bytes = c.vocab_size * h * itemsize
        self._rates: dict[tuple[int, int, float], tuple[float, float, float, float, float]] = {}
        # while both read host memory: the CPU no faster than this (per byte it reads, so per byte
        # of `cpu_row_bytes` scaled by what it reads of them), PCIe slowed by this factor
        self.cpu_shared_spb = (self.host_row_bytes / self.cpu_row_bytes / profile.cpu_with_pcie_bytes_s
                               if profile.cpu_with_pcie_bytes_s else 0.0)
        self.pcie_shared_factor = (profile.pcie_h2d_bytes_s / profile.pcie_with_cpu_bytes_s
                                   if profile.pcie_h2d_bytes_s and profile.pcie_with_cpu_bytes_s else 1.0)
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

    def unit_rates(self, layer: int, unit: int, num_tokens: float) -> tuple[float, float, float, float, float]:
        """(probability of use, tokens when used, CPU seconds per byte at those tokens alone and
        while PCIe streams, GPU seconds per byte), cached."""
        key = (layer, unit, num_tokens)
        rates = self._rates.get(key)
        if rates is None:
            active, tokens = self.activity(layer, unit, num_tokens)
            cpu_spb = self.cpu_table.s_per_byte_at(tokens)
            rates = (active, tokens, cpu_spb, max(cpu_spb, self.cpu_shared_spb), self.gpu_table.s_per_byte_at(tokens))
            self._rates[key] = rates
        return rates

    # -- one layer -------------------------------------------------------------------------

    def _host_pieces(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float,
                     overheads: bool = True, prefill: bool = False) -> tuple[list[_HostPiece], float]:
        """Expected host pieces of a layer's units, and the expected GPU time of its GG rows.
        Without `overheads` (the floor): no latencies, no GPU time, and the CPU at its bf16 rate
        on the bytes it reads, as the floor has always been taken."""
        pieces: list[_HostPiece] = []
        gg_s = 0.0
        latency = self.pcie_latency_s if overheads else 0.0
        stream_host_s = self.profile.stream_host_s if overheads and prefill else 0.0
        for unit, split in splits:
            active, tokens, cpu_spb, cpu_shared_spb, gpu_spb = self.unit_rates(layer, unit, num_tokens)
            if active <= 0:
                continue
            cpu_row_bytes = self.cpu_row_bytes
            if not overheads:
                gpu_spb, cpu_row_bytes = 0.0, self.host_row_bytes
                cpu_spb = cpu_shared_spb = self.profile.cpu_ffn.s_per_byte_at(tokens)
            gg_s += active * split.gg * self.row_bytes * gpu_spb
            for begin, end, kind in split.ranges(self.host_chunk_rows):
                if kind is PieceKind.GG:
                    continue
                num_bytes = (end - begin) * self.host_row_bytes
                cpu_bytes = (end - begin) * cpu_row_bytes
                pieces.append(_HostPiece(active * cpu_bytes * cpu_spb,
                                         active * (num_bytes / self.pcie_bytes_s + latency),
                                         active * (end - begin) * self.row_bytes * gpu_spb, kind,
                                         active * cpu_bytes * cpu_shared_spb, active * stream_host_s))
        return pieces, gg_s

    def _serial_s(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float, cpu_work: bool,
                  prefill: bool = False) -> float:
        """Serial time of a layer outside the resources: the routing sync of an MoE layer and the
        calibrated overheads (per layer, per layer with CPU work, per piece used, and in prefill
        per unit used)."""
        p = self.profile
        serial = p.sync_s * self.config.is_moe_layer(layer) + p.layer_overhead_s + p.cpu_layer_overhead_s * cpu_work
        unit_s = p.prefill_unit_overhead_s if prefill else 0.0
        if p.piece_overhead_s or unit_s:
            chunk = self.host_chunk_rows
            for unit, split in splits:
                active = self.unit_rates(layer, unit, num_tokens)[0]
                host = -(-split.cg // chunk) - (-split.cc // chunk) if chunk else (split.cg > 0) + (split.cc > 0)
                serial += active * (p.piece_overhead_s * ((split.gg > 0) + host) + unit_s)
        return serial

    def _cpu_latency_s(self, cpu_work: bool) -> float:
        """One CPU job's round trip when the layer has CPU work (plain sync for older profiles)."""
        return (self.profile.cpu_job_latency_s or self.profile.sync_s) if cpu_work else 0.0

    def layer_time(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float,
                   mode: HostMode = HostMode.STATIC, prefill: bool = False) -> LayerTime:
        """Expected time of one layer's FFN in a step of `num_tokens` tokens (`prefill`: a
        prompt's step, whose streamed pieces the driving thread launches one by one)."""
        if mode is HostMode.STATIC:
            return self._static_layer_time(layer, splits, num_tokens, prefill)
        pieces, gg_s = self._host_pieces(layer, splits, num_tokens, prefill=prefill)
        if mode is HostMode.ASSIGN:
            latency = self._cpu_latency_s(True)
            cpu_s, pcie_s, gpu_s, thread_s = balance(pieces, gg_s, latency)
            cpu_alone = sum(p.cpu_s for p in pieces)
            cpu_factor = sum(p.cpu_shared_s for p in pieces) / cpu_alone if cpu_alone > 0 else 1.0
            return LayerTime(cpu_s, pcie_s, gpu_s, self._serial_s(layer, splits, num_tokens, cpu_s > 0, prefill),
                             cpu_s * cpu_factor, pcie_s * self.pcie_shared_factor, thread_s=thread_s)
        on_cpu = [p for p in pieces if p.cpu_s <= p.pcie_s]
        streamed = [p for p in pieces if p.cpu_s > p.pcie_s]
        cpu_s = sum(p.cpu_s for p in on_cpu) + self._cpu_latency_s(bool(on_cpu))
        return LayerTime(0.0, sum(p.pcie_s for p in streamed), gg_s + sum(p.gpu_s for p in streamed),
                         self._serial_s(layer, splits, num_tokens, bool(on_cpu), prefill), serial_s=cpu_s,
                         thread_s=sum(p.host_s for p in streamed))

    def _static_layer_time(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float,
                           prefill: bool = False) -> LayerTime:
        """The plan's own kinds, without building pieces (the planner calls this many times)."""
        cpu_s = cpu_shared_s = pcie_s = gpu_s = thread_s = 0.0
        stream_host_s = self.profile.stream_host_s if prefill else 0.0
        chunk = self.host_chunk_rows
        row_bytes, host_row_bytes, cpu_row_bytes = self.row_bytes, self.host_row_bytes, self.cpu_row_bytes
        for unit, split in splits:
            active, _, cpu_spb, cpu_shared_spb, gpu_spb = self.unit_rates(layer, unit, num_tokens)
            if active <= 0:
                continue
            num_cg_chunks = -(-split.cg // chunk) if chunk else int(split.cg > 0)
            cpu_s += active * split.cc * cpu_row_bytes * cpu_spb
            cpu_shared_s += active * split.cc * cpu_row_bytes * cpu_shared_spb
            pcie_s += active * (split.cg * host_row_bytes / self.pcie_bytes_s + num_cg_chunks * self.pcie_latency_s)
            thread_s += active * num_cg_chunks * stream_host_s
            gpu_s += active * (split.gg + split.cg) * row_bytes * gpu_spb
        has_cc = any(split.cc for _, split in splits)
        latency = self._cpu_latency_s(has_cc)
        return LayerTime(cpu_s + latency, pcie_s, gpu_s, self._serial_s(layer, splits, num_tokens, has_cc, prefill),
                         cpu_shared_s + latency, pcie_s * self.pcie_shared_factor, thread_s=thread_s)

    def layer_floor_s(self, layer: int, splits: list[tuple[int, UnitSplit]], num_tokens: float,
                      decode: bool) -> float:
        """The bound no schedule beats: host bytes moved by CPU and PCIe at once, nothing else.
        Decode: the CPU reads at DRAM speed (or its measured rate, if faster) while PCIe streams,
        both together no faster than host DRAM gave them when measured at once (the profile's
        `host_read_bytes_s`, where measured, and no slower than either alone); prefill: the CPU at
        its measured rate at that token count."""
        if decode:
            pcie = self.profile.pcie_h2d_bytes_s or 0.0
            shared = self.profile.host_read_bytes_s or float("inf")
            floor_s = 0.0
            for unit, s in splits:
                active, tokens = self.unit_rates(layer, unit, num_tokens)[:2]
                cpu = max(self.profile.dram_read_bytes_s, self.profile.cpu_ffn.bytes_s(tokens))
                # a disturbed shared reading below one side alone bounds nothing: that side can run alone
                together = min(cpu + pcie, max(shared, cpu, pcie))
                floor_s += active * (s.cg + s.cc) * self.host_row_bytes / together
            return floor_s
        pieces, _ = self._host_pieces(layer, splits, num_tokens, overheads=False)
        if self.profile.pcie_h2d_bytes_s is None:
            return sum(p.cpu_s for p in pieces)
        cpu_s, pcie_s, _, _ = balance(pieces, 0.0, 0.0)
        return max(cpu_s, pcie_s)

    # -- whole steps -----------------------------------------------------------------------

    def layer_splits(self, plan: PartitionPlan) -> dict[int, list[tuple[int, UnitSplit]]]:
        return {layer: [(unit, plan.split_of(layer, unit, size)) for unit, size in units]
                for layer, units in self.units_by_layer.items()}

    def step_s(self, plan: PartitionPlan, num_tokens: int, num_seqs: int = 1,
               mode: HostMode = HostMode.STATIC, prefill: bool = False) -> float:
        """Predicted time of one step of `num_tokens` tokens from `num_seqs` sequences."""
        per_layer = self.layer_splits(plan)
        ffn_s = sum(self.layer_time(layer, splits, num_tokens, mode, prefill).total_s
                    for layer, splits in per_layer.items())
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


def balance(pieces: list[_HostPiece], gg_s: float, cpu_latency_s: float) -> tuple[float, float, float, float]:
    """(cpu_s, pcie_s, gpu_s, thread_s) when each piece's work goes to the CPU or is streamed, a
    piece possibly split, so that the CPU and the streaming side (PCIe, GPU compute or the driving
    thread's launches, whichever is slowest) finish together. Pieces cheapest on the CPU relative
    to streaming go to the CPU first; the CPU, once used, costs `cpu_latency_s` more; a split piece
    is still launched whole by the driving thread."""
    if not pieces:
        return 0.0, 0.0, gg_s, 0.0
    order = sorted(pieces, key=lambda p: p.cpu_s / max(p.pcie_s, p.host_s, 1e-30))
    cpu, pcie = cpu_latency_s, sum(p.pcie_s for p in order)
    gpu, thread = gg_s + sum(p.gpu_s for p in order), sum(p.host_s for p in order)
    if cpu >= max(pcie, gpu, thread):
        return 0.0, pcie, gpu, thread  # the CPU's latency alone is longer than streaming everything
    for piece in order:
        after = (cpu + piece.cpu_s, pcie - piece.pcie_s, gpu - piece.gpu_s, thread - piece.host_s)
        if after[0] >= max(after[1:]):
            # the crossing is inside this piece: give the CPU the share `a` that evens the sides
            lo, hi = 0.0, 1.0
            for _ in range(40):
                a = (lo + hi) / 2
                if cpu + a * piece.cpu_s >= max(pcie - a * piece.pcie_s, gpu - a * piece.gpu_s, thread):
                    hi = a
                else:
                    lo = a
            if cpu + hi * piece.cpu_s >= after[0]:
                return after  # the thread's launch of the piece outlasts the CPU: the CPU takes it all
            return cpu + hi * piece.cpu_s, pcie - hi * piece.pcie_s, gpu - hi * piece.gpu_s, thread
        cpu, pcie, gpu, thread = after
    return cpu, pcie, gpu, thread


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
    decode_mode: HostMode
    prefill_mode: HostMode
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

    def decode_s(self, mode: HostMode) -> float:
        """Seconds per token when decode runs host pieces by `mode`."""
        return self.model.step_s(self.plan, self.batch_size, self.batch_size, mode) / self.batch_size

    def prefill_s(self, prompt_len: int, mode: HostMode | None = None) -> float:
        """Seconds to prefill one prompt of `prompt_len` tokens (`mode`: how host pieces are run)."""
        mode = mode or self.prefill_mode
        return sum(self.model.step_s(self.plan, n, 1, mode, prefill=True)
                   for n in prefill_chunks(prompt_len, self.prefill_chunk_tokens))

    def floor_prefill_s(self, prompt_len: int) -> float:
        return sum(self.model.floor_step_s(self.plan, n, decode=False)
                   for n in prefill_chunks(prompt_len, self.prefill_chunk_tokens))

    def prefill_tok_s(self, prompt_len: int, mode: HostMode | None = None) -> float:
        return prompt_len / self.prefill_s(prompt_len, mode)

    def to_dict(self, prompt_lens: tuple[int, ...] = (512, 2048)) -> dict:
        """JSON-ready (for logs and GET /v1/engine/plan)."""
        return {
            "policy": self.policy, "decode_mode": str(self.decode_mode), "prefill_mode": str(self.prefill_mode),
            "batch_size": self.batch_size,
            "decode_s_per_token": self.decode_s_per_token, "decode_tok_s": self.decode_tok_s,
            "floor_decode_s_per_token": self.floor_decode_s, "floor_decode_tok_s": _per_s(1, self.floor_decode_s),
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "prefill": [{"prompt_len": n, "prefill_s": self.prefill_s(n), "prefill_tok_s": self.prefill_tok_s(n),
                         "floor_prefill_s": self.floor_prefill_s(n),
                         "floor_prefill_tok_s": _per_s(n, self.floor_prefill_s(n))} for n in prompt_lens],
        }


def _per_s(count: int, seconds: float) -> float | None:
    """count / seconds; None for a zero floor (nothing on the host: no bound from host bytes)."""
    return count / seconds if seconds > 0 else None


def host_modes(plan: PartitionPlan, token_assignment: bool | None = None) -> tuple[HostMode, HostMode]:
    """(decode, prefill) modes in which the engine runs `plan`'s host pieces: Fiddler's rule; the
    executor's "balance" rule (re-assigned between CPU and PCIe: in prefill by the profile's rates,
    in decode by the measured imbalance, which the model's balance stands for); or the plan's fixed
    kinds. `token_assignment` overrides: True as "balance", False as fixed kinds."""
    if plan.dynamic == "fiddler":
        return HostMode.FIDDLER, HostMode.FIDDLER
    if token_assignment is None:
        token_assignment = plan.dynamic is not None
    if not token_assignment:
        return HostMode.STATIC, HostMode.STATIC
    return HostMode.ASSIGN, HostMode.ASSIGN


def predict_plan(plan: PartitionPlan, config: ModelConfig, profile: HardwareProfile, itemsize: int = 2,
                 workload: WorkloadMix | None = None, token_assignment: bool | None = None) -> Prediction:
    """Predicted decode and prefill speed of `plan` (see `predict` for a PlanRequest)."""
    workload = workload or WorkloadMix()
    model = CostModel(config, profile, itemsize, plan.host_chunk, workload.expert_popularity, plan.host_bytes_ratio)
    decode_mode, prefill_mode = host_modes(plan, token_assignment)
    batch = workload.batch_size
    return Prediction(plan.policy, model.step_s(plan, batch, batch, decode_mode),
                      model.floor_step_s(plan, batch, decode=True), batch, decode_mode, prefill_mode,
                      workload.prefill_chunk_tokens, model, plan)
