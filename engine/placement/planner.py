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

from dataclasses import dataclass, replace

from engine.model.config import ModelConfig
from engine.model.decode_graphs import MAX_GRAPH_TOKENS
from engine.placement.cost_model import (
    CostModel,
    HostMode,
    Prediction,
    WorkloadMix,
    predict_plan,
    prefill_chunks,
)
from engine.placement.hardware import SERIAL_OVERHEAD_FIELDS, HardwareProfile
from engine.placement.memory import (
    GpuMemoryBreakdown,
    bytes_per_row,
    engine_activation_bytes,
    ffn_units,
    kv_bytes_per_token,
    non_ffn_bytes,
)
from engine.placement.plan import PartitionPlan, UnitKey, UnitSplit
from engine.placement.policies import PlanRequest, plan_memory, staging_slot_bytes

ADAPTIVE_POLICY = "adaptive"
TOKEN_ASSIGNMENT_RULE = "balance"  # the executor's per-step rule: plan's kinds in decode, re-assigned in prefill
SHARE_STEPS = 64  # CG shares tried: 0, 1/64, ..., 1

__all__ = ["ADAPTIVE_POLICY", "TOKEN_ASSIGNMENT_RULE", "MeasuredStep", "Prediction", "WorkloadMix",
           "build_plan_request", "calibrate_overheads", "dispatch_rates", "make_adaptive_plan", "plan_partition",
           "predict"]


def plan_partition(config: ModelConfig, profile: HardwareProfile, request: PlanRequest, workload: WorkloadMix,
                   *, dynamic: str | None = TOKEN_ASSIGNMENT_RULE) -> PartitionPlan:
    """The adaptive plan (pure: no tensors, no clocks). `dynamic` names the executor's per-step
    rule stored in the plan (a dynamic plan always keeps a staging ring; None: fixed kinds).
    Does not check the budget: see `make_adaptive_plan`."""
    units = ffn_units(config)
    row_bytes = bytes_per_row(config, request.itemsize)
    budget = request.budget_bytes if request.budget_bytes is not None else profile.gpu_free_bytes
    chunk = request.host_chunk_rows
    everything = {(layer, unit): UnitSplit(size, 0, 0) for layer, unit, size in units}
    fixed = non_ffn_bytes(config, request.itemsize) + request.kv_cache_bytes + request.activation_bytes
    if budget is None or fixed + sum(size for _, _, size in units) * row_bytes <= budget:
        return PartitionPlan(ADAPTIVE_POLICY, everything, dynamic, chunk)

    model = CostModel(config, profile, request.itemsize, chunk, workload.expert_popularity,
                      request.host_bytes_ratio)
    can_stream = profile.pcie_h2d_bytes_s is not None
    widest = max(size for _, _, size in units)
    ring_bytes = request.staging_slots * staging_slot_bytes(request, min(widest, chunk or widest))
    with_ring = can_stream or dynamic is not None
    resident = _fill_resident(model, units, (budget - fixed - (ring_bytes if with_ring else 0)) // row_bytes,
                              workload.batch_size)
    share = _best_share(model, units, resident, chunk, workload) if can_stream else 0.0
    if share == 0.0 and with_ring and dynamic is None:  # nothing streams: the ring's room is resident too
        resident = _fill_resident(model, units, (budget - fixed) // row_bytes, workload.batch_size)
    return PartitionPlan(ADAPTIVE_POLICY, _host_split(units, resident, share, chunk), dynamic, chunk,
                         request.host_bytes_ratio)


def make_adaptive_plan(request: PlanRequest, profile: HardwareProfile, workload: WorkloadMix | None = None,
                       *, dynamic: str | None = TOKEN_ASSIGNMENT_RULE) -> tuple[PartitionPlan, GpuMemoryBreakdown]:
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
    `token_assignment` None: as the plan's dynamic rule says (see cost_model.host_modes)."""
    return predict_plan(plan, config, profile, request.itemsize, workload, token_assignment)


def dispatch_rates(profile: HardwareProfile, compact_host: bool = False) -> dict[str, float]:
    """Keyword arguments of the executor's DispatchRates (engine/executor/token_assignment.py)
    from a profile: the CPU's decode bandwidth and prefill flop rate (`compact_host`: of compact
    host pieces, where measured), pinned PCIe, job overhead."""
    cpu = profile.cpu_ffn
    prefill_table = (profile.cpu_ffn_compact if compact_host else None) or cpu
    rates = {"cpu_bytes_s": cpu.bytes_s(1), "cpu_flops": prefill_table.flops(prefill_table.num_tokens[-1], 2)}
    if profile.pcie_h2d_bytes_s:
        rates["pcie_bytes_s"] = profile.pcie_h2d_bytes_s
    if profile.cpu_job_latency_s:
        rates["cpu_job_overhead_s"] = profile.cpu_job_latency_s
    return rates


def compact_by_default(profile: HardwareProfile) -> bool:
    """Whether the engine stores host pieces compact by default on the profiled machine: where its CPU
    kernels decode compact rows in registers (cpu_kernels.compact.decodes_in_registers)."""
    from engine.cpu_kernels.compact import REGISTER_DECODE_PATHS

    return profile.cpu_path in REGISTER_DECODE_PATHS


def build_plan_request(config: ModelConfig, budget_bytes: int | None, itemsize: int = 2,
                       kv_cache_tokens: int = 16384, max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                       staging_slots: int = 8, host_chunk_rows: int = 1024,
                       decode_graphs: bool = True, compact_host: bool = True) -> PlanRequest:
    """The PlanRequest the engine builds on a GPU for these settings (defaults: the engine's), without
    weights. `compact_host`: host pieces stored compact (bf16 only; the engine's default where its C++
    kernels decode compact rows in registers: `compact_by_default(profile)`)."""
    graph_tokens = min(MAX_GRAPH_TOKENS, max_num_seqs) if decode_graphs else 0
    activations = engine_activation_bytes(config, itemsize, max_num_batched_tokens, max_num_seqs, graph_tokens,
                                          kv_cache_tokens)
    return PlanRequest(config, itemsize, budget_bytes, kv_cache_tokens * kv_bytes_per_token(config, itemsize),
                       activations, staging_slots, host_chunk_rows, compact_host and itemsize == 2)


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
            total += batch * sum(model.layer_time(layer, splits, num_tokens, HostMode.STATIC, prefill=True).total_s
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
    fine = range(max(0, best - coarse), min(SHARE_STEPS, best + coarse) + 1)
    best_s = min(request_s(i) for i in fine)
    # shares within 0.5% of the best are as good to the model: take the middle of them, the
    # choice least sensitive to errors in the rates (a flat optimum when host DRAM is the limit)
    near = [i for i in fine if request_s(i) <= best_s * 1.005]
    return near[len(near) // 2] / SHARE_STEPS


# -- calibration -------------------------------------------------------------------------------

OVERHEAD_FIELDS = SERIAL_OVERHEAD_FIELDS


@dataclass(frozen=True)
class MeasuredStep:
    """One measured point of a benchmark of the whole engine: a plan, and its decode step time
    (batch 1) or its prefill time for `prompt_len` tokens. `config`, `request`, `rates`: the point's
    own model, plan request and machine (its measured profile: rates only, the overheads are what
    a calibration fits), where points of several runs are fitted together (None: the fit's)."""

    plan: PartitionPlan
    decode_s: float | None = None
    prefill_s: float | None = None
    prompt_len: int = 512
    config: ModelConfig | None = None
    request: PlanRequest | None = None
    rates: HardwareProfile | None = None


STREAM_HOST_GRID_S = tuple(i * 25e-6 for i in range(17))  # 0 .. 0.4 ms


def calibrate_overheads(profile: HardwareProfile, config: ModelConfig, request: PlanRequest,
                        points: list[MeasuredStep], workload: WorkloadMix | None = None,
                        stream_host_grid_s: tuple[float, ...] = STREAM_HOST_GRID_S) -> HardwareProfile:
    """`profile` with its serial overheads (per layer, per layer with CPU work, per piece, per
    unit in prefill) and the driving thread's work per streamed prefill piece fitted to the measured points. The
    serial overheads are additive in the cost model, so each one's effect on a prediction is
    linear: non-negative least squares on relative errors, for each candidate of the thread's
    work (a resource, not additive: tried on a grid), keeping the candidate that fits best."""
    best: tuple[float, HardwareProfile] | None = None
    for stream_host_s in stream_host_grid_s:
        rows, targets = _overhead_rows(profile, config, request, points, workload, stream_host_s)
        coefficients, error = _nnls(rows, targets)
        if best is None or error < best[0] - 1e-12:
            best = (error, replace(profile, stream_host_s=stream_host_s,
                                   **dict(zip(OVERHEAD_FIELDS, coefficients, strict=True))))
    assert best is not None, "an empty grid"
    return best[1]


def _overhead_rows(profile: HardwareProfile, config: ModelConfig, request: PlanRequest,
                   points: list[MeasuredStep], workload: WorkloadMix | None,
                   stream_host_s: float) -> tuple[list[list[float]], list[float]]:
    """Per measured phase: each overhead's effect on the prediction over the measured time, and
    the measured time not predicted without overheads, over the measured time."""
    zeros = dict.fromkeys(OVERHEAD_FIELDS, 0.0)
    rows: list[list[float]] = []
    targets: list[float] = []
    for point in points:
        base = replace(point.rates or profile, **zeros, stream_host_s=stream_host_s)
        for measured, phase in ((point.decode_s, "decode"), (point.prefill_s, "prefill")):
            if measured is None:
                continue

            def predicted(p: HardwareProfile, phase=phase, point=point) -> float:
                prediction = predict(point.plan, point.config or config, p, point.request or request, workload)
                return prediction.decode_step_s if phase == "decode" else prediction.prefill_s(point.prompt_len)

            zero = predicted(base)
            rows.append([(predicted(replace(base, **{f: 1.0})) - zero) / measured for f in OVERHEAD_FIELDS])
            targets.append((measured - zero) / measured)
    return rows, targets


def _nnls(rows: list[list[float]], targets: list[float]) -> tuple[list[float], float]:
    """Least squares with every coefficient >= 0, by trying each set of free coefficients (4 here):
    the coefficients and their sum of squared residuals."""
    import numpy as np

    a, b = np.asarray(rows, dtype=float), np.asarray(targets, dtype=float)
    best, best_err = [0.0] * a.shape[1], float(np.sum(b * b))
    for mask in range(1, 1 << a.shape[1]):
        cols = [j for j in range(a.shape[1]) if mask >> j & 1]
        x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if np.all(x >= 0):
            full = [0.0] * a.shape[1]
            for j, v in zip(cols, x, strict=True):
                full[j] = float(v)
            err = float(np.sum((a @ np.asarray(full) - b) ** 2))
            if err < best_err:
                best, best_err = full, err
    return best, best_err
