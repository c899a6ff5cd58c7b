"""The accelerator the executor drives: a CUDA device with a compute and a copy stream, or the
CPU standing in for one (no streams, synchronous copies) so that CI exercises the same logic."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

MAX_FREE_EVENTS = 256


@dataclass
class Accelerator:
    device: torch.device
    compute_stream: torch.cuda.Stream | None = None
    copy_stream: torch.cuda.Stream | None = None
    _mm_fp32_out: bool | None = field(default=None, repr=False)
    _free_timing: list[torch.cuda.Event] = field(default_factory=list, repr=False)

    @classmethod
    def for_device(cls, device: str | torch.device) -> Accelerator:
        device = torch.device(device)
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            return cls(device, torch.cuda.current_stream(device), torch.cuda.Stream(device))
        return cls(device)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def on(self, stream: torch.cuda.Stream | None) -> AbstractContextManager:
        """A context whose kernels and copies are enqueued on `stream` (none: as they come)."""
        if stream is None:
            return nullcontext()
        return _OnStream(stream) if _RAW_STREAMS else torch.cuda.stream(stream)

    def record(self, stream: torch.cuda.Stream | None, timing: bool = False) -> torch.cuda.Event | None:
        """An event recorded on `stream` (None without streams). Timing events come from a free
        list when there are some (creating a CUDA event costs ~15 us of host time; meters that have
        read theirs hand them back with `release`)."""
        if stream is None:
            return None
        event = self._free_timing.pop() if timing and self._free_timing else torch.cuda.Event(enable_timing=timing)
        event.record(stream)
        return event

    def release(self, *events: object) -> None:
        """Timing events nobody reads any more, for `record` to reuse."""
        for event in events:
            if isinstance(event, torch.cuda.Event) and len(self._free_timing) < MAX_FREE_EVENTS:
                self._free_timing.append(event)

    @staticmethod
    def wait(stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
        if stream is not None and event is not None:
            stream.wait_event(event)

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer that transfers asynchronously (pinned) when there is a GPU."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.is_cuda)

    def linear_fp32(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T with an fp32 result (fp32 accumulation kept, no rounding to bf16 on GPUs
        that can; partial sums of one unit then add up like one product would)."""
        if x.dtype == torch.float32:
            return torch.nn.functional.linear(x, weight)
        if self.is_cuda and self._mm_fp32_out is not False:
            try:
                out = torch.mm(x, weight.t(), out_dtype=torch.float32)
                self._mm_fp32_out = True
                return out
            except (RuntimeError, TypeError):
                self._mm_fp32_out = False
        return torch.nn.functional.linear(x, weight).float()

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


# torch.cuda.stream checks devices and looks the current stream up through Python on every use
# (~16 us of host time on the GPU machine, paid per staged copy); the raw calls it makes cost ~2 us
_RAW_STREAMS = hasattr(torch._C, "_cuda_setStream") and hasattr(torch._C, "_cuda_getCurrentStream")


class _OnStream:
    """`with torch.cuda.stream(stream)` for a stream of the current device, without the checks."""

    __slots__ = ("previous", "stream")

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self.previous: tuple[int, int, int] | None = None

    def __enter__(self) -> None:
        stream = self.stream
        self.previous = torch._C._cuda_getCurrentStream(stream.device_index)
        torch._C._cuda_setStream(stream_id=stream.stream_id, device_index=stream.device_index,
                                 device_type=stream.device_type)

    def __exit__(self, *exc: object) -> None:
        assert self.previous is not None
        stream_id, device_index, device_type = self.previous
        torch._C._cuda_setStream(stream_id=stream_id, device_index=device_index, device_type=device_type)


def now_s() -> float:
    return time.perf_counter()
