"""ModelRunner: owns the model and its KV tensors, runs one step's chunks, returns logits."""

from __future__ import annotations

import torch

from engine.executor.partitioned import PartitionedExecutor
from engine.executor.timeline import StepTimeline, TraceRecorder
from engine.forward_batch import ForwardBatch, SequenceChunk
from engine.kv_cache.paged_cache import PagedKVCache
from engine.model.decoder import DecoderModel
from engine.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, trace: bool = False) -> None:
        c = model.config
        self.model = model
        self.block_size = block_size
        self.cache = PagedKVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim,
                                  model.dtype, model.device)
        executor = model.unit_executor
        self.executor = executor if isinstance(executor, PartitionedExecutor) else None
        self.trace = TraceRecorder() if trace and self.executor is not None else None
        self._num_steps = 0

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [num chunks that complete their sequence, vocab], in the order of `chunks`."""
        seq_chunks = [
            SequenceChunk(
                token_ids=c.seq.uncomputed_token_ids(c.num_tokens),
                num_cached_tokens=c.seq.num_computed_tokens,
                block_table=c.seq.block_table,
                needs_logits=c.completes_sequence,
            )
            for c in chunks
        ]
        batch = ForwardBatch.build(seq_chunks, self.block_size, self.model.device)
        if self.trace is None or self.executor is None:
            return self.model.forward(batch, self.cache)
        kind = "decode" if all(c.num_tokens == 1 for c in chunks) else "prefill"
        self.executor.timeline = StepTimeline(self.executor.accelerator, self._num_steps, kind)
        try:
            logits = self.model.forward(batch, self.cache)
            self.trace.add(self.executor.timeline.finish())
        finally:
            self.executor.timeline = None
            self._num_steps += 1
        return logits
