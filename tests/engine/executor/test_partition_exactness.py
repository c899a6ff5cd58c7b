"""The plan never changes results: any mix of GG/CG/CC pieces gives the single-device answer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model.factory import resolve_model_config
from engine.placement.memory import ffn_units
from engine.placement.plan import PartitionPlan, PieceKind, UnitSplit
from engine.tools.tiny_checkpoint import write_tiny_checkpoint

PROMPTS = [[5, 9, 13, 22, 40, 41, 42, 7, 8, 100, 3], [3, 4, 250, 17]]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def random_plan(path: Path, seed: int) -> PartitionPlan:
    """Every unit gets random GG/CG/CC sizes; at least one unit of each kind exists."""
    config, _ = resolve_model_config(str(path))
    rng = random.Random(seed)
    splits = {}
    for layer, unit, size in ffn_units(config):
        gg = rng.randint(0, size)
        cg = rng.randint(0, size - gg)
        splits[(layer, unit)] = UnitSplit(gg, cg, size - gg - cg)
    plan = PartitionPlan(f"random-{seed}", splits, None, host_chunk=rng.choice([None, 7, 16]))
    assert all(plan.rows_by_kind()[k] > 0 for k in PieceKind)
    return plan


def _kinds(llm: LLM) -> set[str]:
    model = llm.engine.runner.model
    units = [layer.ffn for layer in model.layers]
    pieces = [p for u in units for unit in ([u] if hasattr(u, "slices") else u.experts) for p in unit.slices]
    return {p.kind for p in pieces}


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2_moe"])
def test_five_random_plans_match_the_single_device_run(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints[arch]
    single = LLM(str(path), dtype="float32", show_progress=False, max_prefill_chunk=6)
    expected_logits = single.engine.prompt_logits(PROMPTS[0])
    expected = [o.token_ids for o in single.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
    for seed in range(5):
        plan = random_plan(path, seed)
        llm = LLM(str(path), dtype="float32", show_progress=False, max_prefill_chunk=6, policy=plan)
        assert _kinds(llm) == {"GG", "CG", "CC"}
        logits = llm.engine.prompt_logits(PROMPTS[0])
        assert (logits - expected_logits).abs().max().item() <= 1e-5 * max(1.0, expected_logits.abs().max().item())
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
        assert got == expected, f"plan {plan.policy} changed the greedy tokens"


def test_fixed_policies_under_a_budget_place_pieces_and_keep_results(tiny_checkpoints: dict[str, Path]) -> None:
    path = str(tiny_checkpoints["mixtral"])
    expected = LLM(path, dtype="float32", show_progress=False).generate(prompt_token_ids=PROMPTS, params=GREEDY)
    budget = "1.2MB"  # tiny model: ~0.94 MB of non-FFN weights, KV and activations, 0.3 MB of FFN weights
    seen = {}
    for policy in ("cpu-experts", "stream", "fiddler", "manual:cg=0.5", "balanced:cg=0.5"):
        llm = LLM(path, dtype="float32", show_progress=False, gpu_memory_budget=budget, policy=policy,
                  kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=16)
        rows = llm.engine.partition.plan.rows_by_kind()
        seen[policy] = rows
        assert rows[PieceKind.GG] > 0 and rows[PieceKind.CG] + rows[PieceKind.CC] > 0
        got = llm.generate(prompt_token_ids=PROMPTS, params=GREEDY)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert llm.engine.partition.memory.total <= 1_200_000
    assert seen["cpu-experts"][PieceKind.CG] == 0 and seen["stream"][PieceKind.CC] == 0
    assert seen["manual:cg=0.5"][PieceKind.CG] > 0 and seen["manual:cg=0.5"][PieceKind.CC] > 0


def test_repartition_switches_policies_without_moving_weights(tiny_checkpoints: dict[str, Path]) -> None:
    path = str(tiny_checkpoints["mixtral"])
    # manual:cg=0 computes everything on the CPU but keeps room for a staging ring, so that any policy fits later
    llm = LLM(path, dtype="float32", show_progress=False, gpu_memory_budget="1.2MB", policy="manual:cg=0",
              kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=16)
    partition = llm.engine.partition
    arena_ptr = partition.store.arena.data_ptr()
    expected = llm.generate(prompt_token_ids=PROMPTS, params=GREEDY)
    for policy in ("stream", "manual:cg=0.5", "fiddler", "balanced:cg=0.4", "cpu-experts"):
        plan = partition.repartition(policy)
        assert plan.policy == policy
        got = llm.generate(prompt_token_ids=PROMPTS, params=GREEDY)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert partition.store.arena.data_ptr() == arena_ptr
    assert partition.executor.ring is not None and partition.executor.ring.bytes_streamed > 0


def test_host_pieces_live_in_one_arena_and_nothing_is_held_twice(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["mixtral"]), dtype="float32", show_progress=False,
              policy=random_plan(tiny_checkpoints["mixtral"], 1))
    store = llm.engine.partition.store
    arena_storage = store.arena.untyped_storage().data_ptr()
    host_bytes = 0
    for layer in llm.engine.runner.model.layers:
        for unit in layer.ffn.experts:
            for piece in unit.slices:
                on_host = piece.kind in ("CG", "CC")
                shares_arena = piece.gate_up.untyped_storage().data_ptr() == arena_storage
                assert shares_arena == on_host
                host_bytes += piece.num_bytes if on_host else 0
    assert host_bytes == store.host_bytes == store.arena.nbytes


def test_a_budget_too_small_says_what_does_not_fit(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"too small for the part of the model that always lives on the GPU: non-FFN weights .* KV cache"):
        LLM(str(tiny_checkpoints["mixtral"]), show_progress=False, gpu_memory_budget="100KB")
    with pytest.raises(ValueError, match=r"resident FFN weights .* more than the budget"):
        LLM(str(tiny_checkpoints["mixtral"]), show_progress=False, gpu_memory_budget="1.2MB", policy="gpu",
            kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4)


def test_plan_file_round_trip_and_manual_file_policy(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    plan = random_plan(tiny_checkpoints["llama"], 3)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert PartitionPlan.from_file(path) == plan
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", show_progress=False, policy=f"manual:{path}")
    assert llm.engine.partition.plan.splits == plan.splits


def test_trace_records_all_three_resources_as_chrome_json(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    llm = LLM(str(tiny_checkpoints["mixtral"]), dtype="float32", show_progress=False, trace=True,
              policy=random_plan(tiny_checkpoints["mixtral"], 2))
    llm.generate(prompt_token_ids=PROMPTS, params=SamplingParams(max_tokens=4, ignore_eos=True))
    recorder = llm.engine.runner.trace
    assert recorder is not None and len(recorder.steps) >= 4
    summary = recorder.summary()
    for resource in ("cpu", "pcie", "gpu"):
        assert 0.0 < summary[f"{resource}_busy"] <= 1.0
    out = tmp_path / "trace.json"
    recorder.write(out)
    events = json.loads(out.read_text())["traceEvents"]
    assert {e["tid"] for e in events} >= {"cpu", "pcie", "gpu", "step"}
    assert all(e["dur"] >= 0 for e in events)


def test_random_weights_are_identical_however_units_are_cut(tmp_path: Path) -> None:
    """Random weights fill each piece with its region of the uncut tensor (benchmarks rely on it)."""
    from dataclasses import replace

    from engine.model.random_weights import fill_random
    from engine.model.weights import build_model, device_allocator

    config, _ = resolve_model_config("mixtral-8x7b")
    small = replace(config, num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=50,
                    moe=replace(config.moe, expert_intermediate_size=40, sparse_layers=(0,)))
    whole, fills = build_model(small, device_allocator("cpu", torch.float32))
    fill_random(fills, seed=3, show_progress=False)
    plan = random_plan_for(small, seed=4)
    cut, fills = build_model(small, device_allocator("cpu", torch.float32), plan.layout)
    fill_random(fills, seed=3, show_progress=False)
    x = torch.randn(5, 32)
    for a, b in zip(whole.layers[0].ffn.experts, cut.layers[0].ffn.experts, strict=True):
        assert len(b.slices) > 1
        assert torch.allclose(a(x, torch.nn.functional.silu), b(x, torch.nn.functional.silu), atol=1e-6)


def random_plan_for(config, seed: int) -> PartitionPlan:
    rng = random.Random(seed)
    splits = {}
    for layer, unit, size in ffn_units(config):
        gg = rng.randint(1, size - 2)
        cg = rng.randint(1, size - gg - 1)
        splits[(layer, unit)] = UnitSplit(gg, cg, size - gg - cg)
    return PartitionPlan("random", splits, None, host_chunk=7)


def write_bf16(tmp_path: Path, arch: str) -> Path:
    return write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=1, dtype="bfloat16")


def bf16_gpu_llm(path: Path, **executor_settings: object) -> LLM:
    """A bf16 engine on the GPU whose layers have GG, CG and CC pieces (8-row host chunks), with
    these attributes of its executor set (A/B of one executor setting on the same bits)."""
    llm = LLM(str(path), device="cuda", dtype="bfloat16", show_progress=False, policy="manual:gg=0.25,cg=0.25",
              kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=8)
    for name, value in executor_settings.items():
        setattr(llm.engine.runner.executor, name, value)
    return llm


def gpu_only_plan(path: Path, seed: int) -> PartitionPlan:
    """Random GG/CG splits: every piece is computed by the GPU's own kernels."""
    plan = random_plan(path, seed)
    splits = {k: UnitSplit(v.gg, v.cg + v.cc, 0) for k, v in plan.splits.items()}
    return PartitionPlan(plan.policy, splits, None, plan.host_chunk)


def _bf16_tie(reference: LLM, prefix: list[int], a: int, b: int) -> bool:
    """True when tokens a and b are within bf16 rounding of a tie in the reference's logits."""
    logits = reference.engine.prompt_logits(prefix)
    top = logits.max().item()
    ulp = 2.0 ** (int(torch.tensor(abs(top) + 1e-30).log2().floor().item()) - 7)
    return abs(logits[a].item() - logits[b].item()) <= 4 * ulp


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_cuda_bf16_gpu_pieces_match_the_all_gpu_run_exactly(arch: str, tmp_path: Path) -> None:
    path = write_bf16(tmp_path, arch)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    reference = LLM(str(path), device="cuda", dtype="bfloat16", show_progress=False)
    expected = [o.token_ids for o in reference.generate(prompt_token_ids=PROMPTS, params=greedy)]
    for seed in range(5):
        llm = LLM(str(path), device="cuda", dtype="bfloat16", show_progress=False, policy=gpu_only_plan(path, seed))
        assert llm.engine.partition.store.arena.is_pinned()
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=greedy)]
        assert got == expected, f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_cuda_bf16_random_plans_match_the_all_gpu_run(arch: str, tmp_path: Path) -> None:
    """CC pieces run on the CPU, whose bf16 GEMMs round in another order than the GPU's: greedy
    tokens must be identical except where the all-GPU run itself is within bf16 rounding of a tie."""
    path = write_bf16(tmp_path, arch)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    reference = LLM(str(path), device="cuda", dtype="bfloat16", show_progress=False)
    expected = [o.token_ids for o in reference.generate(prompt_token_ids=PROMPTS, params=greedy)]
    expected_logits = reference.engine.prompt_logits(PROMPTS[0])
    for seed in range(5):
        llm = LLM(str(path), device="cuda", dtype="bfloat16", show_progress=False, policy=random_plan(path, seed))
        logits = llm.engine.prompt_logits(PROMPTS[0])
        assert ((logits - expected_logits).norm() / expected_logits.norm()).item() < 2e-2
        got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=greedy)]
        for prompt, want, have in zip(PROMPTS, expected, got, strict=True):
            k = next((i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), None)
            if k is not None:
                assert _bf16_tie(reference, prompt + want[:k], want[k], have[k]), f"seed {seed}: diverged at {k}"


def test_plan_info_reports_bytes_per_kind_and_memory(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["mixtral"]), show_progress=False, gpu_memory_budget="1.2MB",
              policy="manual:cg=0.5", kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4,
              host_chunk_rows=16)
    info = llm.engine.plan_info()
    assert info["policy"] == "manual:cg=0.5"
    assert info["gpu_memory"]["total"] <= info["gpu_memory_budget_bytes"] == 1_200_000
    per_layer = info["bytes_by_kind_per_layer"]
    assert len(per_layer) == 2
    assert sum(layer["CG"] for layer in per_layer) == info["bytes_by_kind"]["CG"] > 0
    assert info["bytes_by_kind"]["CC"] > 0 and info["bytes_by_kind"]["GG"] > 0
    assert LLM(str(tiny_checkpoints["llama"]), show_progress=False).engine.plan_info()["policy"] == "single-device"


def test_cpu_partials_copied_in_bounded_blocks_keep_results(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    """Prefill moves CPU partials to the GPU a bounded block of rows at a time (GPU memory stays bounded)."""
    import engine.executor.partitioned as partitioned

    path = tiny_checkpoints["mixtral"]
    single = LLM(str(path), dtype="float32", show_progress=False)
    expected = single.engine.prompt_logits(PROMPTS[0])
    monkeypatch.setattr(partitioned, "MAX_CPU_ROWS_PER_COPY", 3)
    llm = LLM(str(path), dtype="float32", show_progress=False, policy=random_plan(path, 7))
    assert (llm.engine.prompt_logits(PROMPTS[0]) - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_budget_messages_for_too_small_and_larger_than_the_model(tiny_checkpoints: dict[str, Path], caplog) -> None:
    path = str(tiny_checkpoints["mixtral"])
    with pytest.raises(ValueError, match=r"too small for the part of the model that always lives on the GPU"):
        LLM(path, show_progress=False, gpu_memory_budget="200KB", kv_cache_tokens=256,
            max_num_batched_tokens=64, max_num_seqs=4)
    with caplog.at_level("WARNING"):
        llm = LLM(path, show_progress=False, gpu_memory_budget="1GiB")
    assert "no offloading needed" in caplog.text
    assert llm.engine.partition.plan.policy == "gpu"
    assert llm.engine.partition.plan.rows_by_kind()[PieceKind.CC] == 0


def test_adaptive_policy_from_a_saved_profile_keeps_results_and_reports_predictions(
        tiny_checkpoints: dict[str, Path]) -> None:
    path = str(tiny_checkpoints["mixtral"])
    expected = LLM(path, dtype="float32", show_progress=False).generate(prompt_token_ids=PROMPTS, params=GREEDY)
    profile = Path(__file__).resolve().parents[3] / "configs" / "hardware" / "h100-16core.json"
    llm = LLM(path, dtype="float32", show_progress=False, gpu_memory_budget="1.2MB", policy="adaptive",
              profile_path=str(profile), kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4,
              host_chunk_rows=16)
    rows = llm.engine.partition.plan.rows_by_kind()
    assert rows[PieceKind.GG] > 0 and rows[PieceKind.CG] + rows[PieceKind.CC] > 0
    got = llm.generate(prompt_token_ids=PROMPTS, params=GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    info = llm.engine.plan_info()
    assert info["predicted"] and info["hardware_profile"]["fingerprint"]


def test_stats_count_busy_seconds_of_every_resource(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["mixtral"]), dtype="float32", show_progress=False,
              policy=random_plan(tiny_checkpoints["mixtral"], 5))
    before = llm.engine.stats()
    llm.generate(prompt_token_ids=PROMPTS, params=SamplingParams(max_tokens=4, ignore_eos=True))
    after = llm.engine.stats()
    assert after.cpu_busy_s > before.cpu_busy_s
    assert after.gpu_busy_s > before.gpu_busy_s
    assert after.pcie_busy_s > before.pcie_busy_s
    assert after.bytes_streamed > before.bytes_streamed
