"""EngineConfig: what the engine is asked to run, and how big its caches and batches are."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.executor.setup import PartitionOptions
from engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class EngineConfig:
    """`model` is a Hugging Face checkpoint directory, or a name from configs/models/ with
    `random_weights=True` (full-size weights built in memory, for benchmarks)."""

    model: str
    device: str = "cpu"
    dtype: str = "auto"  # "auto": the checkpoint's dtype (bfloat16 for random weights); or float32/bfloat16/float16
    random_weights: bool = False
    seed: int = 0
    tokenizer: str | None = None  # directory with tokenizer files; default: the checkpoint directory
    max_model_len: int | None = None  # default: min(max_position_embeddings, kv_cache_tokens)
    block_size: int = 16
    kv_cache_tokens: int = 16384
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    partition: PartitionOptions = field(default_factory=PartitionOptions)  # GPU budget, policy, CPU threads
    attention_kernels: str = "flash"  # "flash" | "torch" (transformers' choice): engine/model/attention_kernels.py
    decode_graphs: bool = True  # replay each layer's fixed-shape decode work as CUDA graphs (on a GPU)
    trace: bool = False  # record a per-step timeline of CPU, PCIe and GPU (engine.trace)
    show_progress: bool = True
