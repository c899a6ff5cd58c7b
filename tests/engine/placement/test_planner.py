"""The adaptive planner on synthetic profiles: it follows the rates, fills the budget, never
exceeds it, and keeps host rows in whole chunks so that fixed policies can relabel it."""

from __future__ import annotations

import pytest

from engine.model.factory import known_model_names, resolve_model_config
from engine.placement.cost_model import HostMode, WorkloadMix
from engine.placement.memory import GIB, PlanDoesNotFitError, non_ffn_bytes
from engine.placement.plan import PieceKind
from engine.placement.planner import build_plan_request, make_adaptive_plan, plan_partition, predict
from engine.placement.policies import make_plan, plan_memory, relabel
from tests.engine.placement.conftest import synthetic_profile

MIXTRAL = resolve_model_config("mixtral-8x7b")[0]


def _request(config=MIXTRAL, budget_gib: float = 24, kv_cache_tokens: int = 4096):
    return build_plan_request(config, int(budget_gib * GIB), kv_cache_tokens=kv_cache_tokens, max_num_seqs=8)


def _shares(plan) -> dict[PieceKind, float]:
    rows = plan.rows_by_kind()
    return {kind: n / sum(rows.values()) for kind, n in rows.items()}


def _cg_of_host(plan) -> float:
    rows = plan.rows_by_kind()
    return rows[PieceKind.CG] / (rows[PieceKind.CG] + rows[PieceKind.CC])


def test_faster_pcie_moves_work_to_cg() -> None:
    slow, fast = (make_adaptive_plan(_request(), synthetic_profile(pcie_bytes_s=bw))[0] for bw in (20e9, 100e9))
    assert _cg_of_host(fast) > _cg_of_host(slow) + 0.2
    assert _shares(fast)[PieceKind.GG] == pytest.approx(_shares(slow)[PieceKind.GG])


def test_faster_cpu_moves_work_to_cc() -> None:
    slow, fast = (make_adaptive_plan(_request(), synthetic_profile(cpu_bytes_s=bw))[0] for bw in (20e9, 120e9))
    assert _cg_of_host(fast) < _cg_of_host(slow) - 0.2


def test_decode_split_balances_cpu_and_pcie() -> None:
    plan, _ = make_adaptive_plan(_request(), synthetic_profile(cpu_bytes_s=50e9, pcie_bytes_s=50e9))
    assert _cg_of_host(plan) == pytest.approx(0.5, abs=0.05)


def test_more_budget_makes_more_resident() -> None:
    profile = synthetic_profile()
    resident = [_shares(make_adaptive_plan(_request(budget_gib=b), profile)[0])[PieceKind.GG] for b in (12, 24, 48, 96)]
    assert resident == sorted(resident) and resident[0] < resident[1] < resident[2]
    assert resident[-1] == 1.0  # 96 GiB holds all 84 GiB of FFN weights besides the rest
    speeds = [predict(make_adaptive_plan(_request(budget_gib=b), profile)[0], MIXTRAL, profile, _request(budget_gib=b))
              .decode_tok_s for b in (12, 24, 48)]
    assert speeds == sorted(speeds)


def test_fills_the_budget_like_the_fixed_policies() -> None:
    request = _request()
    plan, memory = make_adaptive_plan(request, synthetic_profile())
    _, fixed_memory = make_plan("manual:cg=0.5", request)
    assert memory.total <= request.budget_bytes
    assert memory.resident_ffn_weights >= fixed_memory.resident_ffn_weights
    assert request.budget_bytes - memory.total < 64 * 3 * MIXTRAL.hidden_size * 2 * len(plan.splits)


MODELS = known_model_names()
BUDGETS_GIB = (6, 12, 20, 40, 80)


@pytest.mark.parametrize("name", MODELS)
def test_plan_always_fits_the_budget(name: str) -> None:
    config = resolve_model_config(name)[0]
    for with_gpu in (True, False):
        profile = synthetic_profile(with_gpu=with_gpu)
        for budget_gib in BUDGETS_GIB:
            request = _request(config, budget_gib, kv_cache_tokens=2048)
            fixed_bytes = non_ffn_bytes(config, 2) + request.kv_cache_bytes + request.activation_bytes
            try:
                plan, memory = make_adaptive_plan(request, profile)
            except PlanDoesNotFitError:
                assert fixed_bytes > request.budget_bytes - 8 * 1024 * 3 * config.hidden_size * 2
                continue
            assert memory == plan_memory(request, plan) and memory.total <= request.budget_bytes
            chunk = request.host_chunk_rows
            for (layer, unit), split in plan.splits.items():
                host = split.cg + split.cc
                assert split.cg % chunk == 0 or split.cg == host  # whole host chunks streamed
                assert plan.layout(layer, unit, split.size)  # sizes match the model
            if not with_gpu:
                assert plan.rows_by_kind()[PieceKind.CG] == 0
            # every fixed policy can relabel the plan without cutting a built piece
            for policy in ("cpu-experts", "stream", "manual:cg=0.3"):
                other = relabel(plan, policy)
                for (layer, unit), split in plan.splits.items():
                    for begin, end, _ in split.ranges(chunk):
                        moved = other.splits[(layer, unit)]
                        assert moved.kind_at(begin) == moved.kind_at(end - 1)


def test_no_budget_and_room_on_the_gpu_keeps_everything_resident() -> None:
    request = build_plan_request(MIXTRAL, None)
    plan, _ = make_adaptive_plan(request, synthetic_profile(gpu_free_bytes=200 * GIB))
    assert _shares(plan)[PieceKind.GG] == 1.0
    plan, memory = make_adaptive_plan(request, synthetic_profile(gpu_free_bytes=40 * GIB))
    assert memory.total <= 40 * GIB and _shares(plan)[PieceKind.GG] < 1.0


def test_popular_experts_are_resident_first() -> None:
    popularity = ((0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05),)
    plan = plan_partition(MIXTRAL, synthetic_profile(), _request(budget_gib=16),
                          WorkloadMix(expert_popularity=popularity))
    resident = [plan.splits[(0, e)].gg for e in range(8)]
    assert resident[0] == 14336 and resident == sorted(resident, reverse=True) and resident[-1] < 14336


def test_shared_expert_is_resident_before_routed_experts() -> None:
    qwen = resolve_model_config("qwen1.5-moe-a2.7b")[0]
    plan, _ = make_adaptive_plan(_request(qwen, budget_gib=6, kv_cache_tokens=2048), synthetic_profile())
    shared = [s for (_, unit), s in plan.splits.items() if unit == -2]
    routed = [s for (_, unit), s in plan.splits.items() if unit >= 0]
    assert all(s.gg == s.size for s in shared)
    assert sum(s.gg for s in routed) < sum(s.size for s in routed)


def test_planner_is_deterministic() -> None:
    profile = synthetic_profile()
    assert make_adaptive_plan(_request(), profile)[0] == make_adaptive_plan(_request(), profile)[0]


def test_prediction_beats_fixed_policies_and_respects_floors() -> None:
    profile, request = synthetic_profile(), _request()
    adaptive, _ = make_adaptive_plan(request, profile)
    mine = predict(adaptive, MIXTRAL, profile, request)
    assert (mine.decode_mode, mine.prefill_mode) == (HostMode.ASSIGN, HostMode.ASSIGN)
    assert mine.floor_decode_s <= mine.decode_s_per_token
    for n in (512, 2048):
        assert mine.floor_prefill_s(n) <= mine.prefill_s(n) <= mine.prefill_s(n, HostMode.STATIC)
    for policy in ("cpu-experts", "stream", "fiddler", "manual:cg=0.45", "balanced:cg=0.45"):
        plan, _ = make_plan(policy, request)
        theirs = predict(plan, MIXTRAL, profile, request)
        assert mine.decode_s_per_token <= theirs.decode_s_per_token * 1.01, policy
        assert mine.prefill_s(512) <= theirs.prefill_s(512) * 1.01, policy
    assert 3 < mine.decode_tok_s < 20 and 200 < mine.prefill_tok_s(512) < 1000


def test_without_token_assignment_prefill_pulls_the_split_to_streaming() -> None:
    profile, request = synthetic_profile(), _request()
    decode_only = plan_partition(MIXTRAL, profile, request, WorkloadMix())
    prefill_heavy = plan_partition(MIXTRAL, profile, request,
                                   WorkloadMix(prompt_len=2048, new_tokens=16, token_assignment=False))
    assert _cg_of_host(prefill_heavy) > _cg_of_host(decode_only)
