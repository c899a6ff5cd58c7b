"""CachedLauncher's bookkeeping (no GPU needed: a stand-in kernel): one compiled kernel per
specialization, direct calls after the first, and Triton's own path for good after a failure."""

from __future__ import annotations

import pytest
import torch

from engine.executor import triton_launch
from engine.executor.triton_launch import CachedLauncher, _traits


class _Address:
    def __init__(self, address: int) -> None:
        self.address, self.dtype = address, torch.int16

    def data_ptr(self) -> int:
        return self.address


class _Kernel:
    """kernel[grid](*args) as Triton's: launches and returns the compiled kernel of the call."""

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        def run(*args):
            self.launches.append((grid, args))
            return ("compiled", tuple(_traits(a) for a in args))
        return run


def test_traits_follow_tritons_specialization() -> None:
    assert _traits(1) != _traits(3)  # 1 is specialized
    assert _traits(32) != _traits(33)  # divisible by 16
    assert _traits(17) == _traits(33)
    assert _traits(2**31 + 1) != _traits(17)  # 64-bit integers
    assert _traits(_Address(4096)) != _traits(_Address(4098))  # aligned addresses
    assert _traits(_Address(4096)) == _traits(_Address(8192))


def test_one_compiled_kernel_per_specialization_then_direct_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_launch, "_supported", lambda: True)
    direct: list[tuple] = []
    monkeypatch.setattr(CachedLauncher, "_launch", lambda self, compiled, grid_x, args: direct.append((grid_x, args)))
    kernel = _Kernel()
    launch = CachedLauncher(kernel)
    launch(4, _Address(4096), 33, 7)
    launch(5, _Address(8192), 17, 9)  # same traits: the kept kernel, past Triton
    launch(6, _Address(8192), 32, 9)  # another specialization: through Triton once
    launch(6, _Address(4096), 48, 9)
    assert [grid for grid, _ in kernel.launches] == [(4,), (6,)]
    assert [grid for grid, _ in direct] == [5, 6] and launch.direct_calls == 2


def test_a_failed_direct_call_goes_back_to_triton_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_launch, "_supported", lambda: True)

    def broken(self, compiled, grid_x, args):
        raise TypeError("launcher signature changed")

    monkeypatch.setattr(CachedLauncher, "_launch", broken)
    kernel = _Kernel()
    launch = CachedLauncher(kernel)
    for _ in range(3):
        launch(2, _Address(4096), 33)
    assert len(kernel.launches) == 3 and not launch.direct and launch.direct_calls == 0


def test_without_a_recent_triton_every_call_goes_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_launch, "_supported", lambda: False)
    kernel = _Kernel()
    launch = CachedLauncher(kernel)
    for _ in range(2):
        launch(3, _Address(4096), 5)
    assert len(kernel.launches) == 2 and launch.direct_calls == 0
