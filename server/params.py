"""OpenAI request fields -> engine SamplingParams (one per choice), with OpenAI-style 400s."""

from __future__ import annotations

from engine.sampling_params import SamplingParams, SamplingParamsError
from server.errors import APIError, bad_request
from server.protocol import SEED_MAX, SEED_MIN, ChatCompletionRequest, CompletionRequest

_SEED_SPAN = SEED_MAX - SEED_MIN + 1


def choice_seed(seed: int | None, choice_index: int) -> int | None:
    """Choice i of a seeded request uses seed + i (wrapped into the int64 range)."""
    if seed is None:
        return None
    return (seed + choice_index - SEED_MIN) % _SEED_SPAN + SEED_MIN


def reject_unsupported(request: ChatCompletionRequest | CompletionRequest) -> None:
    """400 for known OpenAI fields the server cannot honour (better than silently ignoring them)."""
    if request.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias")
    if isinstance(request, ChatCompletionRequest):
        if request.tools:
            raise bad_request("tools are not supported", param="tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format")
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    else:
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of other than n is not supported", param="best_of")
        if request.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if request.echo and request.logprobs is not None:
            raise bad_request("echo with logprobs is not supported", param="echo")


def requested_max_tokens(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return request.max_completion_tokens
    return request.max_tokens


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The max_tokens to use: the one asked for, or what is left of the context; 400 when over."""
    if num_prompt_tokens == 0:
        raise bad_request("the prompt is empty", param=param)
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens (at least one token must be left to generate)",
            param=param, code="context_length_exceeded",
        )
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens; you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion); reduce the prompt or max_tokens to at most {max_model_len - num_prompt_tokens}",
            param="max_tokens", code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest, max_tokens: int, choice_index: int
) -> SamplingParams:
    """The engine's SamplingParams of choice `choice_index` (0 <= i < n)."""
    if isinstance(request, ChatCompletionRequest):
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        num_logprobs = request.logprobs
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            min_p=request.min_p or 0.0,
            seed=choice_seed(request.seed, choice_index),
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            stop=stop,
            ignore_eos=request.ignore_eos,
            logprobs=num_logprobs,
        )
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
