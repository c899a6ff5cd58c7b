"""One-token decode layers' CPU jobs submitted before the routing and started by the GPU
(engine/executor/routed_job.py): each expert's split depends on the expert alone (as `assign`
gives it), and decoding with routed jobs gives the bits of submitting after the routing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.executor.accelerator import Accelerator
from engine.executor.cpu_pool import CpuPool
from engine.executor.decode_feedback import DecodeFeedback
from engine.executor.gate_copies import STAGED_AHEAD, choice_entries, piece_entry, skip_staged_ahead
from engine.executor.routed_job import RoutedJobs
from engine.executor.token_assignment import (
    DispatchRates,
    assign,
    decode_split,
    layer_streamed,
    mean_streamed_pieces,
    shift_share,
)
from engine.model.factory import resolve_model_config
from engine.model.ffn import FFNUnit, UnitSlice
from engine.placement.memory import ffn_units
from engine.placement.plan import PartitionPlan, UnitSplit
from engine.tools.tiny_checkpoint import write_tiny_checkpoint
from tests.engine.executor.test_partition_exactness import bf16_gpu_llm, write_bf16
from tests.engine.model.test_decode_graphs import PROMPTS, _assert_same, _run

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
RATES = DispatchRates(cpu_bytes_s=60e9, cpu_flops=2e12, pcie_bytes_s=50e9, cpu_job_overhead_s=0.0)


def _unit(kinds: list[str], rows: int = 32, hidden: int = 64) -> FFNUnit:
    slices = [UnitSlice(i * rows, (i + 1) * rows, torch.zeros(2 * rows, hidden), torch.zeros(hidden, rows), kind)
              for i, kind in enumerate(kinds)]
    return FFNUnit(rows * len(kinds), slices)


@pytest.mark.parametrize("num_items", [1, 2, 3])
def test_the_shift_shares_add_up(num_items: int) -> None:
    for shift in range(-7, 8):
        shares = [shift_share(shift, p, num_items) for p in range(num_items)]
        assert sum(shares) == abs(shift) and max(shares) - min(shares) <= 1


def test_an_items_decode_split_is_what_assign_gives_it() -> None:
    """A routed job is built per (position, expert) before the routing is known: the split of an
    item must not depend on the other items."""
    units = [_unit(["GG", "CG", "CG", "CC", "CC"]), _unit(["CG", "CC", "CC", "CC"]), _unit(["GG", "CG", "CC"])]
    for shift, mean in ((shift, mean) for shift in range(-5, 6) for mean in (None, 1.25)):
        for chosen in ([0, 1], [2, 0], [1, 2, 0]):
            items = [(units[u], torch.zeros(1, 64)) for u in chosen]
            placed = assign("balance", items, RATES, DecodeFeedback(shift=shift), mean)
            for i, (unit, _) in enumerate(items):
                split = decode_split(unit, i, len(items), shift, mean)
                for mine, everyone in ((split.on_gpu, placed.on_gpu), (split.streamed, placed.streamed),
                                       (split.on_cpu, placed.on_cpu)):
                    assert [id(p) for _, p in mine] == [id(p) for j, p in everyone if j == i]


def test_uniform_decode_splits_stream_one_total_for_every_routing() -> None:
    """Experts whose plans stream 1 or 2 pieces: by the plan's kinds a top-2 routing streamed 2, 3
    or 4; uniform, every routing streams the layer's count (its first host pieces in row order)."""
    experts = [_unit(["GG", "CG", "CC", "CC", "CC"]), _unit(["GG", "CG", "CG", "CC", "CC"])] * 2
    mean = mean_streamed_pieces(experts)
    assert mean == 1.5
    for shift in range(-4, 5):
        totals = set()
        for first in experts:
            for second in experts:
                splits = [decode_split(unit, i, 2, shift, mean) for i, unit in enumerate((first, second))]
                totals.add(sum(len(split.streamed) for split in splits))
                for split, unit in zip(splits, (first, second), strict=True):
                    host = [piece for piece in unit.slices if piece.kind != "GG"]
                    assert [p for _, p in split.streamed] == host[: len(split.streamed)]
                    assert [p for _, p in split.on_cpu] == host[len(split.streamed) :]
                    assert [p.kind for _, p in split.on_gpu] == ["GG"]
        assert totals == {min(layer_streamed(mean, 2, shift), 8)}
    assert layer_streamed(mean, 2, 0) == 3 and layer_streamed(mean, 2, 5) == 0


def test_no_routed_jobs_without_a_gpu(tiny_checkpoints: dict[str, Path]) -> None:
    pool = CpuPool(torch.nn.functional.silu, "silu", num_threads=1)
    try:
        assert RoutedJobs.create(Accelerator.for_device("cpu"), pool) is None
    finally:
        pool.shutdown()
    llm = LLM(str(tiny_checkpoints["mixtral"]), show_progress=False, policy="manual:cg=0.5")
    assert llm.engine.runner.executor.routed_jobs is None
    assert "routed_cpu_jobs" not in llm.engine.plan_info() and "partial_graphs" not in llm.engine.plan_info()


def _same_bits_either_way(tmp_path: Path, arch: str, setting: str) -> tuple[LLM, LLM]:
    """Engines with the executor's boolean `setting` off and on, once they decoded the same bits."""
    path = write_bf16(tmp_path, arch)
    off, on = bf16_gpu_llm(path, **{setting: False}), bf16_gpu_llm(path, **{setting: True})
    _assert_same(off, on)
    return off, on


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_routed_jobs_give_the_bits_of_jobs_submitted_after_the_routing(arch: str, tmp_path: Path) -> None:
    after, routed = _same_bits_either_way(tmp_path, arch, "use_routed")
    jobs = routed.engine.runner.executor.routed_jobs
    assert jobs is not None and jobs.submitted > 0 and jobs.cancelled == 0
    assert after.engine.runner.executor.routed_jobs.submitted == 0
    assert routed.engine.runner.executor._routed is None
    info = routed.engine.plan_info()
    assert info["routed_cpu_jobs"] == {"enabled": True, "submitted": jobs.submitted, "given_up": 0}
    assert info["partial_graphs"]["replays"] > 0


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
@pytest.mark.parametrize("in_job", [0, 1])
def test_copies_from_the_gate_give_the_bits_of_copies_from_the_driving_thread(arch: str, in_job: int,
                                                                            tmp_path: Path) -> None:
    """in_job: the driver enqueues the copies before the CPU job (0) or from its thread 0 once the
    job's pack phase is over (1: the kernels' `copies_in_job` knob)."""
    from engine.cpu_kernels.runner import get_tuning, set_tuning

    before = get_tuning("copies_in_job")
    set_tuning("copies_in_job", in_job)
    try:
        thread, gate = _same_bits_either_way(tmp_path, arch, "use_gate_copies")
    finally:
        set_tuning("copies_in_job", before)
    copier = gate.engine.runner.executor._gate_copies
    assert copier is not None and copier.adopted > 0
    assert thread.engine.runner.executor._gate_copies is None
    assert gate.engine.plan_info()["gate_copies"] == {"enabled": True, "adopted": copier.adopted}
    assert gate.engine.runner.executor.routed_jobs.cancelled == 0


def _uneven_balanced_plan(path: Path, tmp_path: Path) -> str:
    """A `balance` plan whose experts stream 1 or 2 host chunks of 8 rows (alternating), as the
    adaptive planner's whole-chunk CG gives them: uniform decode splits then differ from the plan's."""
    config, _ = resolve_model_config(str(path))
    splits = {}
    for layer, unit, size in ffn_units(config):
        gg = size // 4
        cg = min(8 * (1 + unit % 2), size - gg)
        splits[(layer, unit)] = UnitSplit(gg, cg, size - gg - cg)
    plan_path = tmp_path / "uneven.json"
    plan_path.write_text(PartitionPlan("uneven", splits, "balance", host_chunk=8).to_json())
    return f"manual:{plan_path}"


def _uneven_llm(path: Path, policy: str, dtype: str, **executor_settings: object) -> LLM:
    llm = LLM(str(path), device="cuda", dtype=dtype, show_progress=False, policy=policy,
              kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=8)
    for name, value in executor_settings.items():
        setattr(llm.engine.runner.executor, name, value)
    return llm


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_uniform_routed_jobs_give_the_bits_of_assign(arch: str, tmp_path: Path) -> None:
    """Uniform decode splits, experts planned unevenly: the routed jobs' tables split each expert as
    `assign` does after the routing (same bits). The feedback is held at its shift: moved by timing,
    the splits (and the fp32 sums' order) would differ between the engines."""
    path = write_bf16(tmp_path, arch)
    policy = _uneven_balanced_plan(path, tmp_path)
    after, routed = (_uneven_llm(path, policy, "bfloat16", use_routed=v, uniform_decode_split=True) for v in (False, True))
    for llm in (after, routed):
        llm.engine.runner.executor.feedback.frozen = True
    _assert_same(after, routed)
    jobs = routed.engine.runner.executor.routed_jobs
    assert jobs.submitted > 0 and jobs.cancelled == 0 and after.engine.runner.executor.routed_jobs.submitted == 0
    assert jobs._tables and all(key[2] == 1.5 for key in jobs._tables)  # (layer, shift, mean streamed, x)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_uniform_decode_splits_keep_fp32_results(arch: str, tmp_path: Path) -> None:
    """A decode split is a partition: uniform or by the plan's kinds, fp32 greedy tokens are those
    of the model on the GPU alone, and logits within 1e-5."""
    path = write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=1)
    policy = _uneven_balanced_plan(path, tmp_path)
    alone = LLM(str(path), device="cuda", dtype="float32", show_progress=False, kv_cache_tokens=256,
                max_num_batched_tokens=64, max_num_seqs=4)
    tokens, logits = _run(alone, PROMPTS)
    for uniform in (False, True):
        llm = _uneven_llm(path, policy, "float32", uniform_decode_split=uniform)
        got_tokens, got_logits = _run(llm, PROMPTS)
        assert got_tokens == tokens
        for a, b in zip(logits, got_logits, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert llm.engine.runner.executor.feedback.layers > 0  # decode layers were measured and split


def test_gate_copy_entries_follow_each_choices_streamed_pieces() -> None:
    rows, hidden = 32, 64
    storages = [torch.zeros(3 * rows * hidden) for _ in range(4)]  # gate_up then down, adjacent: one copy
    pieces = [UnitSlice(i * rows, (i + 1) * rows, s[: 2 * rows * hidden].view(2 * rows, hidden),
                        s[2 * rows * hidden :].view(hidden, rows), kind)
              for i, (s, kind) in enumerate(zip(storages, ["GG", "CG", "CG", "CC"], strict=True))]
    unit = FFNUnit(4 * rows, pieces)
    entries = choice_entries([[p for _, p in decode_split(unit, 0, 1, shift).streamed] for shift in (0, 1, -1)])
    assert entries is not None
    offsets, flat = entries
    assert list(offsets) == [0, 2, 3, 6]  # shift 1 moves the last streamed piece to the CPU, -1 the CC one to PCIe
    expected = [pieces[1], pieces[2], pieces[1], pieces[1], pieces[2], pieces[3]]
    assert [tuple(flat[3 * k : 3 * k + 3]) for k in range(6)] == [piece_entry(p) for p in expected]
    assert all(tuple(flat[3 * k : 3 * k + 3]) == (p.gate_up.data_ptr(), 3 * rows * hidden * 4, 1)
               for k, p in enumerate(expected))
    apart = UnitSlice(0, rows, torch.zeros(2 * rows, hidden), torch.zeros(hidden, rows), "CG")
    assert apart.packed is None and choice_entries([[apart]]) is None
    # pieces staged ahead (expert look-ahead) are marked in every choice that lists them, the rest kept
    marked = skip_staged_ahead(flat, [pieces[1]])
    kinds = [marked[3 * k + 2] for k in range(6)]
    assert kinds == [STAGED_AHEAD, 1, STAGED_AHEAD, STAGED_AHEAD, 1, 1]
    assert [marked[3 * k] for k in range(6)] == [flat[3 * k] for k in range(6)] and flat[2] == 1  # a copy


def test_routed_tables_follow_the_pieces_kinds_after_clear(tiny_checkpoints: dict[str, Path]) -> None:
    """A routed job's table is kept per (layer, shift, mean streamed, activations); a new plan relabels pieces
    (the executor's apply_plan clears the tables), and the next table follows the new kinds."""
    llm = LLM(str(tiny_checkpoints["mixtral"]), dtype="bfloat16", show_progress=False,
              policy="manual:gg=0.25,cg=0.25", host_chunk_rows=8)
    ffn = llm.engine.runner.model.layers[0].ffn
    pool = llm.engine.runner.executor.cpu_pool
    jobs = RoutedJobs(Accelerator.for_device("cpu"), pool, gate=None)  # type: ignore[arg-type]
    x = torch.zeros(1, ffn.experts[0].slices[0].gate_up.shape[1], dtype=torch.bfloat16)
    before = jobs._table(0, ffn, x, 0, None)
    assert before is not None and before.max_rows > 0
    cpu_before = sum(len(split.on_cpu) for split in before.splits)
    for expert in ffn.experts:
        for piece in expert.slices:
            if piece.kind == "CC":
                piece.kind = "CG"
    assert jobs._table(0, ffn, x, 0, None) is before  # kept until cleared
    jobs.clear()
    after = jobs._table(0, ffn, x, 0, None)
    assert after is not None and cpu_before > 0 and sum(len(split.on_cpu) for split in after.splits) == 0
