"""Which SDPA kernels the model's attention may use on a GPU.

    flash   flash attention first (then cuDNN, memory-efficient, math): one compiled kernel for
            every sequence length. The default.
    torch   torch's own choice, the one `transformers` gets. On the H100 machine with torch 2.11
            that is cuDNN attention, which builds a new execution plan for every new key length:
            ~60 ms once per decode step (32 layers, one new length), a quarter of a Mixtral
            decode step at 24 GiB (benchmarks/decode_profile.py).

Both accumulate in fp32; their bf16 outputs differ in the last bit of some elements, so greedy
tokens can differ only at bf16 near-ties (tests/engine/model/test_exactness.py checks both).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_KERNELS = ("flash", "torch")
_FLASH_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


def check_attention_kernels(name: str) -> str:
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernels {name!r}: expected one of {', '.join(ATTENTION_KERNELS)}")
    return name


def attention_kernels(name: str, device: torch.device) -> AbstractContextManager:
    """A context in which SDPA calls on `device` use the kernels `name` asks for."""
    if name == "torch" or device.type != "cuda":
        return nullcontext()
    return sdpa_kernel(_FLASH_FIRST, set_priority=True)
