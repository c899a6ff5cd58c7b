"""Token-assignment scheduler (pure Python, no tensors).

There is no prefill phase or decode phase: each sequence has computed tokens, and every step the
scheduler assigns tokens to sequences under a token budget. Decode tokens (one per running
sequence whose tokens are all computed but the last) come first, then prefill chunks of at most
`max_prefill_chunk` tokens, so a long prompt never stalls running decodes by more than one chunk.
Prefill and decode work are handed to the executor apart, so it can place them differently.
Admission is first-come first-served, by free KV blocks; when decodes run out of blocks the
newest running sequence is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache.block_manager import BlockManager
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, starting at its `num_computed_tokens`."""

    seq: Sequence
    num_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """After this chunk every token of the sequence is computed: its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledChunk] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Marks `seq` finished, frees its blocks and removes it from the queues."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.blocks.free(seq.block_table)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _schedule_decodes(self, out: SchedulerOutput) -> int:
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue
            while not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                victim = self.running[-1]  # newest running sequence gives its blocks back
                self._preempt(victim)
                out.preempted.append(victim)
                out.decodes = [c for c in out.decodes if c.seq is not victim]
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            self.blocks.grow(seq.block_table, seq.num_tokens)
            out.decodes.append(ScheduledChunk(seq, 1))
            budget -= 1
        return budget

    def _prefill_chunk(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        num_tokens = min(seq.num_uncomputed_tokens, self.config.max_prefill_chunk, budget)
        if num_tokens <= 0 or not self.blocks.can_grow(seq.block_table, seq.num_computed_tokens + num_tokens):
            return None
        self.blocks.grow(seq.block_table, seq.num_computed_tokens + num_tokens)
        return ScheduledChunk(seq, num_tokens)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_decodes(out)
        for seq in self.running:  # prompts already partly prefilled continue first
            if seq.num_uncomputed_tokens > 1 and budget > 0:
                chunk = self._prefill_chunk(seq, budget)
                if chunk is not None:
                    out.prefills.append(chunk)
                    budget -= chunk.num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            chunk = self._prefill_chunk(self.waiting[0], budget)
            if chunk is None:
                break  # first come, first served: nobody overtakes the head of the queue
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.prefills.append(chunk)
            budget -= chunk.num_tokens
        return out
