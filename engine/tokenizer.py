"""Tokenizer: a thin wrapper over a Hugging Face tokenizer loaded from local files only."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "tekken.json",
)


class TokenizerLoadError(ValueError):
    """The directory has no usable tokenizer."""


class ChatTemplateError(ValueError):
    """The checkpoint has no chat template, or the messages cannot be rendered with it."""


def _ids(value: Any) -> set[int]:
    """Token ids from an int, a list of ints, or None."""
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _json_eos_ids(path: Path) -> set[int]:
    """`eos_token_id` of a JSON config file (also under `text_config`), or nothing."""
    if not path.is_file():
        return set()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(raw, dict):
        return set()
    found = _ids(raw.get("eos_token_id"))
    text_config = raw.get("text_config")
    if isinstance(text_config, dict):
        found |= _ids(text_config.get("eos_token_id"))
    return found


class Tokenizer:
    """Encode, decode, chat template and stop ids of one checkpoint's tokenizer."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf_tokenizer
        self.eos_token_ids: frozenset[int] = frozenset(
            _ids(hf_tokenizer.eos_token_id) | {int(i) for i in eos_token_ids}
        )
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.pad_token_id: int | None = hf_tokenizer.pad_token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load with `AutoTokenizer` from `path` (local files only); TokenizerLoadError if absent."""
        from transformers import AutoTokenizer

        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerLoadError(f"tokenizer directory {str(directory)!r} does not exist")
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise TokenizerLoadError(
                f"no tokenizer files in {str(directory)!r} (expected one of {', '.join(TOKENIZER_FILES)})"
            )
        try:
            hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds; the caller needs one
            raise TokenizerLoadError(f"cannot load the tokenizer in {str(directory)!r}: {exc}") from exc
        if isinstance(hf, bool) or not hasattr(hf, "decode"):
            raise TokenizerLoadError(f"cannot load the tokenizer in {str(directory)!r}")
        extra = _json_eos_ids(directory / "generation_config.json") | _json_eos_ids(directory / "config.json")
        return cls(hf, extra)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as text."""
        if not self.has_chat_template:
            raise ChatTemplateError("this model's tokenizer has no chat template; use a completion prompt")
        clean: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ChatTemplateError(f"message {i} must be a dict with a 'role'")
            content = message.get("content")
            clean.append({**message, "content": "" if content is None else content})
        try:
            text = self.hf.apply_chat_template(
                clean, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja errors, raise_exception() in the template
            raise ChatTemplateError(f"cannot apply the chat template: {exc}") from exc
        if not isinstance(text, str):
            raise ChatTemplateError("the chat template did not render to text")
        return text

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat (special tokens come from the template itself)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Same as `Tokenizer.from_dir`."""
    return Tokenizer.from_dir(path)
