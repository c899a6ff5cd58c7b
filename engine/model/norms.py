"""RMSNorm and LayerNorm as functions over (weight, bias) tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.config import NormKind


@dataclass
class Norm:
    kind: NormKind
    weight: torch.Tensor  # [hidden]
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind is NormKind.LAYER:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        # RMSNorm as Llama/Mixtral/Qwen2 compute it: fp32 statistics, cast back, then scale.
        x_fp32 = x.float()
        variance = x_fp32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x_fp32 * torch.rsqrt(variance + self.eps)).to(x.dtype)
