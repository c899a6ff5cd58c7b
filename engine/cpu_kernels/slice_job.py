"""SliceJob: one FFN unit slice applied to the tokens routed to it, and its checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.compact_weights import CompactMatrix, CompactPiece

# Field order of the int64 record handed to the C++ driver (JobDesc in csrc/slice_ffn.h).
DESC_FIELDS = ("x", "num_tokens", "hidden", "gate_up", "gate_up_stride", "n", "down", "down_stride",
               "out", "out_stride", "gu_codes", "gu_base", "gu_exc_row_ptr", "gu_exc_cols", "gu_exc_vals",
               "down_codes", "down_base", "down_exc_row_ptr", "down_exc_cols", "down_exc_vals")
BF16_WEIGHTS = (0,) * 10  # the compact fields of a job whose weights are plain bf16
# A job's weight fields: gate_up, gate_up_stride, n, down, down_stride, then the 10 compact fields.
WeightFields = tuple[int, ...]


@dataclass
class SliceJob:
    """out = down @ (act(gate @ x) * (up @ x)) for one unit slice.

    x: [num_tokens, hidden] bf16, contiguous, CPU: the routed tokens' activations.
    gate_up: [2n, hidden] bf16, CPU: gate rows [0, n) then up rows [n, 2n) of one unit slice
        (a view into model storage, rows may be strided, elements contiguous; may be pinned).
    down: [hidden, n] bf16, CPU (rows may be strided, elements contiguous).
    out: [num_tokens, hidden] fp32, CPU: written (not accumulated).
    compact: the weights stored compact (engine/model/compact_weights.py); gate_up and down are
        then only their shapes (meta tensors).
    """

    x: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    out: torch.Tensor
    compact: CompactPiece | None = None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) as bf16 tensors, decoded when compact."""
        return self.compact.decompact() if self.compact is not None else (self.gate_up, self.down)


def check_shapes(job: SliceJob) -> None:
    """Raises ValueError when the tensors do not describe one slice job."""
    x, gate_up, down, out = job.x, job.gate_up, job.down, job.out
    for name, t in (("x", x), ("gate_up", gate_up), ("down", down), ("out", out)):
        if t.dim() != 2:
            raise ValueError(f"SliceJob.{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.device.type != "cpu" and not (job.compact is not None and name in ("gate_up", "down")):
            raise ValueError(f"SliceJob.{name} must be on the CPU, got {t.device}")
    num_tokens, hidden = x.shape
    if gate_up.shape[1] != hidden or gate_up.shape[0] % 2:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} is not [2n, {hidden}]")
    n = gate_up.shape[0] // 2
    if tuple(down.shape) != (hidden, n):
        raise ValueError(f"down {tuple(down.shape)} is not [{hidden}, {n}]")
    if tuple(out.shape) != (num_tokens, hidden):
        raise ValueError(f"out {tuple(out.shape)} is not [{num_tokens}, {hidden}]")
    if out.dtype != torch.float32:
        raise ValueError(f"out must be float32, got {out.dtype}")


def weights_ready(gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """True when the C++ kernels read these weights: bf16, elements of a row contiguous."""
    return (gate_up.dtype == down.dtype == torch.bfloat16 and (gate_up.stride(1) == 1 or gate_up.shape[1] <= 1)
            and (down.stride(1) == 1 or down.shape[1] <= 1))


def activations_ready(x: torch.Tensor) -> bool:
    """True when the C++ kernels read these activations: bf16, contiguous."""
    return x.dtype == torch.bfloat16 and x.is_contiguous()


def kernel_ready(job: SliceJob) -> bool:
    """True when the C++ kernels take this job: bf16 operands with the layouts they read."""
    out = job.out
    return (activations_ready(job.x) and weights_ready(job.gate_up, job.down)
            and (out.stride(1) == 1 or out.shape[1] <= 1))


def weight_fields(gate_up: torch.Tensor, down: torch.Tensor) -> WeightFields:
    """The weights' part of a job record (gate_up, gate_up_stride, n, down, down_stride and the
    compact fields): fixed for a model's piece, so callers that run the same pieces every step can
    keep it."""
    return (gate_up.data_ptr(), gate_up.stride(0), down.shape[1], down.data_ptr(), down.stride(0), *BF16_WEIGHTS)


def compact_weight_fields(piece: CompactPiece) -> WeightFields:
    """weight_fields of compact weights: the low bytes stand where the bf16 rows would."""
    gu, dn = piece.gate_up, piece.down

    def rest(m: CompactMatrix) -> tuple[int, ...]:
        return (m.codes.data_ptr(), m.base, m.exc_row_ptr.data_ptr(), m.exc_cols.data_ptr(), m.exc_values.data_ptr())

    return (gu.low.data_ptr(), gu.low.stride(0), dn.shape[1], dn.low.data_ptr(), dn.low.stride(0), *rest(gu),
            *rest(dn))


def activation_fields(x: torch.Tensor) -> tuple[int, int, int]:
    """The activations' part of a job record (x, num_tokens, hidden)."""
    return (x.data_ptr(), x.shape[0], x.shape[1])


def record(activations: tuple[int, int, int], weights: WeightFields, out_ptr: int,
           out_stride: int) -> tuple[int, ...]:
    """One job's int64 record (DESC_FIELDS order) for the C++ driver, from its parts."""
    return (*activations, *weights[:5], out_ptr, out_stride, *weights[5:])


def job_weight_fields(job: SliceJob) -> WeightFields:
    return compact_weight_fields(job.compact) if job.compact is not None else weight_fields(job.gate_up, job.down)


def describe(job: SliceJob, weights: WeightFields | None = None) -> tuple[int, ...]:
    """The job's int64 record for the C++ driver; `weights`: its weight_fields when the caller has
    them already."""
    return record(activation_fields(job.x), weights or job_weight_fields(job), job.out.data_ptr(), job.out.stride(0))
