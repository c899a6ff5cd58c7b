"""Rotary cos/sin gathered from position tables: the same bits as computed for the positions."""

from __future__ import annotations

import pytest
import torch

from engine.model.config import RopeConfig
from engine.model.rotary import MIN_TABLE_POSITIONS, RotaryEmbedding

HEAD_DIM = 64
LONGROPE = RopeConfig("longrope", 10000.0, (
    ("short_factor", tuple(1.0 + 0.05 * i for i in range(HEAD_DIM // 2))),
    ("long_factor", tuple(1.5 + 0.1 * i for i in range(HEAD_DIM // 2))),
    ("original_max_position_embeddings", 4096), ("short_mscale", 1.2), ("long_mscale", 1.3)))
ROPES = {
    "default": RopeConfig(),
    "linear": RopeConfig("linear", 500000.0, (("factor", 4.0),)),
    "llama3": RopeConfig("llama3", 500000.0, (("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                              ("original_max_position_embeddings", 8192))),
    "longrope": LONGROPE,
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", list(ROPES))
def test_gathered_cos_sin_are_the_computed_bits(rope: str, dtype: torch.dtype, device: str) -> None:
    rotary = RotaryEmbedding(ROPES[rope], HEAD_DIM, 131072)
    generator = torch.Generator().manual_seed(3)
    for largest in (7, 1500, 70000):  # the table grows past its first size twice
        positions = torch.randint(0, largest, (37,), generator=generator)
        positions[5] = largest
        positions = positions.to(device)
        computed = rotary.cos_sin(positions, dtype)
        gathered = rotary.cos_sin(positions, dtype, max_position=largest)
        for a, b in zip(computed, gathered, strict=True):
            assert a.dtype == b.dtype == dtype and a.shape == b.shape == (37, HEAD_DIM)
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


def test_a_table_covers_small_contexts_with_one_first_size() -> None:
    rotary = RotaryEmbedding(RopeConfig(), HEAD_DIM, 2048)
    rotary.cos_sin(torch.tensor([0, 1, 2]), torch.float32, max_position=2)
    assert rotary._tables[(torch.device("cpu"), torch.float32, False)][0].shape[0] == MIN_TABLE_POSITIONS
