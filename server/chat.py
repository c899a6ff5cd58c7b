"""POST /v1/chat/completions: messages -> n choices, as one response or a chunk stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse

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
)
from server.serving import GenerationRun, new_request_id, until_disconnect
from server.sse import DONE, data_event, error_event, sse_response
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


async def _chunks(run: GenerationRun, state: ServerState, body: ChatCompletionRequest, model: str,
                  created: int, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    tokenizer = state.engine.tokenizer if state.engine is not None else None

    def chunk(choices: list[ChatChunkChoice]) -> dict[str, str]:
        return data_event(ChatCompletionChunk(id=run.request_id, created=created, model=model, choices=choices))

    try:
        for choice in run.choices:
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])
        async for choice, output in run.events():
            if output.delta_text or output.delta_logprobs:
                logprobs = chat_logprobs(tokenizer, output.delta_logprobs) if body.logprobs and \
                    output.delta_logprobs else None
                yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=output.delta_text),
                                             logprobs=logprobs)])
            if output.finished:
                failure = run.failure()
                if failure is not None:
                    yield error_event(failure)
                    yield data_event(DONE)
                    return
                yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(),
                                             finish_reason=choice.finish_reason)])
        if include_usage:
            yield data_event(ChatCompletionChunk(id=run.request_id, created=created, model=model, choices=[],
                                                 usage=run.usage()))
        yield data_event(DONE)
    finally:
        run.close()
