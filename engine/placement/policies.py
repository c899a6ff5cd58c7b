"""Fixed partition policies (the baselines) and manual splits.

Every policy keeps the same resident (GG) share, the largest that fits the budget, spread evenly
over all units; they differ in what they do with the rest:
    gpu          everything resident (fails when it does not fit)
    cpu-experts  the rest computed on the CPU (like llama.cpp --cpu-moe)
    stream       the rest streamed over PCIe and computed on the GPU (like vLLM --cpu-offload-gb)
    fiddler      per expert and step: CPU if few tokens are routed to it, else streamed; no overlap
    manual:cg=F  the rest split, a share F of every unit's non-resident rows streamed (CG), the rest CC
    manual:gg=A,cg=B   fixed fractions of every unit (CC gets the remainder)
    manual:PATH  an explicit plan file (PartitionPlan JSON)
    balanced:cg=F      a manual split whose host pieces are re-assigned every step by token
                       assignment (decode keeps the split, prefill leans to streaming)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.model.compact_weights import COMPACT_BYTES_RATIO, max_region_bytes
from engine.model.config import ModelConfig
from engine.placement.memory import (
    GpuMemoryBreakdown,
    PlanDoesNotFitError,
    bytes_per_row,
    ffn_units,
    format_bytes,
    non_ffn_bytes,
)
from engine.placement.plan import PartitionPlan, UnitSplit

POLICIES = ("gpu", "cpu-experts", "stream", "fiddler", "manual", "balanced")


@dataclass(frozen=True)
class PlanRequest:
    config: ModelConfig
    itemsize: int
    budget_bytes: int | None  # None: no budget (everything resident)
    kv_cache_bytes: int
    activation_bytes: int
    staging_slots: int = 8
    host_chunk_rows: int = 1024
    compact_host: bool = False  # host pieces stored compact (engine/model/compact_weights.py)

    @property
    def host_bytes_ratio(self) -> float:
        return COMPACT_BYTES_RATIO if self.compact_host else 1.0


def staging_slot_bytes(req: PlanRequest, slot_rows: int) -> int:
    """GPU bytes of one staging slot of `slot_rows` rows: the bf16 rows the matmuls read, and with
    compact host pieces the byte buffer their regions land in (engine/executor/staging.py)."""
    row_bytes = bytes_per_row(req.config, req.itemsize)
    compact = max_region_bytes(slot_rows * row_bytes // req.itemsize) if req.compact_host else 0
    return slot_rows * row_bytes + compact


def _align(size: int) -> int:
    return 64 if size >= 512 else 1


def _resident_rows(size: int, fraction: float) -> int:
    align = _align(size)
    return min(size, int(fraction * size) // align * align)


def staging_slot_rows(plan: PartitionPlan) -> int:
    """Rows of the largest piece that may be streamed: any host piece when the plan has CG pieces
    or a dynamic rule (host pieces can change kind), else none."""
    if not plan.dynamic and not any(s.cg for s in plan.splits.values()):
        return 0
    host_rows = [s.cg + s.cc for s in plan.splits.values() if s.cg + s.cc]
    return max((min(r, plan.host_chunk or r) for r in host_rows), default=0)


def plan_memory(req: PlanRequest, plan: PartitionPlan) -> GpuMemoryBreakdown:
    """What `plan` keeps on the GPU."""
    row_bytes = bytes_per_row(req.config, req.itemsize)
    resident = sum(s.gg for s in plan.splits.values()) * row_bytes
    staging = req.staging_slots * staging_slot_bytes(req, staging_slot_rows(plan))
    return GpuMemoryBreakdown(non_ffn_bytes(req.config, req.itemsize), resident, staging,
                              req.kv_cache_bytes, req.activation_bytes)


def _max_resident_fraction(req: PlanRequest, streams: bool) -> float:
    if req.budget_bytes is None:
        return 1.0
    units = ffn_units(req.config)
    row_bytes = bytes_per_row(req.config, req.itemsize)
    total_ffn = sum(size for _, _, size in units) * row_bytes
    widest = max(size for _, _, size in units)
    slot_rows = min(widest, req.host_chunk_rows)
    staging = req.staging_slots * staging_slot_bytes(req, slot_rows) if streams else 0
    fixed = non_ffn_bytes(req.config, req.itemsize) + req.kv_cache_bytes + req.activation_bytes + staging
    return max(0.0, min(1.0, (req.budget_bytes - fixed) / total_ffn))


def check_budget_covers_fixed_part(req: PlanRequest) -> None:
    """A clear error when the budget cannot even hold what always lives on the GPU."""
    if req.budget_bytes is None:
        return
    fixed = GpuMemoryBreakdown(non_ffn_bytes(req.config, req.itemsize), 0, 0, req.kv_cache_bytes, req.activation_bytes)
    if fixed.total > req.budget_bytes:
        raise PlanDoesNotFitError(
            f"a GPU budget of {format_bytes(req.budget_bytes)} is too small for the part of the model that always "
            f"lives on the GPU: {fixed.describe()} (before any FFN weight); raise the budget or lower "
            "kv_cache_tokens / max_num_batched_tokens")


def fits_entirely(req: PlanRequest) -> bool:
    """True when the whole model (and KV cache, activations) fits the budget: no offloading needed."""
    if req.budget_bytes is None:
        return True
    total_ffn = sum(size for _, _, size in ffn_units(req.config)) * bytes_per_row(req.config, req.itemsize)
    fixed = non_ffn_bytes(req.config, req.itemsize) + req.kv_cache_bytes + req.activation_bytes
    return fixed + total_ffn <= req.budget_bytes


def _split_all(req: PlanRequest, split_unit) -> dict[tuple[int, int], UnitSplit]:
    return {(layer, unit): split_unit(size) for layer, unit, size in ffn_units(req.config)}


def _parse_manual(spec: str) -> dict[str, float]:
    values = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("gg", "cg") or not value:
            raise ValueError(f"cannot read manual split {spec!r}: write cg=0.4, gg=0.2,cg=0.3 or a plan file path")
        values[key.strip()] = float(value)
        if not 0.0 <= values[key.strip()] <= 1.0:
            raise ValueError(f"manual fraction {key}={value} outside [0, 1]")
    return values


def make_plan(policy: str, req: PlanRequest) -> tuple[PartitionPlan, GpuMemoryBreakdown]:
    """The plan for `policy` and what it keeps on the GPU; raises PlanDoesNotFitError if it cannot fit."""
    name, _, spec = policy.partition(":")
    chunk = req.host_chunk_rows
    check_budget_covers_fixed_part(req)
    if name == "gpu":
        plan = PartitionPlan("gpu", _split_all(req, lambda size: UnitSplit(size, 0, 0)))
    elif name in ("cpu-experts", "stream", "fiddler"):
        fraction = _max_resident_fraction(req, streams=name != "cpu-experts")

        def split(size: int) -> UnitSplit:
            gg = _resident_rows(size, fraction)
            return UnitSplit(gg, size - gg, 0) if name == "stream" else UnitSplit(gg, 0, size - gg)

        plan = PartitionPlan(name, _split_all(req, split), "fiddler" if name == "fiddler" else None, chunk)
    elif name == "manual" and spec.endswith(".json"):
        plan = PartitionPlan.from_file(spec)
    elif name in ("manual", "balanced"):
        fractions = _parse_manual(spec or "cg=0.45")
        gg_fraction = fractions.get("gg")
        if gg_fraction is None:
            gg_fraction = _max_resident_fraction(req, streams=True)

        def split(size: int) -> UnitSplit:
            gg = _resident_rows(size, gg_fraction)
            cg = round(fractions.get("cg", 0.45) * (size if "gg" in fractions else size - gg))
            cg = min(cg, size - gg)
            return UnitSplit(gg, cg, size - gg - cg)

        dynamic = "balance" if name == "balanced" else None
        plan = PartitionPlan(f"{name}:{spec or 'cg=0.45'}", _split_all(req, split), dynamic, chunk)
    else:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if req.compact_host and plan.host_bytes_ratio == 1.0:
        plan = replace(plan, host_bytes_ratio=req.host_bytes_ratio)
    breakdown = plan_memory(req, plan)
    if req.budget_bytes is not None:
        breakdown.check(req.budget_bytes)
    return plan, breakdown


def relabel(plan: PartitionPlan, policy: str) -> PartitionPlan:
    """`policy` applied to the host rows of `plan`, keeping its resident (GG) rows: the switch an
    engine can make at run time without moving weights. CG shares are rounded to host chunks."""
    name, _, spec = policy.partition(":")
    if name not in ("cpu-experts", "stream", "fiddler", "manual", "balanced") or spec.endswith(".json"):
        raise ValueError(f"policy {policy!r} cannot be applied at run time; use cpu-experts, stream, "
                         "fiddler, manual:cg=F or balanced:cg=F")
    share = {"cpu-experts": 0.0, "stream": 1.0, "fiddler": 0.0}.get(name)
    if share is None:
        share = _parse_manual(spec or "cg=0.45").get("cg", 0.45)
    chunk = plan.host_chunk

    def split(s: UnitSplit) -> UnitSplit:
        host = s.cg + s.cc
        cg = round(share * host)
        if chunk:
            cg = min(host, round(cg / chunk) * chunk)
        return UnitSplit(s.gg, cg, host - cg)

    dynamic = {"fiddler": "fiddler", "balanced": "balance"}.get(name)
    return PartitionPlan(policy, {k: split(v) for k, v in plan.splits.items()}, dynamic, chunk, plan.host_bytes_ratio)
