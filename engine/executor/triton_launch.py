"""Launching a Triton kernel again without Triton's per-call Python path.

`kernel[grid](*args)` binds and specializes every argument, looks the compiled kernel up and
checks globals before it launches: ~50-60 us of host time a call on the H100 machine, paid by the
thread that drives the GPU for every streamed piece of a decode layer. `CachedLauncher` launches
through Triton once per specialization and keeps the compiled kernel it returns; later calls with
the same specialization call the kernel's launcher directly.

The specialization is Triton's own rule for the arguments it specializes on: an integer equal to
1, an integer or address divisible by 16, and an integer's width (32 or 64 bits). Calls that
differ in any of these take another compiled kernel (a first call through Triton again). Only for
Triton >= 3.3 (`CompiledKernel.run` takes every bound argument and `triton.knobs` has the hooks);
elsewhere, and after any failure of the direct call, every launch goes through Triton.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of torch
    import triton
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

_INT32 = (-(2**31), 2**31)


def _supported() -> bool:
    if triton is None:
        return False
    try:
        from triton import knobs  # noqa: F401  (>= 3.3: the launch hooks live there)

        major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    except (ImportError, ValueError):
        return False
    return (major, minor) >= (3, 3)


def _traits(value: Any) -> tuple:
    """What Triton specializes an argument on."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        return ("i", value == 1, value % 16 == 0, _INT32[0] <= value < _INT32[1])
    if hasattr(value, "data_ptr"):
        return ("p", value.data_ptr() % 16 == 0, value.dtype)
    return ("o", value)


class CachedLauncher:
    """`launcher(grid_x, *args)` == `kernel[(grid_x,)](*args)` (args: every parameter in order,
    constexprs included), on the current device's current stream."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.direct = _supported()
        self._compiled: dict[tuple, Any] = {}
        self.direct_calls = 0  # launches that skipped Triton's path (tests, benchmarks)

    def __call__(self, grid_x: int, *args: Any) -> None:
        key = tuple(_traits(a) for a in args)
        compiled = self._compiled.get(key) if self.direct else None
        if compiled is not None:
            try:
                self._launch(compiled, grid_x, args)
                self.direct_calls += 1
                return
            except Exception as exc:
                logger.warning("direct Triton launch failed (%s); launching through Triton from now on", exc)
                self.direct = False
        compiled = self.kernel[(grid_x,)](*args)
        if self.direct and compiled is not None:
            self._compiled[key] = compiled

    def _launch(self, compiled: Any, grid_x: int, args: tuple) -> None:
        from triton import knobs

        stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
        grid = (grid_x, 1, 1)
        metadata = compiled.launch_metadata(grid, stream, *args)
        compiled.run(grid_x, 1, 1, stream, compiled.function, compiled.packed_metadata, metadata,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)
