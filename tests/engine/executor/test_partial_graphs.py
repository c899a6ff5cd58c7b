"""Decode pieces' partials replayed as CUDA graphs (engine/executor/partial_graphs.py): a replay
gives the eager bits on whatever its operands' addresses hold, new operands take a new graph, and
decoding with the replays gives the bits of decoding without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.executor.accelerator import Accelerator
from engine.executor.partial_graphs import PartialGraphs
from tests.engine.executor.test_partition_exactness import bf16_gpu_llm, write_bf16
from tests.engine.model.test_decode_graphs import _assert_same

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def _partial_fn(accelerator: Accelerator):
    def partial(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return accelerator.linear_fp32(F.silu(gate) * up, down)
    return partial


def _operands(device: str, rows: int = 96, hidden: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(rows)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    return randn(1, hidden), randn(2 * rows, hidden), randn(hidden, rows)


def test_without_a_gpu_every_call_is_eager() -> None:
    accelerator = Accelerator.for_device("cpu")
    graphs = PartialGraphs(accelerator, _partial_fn(accelerator))
    x, gate_up, down = _operands("cpu")
    sums = torch.zeros(2, 64)
    graphs.add_partial(sums[1:], x, gate_up, down)
    graphs.add_partial(sums[1:], x, gate_up, down)
    expected = 2 * _partial_fn(accelerator)(x, gate_up, down)
    assert torch.equal(sums[1:], expected) and not sums[0].any()
    assert not graphs.enabled and len(graphs) == 0 and graphs.replayed == 0


@pytest.mark.gpu
@CUDA
def test_replays_give_the_eager_bits_on_what_the_addresses_hold_now() -> None:
    accelerator = Accelerator.for_device("cuda")
    partial = _partial_fn(accelerator)
    graphs = PartialGraphs(accelerator, partial)
    x, gate_up, down = _operands("cuda")
    sums = torch.zeros(2, 64, device="cuda")
    graphs.add_partial(sums[0:1], x, gate_up, down)  # eager, then captured
    assert len(graphs) == 1 and graphs.replayed == 0
    torch.testing.assert_close(sums[0:1], partial(x, gate_up, down), rtol=0, atol=0)
    for step in range(3):  # new values at the same addresses: the replay reads them
        x.copy_(_operands("cuda", rows=97 + step)[0])
        gate_up.mul_(-1)
        sums.zero_()
        graphs.add_partial(sums[0:1], x, gate_up, down)
        expected = partial(x, gate_up, down)
        assert torch.equal(sums[0:1], expected), f"step {step}"
        assert not sums[1].any()
    assert len(graphs) == 1 and graphs.replayed == 3
    graphs.add_partial(sums[1:2], x, gate_up, down)  # another sums row: other operands, a new graph
    assert len(graphs) == 2 and torch.equal(sums[1:2], sums[0:1])


@pytest.mark.gpu
@CUDA
def test_past_the_limit_new_operands_run_eagerly() -> None:
    accelerator = Accelerator.for_device("cuda")
    graphs = PartialGraphs(accelerator, _partial_fn(accelerator), max_graphs=1)
    x, gate_up, down = _operands("cuda")
    sums = torch.zeros(2, 64, device="cuda")
    for _ in range(2):
        graphs.add_partial(sums[0:1], x, gate_up, down)
        graphs.add_partial(sums[1:2], x, gate_up, down)
    assert len(graphs) == 1 and graphs.replayed == 1
    assert torch.equal(sums[0], sums[1])


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("arch", ["mixtral", "phimoe", "llama"])
def test_decoding_with_partial_graphs_gives_the_eager_bits(arch: str, tmp_path: Path) -> None:
    path = write_bf16(tmp_path, arch)

    eager, replayed = bf16_gpu_llm(path), bf16_gpu_llm(path)
    eager.engine.runner.executor.partial_graphs.enabled = False
    _assert_same(eager, replayed)
    graphs = replayed.engine.runner.executor.partial_graphs
    assert len(graphs) > 0 and graphs.replayed > len(graphs)
    assert eager.engine.runner.executor.partial_graphs.replayed == 0
