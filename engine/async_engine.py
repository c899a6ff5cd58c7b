"""AsyncEngine: LLMEngine's step loop on its own thread, with an async stream of deltas per request.

Threads: the caller's event loop(s) submit commands (add, abort) through a thread-safe queue; one
engine thread owns the LLMEngine, applies the commands before every step, runs `step()` while
there is work, and hands each `RequestOutput` back to the event loop of the request that asked for
it with `loop.call_soon_threadsafe`. Only the engine thread touches the LLMEngine.

Admission: at most `max_queue_size` requests may be waiting for their first output; beyond that
`generate` raises `QueueFullError` (the server answers 429). After `drain()` or `shutdown()` it
raises `EngineStoppedError` (503).

Stdlib + engine only (no server dependencies).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.outputs import RequestOutput

logger = logging.getLogger("scheinfer.async_engine")

_IDLE_WAIT_S = 0.5  # the idle engine thread re-checks for shutdown this often


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry after `retry_after_s`."""

    def __init__(self, num_waiting: int, max_queue_size: int, retry_after_s: float = 1.0) -> None:
        super().__init__(
            f"the server is busy: {num_waiting} requests are waiting (limit {max_queue_size}); retry later"
        )
        self.retry_after_s = retry_after_s


class EngineStoppedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


class RequestRejectedError(ValueError):
    """LLMEngine.add_request refused the request (for example a prompt longer than the context)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineLike(Protocol):
    """The part of LLMEngine that AsyncEngine drives (see docs/ARCHITECTURE.md)."""

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None: ...
    def abort_request(self, request_id: str) -> RequestOutput | None: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished_requests(self) -> bool: ...
    def stats(self) -> Any: ...


@dataclass(frozen=True)
class GenerateRequest:
    """One engine request of a (possibly fanned-out) client request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Stream:
    """Where the outputs of one engine request go: a queue on the caller's event loop."""

    request: GenerateRequest
    index: int
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue[tuple[int, RequestOutput | BaseException]]
    submitted_at_s: float
    first_output_at_s: float | None = None
    last: RequestOutput | None = None


@dataclass(frozen=True)
class _Add:
    streams: list[_Stream]


@dataclass(frozen=True)
class _Abort:
    request_id: str
    reason: str = "abort"


@dataclass
class StepRecord:
    """What the step observer learns after every step (engine thread)."""

    duration_s: float
    num_outputs: int
    stats: Any  # LLMEngine.stats() right after the step
    failed: bool = False


@dataclass
class AsyncEngineStats:
    """A snapshot for /metrics and /health; safe to read from any thread."""

    num_unfinished: int = 0
    num_waiting_first_output: int = 0
    num_steps: int = 0
    engine_stats: Any = None  # LLMEngine.stats() after the last step
    draining: bool = False
    running: bool = False


@dataclass
class _Counters:
    num_unfinished: int = 0
    num_waiting_first_output: int = 0
    request_ids: set[str] = field(default_factory=set)


class AsyncEngine:
    """Drives an LLMEngine from a background thread; `generate` streams its deltas to asyncio."""

    def __init__(
        self,
        engine: EngineLike,
        *,
        max_queue_size: int = 256,
        retry_after_s: float = 1.0,
        step_observer: Callable[[StepRecord], None] | None = None,
        queue_time_observer: Callable[[float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue_size = max_queue_size
        self.retry_after_s = retry_after_s
        self.step_observer = step_observer
        self.queue_time_observer = queue_time_observer
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Condition()
        self._counters = _Counters()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = True
        self._num_steps = 0
        self._last_engine_stats: Any = None

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer  # type: ignore[attr-defined]

    @property
    def model_config(self) -> Any:
        return self.engine.model_config  # type: ignore[attr-defined]

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.is_running

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self.is_running:
            return
        self._stop = False
        self._accepting = True
        self._last_engine_stats = self._safe_stats()
        self._thread = threading.Thread(target=self._run, name="scheinfer-engine", daemon=True)
        self._thread.start()

    def drain(self, timeout_s: float) -> bool:
        """Stop taking requests, wait up to `timeout_s` for the running ones, abort the rest.

        Returns True when every request finished on its own. Blocking: call it from a thread
        (for example `await asyncio.to_thread(engine.drain, 30)`), never from the event loop
        that consumes the streams.
        """
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._counters.num_unfinished > 0:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    break
                self._lock.wait(left_s)
            leftover = sorted(self._counters.request_ids)
        for request_id in leftover:
            self.abort(request_id)
        if leftover:
            logger.warning("drain: aborted %d requests still running after %.1fs", len(leftover), timeout_s)
            with self._lock:
                self._lock.wait_for(lambda: self._counters.num_unfinished == 0, timeout=5.0)
        return not leftover

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Drain (see `drain`), then stop and join the engine thread."""
        if self.is_running:
            self.drain(drain_timeout_s)
        self._accepting = False
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
            self._thread = None

    # ---- requests -------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Submit one request and yield its RequestOutputs (deltas) until it finishes.

        Raises QueueFullError or EngineStoppedError at once when not admitted, and
        RequestRejectedError when the engine refuses the request. Closing the iterator early (a
        client disconnect cancels the task) aborts the request and frees its KV blocks.
        """
        with self.submit([GenerateRequest(request_id, prompt_token_ids, params)]) as stream:
            async for _, output in stream:
                yield output

    def submit(self, requests: Sequence[GenerateRequest]) -> ResponseStream:
        """Admit several requests at once (all or none) and return the stream of their outputs.

        Must be called on the event loop that will consume the stream. Raises QueueFullError or
        EngineStoppedError when not admitted. Use the stream as a context manager (or call
        `close()`), so that leaving early aborts what is unfinished.
        """
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        now_s = time.monotonic()
        streams = [_Stream(request, index, loop, sink, now_s) for index, request in enumerate(requests)]
        self._admit(streams)
        self._inbox.put(_Add(streams))
        self._wake.set()
        return ResponseStream(self, [request.request_id for request in requests], sink)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Abort a request from any thread; the engine thread frees its KV blocks before the next step."""
        self._inbox.put(_Abort(request_id, reason))
        self._wake.set()

    def stats(self) -> AsyncEngineStats:
        with self._lock:
            return AsyncEngineStats(
                num_unfinished=self._counters.num_unfinished,
                num_waiting_first_output=self._counters.num_waiting_first_output,
                num_steps=self._num_steps,
                engine_stats=self._last_engine_stats,
                draining=not self._accepting,
                running=self.is_running,
            )

    def _admit(self, streams: list[_Stream]) -> None:
        if not self.accepting:
            raise EngineStoppedError("the engine is not accepting requests (starting or shutting down)")
        with self._lock:
            counters = self._counters
            if counters.num_waiting_first_output + len(streams) > self.max_queue_size:
                raise QueueFullError(counters.num_waiting_first_output, self.max_queue_size, self.retry_after_s)
            ids = [stream.request.request_id for stream in streams]
            if len(set(ids)) != len(ids) or counters.request_ids.intersection(ids):
                raise RequestRejectedError(f"duplicate request id among {ids}")
            counters.num_unfinished += len(streams)
            counters.num_waiting_first_output += len(streams)
            counters.request_ids.update(ids)

    # ---- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self._apply_commands():
                    engine_stats = self._safe_stats()  # aborts free blocks without a step
                    with self._lock:
                        self._last_engine_stats = engine_stats
            except Exception:  # a bug here must not kill the loop
                logger.exception("engine thread: applying commands failed")
            if self._stop:
                break
            if not self._has_work():
                self._wake.wait(_IDLE_WAIT_S)
                continue
            self._step_once()
        self._fail_all("engine stopped", reason="abort")

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished_requests())
        except Exception:
            logger.exception("engine thread: has_unfinished_requests failed")
            return False

    def _apply_commands(self) -> bool:
        """Apply queued adds and aborts in order; True when there were any."""
        applied = False
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            if isinstance(command, _Add):
                for stream in command.streams:
                    self._add(stream)
            else:
                self._abort(command.request_id, command.reason)

    def _add(self, stream: _Stream) -> None:
        request = stream.request
        try:
            self.engine.add_request(request.request_id, list(request.prompt_token_ids), request.params)
        except Exception as exc:
            logger.info("request %s rejected: %s", request.request_id, exc)
            self._finish_counters(stream)
            self._deliver([(stream, RequestRejectedError(str(exc), getattr(exc, "param", None)))])
            return
        self._streams[request.request_id] = stream

    def _abort(self, request_id: str, reason: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return  # finished already, or never admitted
        final: Any = None
        try:
            final = self.engine.abort_request(request_id)
        except Exception:
            logger.exception("abort_request(%s) failed", request_id)
        self._finish_counters(stream)
        if final is None or not getattr(final, "finished", False):
            final = _terminal_output(stream, reason, None)
        self._deliver([(stream, final)])

    def _step_once(self) -> None:
        start_s = time.perf_counter()
        failed = False
        try:
            outputs = self.engine.step()
        except Exception as exc:  # LLMEngine catches its own; this is the last line of defence
            logger.exception("engine step failed")
            failed = True
            outputs = []
            self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}", reason="error")
        duration_s = time.perf_counter() - start_s
        self._dispatch(outputs, duration_s)
        engine_stats = self._safe_stats()
        with self._lock:
            self._num_steps += 1
            self._last_engine_stats = engine_stats
        if self.step_observer is not None:
            try:
                self.step_observer(StepRecord(duration_s, len(outputs), engine_stats, failed))
            except Exception:
                logger.exception("step observer failed")

    def _dispatch(self, outputs: list[RequestOutput], step_duration_s: float) -> None:
        deliveries: list[tuple[_Stream, RequestOutput | BaseException]] = []
        now_s = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted while the step ran
            if stream.first_output_at_s is None:
                stream.first_output_at_s = now_s
                with self._lock:
                    self._counters.num_waiting_first_output -= 1
                if self.queue_time_observer is not None:
                    # Approximate: submission until the start of the step that finished the prompt.
                    try:
                        self.queue_time_observer(max(0.0, now_s - step_duration_s - stream.submitted_at_s))
                    except Exception:
                        logger.exception("queue time observer failed")
            stream.last = output
            if output.finished:
                del self._streams[output.request_id]
                self._finish_counters(stream, first_output_counted=True)
            deliveries.append((stream, output))
        self._deliver(deliveries)

    def _fail_all(self, message: str, reason: str) -> None:
        deliveries: list[tuple[_Stream, RequestOutput | BaseException]] = []
        for request_id, stream in list(self._streams.items()):
            del self._streams[request_id]
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort_request(%s) failed", request_id)
            self._finish_counters(stream)
            deliveries.append((stream, _terminal_output(stream, reason, message if reason == "error" else None)))
        self._deliver(deliveries)

    def _finish_counters(self, stream: _Stream, first_output_counted: bool | None = None) -> None:
        if first_output_counted is None:
            first_output_counted = stream.first_output_at_s is not None
        with self._lock:
            self._counters.num_unfinished -= 1
            if not first_output_counted:
                self._counters.num_waiting_first_output -= 1
            self._counters.request_ids.discard(stream.request.request_id)
            self._lock.notify_all()

    def _deliver(self, deliveries: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        """Hand items to their event loops: one call_soon_threadsafe per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
        for stream, item in deliveries:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for stream, _ in items:
                    if stream.request.request_id in self._streams:
                        self._abort(stream.request.request_id, "abort")

    def _safe_stats(self) -> Any:
        try:
            return self.engine.stats()
        except Exception:
            logger.exception("engine stats failed")
            return None


class ResponseStream:
    """Async iterator of (index, RequestOutput) for the requests of one `submit`, until all finish.

    The outputs of each request arrive in order; requests interleave. A request the engine
    refused raises RequestRejectedError from `__anext__`. `close()` aborts what is unfinished.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str],
                 sink: asyncio.Queue[tuple[int, RequestOutput | BaseException]]) -> None:
        self._engine = engine
        self.request_ids = request_ids
        self._sink = sink
        self._ready: deque[tuple[int, RequestOutput | BaseException]] = deque()
        self._unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        if not self._ready:
            self._ready.append(await self._sink.get())
        while not self._sink.empty():
            self._ready.append(self._sink.get_nowait())
        index, item = self._ready.popleft()
        if not isinstance(item, BaseException):
            item = self._merge_ready(index, item)
        if isinstance(item, BaseException):
            self._unfinished.discard(self.request_ids[index])
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return index, item

    def _merge_ready(self, index: int, output: RequestOutput) -> RequestOutput:
        """Fold the other outputs of request `index` that are already waiting into one delta, so a
        consumer that falls behind sends fewer, larger chunks instead of lagging further."""
        later = [item for i, item in self._ready if i == index]
        if not later or any(isinstance(item, BaseException) for item in later):
            return output
        self._ready = deque(entry for entry in self._ready if entry[0] != index)
        for item in later:
            output = _merge_outputs(output, item)  # type: ignore[arg-type]
        return output

    def close(self) -> None:
        """Abort every request of this stream that has not finished (idempotent)."""
        for request_id in sorted(self._unfinished):
            self._engine.abort(request_id)
        self._unfinished.clear()

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _merge_outputs(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """One delta covering `first` then `second` (consecutive outputs of one request)."""
    delta_logprobs = None
    if first.delta_logprobs is not None or second.delta_logprobs is not None:
        delta_logprobs = list(first.delta_logprobs or []) + list(second.delta_logprobs or [])
    return dataclasses.replace(
        second,
        delta_token_ids=list(first.delta_token_ids) + list(second.delta_token_ids),
        delta_text=first.delta_text + second.delta_text,
        delta_logprobs=delta_logprobs,
    )


def _put_all(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.sink.put_nowait((stream.index, item))


def _terminal_output(stream: _Stream, reason: str, error: str | None) -> RequestOutput:
    """A final RequestOutput for a request the engine will not report on (abort, failed step)."""
    from engine.outputs import RequestOutput

    last = stream.last
    token_ids = list(last.token_ids) if last is not None else []
    values: dict[str, Any] = {
        "request_id": stream.request.request_id,
        "prompt_token_ids": list(stream.request.prompt_token_ids),
        "token_ids": token_ids,
        "text": last.text if last is not None else "",
        "delta_token_ids": [],
        "delta_text": "",
        "logprobs": list(last.logprobs) if last is not None and last.logprobs is not None else None,
        "delta_logprobs": [] if stream.request.params.logprobs is not None else None,
        "finished": True,
        "finish_reason": reason,
        "error": error,
    }
    names = {f.name for f in dataclasses.fields(RequestOutput)}
    return RequestOutput(**{key: value for key, value in values.items() if key in names})
