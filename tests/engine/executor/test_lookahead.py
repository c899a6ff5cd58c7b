"""Expert look-ahead: decode layers copy the first streamed pieces of the next layer's likely
experts ahead. The guess comes from the next router (the experts both routers pick); right or
wrong, the logits and tokens stay those of decoding without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.executor import partitioned
from engine.executor.gate_copies import GateCopies
from engine.executor.lookahead import likely_pieces
from engine.model.decode_graphs import DecodeGraphs
from engine.model.moe import MoEBlock
from engine.placement.plan import PieceKind
from tests.engine.model.test_decode_graphs import _assert_same

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(path: Path, lookahead_pieces: int, device: str = "cpu") -> LLM:
    llm = LLM(str(path), device=device, dtype="float32" if device == "cpu" else "bfloat16", show_progress=False,
              policy="manual:gg=0.25,cg=0.5", kv_cache_tokens=256, max_num_batched_tokens=64, max_num_seqs=4,
              host_chunk_rows=8)
    model = llm.engine.runner.model
    if device == "cpu":  # the decode path that reads routing on the host (captured graphs on a GPU)
        model.decode_graphs = DecodeGraphs(model, capture=False)
    llm.engine.runner.executor.lookahead_pieces = lookahead_pieces
    if model.decode_graphs is not None:
        model.decode_graphs.reset()  # they compute the guesses only when look-ahead is on
    return llm


@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_likely_experts_are_the_routers_picks(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    model = LLM(str(tiny_checkpoints[arch]), dtype="float32", show_progress=False).engine.runner.model
    layer = model.layers[1]
    assert isinstance(layer.ffn, MoEBlock)
    residual = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    guessed = layer.ffn.likely_experts(residual, layer.post_attention_norm)
    routed = layer.ffn.route(layer.post_attention_norm(residual)).expert_ids
    assert torch.equal(guessed.sort(dim=-1).values, routed.sort(dim=-1).values)


def test_likely_pieces_take_each_experts_first_streamed_pieces_in_turn(tiny_checkpoints: dict[str, Path]) -> None:
    ffn = _engine(tiny_checkpoints["mixtral"], 2).engine.runner.model.layers[1].ffn
    streamed = {e: [p for p in ffn.experts[e].slices if p.kind == PieceKind.CG] for e in range(len(ffn.experts))}
    assert all(len(pieces) >= 2 for pieces in streamed.values())
    got = likely_pieces(ffn, [2, 0], 3)
    assert [id(p) for p in got] == [id(streamed[2][0]), id(streamed[0][0]), id(streamed[2][1])]
    assert likely_pieces(ffn, [2, 0], 0) == []
    assert likely_pieces(ffn, [99], 2) == []  # not an expert of this layer: nothing


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@pytest.mark.parametrize(("arch", "device"), [("mixtral", "cpu"), ("phimoe", "cpu"),
                                              pytest.param("mixtral", "cuda", marks=[pytest.mark.gpu, CUDA]),
                                              pytest.param("phimoe", "cuda", marks=[pytest.mark.gpu, CUDA])])
def test_lookahead_keeps_every_logit_and_uses_right_guesses(arch: str, device: str, tiny_checkpoints: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plans_ahead: list[int] = []  # on the GPU: how many pieces each gate-copy plan found staged ahead
    plan = GateCopies.plan

    def recording_plan(self: GateCopies, *args, **kwargs):
        made = plan(self, *args, **kwargs)
        plans_ahead.append(self.ring.num_slots - made.max_copies)
        return made

    monkeypatch.setattr(GateCopies, "plan", recording_plan)
    off, on = _engine(tiny_checkpoints[arch], 0, device), _engine(tiny_checkpoints[arch], 4, device)
    _assert_same(off, on)
    stats = on.engine.runner.executor.lookahead_stats
    assert stats.staged > 0 and 0 < stats.used <= stats.staged
    if device == "cuda":  # the routed jobs' copies from the gate go on, skipping the pieces staged ahead
        copier = on.engine.runner.executor._gate_copies
        assert copier is not None and copier.adopted > 0
        assert any(ahead > 0 for ahead in plans_ahead) and on.engine.runner.executor.routed_jobs.cancelled == 0
    assert off.engine.runner.executor.lookahead_stats.staged == 0
    # without look-ahead the decode graphs compute no guesses (a router pass per layer saved)
    for llm, guessing in ((off, False), (on, True)):
        steps = llm.engine.runner.model.decode_graphs._steps.values()
        assert steps and all(step.segments.lookahead is guessing for step in steps)
        outputs = [out for step in steps for outs in step.outputs.values() for out in outs[:-1]]
        assert outputs and all((out.next_ids is not None) is guessing for out in outputs)
    assert on.engine.partition.describe()["lookahead"]["staged"] == stats.staged


def test_wrong_guesses_are_released_and_change_nothing(tiny_checkpoints: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every guess names pieces of the first layer, which no later layer streams: all copies
    ahead are released unused, between used slots of the ring."""
    off = _engine(tiny_checkpoints["mixtral"], 0)
    on = _engine(tiny_checkpoints["mixtral"], 4)
    first = on.engine.runner.model.layers[0].ffn

    def wrong_pieces(ffn: MoEBlock, experts: list[int], limit: int):
        return likely_pieces(first, experts, limit)

    monkeypatch.setattr(partitioned, "likely_pieces", wrong_pieces)
    _assert_same(off, on)
    stats = on.engine.runner.executor.lookahead_stats
    assert stats.staged > 0 and stats.used == 0
