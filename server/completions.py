"""POST /v1/completions: prompt(s) -> n choices each, as one response or a chunk stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from sse_starlette import EventSourceResponse

from engine.outputs import RequestOutput
from server.logprobs import completion_logprobs
from server.models import resolve_model
from server.params import check_context, reject_unsupported, sampling_params
from server.prompts import completion_prompt_ids
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from server.serving import Choice, GenerationRun, new_request_id, until_disconnect
from server.sse import data_event, sse_response, stream_choices
from server.state import ServerState


async def create_completion(
    state: ServerState, body: CompletionRequest, request: Request
) -> CompletionResponse | EventSourceResponse:
    model = resolve_model(state, body.model)
    reject_unsupported(body)
    engine = state.ready_engine()
    tokenizer = engine.tokenizer
    prompts = completion_prompt_ids(tokenizer, body.prompt, int(engine.model_config.vocab_size))
    max_model_len = state.max_model_len or 0
    max_tokens = min(check_context(len(ids), body.max_tokens, max_model_len, "prompt") for ids in prompts)
    params = [sampling_params(body, max_tokens, i) for i in range(body.n)]
    run = GenerationRun(state, new_request_id("cmpl"), prompts, params)
    created = int(time.time())
    echoes = [_prompt_text(tokenizer, body.prompt, ids, i) if body.echo else "" for i, ids in enumerate(prompts)]
    run.start()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_chunks(run, tokenizer, body, model, created, include_usage, echoes), run.close)
    await until_disconnect(request.is_disconnected, run.collect())
    choices = [_final_choice(choice, tokenizer, body, echoes[choice.prompt_index]) for choice in run.choices]
    return CompletionResponse(id=run.request_id, created=created, model=model, choices=choices, usage=run.usage())


def _prompt_text(tokenizer: Any, prompt: Any, ids: list[int], index: int) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[index] if index < len(prompt) else None, str):
        return str(prompt[index])
    return tokenizer.decode(ids) if tokenizer is not None else ""


def _final_choice(choice: Choice, tokenizer: Any, body: CompletionRequest, echo: str) -> CompletionChoice:
    logprobs = completion_logprobs(tokenizer, choice.logprobs, 0) if body.logprobs is not None else None
    return CompletionChoice(index=choice.index, text=echo + choice.text, logprobs=logprobs,
                            finish_reason=choice.finish_reason)


def _chunks(run: GenerationRun, tokenizer: Any, body: CompletionRequest, model: str, created: int,
            include_usage: bool, echoes: list[str]) -> AsyncIterator[dict[str, str]]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> dict[str, str]:
        return data_event(CompletionResponse(id=run.request_id, created=created, model=model, choices=choices,
                                             usage=usage))

    text_offsets = [0] * len(run.choices)

    def delta(choice: Choice, output: RequestOutput) -> dict[str, str]:
        logprobs = None
        if body.logprobs is not None and output.delta_logprobs:
            logprobs = completion_logprobs(tokenizer, output.delta_logprobs, text_offsets[choice.index])
        text_offsets[choice.index] += len(output.delta_text)
        return chunk([CompletionChoice(index=choice.index, text=output.delta_text, logprobs=logprobs)])

    opening = [chunk([CompletionChoice(index=choice.index, text=echoes[choice.prompt_index])])
               for choice in run.choices] if body.echo else []
    return stream_choices(
        run, opening, delta,
        lambda choice: chunk([CompletionChoice(index=choice.index, text="", finish_reason=choice.finish_reason)]),
        (lambda: chunk([], run.usage())) if include_usage else None)
