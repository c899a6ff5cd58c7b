"""Sequence: one request's tokens and progress, as the scheduler and engine see it (no tensors)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from engine.sampling_params import SamplingParams


class SequenceStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class Sequence:
    """A request in flight. Its KV holds `num_computed_tokens` of `token_ids` (prompt + output)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def uncomputed_token_ids(self, num_tokens: int) -> list[int]:
        """The next `num_tokens` tokens whose KV is not yet computed."""
        start = self.num_computed_tokens
        prompt_len = len(self.prompt_token_ids)
        if start + num_tokens <= prompt_len:
            return self.prompt_token_ids[start : start + num_tokens]
        return self.token_ids[start : start + num_tokens]
