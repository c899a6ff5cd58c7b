"""Server-sent events in OpenAI's framing: `data: {json}` events, then `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from server.errors import APIError, error_body

if TYPE_CHECKING:
    from engine.outputs import RequestOutput
    from server.serving import Choice, GenerationRun

logger = logging.getLogger("scheinfer.server")

DONE = "[DONE]"
_PING_S = 15


def data_event(payload: BaseModel | str) -> dict[str, str]:
    if isinstance(payload, BaseModel):
        return {"data": payload.model_dump_json(exclude_none=True)}
    return {"data": payload}


def error_event(error: APIError) -> dict[str, str]:
    body = error_body(error.message, error.type, error.param, error.code)
    body["error"]["status"] = error.status_code  # type: ignore[index]
    return {"data": json.dumps(body)}


Event = dict[str, str]


async def stream_choices(run: GenerationRun, opening: list[Event], on_delta: Callable[[Choice, RequestOutput], Event],
                         on_finish: Callable[[Choice], Event], usage: Callable[[], Event] | None) -> AsyncIterator[Event]:
    """The event stream of a generation run, in OpenAI's order:
    `opening` events, one event per delta of a choice (`on_delta(choice, output)`), one when a
    choice finishes (`on_finish(choice)`), the usage event if asked for, then [DONE]; a failed or
    aborted choice ends the stream with an error event and [DONE]. The run is closed in every case."""
    try:
        for event in opening:
            yield event
        async for choice, output in run.events():
            if output.delta_text or output.delta_logprobs:
                yield on_delta(choice, output)
            if output.finished:
                failure = run.failure()
                if failure is not None:
                    yield error_event(failure)
                    yield data_event(DONE)
                    return
                yield on_finish(choice)
        if usage is not None:
            yield usage()
        yield data_event(DONE)
    finally:
        run.close()


async def _guarded(events: AsyncIterator[dict[str, str]]) -> AsyncIterator[dict[str, str]]:
    """Never let an exception break the stream: it becomes an error event, then [DONE]."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield error_event(exc)
        yield data_event(DONE)
    except Exception:
        logger.exception("stream failed")
        yield error_event(APIError(500, "internal server error", code="internal_error"))
        yield data_event(DONE)


def sse_response(events: AsyncIterator[dict[str, str]], on_close: Callable[[], None]) -> EventSourceResponse:
    """An SSE response. When the client disconnects the generator is cancelled (its finally runs);
    `on_close` runs after the response in every case (also when the generator never started)."""
    return EventSourceResponse(_guarded(events), sep="\n", ping=_PING_S, background=BackgroundTask(on_close),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
