"""Decode pieces' partials replayed as small CUDA graphs instead of five eager torch calls.

A piece's partial on the GPU, `sums_row += linear_fp32(act(gate) * up, down)` with
`gate, up = linear(x, gate_up)`, costs ~70-80 us of host time eagerly (Phi-3.5-MoE decode shapes,
H100 machine; `benchmarks/partial_graph_probe.py`) and ~8-12 us as a graph replay. A decode layer
computes several such pieces on the GPU (its resident pieces and its streamed ones), and its
driving thread's time is the layer's, so the replays shorten decode steps.

A graph is captured per set of operands: the addresses, shapes, strides and dtypes of x, gate_up,
down and the sums row. It replays the very kernels the eager call enqueued on those operands, on
whatever those addresses hold at replay time, so results are bitwise the eager ones for any
tensors that match the key (decode steps pass static buffers: the decode graphs' activations and
unit sums, resident pieces, staging slots). A piece's first call runs eagerly (it loads kernels and
picks the cuBLAS algorithms), the capture follows it; later calls replay.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from engine.executor.accelerator import Accelerator

MAX_PARTIAL_GRAPHS = 8192  # graphs kept per executor; past it, new operands run eagerly
OperandKey = tuple[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], ...]
PartialFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _operand_key(*tensors: torch.Tensor) -> OperandKey:
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in tensors)


class PartialGraphs:
    """`add_partial(sums_row, x, gate_up, down)`: `sums_row += partial(x, gate_up, down)`, replayed
    from a graph once these operands were seen (CUDA only; `enabled` False: always eager)."""

    def __init__(self, accelerator: Accelerator, partial: PartialFn, max_graphs: int = MAX_PARTIAL_GRAPHS) -> None:
        self.accelerator = accelerator
        self.partial = partial
        self.max_graphs = max_graphs
        self.enabled = accelerator.is_cuda
        self._replays: dict[OperandKey, Callable[[], None]] = {}
        self._pool = None
        self._capture_stream: torch.cuda.Stream | None = None
        self.replayed = 0  # calls served by a replay (tests and benchmarks read it)

    def __len__(self) -> int:
        return len(self._replays)

    def add_partial(self, sums_row: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        if not self.enabled:
            sums_row += self.partial(x, gate_up, down)
            return
        key = _operand_key(sums_row, x, gate_up, down)
        replay = self._replays.get(key)
        if replay is not None:
            replay()
            self.replayed += 1
            return
        sums_row += self.partial(x, gate_up, down)
        if len(self._replays) < self.max_graphs:
            self._replays[key] = self._capture(lambda: sums_row.add_(self.partial(x, gate_up, down)))

    def _capture(self, run: Callable[[], None]) -> Callable[[], None]:
        """`run` captured (not executed) as a graph on a side stream, into one pool for all graphs:
        their intermediates are dead once a replay ends, and replays never overlap (one stream)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream(self.accelerator.device)
        graph = torch.cuda.CUDAGraph()
        # no garbage collection while capturing: destroying another engine's graphs or events then
        # would invalidate the capture (as in engine/model/decode_graphs.py)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.stream(self._capture_stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    run()
                finally:
                    graph.capture_end()
        finally:
            if gc_was_enabled:
                gc.enable()
        return graph.replay
