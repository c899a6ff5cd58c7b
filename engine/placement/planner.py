"""The adaptive planner: (model, hardware profile, GPU budget, workload) -> PartitionPlan.

    plan, memory = make_adaptive_plan(request, profile)                 # policy "adaptive"
    prediction = predict(plan, request.config, profile, request)

1. Resident (GG) rows: as many as the budget leaves after the non-FFN weights, the KV cache, the
   activations and the staging ring (the accounting of `policies.plan_memory`, so the fixed
   policies and this planner agree to the byte). Rows go first to the units a decode step uses
   most: dense MLPs and shared experts, then routed experts by popularity when a popularity
   profile is given (the most popular wholly resident first); equally popular units share evenly.
   More resident is always faster: GPU compute of resident rows is far cheaper than moving them.
2. Host rows (CG/CC): one share of every unit's host rows is streamed (CG), the rest computed on
   the CPU (CC). The share minimises the cost model's time of a typical request (prefill plus
   `new_tokens` decode steps). With per-step token assignment (the default) prefill host work is
   re-balanced at every step whatever the kinds, so the share is the one where CPU and PCIe
   finish together in decode. CG rows are whole host chunks (`request.host_chunk_rows`, counted
   from the first host row, like `policies.relabel`), rounded unit by unit with the rounding error
   carried to the next unit so that the total share is the chosen one.
"""

from __future__ import annotations

from engine.model.config import ModelConfig
from engine.placement.cost_model import (
    CostModel,
    HostMode,
    Prediction,
    WorkloadMix,
    predict_plan,
    prefill_chunks,
)
from engine.placement.hardware import HardwareProfile
from engine.placement.memory import (
    GpuMemoryBreakdown,
    activation_bytes,
    bytes_per_row,
    ffn_units,
    kv_bytes_per_token,
    non_ffn_bytes,
)
from engine.placement.plan import PartitionPlan, UnitKey, UnitSplit
from engine.placement.policies import PlanRequest, plan_memory

ADAPTIVE_POLICY = "adaptive"
SHARE_STEPS = 64  # CG shares tried: 0, 1/64, ..., 1

__all__ = ["ADAPTIVE_POLICY", "Prediction", "WorkloadMix", "build_plan_request", "make_adaptive_plan",
           "plan_partition", "predict"]


def plan_partition(config: ModelConfig, profile: HardwareProfile, request: PlanRequest, workload: WorkloadMix,
                   *, dynamic: str | None = None) -> PartitionPlan:
    """The adaptive plan (pure: no tensors, no clocks). `dynamic` names the executor's per-step
    rule stored in the plan (a dynamic plan always keeps a staging ring). Does not check the
    budget: see `make_adaptive_plan`."""
    units = ffn_units(config)
    row_bytes = bytes_per_row(config, request.itemsize)
    budget = request.budget_bytes if request.budget_bytes is not None else profile.gpu_free_bytes
    chunk = request.host_chunk_rows
    everything = {(layer, unit): UnitSplit(size, 0, 0) for layer, unit, size in units}
    fixed = non_ffn_bytes(config, request.itemsize) + request.kv_cache_bytes + request.activation_bytes
    if budget is None or fixed + sum(size for _, _, size in units) * row_bytes <= budget:
        return PartitionPlan(ADAPTIVE_POLICY, everything, dynamic, chunk)

    model = CostModel(config, profile, request.itemsize, chunk, workload.expert_popularity)
    can_stream = profile.pcie_h2d_bytes_s is not None
    widest = max(size for _, _, size in units)
    ring_bytes = request.staging_slots * min(widest, chunk or widest) * row_bytes
    with_ring = can_stream or dynamic is not None
    resident = _fill_resident(model, units, (budget - fixed - (ring_bytes if with_ring else 0)) // row_bytes,
                              workload.batch_size)
    share = _best_share(model, units, resident, chunk, workload) if can_stream else 0.0
    if share == 0.0 and with_ring and dynamic is None:  # nothing streams: the ring's room is resident too
        resident = _fill_resident(model, units, (budget - fixed) // row_bytes, workload.batch_size)
    return PartitionPlan(ADAPTIVE_POLICY, _host_split(units, resident, share, chunk), dynamic, chunk)


def make_adaptive_plan(request: PlanRequest, profile: HardwareProfile, workload: WorkloadMix | None = None,
                       *, dynamic: str | None = None) -> tuple[PartitionPlan, GpuMemoryBreakdown]:
    """Policy "adaptive": the plan and what it keeps on the GPU (like `policies.make_plan`);
    raises PlanDoesNotFitError when even no resident FFN row fits the budget."""
    plan = plan_partition(request.config, profile, request, workload or WorkloadMix(), dynamic=dynamic)
    memory = plan_memory(request, plan)
    budget = request.budget_bytes if request.budget_bytes is not None else profile.gpu_free_bytes
    if budget is not None:
        memory.check(budget)
    return plan, memory


def predict(plan: PartitionPlan, config: ModelConfig, profile: HardwareProfile, request: PlanRequest,
            workload: WorkloadMix | None = None, token_assignment: bool | None = None) -> Prediction:
    """Predicted decode and prefill speed of any plan (adaptive or fixed) on `profile`.
    `token_assignment` None: assumed when the plan names a dynamic rule other than Fiddler's."""
    return predict_plan(plan, config, profile, request.itemsize, workload, token_assignment)


def build_plan_request(config: ModelConfig, budget_bytes: int | None, itemsize: int = 2,
                       kv_cache_tokens: int = 16384, max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                       staging_slots: int = 8, host_chunk_rows: int = 1024) -> PlanRequest:
    """The PlanRequest the engine builds for these settings (defaults: the engine's), without weights."""
    return PlanRequest(config, itemsize, budget_bytes, kv_cache_tokens * kv_bytes_per_token(config, itemsize),
                       activation_bytes(config, itemsize, max_num_batched_tokens, max_num_seqs),
                       staging_slots, host_chunk_rows)


# -- resident rows --------------------------------------------------------------------------------

def _align(size: int) -> int:
    return 64 if size >= 512 else 1  # as policies._align: whole 64-row blocks on the GPU


def _fill_resident(model: CostModel, units: list[tuple[int, int, int]], num_rows: int,
                   batch_size: int) -> dict[UnitKey, int]:
    """Resident rows per unit: `num_rows` in all, most-used units first (probability that a decode
    step of `batch_size` tokens uses the unit); units used equally often share evenly."""
    resident = {(layer, unit): 0 for layer, unit, _ in units}
    remaining = max(0, int(num_rows))
    levels: dict[float, list[tuple[UnitKey, int]]] = {}
    for layer, unit, size in units:
        level = round(model.activity(layer, unit, batch_size)[0], 9)
        levels.setdefault(level, []).append(((layer, unit), size))
    for level in sorted(levels, reverse=True):
        group = levels[level]
        group_rows = sum(size for _, size in group)
        if remaining >= group_rows:
            resident.update({key: size for key, size in group})
            remaining -= group_rows
            continue
        fraction = remaining / group_rows
        for key, size in group:
            resident[key] = min(size, int(fraction * size) // _align(size) * _align(size))
            remaining -= resident[key]
        progress = True
        while progress:  # hand the rounding leftovers out block by block
            progress = False
            for key, size in group:
                step = _align(size)
                if remaining >= step and resident[key] + step <= size:
                    resident[key] += step
                    remaining -= step
                    progress = True
        break
    return resident


# -- host rows --------------------------------------------------------------------------------------

def _host_split(units: list[tuple[int, int, int]], resident: dict[UnitKey, int], share: float,
                chunk: int | None) -> dict[UnitKey, UnitSplit]:
    """Every unit's host rows split CG/CC at `share`, CG in whole chunks, rounding error carried on."""
    splits: dict[UnitKey, UnitSplit] = {}
    carry = 0.0
    for layer, unit, size in units:
        gg = resident[(layer, unit)]
        host = size - gg
        target = share * host + carry
        step = chunk or max(host, 1)
        below = max(0, min(host, int(target // step) * step))
        above = min(host, below + step)
        cg = above if above - target < target - below else below
        carry = target - cg
        splits[(layer, unit)] = UnitSplit(gg, cg, host - cg)
    return splits


def _request_s(model: CostModel, splits_by_layer: dict[int, list[tuple[int, UnitSplit]]],
               workload: WorkloadMix) -> float:
    """FFN time of one typical request for the batch: decode steps, plus prefill when its host
    work follows the plan's kinds (without token assignment)."""
    batch = workload.batch_size
    decode_s = sum(model.layer_time(layer, splits, batch).total_s for layer, splits in splits_by_layer.items())
    total = workload.new_tokens * decode_s
    if not workload.token_assignment:
        for num_tokens in prefill_chunks(workload.prompt_len, workload.prefill_chunk_tokens):
            total += batch * sum(model.layer_time(layer, splits, num_tokens, HostMode.STATIC).total_s
                                 for layer, splits in splits_by_layer.items())
    return total


def _best_share(model: CostModel, units: list[tuple[int, int, int]], resident: dict[UnitKey, int],
                chunk: int | None, workload: WorkloadMix) -> float:
    """The CG share with the least request time: a coarse pass over shares, then a finer one
    around the best (the time is close to convex in the share: max of a rising and a falling sum)."""
    cache: dict[int, float] = {}

    def request_s(step: int) -> float:
        if step not in cache:
            by_layer: dict[int, list[tuple[int, UnitSplit]]] = {}
            for (layer, unit), split in _host_split(units, resident, step / SHARE_STEPS, chunk).items():
                by_layer.setdefault(layer, []).append((unit, split))
            cache[step] = _request_s(model, by_layer, workload)
        return cache[step]

    coarse = SHARE_STEPS // 16
    best = min(range(0, SHARE_STEPS + 1, coarse), key=request_s)
    best = min(range(max(0, best - coarse), min(SHARE_STEPS, best + coarse) + 1), key=lambda i: (request_s(i), i))
    return best / SHARE_STEPS
