"""The fused sparsemixer routing kernel gives torch's routing to the bit (GPU): the same experts and
the same weights for random logits, for logits full of ties, and for logits whose gap to the
maximum sits at the jitter threshold, in bf16 and fp32, for 2 to 32 experts."""

from __future__ import annotations

import pytest
import torch

from engine.model.decode_graphs import _in_id_order
from engine.model.moe import sparsemixer
from engine.model.routing_kernels import fused_sparsemixer_applies, sparsemixer_in_id_order

JITTER_EPS = 0.01  # PhiMoE's router_jitter_noise


def test_the_fused_routing_does_not_apply_without_cuda() -> None:
    assert not fused_sparsemixer_applies(torch.randn(1, 16))


@pytest.mark.gpu
def test_the_fused_routing_takes_bf16_and_fp32_logits_only() -> None:
    assert not fused_sparsemixer_applies(torch.randn(1, 16, device="cuda", dtype=torch.float16))


def _logit_sets(num_experts: int, dtype: torch.dtype, generator: torch.Generator) -> dict[str, torch.Tensor]:
    rows = 4096
    plain = torch.randn(rows, num_experts, generator=generator) * 2
    # few distinct values: ties at the first and second maximum, zero gaps, zeros
    coarse = torch.randint(-4, 5, (rows, num_experts), generator=generator).float() / 4
    # gaps to the row's maximum around 2 * eps of its scale: the mask's decision at its threshold
    top = torch.rand(rows, 1, generator=generator) * 4 - 2
    relative = 2 * JITTER_EPS * (1 + (torch.randint(-3, 4, (rows, num_experts), generator=generator) / 256))
    near = top - top.abs() * relative
    near[:, 0] = top[:, 0]
    near = near[:, torch.randperm(num_experts, generator=generator)]
    return {name: values.to(dtype).cuda() for name, values in
            (("plain", plain), ("coarse", coarse), ("near the threshold", near))}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_experts", [2, 8, 12, 16, 32])
def test_fused_sparsemixer_matches_torch_bit_for_bit(dtype: torch.dtype, num_experts: int) -> None:
    generator = torch.Generator().manual_seed(num_experts)
    for name, logits in _logit_sets(num_experts, dtype, generator).items():
        assert fused_sparsemixer_applies(logits)
        expected = _in_id_order(sparsemixer(logits, JITTER_EPS))
        got = sparsemixer_in_id_order(logits, JITTER_EPS)
        assert torch.equal(got.expert_ids, expected.expert_ids), name
        assert got.weights.dtype == expected.weights.dtype
        differ = (got.weights.view(-1) != expected.weights.view(-1)).nonzero().flatten()
        assert differ.numel() == 0, (
            f"{name}: {differ.numel()} weights differ, first at {differ[0].item()}: "
            f"{got.weights.view(-1)[differ[0]].item()} vs {expected.weights.view(-1)[differ[0]].item()}")


@pytest.mark.gpu
def test_fused_sparsemixer_reads_a_strided_batch() -> None:
    logits = torch.randn(8, 40, device="cuda", dtype=torch.bfloat16)[:, :16]  # rows 40 apart
    got = sparsemixer_in_id_order(logits, JITTER_EPS)
    expected = _in_id_order(sparsemixer(logits, JITTER_EPS))
    assert torch.equal(got.expert_ids, expected.expert_ids) and torch.equal(got.weights, expected.weights)
