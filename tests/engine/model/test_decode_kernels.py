"""The decode graphs' fused kernels give torch's bits (GPU): rotary embedding with the cache writes,
and a one-token MoE combine into the residual, for bf16 models, odd sizes included; the routing's
store into pinned host memory gives what copies give, in a graph too."""

from __future__ import annotations

import pytest
import torch

from engine.model.decode_kernels import (
    combine_into_residual,
    combine_into_residual_applies,
    copy_to_host,
    copy_to_host_applies,
    rotate_into_cache,
    rotate_into_cache_applies,
)
from engine.model.moe import _sum_in_topk_order
from engine.model.rotary import apply_rotary

DTYPES = [torch.bfloat16]


def test_the_fused_kernels_do_not_apply_without_cuda() -> None:
    keys = torch.zeros(4, 2, 64)
    assert not rotate_into_cache_applies(torch.zeros(1, 64), 64, keys, keys)
    assert not combine_into_residual_applies(torch.zeros(2, 64), torch.zeros(1, 2), torch.zeros(1, 64))
    ids = torch.zeros(1, 2, dtype=torch.int64)
    assert not copy_to_host_applies(torch.zeros(1, 64), ids, torch.zeros(1, 64), ids)


@pytest.mark.gpu
def test_the_fused_kernels_take_bf16_only() -> None:
    keys = torch.zeros(4, 2, 64, dtype=torch.float16, device="cuda")
    assert not rotate_into_cache_applies(keys[0], 64, keys, keys)
    residual = torch.zeros(1, 64, dtype=torch.float16, device="cuda")
    assert not combine_into_residual_applies(torch.zeros(2, 64, device="cuda"), torch.zeros(1, 2, device="cuda"), residual)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "heads", "kv_heads", "head_dim"), [(1, 32, 8, 128), (3, 8, 2, 64), (8, 4, 4, 128)])
def test_rotary_into_the_cache_matches_torch_bit_for_bit(dtype, num_tokens, heads, kv_heads, head_dim) -> None:
    generator = torch.Generator(device="cuda").manual_seed(num_tokens)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator, device="cuda") * 3).to(dtype)

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size)
    cos, sin = randn(num_tokens, head_dim), randn(num_tokens, head_dim)
    slots = torch.randperm(64, generator=generator, device="cuda")[:num_tokens]
    keys, values = randn(64, kv_heads, head_dim), randn(64, kv_heads, head_dim)
    expected_keys, expected_values = keys.clone(), values.clone()
    q = qkv[:, :q_size].view(num_tokens, heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(num_tokens, kv_heads, head_dim)
    expected_q = apply_rotary(q, cos, sin)
    expected_keys.index_copy_(0, slots, apply_rotary(k, cos, sin))
    expected_values.index_copy_(0, slots, v.contiguous())

    assert rotate_into_cache_applies(qkv, head_dim, keys, values)
    got_q = rotate_into_cache(qkv, heads, kv_heads, head_dim, cos, sin, slots, keys, values)
    assert torch.equal(got_q.view(torch.int16), expected_q.view(torch.int16))
    assert torch.equal(keys.view(torch.int16), expected_keys.view(torch.int16))
    assert torch.equal(values.view(torch.int16), expected_values.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", ["model", "float32"])  # PhiMoE / Qwen2-MoE weights, Mixtral's fp32 ones
@pytest.mark.parametrize(("top_k", "hidden"), [(2, 4096), (4, 1000), (1, 96)])
def test_combine_into_the_residual_matches_torch_bit_for_bit(dtype, weight_dtype, top_k, hidden) -> None:
    generator = torch.Generator(device="cuda").manual_seed(top_k)
    sums = torch.randn(top_k, hidden, generator=generator, device="cuda") * 4
    weights = torch.rand(1, top_k, generator=generator, device="cuda")
    weights = weights.to(dtype) if weight_dtype == "model" else weights
    residual = (torch.randn(1, hidden, generator=generator, device="cuda") * 8).to(dtype)
    expected_out = _sum_in_topk_order(sums.to(dtype), weights, dtype)
    expected_residual = residual + expected_out

    ffn_out = torch.zeros(1, hidden, dtype=dtype, device="cuda")
    assert combine_into_residual_applies(sums, weights, residual)
    combine_into_residual(sums, weights, residual, ffn_out)
    assert torch.equal(ffn_out.view(torch.int16), expected_out.view(torch.int16))
    assert torch.equal(residual.view(torch.int16), expected_residual.view(torch.int16))
    assert not sums.any()  # zeroed for the next layer


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "num_tokens", "hidden", "top_k", "with_next"),
                         [(torch.bfloat16, 1, 4096, 2, True), (torch.bfloat16, 3, 1000, 2, False),
                          (torch.float32, 600, 8, 2, True), (torch.bfloat16, 1, 4096, 8, False)])
def test_copy_to_host_stores_what_copies_give(dtype, num_tokens, hidden, top_k, with_next) -> None:
    """Eagerly and replayed from a CUDA graph with new inputs each time."""
    generator = torch.Generator(device="cuda").manual_seed(num_tokens * hidden)
    x = torch.empty(num_tokens, hidden, dtype=dtype, device="cuda")
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device="cuda")
    next_ids = torch.empty_like(ids) if with_next else None
    host_x = torch.empty(x.shape, dtype=dtype, pin_memory=True)
    host_ids = torch.empty(ids.shape, dtype=torch.int64, pin_memory=True)
    host_next = torch.empty(ids.shape, dtype=torch.int64, pin_memory=True) if with_next else None
    assert copy_to_host_applies(x, ids, host_x, host_ids)

    def refill() -> None:
        x.copy_(torch.randn(x.shape, generator=generator, device="cuda"))
        ids.copy_(torch.randint(0, 1 << 40, ids.shape, generator=generator, device="cuda"))
        if next_ids is not None:
            next_ids.copy_(torch.randint(0, 64, ids.shape, generator=generator, device="cuda"))

    def check() -> None:
        torch.cuda.synchronize()
        assert torch.equal(host_x, x.cpu()) and torch.equal(host_ids, ids.cpu())
        if host_next is not None:
            assert torch.equal(host_next, next_ids.cpu())

    refill()
    copy_to_host(x, ids, next_ids, host_x, host_ids, host_next)
    check()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        copy_to_host(x, ids, next_ids, host_x, host_ids, host_next)  # compiled before the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        copy_to_host(x, ids, next_ids, host_x, host_ids, host_next)
    for _ in range(3):
        refill()
        graph.replay()
        check()
