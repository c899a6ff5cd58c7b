"""Combining expert outputs: the one-token fast path is bitwise the general loop."""

from __future__ import annotations

import pytest
import torch

from engine.model.moe import MoEBlock, Routing, _combine_one_token

HIDDEN = 96


def _groups(ids: list[int]):
    routing = Routing(torch.tensor([ids]), torch.zeros(1, len(ids)))
    return routing.tokens_of()


@pytest.mark.parametrize("top_k", [2, 4])
@pytest.mark.parametrize("adjacent", [True, False])
def test_one_token_combination_is_bitwise_the_loop(top_k: int, adjacent: bool) -> None:
    gen = torch.Generator().manual_seed(top_k)
    x = torch.zeros(1, HIDDEN, dtype=torch.bfloat16)
    weights = torch.rand(1, top_k, generator=gen)  # fp32 routing weights, as Mixtral keeps them
    block = torch.randn(top_k, HIDDEN, generator=gen).to(torch.bfloat16) * 3
    results = [block[k : k + 1] for k in range(top_k)] if adjacent else [block[k : k + 1].clone() for k in range(top_k)]
    groups = _groups(list(range(10, 10 + top_k)))  # ids in increasing order: k positions 0, 1, ...
    fast = _combine_one_token(results, groups, weights, torch.bfloat16)
    assert fast is not None
    assert torch.equal(fast, MoEBlock._combine(x, results, groups, weights))


def test_experts_out_of_top_k_order_take_the_loop() -> None:
    groups = _groups([7, 3])  # expert 3 (k=1) comes first in id order
    results = [torch.ones(1, HIDDEN), torch.ones(1, HIDDEN)]
    assert _combine_one_token(results, groups, torch.ones(1, 2), torch.float32) is None
    two_tokens = Routing(torch.tensor([[1, 2], [1, 2]]), torch.ones(2, 2)).tokens_of()
    assert _combine_one_token([torch.ones(2, HIDDEN)] * 2, two_tokens, torch.ones(2, 2), torch.float32) is None
