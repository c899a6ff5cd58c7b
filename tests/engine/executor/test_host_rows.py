"""The CPU's output rows added into the GPU's sums from pinned host memory (host_rows.py): the
bits of a copy and `index_add_`, fresh values at every call, and whole decodes unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.executor import host_rows
from tests.engine.executor.test_partition_exactness import bf16_gpu_llm, write_bf16
from tests.engine.model.test_decode_graphs import _assert_same

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def test_only_gpu_sums_with_pinned_rows_are_read_in_place() -> None:
    sums, rows = torch.zeros(2, 64), torch.zeros(3, 64)
    assert not host_rows.applies(sums, torch.zeros(3, dtype=torch.int64), rows)  # no GPU: the copy path
    assert not host_rows.applies(sums, None, rows)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(("num_sums", "num_rows", "width"),
                         [(2, 7, 4096), (3, 5, 1000), (1, 1, 256), (16, 16, 6400), (2, 32, 4096), (4, 29, 333)])
def test_rows_read_in_place_give_the_bits_of_adding_them_in_order(num_sums: int, num_rows: int, width: int) -> None:
    """Each sum plus its rows one after the other (fp32 adds on the host: the same IEEE operation).
    Up to 16 rows that is what torch's CUDA index_add_ gives too (beyond, it adds with atomics in no
    fixed order)."""
    generator = torch.Generator().manual_seed(num_rows * width)
    sums = (torch.randn(num_sums, width, generator=generator) * 100).cuda()
    rows = torch.empty(num_rows, width, pin_memory=True)
    dest_host = torch.randint(0, num_sums, (num_rows,), generator=generator)
    dest = dest_host.cuda()
    assert host_rows.applies(sums, dest, rows)
    for trial in range(3):  # the same buffers again with new values: nothing stale is read
        torch.cuda.synchronize()
        rows.copy_(torch.randn(num_rows, width, generator=generator) * 10 ** trial)
        expected = sums.cpu()
        for row, target in enumerate(dest_host.tolist()):
            expected[target] += rows[row]
        got = sums.clone()
        host_rows.add_host_rows(got, dest, rows)
        assert torch.equal(got.cpu(), expected)
        if num_rows <= 16:
            assert torch.equal(got, sums.clone().index_add_(0, dest, rows.cuda()))
        assert not torch.equal(got, sums)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_decodes_reading_cpu_rows_in_place_keep_their_bits(arch: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    add = host_rows.add_host_rows

    def counting_add(*args: torch.Tensor) -> None:
        calls.append(args[2].shape[0])
        add(*args)

    monkeypatch.setattr(host_rows, "add_host_rows", counting_add)
    path = write_bf16(tmp_path, arch)
    copied, in_place = bf16_gpu_llm(path, read_cpu_rows_in_place=False), bf16_gpu_llm(path, read_cpu_rows_in_place=True)
    _assert_same(copied, in_place)
    assert calls and all(n > 0 for n in calls)
