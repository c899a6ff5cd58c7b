"""POST /v1/chat/completions: messages -> n choices, as one response or a chunk stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse

from engine.outputs import RequestOutput
from server.logprobs import chat_logprobs
from server.models import resolve_model
from server.params import check_context, reject_unsupported, requested_max_tokens, sampling_params
from server.prompts import chat_prompt_ids
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    Usage,
)
from server.serving import Choice, GenerationRun, new_request_id, until_disconnect
from server.sse import data_event, sse_response, stream_choices
from server.state import ServerState


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | EventSourceResponse:
    model = resolve_model(state, body.model)
    reject_unsupported(body)
    engine = state.ready_engine()
    prompt_ids = chat_prompt_ids(engine.tokenizer, body.messages)
    max_tokens = check_context(len(prompt_ids), requested_max_tokens(body), state.max_model_len or 0, "messages")
    params = [sampling_params(body, max_tokens, i) for i in range(body.n)]
    run = GenerationRun(state, new_request_id("chatcmpl"), [prompt_ids], params)
    created = int(time.time())
    run.start()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_chunks(run, state, body, model, created, include_usage), run.close)
    await until_disconnect(request.is_disconnected, run.collect())
    tokenizer = engine.tokenizer
    choices = [
        ChatChoice(
            index=choice.index,
            message=AssistantMessage(content=choice.text),
            logprobs=chat_logprobs(tokenizer, choice.logprobs) if body.logprobs else None,
            finish_reason=choice.finish_reason,
        )
        for choice in run.choices
    ]
    return ChatCompletionResponse(id=run.request_id, created=created, model=model, choices=choices,
                                  usage=run.usage())


def _chunks(run: GenerationRun, state: ServerState, body: ChatCompletionRequest, model: str,
            created: int, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    tokenizer = state.engine.tokenizer if state.engine is not None else None

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict[str, str]:
        return data_event(ChatCompletionChunk(id=run.request_id, created=created, model=model, choices=choices,
                                              usage=usage))

    def delta(choice: Choice, output: RequestOutput) -> dict[str, str]:
        logprobs = chat_logprobs(tokenizer, output.delta_logprobs) if body.logprobs and output.delta_logprobs else None
        return chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=output.delta_text), logprobs=logprobs)])

    opening = [chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])
               for choice in run.choices]
    return stream_choices(
        run, opening, delta,
        lambda choice: chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=choice.finish_reason)]),
        (lambda: chunk([], run.usage())) if include_usage else None)
