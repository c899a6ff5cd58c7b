"""Assembles a partitioned model: plan -> weight store -> model -> staging ring, CPU pool, executor."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from engine.executor.accelerator import Accelerator
from engine.executor.compaction import CompactionReport, compact_host_pieces
from engine.executor.cpu_pool import CpuPool
from engine.executor.partitioned import PartitionedExecutor
from engine.executor.staging import StagingRing
from engine.executor.token_assignment import DispatchRates
from engine.executor.weight_store import WeightStore
from engine.model.compact_weights import max_region_bytes
from engine.model.config import ModelConfig
from engine.model.decoder import DecoderModel
from engine.model.factory import load_model
from engine.placement.hardware import HardwareProfile
from engine.placement.memory import (
    GpuMemoryBreakdown,
    engine_activation_bytes,
    kv_bytes_per_token,
    parse_bytes,
)
from engine.placement.plan import PartitionPlan
from engine.placement.policies import (
    PlanRequest,
    check_budget_covers_fixed_part,
    fits_entirely,
    make_plan,
    plan_memory,
    relabel,
    staging_slot_rows,
)

logger = logging.getLogger(__name__)


@dataclass
class Partition:
    plan: PartitionPlan
    memory: GpuMemoryBreakdown
    budget_bytes: int | None
    request: PlanRequest
    store: WeightStore
    executor: PartitionedExecutor
    profile: HardwareProfile | None = None  # the measurements the adaptive plan came from
    compaction: CompactionReport | None = None  # host pieces stored compact

    def describe(self) -> dict:
        """JSON-ready: the policy, the GPU memory breakdown and weight bytes per kind per layer."""
        row_bytes = 3 * self.request.config.hidden_size * self.request.itemsize
        per_layer: dict[int, dict[str, int]] = {}
        for (layer, _), split in sorted(self.plan.splits.items()):
            entry = per_layer.setdefault(layer, {"GG": 0, "CG": 0, "CC": 0})
            for kind, rows in (("GG", split.gg), ("CG", split.cg), ("CC", split.cc)):
                entry[kind] += rows * row_bytes
        m = self.memory
        extra: dict = {}
        if self.profile is not None:
            from engine.placement.planner import predict

            extra["predicted"] = predict(self.plan, self.request.config, self.profile, self.request).to_dict()
            extra["hardware_profile"] = json.loads(self.profile.to_json())
        if self.compaction is not None:
            extra["compact_host_weights"] = {"pieces": self.compaction.pieces, "kept_bf16": self.compaction.kept_bf16,
                                             "bytes_ratio": round(self.compaction.ratio, 4),
                                             "exceptions": self.compaction.exceptions}
        if self.plan.dynamic == "balance":  # how decode steps moved host pieces, measured as they run
            extra["decode_feedback"] = self.executor.feedback.summary()
        if self.executor.signal is not None:  # decode CPU jobs the GPU stream waits for itself
            extra["cpu_signal"] = {"enabled": self.executor.use_signal, "waits": self.executor.signal.waits}
        routed = self.executor.routed_jobs
        if routed is not None:  # one-token decode CPU jobs started by the GPU's routing
            extra["routed_cpu_jobs"] = {"enabled": self.executor.use_routed, "submitted": routed.submitted,
                                        "given_up": routed.cancelled}
            copier = self.executor._gate_copies  # their streamed pieces' copies enqueued at the gate
            extra["gate_copies"] = {"enabled": self.executor.use_gate_copies,
                                    "adopted": copier.adopted if copier is not None else 0}
        graphs = self.executor.partial_graphs
        if graphs.enabled:  # decode pieces' partials replayed as CUDA graphs
            extra["partial_graphs"] = {"graphs": len(graphs), "replays": graphs.replayed}
        if self.executor.ring is not None:  # streamed pieces of the next layer's likely experts copied ahead
            extra["lookahead"] = {**self.executor.lookahead_stats.summary(), "pieces": self.executor.lookahead_pieces}
        return {
            **extra,
            "policy": self.plan.policy,
            "dynamic": self.plan.dynamic,
            "host_chunk_rows": self.plan.host_chunk,
            "gpu_memory_budget_bytes": self.budget_bytes,
            "gpu_memory": {"non_ffn_weights": m.non_ffn_weights, "resident_ffn_weights": m.resident_ffn_weights,
                           "staging": m.staging, "kv_cache": m.kv_cache, "activations": m.activations,
                           "total": m.total},
            "bytes_by_kind": {k: sum(layer[k] for layer in per_layer.values()) for k in ("GG", "CG", "CC")},
            "bytes_by_kind_per_layer": [{"layer": i, **kinds} for i, kinds in per_layer.items()],
        }

    def repartition(self, policy: str | PartitionPlan) -> PartitionPlan:
        """Switches to another policy over the same resident share without moving any weight
        (host pieces change kind; a staging ring is added if the new plan streams)."""
        plan = policy if isinstance(policy, PartitionPlan) else relabel(self.plan, policy)
        memory = plan_memory(self.request, plan)
        if self.budget_bytes is not None:
            memory.check(self.budget_bytes)
        self.executor.apply_plan(plan)
        slot_numel = 3 * staging_slot_rows(plan) * self.request.config.hidden_size
        ring = self.executor.ring
        if slot_numel and (ring is None or ring.slot_numel < slot_numel):
            self.executor.ring = StagingRing(self.executor.accelerator, self.request.staging_slots, slot_numel,
                                             self.store.dtype)
        self.plan, self.memory = plan, memory
        return plan

    def replan(self, profile: HardwareProfile) -> PartitionPlan:
        """Re-plans adaptively from another hardware profile (for example one measured with another
        CPU kernel path) over the same resident weights, and dispatches tokens with its rates."""
        from engine.placement.cost_model import WorkloadMix
        from engine.placement.planner import dispatch_rates, plan_partition

        plan = plan_partition(self.request.config, profile, self.request, WorkloadMix())
        moved = [key for key, split in plan.splits.items() if split.gg != self.plan.splits[key].gg]
        if moved:
            raise ValueError(f"the new profile changes the resident rows of {len(moved)} units "
                             "(rebuild the engine to plan with it)")
        self.repartition(plan)
        self.executor.rates = DispatchRates(**dispatch_rates(profile, self.compaction is not None))
        self.profile = profile
        return plan


@dataclass(frozen=True)
class PartitionOptions:
    policy: str | PartitionPlan = "auto"
    gpu_memory_budget: str | int | None = None
    cpu_threads: int | None = None
    staging_slots: int = 8
    host_chunk_rows: int = 1024
    profile_path: str | None = None  # hardware profile for the adaptive planner (default: this machine's)
    # host pieces stored compact (lossless, 3/4 of the bytes): None = when the CPU kernels decode them
    # in registers (AVX512/AMX), True = whenever the C++ kernels are built, False = never
    compact_host_weights: bool | None = None

    @property
    def partitioned(self) -> bool:
        return self.gpu_memory_budget is not None or self.policy not in ("auto", "gpu")


def build_partitioned(model: str, model_config: ModelConfig, device: str, dtype: torch.dtype, dtype_name: str,
                      random_weights: bool, seed: int, options: PartitionOptions, kv_cache_tokens: int,
                      max_num_tokens: int, max_num_seqs: int, show_progress: bool,
                      graph_tokens: int = 0) -> tuple[DecoderModel, Partition]:
    """`graph_tokens`: decode graphs will be captured for up to this many sequences (their memory is
    reserved in the budget)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = parse_bytes(options.gpu_memory_budget) if options.gpu_memory_budget is not None else None
    activations = engine_activation_bytes(model_config, itemsize, max_num_tokens, max_num_seqs, graph_tokens,
                                          kv_cache_tokens)
    compact_host = _use_compact_host(options.compact_host_weights, dtype)
    request = PlanRequest(model_config, itemsize, budget, kv_cache_tokens * kv_bytes_per_token(model_config, itemsize),
                          activations, options.staging_slots, options.host_chunk_rows, compact_host)
    rates: DispatchRates | None = None  # token assignment's rates; measured ones with the adaptive planner
    profile: HardwareProfile | None = None
    if isinstance(options.policy, PartitionPlan):
        plan = options.policy
        memory = plan_memory(request, plan)
        if budget is not None:
            memory.check(budget)
    else:
        policy = options.policy
        check_budget_covers_fixed_part(request)
        if policy == "auto" and fits_entirely(request):
            logger.warning("the GPU budget holds the whole model: no offloading needed, everything stays on the GPU")
            policy = "gpu"
        if policy == "auto":  # adaptive on a GPU; on the CPU stand-in a balanced split
            policy = "adaptive" if torch.device(device).type == "cuda" else "balanced:cg=0.45"
        if policy == "adaptive":
            from engine.placement.planner import dispatch_rates, make_adaptive_plan
            from engine.placement.profiler import engine_profile

            profile = engine_profile(model_config, options.host_chunk_rows, profile_path=options.profile_path)
            plan, memory = make_adaptive_plan(request, profile)
            rates = DispatchRates(**dispatch_rates(profile, compact_host))
            logger.info("adaptive plan from the profile %s", profile.fingerprint)
        else:
            plan, memory = make_plan(policy, request)
    accelerator = Accelerator.for_device(device)
    if accelerator.is_cuda and budget is not None:
        total = torch.cuda.get_device_properties(accelerator.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), accelerator.device)
        _expandable_segments()
    logger.info("partition %s: %s", plan.policy, memory.describe())
    store = WeightStore(plan, model_config, dtype, accelerator)
    decoder = load_model(model, device, dtype_name, random_weights, seed, allocator=store.allocate,
                         layout=plan.layout, show_progress=show_progress)
    compaction = compact_host_pieces(decoder, show_progress) if compact_host else None
    slot_numel = 3 * staging_slot_rows(plan) * model_config.hidden_size
    compact_bytes = max_region_bytes(slot_numel) if compaction is not None and compaction.pieces else 0
    ring = StagingRing(accelerator, options.staging_slots, slot_numel, dtype, compact_bytes) if slot_numel else None
    pool = CpuPool(decoder.act, model_config.hidden_act, options.cpu_threads)
    executor = PartitionedExecutor(decoder, accelerator, pool, ring, plan.dynamic, rates)
    decoder.unit_executor = executor
    return decoder, Partition(plan, memory, budget, request, store, executor, profile, compaction)


def _use_compact_host(requested: bool | None, dtype: torch.dtype) -> bool:
    """Whether host pieces are stored compact, logging why not when it was not explicitly refused."""
    if requested is False:
        return False
    if dtype != torch.bfloat16:
        reason = f"weights are {dtype}, compact storage is for bf16"
    else:
        from engine.cpu_kernels.compact import available, decodes_in_registers

        if not available():
            reason = "the C++ cpu kernels are not available"
        elif requested is None and not decodes_in_registers():
            reason = ("this CPU's kernel path decodes them into a scratch copy, slower than reading bf16 "
                      "(force with compact_host_weights=True)")
        else:
            return True
    log = logger.warning if requested else logger.info
    log("host pieces stay bf16: %s", reason)
    return False


def _expandable_segments() -> None:
    """Under a budget, blocks freed by one step's temporaries are reused by the next step's
    differently sized ones instead of fragmenting the budget (torch's allocator setting; the
    environment variable PYTORCH_CUDA_ALLOC_CONF, when set, wins)."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        return
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as exc:  # private API: absent or refused in some builds
        logger.debug("expandable segments not enabled: %s", exc)
