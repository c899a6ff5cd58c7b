"""Compact bf16 weights are lossless: every encoder and decoder gives back the exact bits."""

from __future__ import annotations

import pytest
import torch

from engine.executor.gpu_unpack import unpack_at, unpack_piece
from engine.model.compact_weights import (
    ESCAPE,
    choose_base,
    compact_reference,
    compactable,
    decompact_reference,
    exponent_histogram,
    max_region_bytes,
)

cpu_compact = pytest.importorskip("engine.cpu_kernels.compact")
needs_native = pytest.mark.skipif(not cpu_compact.available(), reason="the C++ cpu kernels did not build here")


def awkward_matrix(rows: int, cols: int, seed: int, std: float = 0.02) -> torch.Tensor:
    """Random normal bf16 with the values an encoder can get wrong: zeros of both signs, subnormals,
    infinities, NaN, the largest finite values, and values just outside the coded exponents."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * std).to(torch.bfloat16)
    specials = torch.tensor([0.0, -0.0, 1e-40, -3e-39, float("inf"), float("-inf"), float("nan"), 3.3e38, -3.3e38,
                             1e-12, 60.0], dtype=torch.float32).to(torch.bfloat16)
    flat = w.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[: specials.numel()]
    flat[where] = specials
    return w


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int16), b.contiguous().view(torch.int16))


@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 96), (64, 4096 // 8)])
def test_reference_round_trip_is_bit_exact(shape: tuple[int, int]) -> None:
    w = awkward_matrix(*shape, seed=shape[0])
    m = compact_reference(w)
    assert m.low.dtype == torch.uint8 and tuple(m.codes.shape) == (shape[0], shape[1] // 2)
    assert same_bits(decompact_reference(m), w)
    assert m.num_exceptions >= 9  # the specials are exceptions (60.0 may be coded)


def test_base_covers_the_most_values_and_never_codes_exponent_zero() -> None:
    w = (torch.randn(256, 256) * 1e-3).to(torch.bfloat16)
    hist = exponent_histogram(w)
    base = choose_base(hist)
    assert base >= 1
    covered = int(hist[base : base + 15].sum())
    assert all(covered >= int(hist[b : b + 15].sum()) for b in range(1, 242))
    assert covered > 0.999 * w.numel()


def test_shapes_that_cannot_be_compact_are_refused() -> None:
    assert not compactable((4, 48)) and compactable((4, 64)) and not compactable((64,))
    with pytest.raises(ValueError):
        compact_reference(torch.zeros(4, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        compact_reference(torch.zeros(4, 64, dtype=torch.float32))


@needs_native
@pytest.mark.parametrize("shape", [(5, 320), (17, 160), (128, 512)])
def test_native_encoder_writes_the_reference_bytes_and_decodes_exactly(shape: tuple[int, int]) -> None:
    w = awkward_matrix(*shape, seed=7 + shape[1])
    wide = torch.zeros(shape[0], shape[1] + 64, dtype=torch.bfloat16)
    wide[:, : shape[1]] = w  # a strided view, as a column slice of a bigger matrix
    low = torch.empty(shape, dtype=torch.uint8)
    codes = torch.empty(shape[0], shape[1] // 2, dtype=torch.uint8)
    native = cpu_compact.compact_matrix(wide[:, : shape[1]], low, codes)
    ref = compact_reference(w)
    assert native is not None and native.base == ref.base
    for name in ("low", "codes", "exc_row_ptr", "exc_cols", "exc_values"):
        assert torch.equal(getattr(native, name), getattr(ref, name)), name
    assert same_bits(cpu_compact.unpack_rows(native, 0, shape[0]), w)
    assert same_bits(cpu_compact.unpack_rows(native, shape[0] // 2, shape[0]), w[shape[0] // 2 :])
    assert same_bits(cpu_compact.unpack_rows(native, 1, shape[0], threads=3), w[1:])  # rows split over threads


@needs_native
def test_a_matrix_with_too_many_exceptions_stays_bf16() -> None:
    w = torch.logspace(-30, 30, 64 * 64).to(torch.bfloat16).view(64, 64)  # exponents everywhere
    low, codes = torch.empty(64, 64, dtype=torch.uint8), torch.empty(64, 32, dtype=torch.uint8)
    assert cpu_compact.compact_matrix(w, low, codes) is None
    gate_up, down = w[:, :].repeat(2, 1)[:, :64], w[:, :32].contiguous()
    region = torch.zeros(max_region_bytes(gate_up.numel() + down.numel()), dtype=torch.uint8)
    assert cpu_compact.compact_piece(gate_up, down, region) is None
    assert int(region.sum()) == 0  # nothing written


@needs_native
def test_piece_region_decodes_on_the_streaming_path_in_place_of_its_weights() -> None:
    hidden, n = 96, 64
    gate_up, down = awkward_matrix(2 * n, hidden, seed=1), awkward_matrix(hidden, n, seed=2, std=0.3)
    storage = torch.cat((gate_up.reshape(-1), down.reshape(-1)))  # the piece's own bf16 memory
    expected = storage.clone()
    piece = cpu_compact.compact_piece(storage[: gate_up.numel()].view(2 * n, hidden),
                                      storage[gate_up.numel():].view(hidden, n), storage.view(torch.uint8))
    assert piece is not None and piece.gate_up.base != piece.down.base  # two matrices, two bases
    assert piece.num_bytes < 0.76 * expected.nbytes
    got_gate_up, got_down = piece.decompact()
    assert same_bits(got_gate_up, gate_up) and same_bits(got_down, down)
    out = torch.full((expected.numel() + 8,), 7.0, dtype=torch.bfloat16)
    unpack_piece(piece.region.clone(), piece, out)  # the torch decoder (no GPU here)
    assert same_bits(out[: expected.numel()], expected)
    assert ESCAPE == 15


@pytest.mark.gpu
@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_gpu_decoder_is_bit_exact() -> None:
    hidden, n = 4096, 1024
    gate_up, down = awkward_matrix(2 * n, hidden, seed=3), awkward_matrix(hidden, n, seed=4)
    region = torch.empty(max_region_bytes(gate_up.numel() + down.numel()), dtype=torch.uint8)
    piece = cpu_compact.compact_piece(gate_up, down, region)
    assert piece is not None
    out = torch.empty(gate_up.numel() + down.numel(), dtype=torch.bfloat16, device="cuda")
    unpack_piece(piece.region.cuda(), piece, out)
    expected = torch.cat((gate_up.reshape(-1), down.reshape(-1)))
    assert same_bits(out.cpu(), expected)
    # by address, as a staging slot decodes (gpu_unpack.unpack_at): the same bits
    slot = torch.zeros(region.numel(), dtype=torch.uint8, device="cuda")
    slot[: piece.region.numel()].copy_(piece.region)
    from engine.executor import gpu_unpack

    direct_before = gpu_unpack._launch_unpack.direct_calls
    for _ in range(3):  # the first call of a specialization through Triton, the next ones past it
        by_address = torch.full_like(out, 7.0)
        unpack_at(slot.data_ptr(), piece, by_address.data_ptr())
        assert piece.num_exceptions > 0 and same_bits(by_address.cpu(), expected)
    assert gpu_unpack._launch_unpack.direct_calls >= direct_before + 2
