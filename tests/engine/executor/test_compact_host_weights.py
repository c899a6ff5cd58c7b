"""Host pieces stored compact change no result: the same tokens and logits, bit for bit, as bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model.compact_weights import COMPACT_BYTES_RATIO
from engine.placement.plan import PieceKind
from engine.tools.tiny_checkpoint import write_tiny_checkpoint

compact = pytest.importorskip("engine.cpu_kernels.compact")
pytestmark = pytest.mark.skipif(not compact.available(), reason="the C++ cpu kernels did not build here")
PROMPTS = [[5, 9, 13, 22, 40, 41, 42, 7, 8, 100, 3], [3, 4, 250, 17]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(path: Path, policy: str, compact_host_weights: bool, device: str = "cpu") -> LLM:
    budget = "4MB" if device == "cpu" else None  # a budget on CUDA caps the whole process's memory
    return LLM(str(path), device=device, dtype="bfloat16", show_progress=False, gpu_memory_budget=budget,
               policy=policy, kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4, host_chunk_rows=32,
               compact_host_weights=compact_host_weights)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # widths that are multiples of 32, so that every host piece can be compact
    return write_tiny_checkpoint(tmp_path_factory.mktemp("compact") / "mixtral", arch="mixtral", seed=3,
                                 dtype="bfloat16", intermediate_size=128)


@pytest.mark.parametrize("policy", ["manual:gg=0.5,cg=0.25", "balanced:gg=0.25,cg=0.5", "manual:gg=0.25,cg=0"])
def test_compact_host_pieces_keep_every_bit(checkpoint: Path, policy: str) -> None:
    plain = _engine(checkpoint, policy, compact_host_weights=False)
    packed = _engine(checkpoint, policy, compact_host_weights=True)
    report = packed.engine.partition.compaction
    rows = packed.engine.partition.plan.rows_by_kind()
    assert rows[PieceKind.CG] + rows[PieceKind.CC] > 0
    assert report is not None and report.pieces > 0 and report.kept_bf16 == 0
    assert 0.74 < report.ratio < 0.77
    assert plain.engine.partition.compaction is None
    assert packed.engine.partition.plan.host_bytes_ratio == COMPACT_BYTES_RATIO
    assert torch.equal(packed.engine.prompt_logits(PROMPTS[0]), plain.engine.prompt_logits(PROMPTS[0]))
    got = [o.token_ids for o in packed.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
    assert got == [o.token_ids for o in plain.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
    assert packed.engine.partition.describe()["compact_host_weights"]["pieces"] == report.pieces


def test_compact_staging_is_in_the_gpu_budget(checkpoint: Path) -> None:
    plain = _engine(checkpoint, "manual:gg=0.5,cg=0.5", compact_host_weights=False).engine.partition
    packed = _engine(checkpoint, "manual:gg=0.5,cg=0.5", compact_host_weights=True).engine.partition
    assert packed.memory.staging > 1.7 * plain.memory.staging
    assert packed.executor.ring is not None and packed.memory.staging == packed.executor.ring.num_bytes
    assert packed.memory.total <= 4_000_000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_cuda_compact_host_pieces_keep_every_bit(checkpoint: Path) -> None:
    plain = _engine(checkpoint, "balanced:gg=0.25,cg=0.5", compact_host_weights=False, device="cuda")
    packed = _engine(checkpoint, "balanced:gg=0.25,cg=0.5", compact_host_weights=True, device="cuda")
    assert packed.engine.partition.compaction.pieces > 0
    assert torch.equal(packed.engine.prompt_logits(PROMPTS[0]), plain.engine.prompt_logits(PROMPTS[0]))
    got = [o.token_ids for o in packed.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
    assert got == [o.token_ids for o in plain.generate(prompt_token_ids=PROMPTS, params=GREEDY)]


def test_default_is_compact_only_where_kernels_decode_in_registers(checkpoint: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "avx2")  # the path that decodes into a scratch copy
    assert not compact.decodes_in_registers()
    assert _engine(checkpoint, "manual:gg=0.5,cg=0.25", compact_host_weights=None).engine.partition.compaction is None
    forced = _engine(checkpoint, "manual:gg=0.5,cg=0.25", compact_host_weights=True).engine.partition.compaction
    assert forced is not None and forced.pieces > 0
    monkeypatch.setenv("SCHEINFER_CPU_KERNEL", "auto")
    register_decode = compact.runner.active_path() in ("avx512_bf16", "amx")
    assert compact.decodes_in_registers() == register_decode
    auto = _engine(checkpoint, "manual:gg=0.5,cg=0.25", compact_host_weights=None).engine.partition.compaction
    assert (auto is not None) == register_decode
