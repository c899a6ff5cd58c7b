"""A GPU stream that waits for the CPU kernels: a value they store in pinned host memory when a
job is over, watched by the stream itself (CUDA stream memory operations, cuStreamWaitValue64).

Without it a decode layer's end is a round trip through the thread that drives the GPU: it
wakes when the CPU job is done, then enqueues the copy of the CPU's partial outputs, the sum,
and the next layer's graph, and the GPU starts on them only then (~0.14 ms a layer on the H100
machine, with the CPU idle meanwhile). With it, all of that is enqueued while the CPU computes,
behind a wait for the job's value: the GPU starts the moment the CPU's outputs are there, and
the driving thread has already moved on to the next layer.

A kernel's first launch (CUDA's lazy module loading) waits for every stream, so one launched
behind a wait holds the driving thread until the CPU job is over: a stall at warm-up, never a
deadlock, since the job does not depend on that thread.

Only where the driver API has the call (CUDA >= 11.7 drivers; `SCHEINFER_STREAM_SIGNAL=0` turns
it off): `StreamSignal.create` returns None elsewhere, and the executor then waits as before.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

logger = logging.getLogger(__name__)

_WAIT_VALUE_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int64) *addr >= value
_WRITE_VALUE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: the earlier work's writes are visible first
_CUDA_SUCCESS = 0


def _driver() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        wait = lib.cuStreamWaitValue64_v2
        write = lib.cuStreamWriteValue64_v2
        device_pointer = lib.cuMemHostGetDevicePointer_v2
    except (OSError, AttributeError):
        return None
    for call in (wait, write):
        call.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
        call.restype = ctypes.c_int
    device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    device_pointer.restype = ctypes.c_int
    return lib


class StreamSignal:
    """One int64 in pinned memory that only grows: `next_value()` names a job's value, the CPU side
    stores it when the job is over (`address`), `wait(stream, value)` holds the stream until then.
    The other way round, `store(stream, value)` has the stream store a value once the work enqueued
    before it is done (a CPU job waiting for the GPU's routing, engine/executor/routed_job.py)."""

    def __init__(self, lib: ctypes.CDLL, flag: torch.Tensor, device_address: int) -> None:
        self._wait = lib.cuStreamWaitValue64_v2
        self._write = lib.cuStreamWriteValue64_v2
        self.flag = flag  # kept alive: the CPU side writes, the GPU reads it
        self.address = flag.data_ptr()
        self._device_address = device_address
        self._last = 0
        self.waits = 0  # waits enqueued so far (tests, benchmarks)

    @classmethod
    def create(cls, device: torch.device) -> StreamSignal | None:
        """A signal for streams of `device`, or None where the call is missing or fails (logged)."""
        if device.type != "cuda" or os.environ.get("SCHEINFER_STREAM_SIGNAL", "1") == "0":
            return None
        lib = _driver()
        if lib is None:
            logger.info("GPU streams wait for the CPU through the host: no cuStreamWaitValue64_v2 in libcuda")
            return None
        with torch.cuda.device(device):
            flag = torch.zeros(1, dtype=torch.int64, pin_memory=True)
            device_address = ctypes.c_uint64(0)
            status = lib.cuMemHostGetDevicePointer_v2(ctypes.byref(device_address), flag.data_ptr(), 0)
            if status != _CUDA_SUCCESS:
                logger.info("GPU streams wait for the CPU through the host: pinned memory not mapped (CUDA error %d)",
                            status)
                return None
            signal = cls(lib, flag, device_address.value)
            # a wait that is already satisfied: the call must be accepted, and must let the stream go on
            stream = torch.cuda.Stream(device)
            try:
                signal.wait(stream, 0)
                signal.store(stream, 0)
                stream.synchronize()
            except RuntimeError as exc:
                logger.info("GPU streams wait for the CPU through the host: %s", exc)
                return None
            signal.waits = 0
        return signal

    def next_value(self) -> int:
        self._last += 1
        return self._last

    def wait(self, stream: torch.cuda.Stream, value: int) -> None:
        """Work enqueued on `stream` after this starts once the flag holds `value` or more."""
        status = self._wait(stream.cuda_stream, self._device_address, value, _WAIT_VALUE_GEQ)
        if status != _CUDA_SUCCESS:
            raise RuntimeError(f"cuStreamWaitValue64 failed (CUDA error {status})")
        self.waits += 1

    def store(self, stream: torch.cuda.Stream, value: int) -> None:
        """The flag takes `value` once the work enqueued on `stream` before this is done (its memory
        writes visible first)."""
        status = self._write(stream.cuda_stream, self._device_address, value, _WRITE_VALUE_DEFAULT)
        if status != _CUDA_SUCCESS:
            raise RuntimeError(f"cuStreamWriteValue64 failed (CUDA error {status})")
