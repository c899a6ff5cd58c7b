"""Tests of engine/sampler.py: seeding, filters' exact support, penalties, greedy, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import (
    Sampler,
    SampleResult,
    SamplerRequest,
    apply_filters,
    apply_penalties,
    make_generator,
)
from engine.sampling_params import SamplingParams

VOCAB = 32


def _req(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> SamplerRequest:
    gen = generator if generator is not None else make_generator(params.seed, "cpu")
    return SamplerRequest(params, prompt or [], output or [], gen)


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def _draw_ids(logits_row: torch.Tensor, params: SamplingParams, n: int = 2000) -> set[int]:
    """The set of ids drawn in n samples of one row (one generator shared by all n rows)."""
    gen = make_generator(1234, "cpu")
    logits = logits_row.unsqueeze(0).expand(n, -1)
    results = Sampler()(logits, [_req(params, generator=gen) for _ in range(n)])
    return {r.token_id for r in results}


def _support(logits_row: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> set[int]:
    out = apply_filters(
        logits_row.unsqueeze(0),
        torch.tensor([top_k]),
        torch.tensor([top_p]),
        torch.tensor([min_p]),
    )
    return set(torch.isfinite(out[0]).nonzero().flatten().tolist())


def test_make_generator_seeded_and_random() -> None:
    a = torch.rand(8, generator=make_generator(7, "cpu"))
    b = torch.rand(8, generator=make_generator(7, "cpu"))
    c = torch.rand(8, generator=make_generator(None, "cpu"))
    d = torch.rand(8, generator=make_generator(None, "cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(c, d)


def _run_steps(params: SamplingParams, steps: int, others: list[SamplingParams]) -> list[int]:
    """Sample `steps` tokens for one seeded row, batched behind rows with other params."""
    sampler = Sampler()
    mine = _req(params)
    rest = [_req(p) for p in others]
    tokens: list[int] = []
    for step in range(steps):
        logits = _logits(len(rest) + 1, seed=step)
        logits[-1] = _logits(1, seed=1000 + step)[0]  # my row's logits do not depend on the batch
        results = sampler(logits, [*rest, mine])
        tokens.append(results[-1].token_id)
        mine.output_token_ids.append(results[-1].token_id)
    return tokens


def test_seed_reproducible_across_calls_and_batches() -> None:
    params = SamplingParams(temperature=1.5, seed=42)
    alone = _run_steps(params, 30, [])
    again = _run_steps(params, 30, [])
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, seed=1),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1, presence_penalty=1.0),
    ]
    batched = _run_steps(params, 30, others)
    assert alone == again == batched
    other_seed = _run_steps(SamplingParams(temperature=1.5, seed=43), 30, [])
    assert other_seed != alone


def test_greedy_is_argmax() -> None:
    logits = _logits(6, seed=3)
    results = Sampler()(logits, [_req(SamplingParams(temperature=0.0, top_k=3)) for _ in range(6)])
    assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()


def test_greedy_ties_pick_lowest_id() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, [5, 9]] = 1.0
    assert Sampler()(logits, [_req(SamplingParams(temperature=0.0))])[0].token_id == 5


def test_top_k_support() -> None:
    row = torch.zeros(VOCAB)
    top = [3, 8, 17, 30]
    row[top] = torch.tensor([1.0, 1.05, 0.95, 1.02])
    assert _draw_ids(row, SamplingParams(top_k=4)) == set(top)
    assert _support(row, top_k=4) == set(top)
    # Control: without top-k the other ids are drawn too.
    assert len(_draw_ids(row, SamplingParams())) > len(top)


PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]  # sorted: id1 .4, id3 .3, id4 .15, id2 .1, id0 .05


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.3, {1}), (0.65, {1, 3}), (0.8, {1, 3, 4}), (0.9, {1, 2, 3, 4}), (0.99, {0, 1, 2, 3, 4})],
)
def test_top_p_support(top_p: float, expected: set[int]) -> None:
    row = torch.tensor(PROBS).log()
    assert _support(row, top_p=top_p) == expected
    assert _draw_ids(row, SamplingParams(top_p=top_p)) == expected


def test_top_p_applies_after_top_k_renormalizes() -> None:
    # top-3 renormalized: id1 .471, id3 .353, id4 .176 -> mass before id4 is .82 >= .8, so it goes.
    row = torch.tensor(PROBS).log()
    assert _support(row, top_k=3, top_p=0.8) == {1, 3}
    assert _support(row, top_p=0.8) == {1, 3, 4}


@pytest.mark.parametrize(("min_p", "expected"), [(0.22, {1, 2, 3, 4}), (0.3, {1, 3, 4}), (0.5, {1, 3}), (0.0, {0, 1, 2, 3, 4})])
def test_min_p_support(min_p: float, expected: set[int]) -> None:
    row = torch.tensor(PROBS).log()  # threshold = min_p * 0.4
    assert _support(row, min_p=min_p) == expected
    assert _draw_ids(row, SamplingParams(min_p=min_p)) == expected


def test_temperature_changes_distribution() -> None:
    row = torch.tensor([0.0, math.log(3.0)])  # p(1) = 0.75 at temperature 1
    n = 4000
    for temperature, p1 in [(1.0, 0.75), (2.0, math.sqrt(3) / (1 + math.sqrt(3))), (0.5, 0.9)]:
        gen = make_generator(5, "cpu")
        logits = row.unsqueeze(0).expand(n, -1)
        results = Sampler()(logits, [_req(SamplingParams(temperature=temperature), generator=gen)] * n)
        freq = sum(r.token_id for r in results) / n
        assert abs(freq - p1) < 0.03, (temperature, freq, p1)


def test_penalties_exact_numbers() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    requests = [_req(params, prompt=[0, 1], output=[1, 3, 3]), _req(SamplingParams(), [0, 1], [1, 3, 3])]
    out = apply_penalties(logits, requests)
    # repetition over {0, 1, 3}: 2 -> 1, -1 -> -2, 3 -> 1.5; then id1 -= .5 + .25*1, id3 -= .5 + .25*2
    assert torch.allclose(out[0], torch.tensor([1.0, -2.75, 0.5, 0.5, -2.0]))
    assert torch.equal(out[1], logits[1])


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert Sampler()(logits, [_req(params)])[0].token_id == 0
    assert Sampler()(logits, [_req(params, output=[0])])[0].token_id == 1


def test_logprobs_are_raw_log_softmax_and_sorted() -> None:
    logits = _logits(3, seed=9)
    params = [
        SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.5, presence_penalty=1.0, logprobs=4, seed=2),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(),
    ]
    results: list[SampleResult] = Sampler()(logits, [_req(p, [1, 2], [3]) for p in params])
    raw = torch.log_softmax(logits, dim=-1)
    lp = results[0].logprob
    assert lp is not None and lp.token_id == results[0].token_id
    assert lp.logprob == pytest.approx(raw[0, lp.token_id].item(), abs=1e-6)
    assert [t for t, _ in lp.top_logprobs] == raw[0].topk(4).indices.tolist()
    values = [v for _, v in lp.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(raw[0].topk(4).values.tolist(), abs=1e-6)
    assert results[1].logprob is not None and results[1].logprob.top_logprobs == []
    assert results[1].logprob.logprob == pytest.approx(raw[1].max().item(), abs=1e-6)
    assert results[2].logprob is None


def test_callers_logits_unchanged() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        logits = _logits(2, seed=4).to(dtype)
        before = logits.clone()
        params = SamplingParams(
            temperature=0.5, top_k=4, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
            presence_penalty=0.5, frequency_penalty=0.5, logprobs=2, seed=0,
        )
        Sampler()(logits, [_req(params, [0, 1], [2, 2]), _req(SamplingParams(temperature=0.0), [3], [])])
        assert torch.equal(logits, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_seeded_reproducible() -> None:
    logits = _logits(2, seed=1).cuda()
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    a = Sampler()(logits, [_req(params, generator=make_generator(11, "cuda"))] * 2)
    b = Sampler()(logits, [_req(params, generator=make_generator(11, "cuda"))] * 2)
    assert [r.token_id for r in a] == [r.token_id for r in b]
