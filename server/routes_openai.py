"""OpenAI endpoints: thin wrappers over server.chat and server.completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.chat import create_chat_completion
from server.completions import create_completion
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)
from server.state import ServerState

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "waiting queue full (see Retry-After)"),
        (500, "generation failed"),
        (503, "loading or shutting down"),
    ]
}
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


def get_state(request: Request) -> ServerState:
    return request.app.state.scheinfer


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, 200: {"content": _STREAM, "description": "a chat completion, or chunks when stream"}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
    """Chat completion in OpenAI's shape; with `stream`, server-sent `chat.completion.chunk` events."""
    return await create_chat_completion(get_state(request), body, request)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, 200: {"content": _STREAM, "description": "a completion, or chunks when stream"}},
)
async def completions(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
    """Text completion in OpenAI's shape; with `stream`, server-sent `text_completion` events."""
    return await create_completion(get_state(request), body, request)
