"""GenerationRun: the engine requests behind one API request (n choices per prompt), with metrics.

Shared by chat completions and completions: admission (429/503 as HTTP errors before any byte is
sent), per-choice accumulation of deltas, latency metrics, aborting what is left when the client
goes away, and usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.async_engine import (
    EngineStoppedError,
    GenerateRequest,
    QueueFullError,
    RequestRejectedError,
    ResponseStream,
)
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.errors import APIError
from server.metrics import RequestTimer
from server.protocol import Usage
from server.state import ServerState

logger = logging.getLogger("scheinfer.server")

T = TypeVar("T")

# Metric status of a finished engine request, by finish reason (499: the client went away).
_STATUS_BY_REASON = {"stop": "200", "length": "200", "error": "500", "abort": "503"}
_DISCONNECT_POLL_S = 0.25


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Choice:
    """What one choice (one engine request) has produced so far."""

    index: int
    prompt_index: int
    request_id: str
    num_prompt_tokens: int
    timer: RequestTimer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    recorded: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class GenerationRun:
    """n choices for each prompt; choice index = prompt_index * n + i (OpenAI's order)."""

    def __init__(self, state: ServerState, request_id: str, prompts: list[list[int]],
                 params_per_choice: list[SamplingParams]) -> None:
        self.state = state
        self.request_id = request_id
        self.prompts = prompts
        n = len(params_per_choice)
        self.choices: list[Choice] = []
        self._requests: list[GenerateRequest] = []
        for prompt_index, prompt in enumerate(prompts):
            for i, params in enumerate(params_per_choice):
                index = prompt_index * n + i
                engine_id = f"{request_id}-{index}"
                self.choices.append(Choice(index, prompt_index, engine_id, len(prompt), RequestTimer(state.metrics)))
                self._requests.append(GenerateRequest(engine_id, prompt, params))
        self._stream: ResponseStream | None = None

    def start(self) -> None:
        """Admit every engine request (all or none): 429 when the queue is full, 503 when stopping."""
        engine = self.state.ready_engine()
        if len(self._requests) > engine.max_queue_size:
            raise APIError(400, f"this request needs {len(self._requests)} generations (prompts x n); at most "
                                f"{engine.max_queue_size} fit in the queue", param="n")
        try:
            self._stream = engine.submit(self._requests)
        except QueueFullError as exc:
            retry_after_s = max(1, round(exc.retry_after_s))
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(retry_after_s)}) from exc
        except EngineStoppedError as exc:
            raise APIError(503, str(exc), code="shutting_down") from exc

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """(choice, delta) as outputs arrive; RequestRejectedError becomes a 400 APIError."""
        assert self._stream is not None, "start() first"
        try:
            async for index, output in self._stream:
                choice = self.choices[index]
                self._apply(choice, output)
                yield choice, output
        except RequestRejectedError as exc:
            raise APIError(400, str(exc), param=exc.param) from exc

    def _apply(self, choice: Choice, output: RequestOutput) -> None:
        choice.timer.on_tokens(len(output.delta_token_ids))
        choice.text = output.text
        choice.token_ids = list(output.token_ids)
        if output.delta_logprobs:
            choice.logprobs.extend(output.delta_logprobs)
        if output.finished:
            choice.finish_reason = output.finish_reason or "stop"
            choice.error = output.error
            self._record(choice, _STATUS_BY_REASON.get(choice.finish_reason, "200"))

    def _record(self, choice: Choice, status: str) -> None:
        if not choice.recorded:
            choice.recorded = True
            choice.timer.on_finish(choice.finish_reason or "abort", status, choice.num_prompt_tokens,
                                   len(choice.token_ids))

    def close(self) -> None:
        """Abort unfinished choices (the client went away or the handler failed) and record them."""
        if self._stream is not None:
            self._stream.close()
        for choice in self.choices:
            if not choice.finished:
                choice.finish_reason = "abort"
                self._record(choice, "499")

    def failure(self) -> APIError | None:
        """The error to answer when a choice failed (500) or was aborted by a shutdown (503)."""
        for choice in self.choices:
            if choice.finish_reason == "error":
                return APIError(500, choice.error or "internal error during generation", code="engine_error")
        for choice in self.choices:
            if choice.finish_reason == "abort":
                return APIError(503, "the request was aborted: the server is shutting down", code="shutting_down")
        return None

    def usage(self) -> Usage:
        num_prompt_tokens = sum(len(prompt) for prompt in self.prompts)
        num_completion_tokens = sum(len(choice.token_ids) for choice in self.choices)
        return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                     total_tokens=num_prompt_tokens + num_completion_tokens)

    async def collect(self) -> None:
        """Run every choice to the end (non-streaming requests); raises the failure, if any."""
        try:
            async for _ in self.events():
                pass
        finally:
            self.close()
        error = self.failure()
        if error is not None:
            raise error


async def until_disconnect(is_disconnected: Callable[[], Awaitable[bool]], work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (non-streaming requests)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await is_disconnected():
            await asyncio.sleep(_DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise APIError(499, "client closed the request", code="client_closed_request")
    return task.result()
