"""IncrementalDetokenizer: generated token ids -> text deltas that are safe to stream.

Deltas never end in half a character and never contain text that may still turn out to be the
start of a stop string. Decoding uses a sliding window of output tokens (like vLLM): only the
tokens since the last clean character boundary are decoded at each step, so an append costs
O(new tokens). The window never reaches into the prompt: `tokenizer.decode(output_ids)` is the
reference text, and decoding in the prompt's context would differ from it for tokenizers that
strip the first token's leading space (SentencePiece). For byte-level BPE both are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turn one request's output token ids into streamable text, applying stop strings."""

    def __init__(
        self, tokenizer: Decoder, prompt_token_ids: Sequence[int], stop: Sequence[str] | None = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids)
        self.stop: list[str] = [s for s in stop or () if s]
        self.output_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that matched
        self._prefix_offset = 0  # window start: a character boundary in output_ids
        self._read_offset = 0  # tokens before this are decoded into emitted or held text
        self._held = ""  # decoded text not emitted yet (might start a stop string)

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to emit."""
        if self.stopped:
            return ""
        self.output_ids.append(token_id)
        new = self._decode_window(final=False)
        if new:
            self._held += new
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of the request: release held-back text (nothing once stopped)."""
        if self.stopped:
            return ""
        self._held += self._decode_window(final=True)
        return self._release(final=True)

    def _decode_window(self, final: bool) -> str:
        """Text of the tokens past `_read_offset`, or "" while it ends in half a character."""
        ids = self.output_ids
        if self._read_offset >= len(ids):
            return ""
        window = ids[self._prefix_offset :]
        prefix_text = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset])
        full_text = self.tokenizer.decode(window)
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        return full_text[len(prefix_text) :]

    def _release(self, final: bool) -> str:
        """Emit held text up to a stop string, or up to a possible stop-string start."""
        held = self._held
        cut = -1
        for s in self.stop:
            i = held.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, self.stop_string = i, s
        if cut != -1:
            self.stopped = True
            self._held = ""
            return self._emit(held[:cut])
        keep = 0 if final else self._possible_stop_start(held)
        self._held = held[len(held) - keep :] if keep else ""
        return self._emit(held[: len(held) - keep])

    def _possible_stop_start(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, delta: str) -> str:
        self.text += delta
        return delta
