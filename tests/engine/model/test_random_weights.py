"""Full-size architectures with random weights: published sizes, deterministic fills."""

from __future__ import annotations

import pytest
import torch

from engine.model.factory import known_model_names, resolve_model_config
from engine.model.random_weights import fill_random
from engine.model.weights import build_model, device_allocator

PUBLISHED_PARAMS_B = {
    "mixtral-8x7b": 46.70, "llama-2-7b": 6.74, "llama-2-13b": 13.02, "qwen1.5-moe-a2.7b": 14.32, "phi-3.5-moe": 41.87,
}


def _meta(shape, role):
    return torch.empty(shape, dtype=torch.bfloat16, device="meta")


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_named_configs_have_the_published_parameter_count(name: str) -> None:
    assert name in known_model_names()
    config, checkpoint = resolve_model_config(name)
    assert checkpoint is None
    _, fills = build_model(config, _meta)
    num_params = sum(f.out.numel() for f in fills)
    assert num_params / 1e9 == pytest.approx(PUBLISHED_PARAMS_B[name], abs=0.01)


def _shrunk_fills(seed: int):
    config, _ = resolve_model_config("mixtral-8x7b")
    from dataclasses import replace
    small = replace(config, num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=100,
                    moe=replace(config.moe, expert_intermediate_size=96, sparse_layers=(0,)))
    _, fills = build_model(small, device_allocator("cpu", torch.bfloat16))
    fill_random(fills, seed=seed, show_progress=False)
    return {f.name: f.out.clone() for f in fills}


def test_random_weights_are_deterministic_and_depend_on_seed_and_name() -> None:
    a, b, c = _shrunk_fills(0), _shrunk_fills(0), _shrunk_fills(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    w1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert not torch.equal(a[w1], c[w1])
    assert not torch.equal(a[w1], a["model.layers.0.block_sparse_moe.experts.1.w1.weight"])
    assert torch.all(a["model.norm.weight"] == 1)
    std = a[w1].float().std().item()
    assert std == pytest.approx(1 / 64**0.5, rel=0.1)  # scaled for fan-in
