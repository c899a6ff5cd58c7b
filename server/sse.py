"""Server-sent events in OpenAI's framing: `data: {json}` events, then `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from server.errors import APIError, error_body

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
