"""Engine TokenLogprobs -> OpenAI's logprobs shapes (chat `content` list; completions columns)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

_MIN_LOGPROB = -9999.0  # JSON has no -inf


def _finite(logprob: float) -> float:
    if math.isnan(logprob) or logprob < _MIN_LOGPROB:
        return _MIN_LOGPROB
    return float(logprob)


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Any, logprobs: Sequence[Any]) -> ChatLogprobs:
    content = []
    for entry in logprobs:
        token = _token_text(tokenizer, entry.token_id)
        top = [
            TopLogprob(token=(text := _token_text(tokenizer, token_id)), logprob=_finite(lp),
                       bytes=list(text.encode("utf-8")))
            for token_id, lp in entry.top_logprobs
        ]
        content.append(ChatTokenLogprob(token=token, logprob=_finite(entry.logprob),
                                        bytes=list(token.encode("utf-8")), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer: Any, logprobs: Sequence[Any], text_offset_start: int) -> CompletionLogprobs:
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    offset = text_offset_start
    for entry in logprobs:
        token = _token_text(tokenizer, entry.token_id)
        tokens.append(token)
        token_logprobs.append(_finite(entry.logprob))
        top_logprobs.append({_token_text(tokenizer, token_id): _finite(lp) for token_id, lp in entry.top_logprobs})
        text_offset.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                              text_offset=text_offset)
