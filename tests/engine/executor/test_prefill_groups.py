"""Prefill computes adjacent streamed pieces of a unit as one piece (PartitionedExecutor.group_rows):
the result is bit for bit that of pieces built as wide as the group, compact or bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.tools.tiny_checkpoint import write_tiny_checkpoint

compact = pytest.importorskip("engine.cpu_kernels.compact")
PROMPT = [(7 * k + 3) % 250 + 1 for k in range(160)]  # enough tokens a unit for prefill's rule


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("groups") / "mixtral", arch="mixtral", seed=5,
                                 dtype="bfloat16", intermediate_size=128)


def _engine(path: Path, host_chunk_rows: int, group_rows: int, compact_host_weights: bool) -> LLM:
    llm = LLM(str(path), device="cpu", dtype="bfloat16", show_progress=False, gpu_memory_budget="8MB",
              policy="manual:gg=0,cg=1", kv_cache_tokens=512, max_num_batched_tokens=256, max_num_seqs=2,
              host_chunk_rows=host_chunk_rows, compact_host_weights=compact_host_weights)
    llm.engine.partition.executor.group_rows = group_rows
    return llm


@pytest.mark.parametrize("compact_host_weights", [
    pytest.param(True, marks=pytest.mark.skipif(not compact.available(), reason="the C++ cpu kernels did not build here")),
    False])
def test_grouped_pieces_give_the_bits_of_pieces_built_as_wide(checkpoint: Path, compact_host_weights: bool) -> None:
    grouped = _engine(checkpoint, 32, 64, compact_host_weights)
    wide = _engine(checkpoint, 64, 0, compact_host_weights)
    alone = _engine(checkpoint, 32, 0, compact_host_weights)
    logits = grouped.engine.prompt_logits(PROMPT)
    assert grouped.engine.partition.executor.grouped_pieces > 0
    assert wide.engine.partition.executor.grouped_pieces == alone.engine.partition.executor.grouped_pieces == 0
    assert torch.equal(logits, wide.engine.prompt_logits(PROMPT))
    # each piece alone sums four partials a unit instead of two: the same values up to rounding
    torch.testing.assert_close(logits, alone.engine.prompt_logits(PROMPT), rtol=0.02, atol=0.02)


def test_decode_steps_compute_pieces_alone(checkpoint: Path) -> None:
    llm = _engine(checkpoint, 32, 64, compact_host_weights=False)
    llm.engine.prompt_logits(PROMPT[:4])  # four tokens: bandwidth-bound, no groups
    assert llm.engine.partition.executor.grouped_pieces == 0
