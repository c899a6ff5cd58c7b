"""Places every weight where the plan says, allocating it there directly (never twice on the host).

GPU: embeddings, attention, norms, routers and GG pieces. Host: CG and CC pieces, carved out of
one arena that is page-locked with cudaHostRegister when there is a GPU, so that streaming runs
at pinned-copy speed (pageable copies are ~8x slower) without the power-of-two rounding of torch's
pinned allocator.
"""

from __future__ import annotations

import logging
import weakref

import torch

from engine.executor.accelerator import Accelerator
from engine.model.config import ModelConfig
from engine.model.weights import TensorRole
from engine.placement.memory import bytes_per_row
from engine.placement.plan import PartitionPlan, PieceKind

logger = logging.getLogger(__name__)
HOST_KINDS = (PieceKind.CG, PieceKind.CC)


class WeightStore:
    def __init__(self, plan: PartitionPlan, config: ModelConfig, dtype: torch.dtype, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        host_rows = sum(s.cg + s.cc for s in plan.splits.values())
        self.host_bytes = host_rows * bytes_per_row(config, itemsize)
        self.arena = torch.empty(self.host_bytes // itemsize, dtype=dtype)
        self._offset = 0
        self._registered = False
        self.gpu_bytes = 0
        if accelerator.is_cuda and self.host_bytes:
            self._register()

    def _register(self) -> None:
        cudart = torch.cuda.cudart()
        result = cudart.cudaHostRegister(self.arena.data_ptr(), self.arena.nbytes, 0)
        code = getattr(result, "value", result)
        if code != 0:
            cudart.cudaGetLastError()  # clear it, or the next CUDA call reports it
            logger.warning("could not page-lock %.1f GiB of host weights (CUDA error %s): streaming will be slow",
                           self.arena.nbytes / 2**30, code)
            return
        self._registered = True
        # The registration must end before the arena's memory is freed: a range freed while still
        # registered keeps stale GPU mappings, and a later arena at the same address would stream
        # old data. The finalizer holds the arena alive until it has unregistered it.
        self._finalizer = weakref.finalize(self, _unregister, self.arena)
        logger.info("page-locked %.1f GiB of host weights", self.arena.nbytes / 2**30)

    def allocate(self, shape: tuple[int, ...], role: TensorRole) -> torch.Tensor:
        """engine.model.weights.Allocator."""
        numel = 1
        for n in shape:
            numel *= n
        if role.piece in HOST_KINDS:
            if self._offset + numel > self.arena.numel():
                raise RuntimeError("host weight arena overflow: plan and model disagree")
            out = self.arena[self._offset : self._offset + numel].view(shape)
            self._offset += numel
            return out
        self.gpu_bytes += numel * self.arena.element_size()
        return torch.empty(shape, dtype=self.dtype, device=self.accelerator.device)

    def close(self) -> None:
        if self._registered:
            self._finalizer()
            self._registered = False


def _unregister(arena: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
