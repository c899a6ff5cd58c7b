"""Rotary cos/sin gathered from position tables: the same bits as computed for the positions."""

from __future__ import annotations

import pytest
import torch

from engine.model.config import RopeConfig
from engine.model.rotary import MIN_TABLE_POSITIONS, RotaryEmbedding

HEAD_DIM = 64


def _longrope(head_dim: int) -> RopeConfig:
    return RopeConfig("longrope", 10000.0, (
        ("short_factor", tuple(1.0 + 0.05 * i for i in range(head_dim // 2))),
        ("long_factor", tuple(1.5 + 0.1 * i for i in range(head_dim // 2))),
        ("original_max_position_embeddings", 4096), ("short_mscale", 1.2), ("long_mscale", 1.3)))


LONGROPE = _longrope(HEAD_DIM)
ROPES = {
    "default": lambda head_dim: RopeConfig(),
    "linear": lambda head_dim: RopeConfig("linear", 500000.0, (("factor", 4.0),)),
    "llama3": lambda head_dim: RopeConfig("llama3", 500000.0, (
        ("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192))),
    "longrope": _longrope,
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "head_dim"), [(torch.float32, 64), (torch.bfloat16, 128), (torch.float16, 96)])
@pytest.mark.parametrize("rope", list(ROPES))
def test_gathered_cos_sin_are_the_computed_bits(rope: str, dtype: torch.dtype, head_dim: int, device: str) -> None:
    rotary = RotaryEmbedding(ROPES[rope](head_dim), head_dim, 131072)
    generator = torch.Generator().manual_seed(3)
    for largest in (7, 1500, 70000):  # the table grows past its first size twice
        positions = torch.randint(0, largest, (37,), generator=generator)
        positions[5] = largest
        positions = positions.to(device)
        computed = rotary.cos_sin(positions, dtype)
        gathered = rotary.cos_sin(positions, dtype, max_position=largest)
        for a, b in zip(computed, gathered, strict=True):
            assert a.dtype == b.dtype == dtype and a.shape == b.shape == (37, head_dim)
            assert torch.equal(a, b)
    table_rows = rotary._tables[(positions.device, dtype, False)][0].shape[0]
    assert table_rows == 131072  # 70000 rounds up to 2**17, the model's context


def test_longrope_mixes_long_and_short_tokens_as_computed() -> None:
    rotary = RotaryEmbedding(LONGROPE, HEAD_DIM, 131072)
    positions = torch.tensor([3, 4095, 4096, 9000, 10])
    long_mask = torch.tensor([False, False, True, True, False])
    computed = rotary.cos_sin(positions, torch.bfloat16, long_mask)
    gathered = rotary.cos_sin(positions, torch.bfloat16, long_mask, max_position=9000)
    assert all(torch.equal(a, b) for a, b in zip(computed, gathered, strict=True))
    short = rotary.cos_sin(positions, torch.bfloat16)
    assert not torch.equal(gathered[0][2:4], short[0][2:4]) and torch.equal(gathered[0][:2], short[0][:2])


def test_table_sizes() -> None:
    """One first size for small contexts; powers of two up to the model's context, then the context;
    past it (direct use of the model), whole MIN_TABLE_POSITIONS, so that the next steps reuse it."""
    rotary = RotaryEmbedding(RopeConfig(), HEAD_DIM, 3000)
    rows = {}
    for largest in (2, 1024, 2500, 3000, 3001, 3002):
        rotary.cos_sin(torch.tensor([0, largest]), torch.float32, max_position=largest)
        rows[largest] = rotary._tables[(torch.device("cpu"), torch.float32, False)][0].shape[0]
    assert rows == {2: MIN_TABLE_POSITIONS, 1024: 2048, 2500: 3000, 3000: 3072, 3001: 3072, 3002: 3072}



def _table_bytes(rotary: RotaryEmbedding) -> dict[tuple, int]:
    return {key: sum(t.numel() * t.element_size() for t in pair) for key, pair in rotary._tables.items()}


@pytest.mark.parametrize("max_positions", [100, 5000, 16384, 20000])
@pytest.mark.parametrize("rope", list(ROPES))
def test_the_plan_counts_the_tables_at_their_peak(rope: str, max_positions: int) -> None:
    """A context growing to the KV cache's length or the model's context (longrope: long tokens past
    its original context):
    the tables never take more than the plan counts (memory.rotary_table_bytes), a growing table's
    old pair included, and the count is not more than twice their peak."""
    from engine.model.config import ModelConfig
    from engine.placement.memory import rotary_table_bytes

    config = ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=100, hidden_size=1024,
                         num_layers=2, num_heads=8, num_kv_heads=8, head_dim=128, intermediate_size=2048,
                         max_position_embeddings=16384, norm_eps=1e-5, rope=ROPES[rope](128))
    rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
    original = config.rope.get("original_max_position_embeddings", config.max_position_embeddings)
    peak = 0
    longest = min(max_positions, config.max_position_embeddings)  # the engine's sequences end there
    for largest in sorted({*range(0, longest, 997), longest - 1}):
        long = rope == "longrope" and largest >= original
        before = _table_bytes(rotary)
        rotary.cos_sin(torch.tensor([0, largest]), torch.bfloat16, torch.tensor([False, True]) if long else None,
                       max_position=largest)
        after = _table_bytes(rotary)
        replaced = sum(before[key] for key in before if after[key] != before[key])  # alive while the new one was built
        peak = max(peak, sum(after.values()) + replaced)
    counted = rotary_table_bytes(config, 2, max_positions)
    assert peak <= counted <= 2 * peak
