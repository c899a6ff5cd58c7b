"""What the engine hands back: per-request deltas and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampler import TokenLogprob


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    text: str  # generated text so far (stop strings cut)
    delta_token_ids: list[int]  # new since this request's previous output
    delta_text: str
    logprobs: list[TokenLogprob] | None
    delta_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    error: str | None = None


@dataclass(frozen=True)
class StepStats:
    kind: str  # "prefill", "decode", "mixed" or "idle"
    num_prefill_tokens: int
    num_decode_tokens: int
    duration_s: float


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    last_step: StepStats | None
    cpu_busy_s: float = 0.0  # seconds the CPU pool spent on CC pieces
    bytes_streamed: int = 0  # weight bytes streamed to the GPU (CG pieces)
    pcie_busy_s: float = 0.0  # seconds the copy stream spent streaming weights
    gpu_busy_s: float = 0.0  # seconds the compute stream spent on FFN pieces
    # the decode feedback (engine/executor/decode_feedback.py): host pieces per layer moved from
    # PCIe to the CPU against the plan, its moves so far, and its last window's medians: the
    # imbalance (last copy's end minus the CPU job's) and a decode layer's gate-to-gate period
    decode_shift: int = 0
    decode_moves: int = 0
    decode_imbalance_s: float = 0.0
    decode_layer_period_s: float = 0.0
