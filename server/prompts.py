"""Prompts -> token ids: chat messages through the chat template, completion prompts as text or ids."""

from __future__ import annotations

from typing import Any

from server.errors import bad_request
from server.protocol import ChatMessage

_ROLE_ALIASES = {"developer": "system"}


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template (400 when impossible)."""
    if tokenizer is None:
        raise bad_request("this model has no tokenizer; send token ids to /v1/completions", param="messages")
    rendered = [{"role": _ROLE_ALIASES.get(m.role, m.role), "content": m.text()} for m in messages]
    try:
        return list(tokenizer.apply_chat_template(rendered, add_generation_prompt=True))
    except ValueError as exc:  # ChatTemplateError and friends
        raise bad_request(str(exc), param="messages") from exc


def completion_prompt_ids(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]],
                          vocab_size: int) -> list[list[int]]:
    """One list of token ids per prompt (a string, strings, token ids, or lists of token ids)."""
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    elif all(isinstance(item, int) for item in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    out: list[list[int]] = []
    for item in prompts:
        if isinstance(item, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer; send the prompt as token ids", param="prompt")
            out.append(list(tokenizer.encode(item, add_special_tokens=True)))
        else:
            if any(not 0 <= token_id < vocab_size for token_id in item):
                raise bad_request(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
            out.append(list(item))
    return out
