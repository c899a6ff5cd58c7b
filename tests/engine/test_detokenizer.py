"""IncrementalDetokenizer: safe deltas, equality with a full decode, stop strings."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from engine.tools.tiny_checkpoint import build_tokenizer

PIECES = [
    "the",
    " cat",
    " sat",
    ",",
    " ",
    "\n",
    "café",
    " naïve",
    " Ærø",
    "日本語",
    "你好",
    "世界",
    "🙂",
    "👍🏽",
    "🇫🇷",
    "e\u0301",
    "42",
    "!",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(build_tokenizer())


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 25)))


def run(
    tok: Tokenizer, ids: Sequence[int], stop: Sequence[str] = ()
) -> tuple[list[str], str, IncrementalDetokenizer]:
    det = IncrementalDetokenizer(tok, [tok.bos_token_id or 0, 5, 6], list(stop))
    deltas = [det.append(i) for i in ids]
    return deltas, det.flush(), det


def test_deltas_are_whole_characters_and_concatenate_to_decode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    multibyte_splits = 0
    for _ in range(200):
        text = random_text(rng)
        ids = tok.encode(text, add_special_tokens=False)
        multibyte_splits += any(tok.decode([i]).endswith("\ufffd") for i in ids)
        deltas, tail, det = run(tok, ids)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) + tail == tok.decode(ids) == text
        assert det.text == text and not det.stopped
    assert multibyte_splits > 20  # the cases above do split characters across tokens


def test_random_token_ids_match_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas, tail, _ = run(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids)


def test_special_tokens_are_skipped(tok: Tokenizer) -> None:
    eos = next(iter(tok.eos_token_ids))
    ids = tok.encode("hi there", add_special_tokens=False)
    deltas, tail, _ = run(tok, [*ids[:1], eos, *ids[1:], eos])
    assert "".join(deltas) + tail == "hi there"


def test_decode_window_stays_small(tok: Tokenizer) -> None:
    class Spy:
        longest = 0

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            Spy.longest = max(Spy.longest, len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode("The quick brown fox 🙂 jumps over the lazy dog. " * 20, add_special_tokens=False)
    assert len(ids) > 200
    det = IncrementalDetokenizer(Spy(), [], [])
    out = "".join(det.append(i) for i in ids) + det.flush()
    assert out == tok.decode(ids)
    assert Spy.longest <= 8


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(tok: Tokenizer) -> None:
    text = "Hello world. The end is near, friend."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "end is"
    stop_ids = tok.encode(" end is", add_special_tokens=False)
    assert len(stop_ids) >= 3  # the stop string really spans several tokens
    deltas, tail, det = run(tok, ids, [stop])
    assert det.stopped and det.stop_string == stop
    assert "".join(deltas) == det.text == "Hello world. The "
    assert tail == ""
    assert all("end" not in d for d in deltas)
    assert det.append(ids[0]) == "" and det.text == "Hello world. The "


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four", add_special_tokens=False)
    _, _, det = run(tok, ids, ["four", "two", "three"])
    assert det.text == "one " and det.stop_string == "two"
    # both complete on the same token: "two three" starts first
    _, _, det = run(tok, ids, ["two three", "three"])
    assert det.text == "one " and det.stop_string == "two three"


def test_multibyte_stop_string(tok: Tokenizer) -> None:
    ids = tok.encode("I am 🙂 happy", add_special_tokens=False)
    deltas, tail, det = run(tok, ids, ["🙂"])
    assert det.stopped and "".join(deltas) == "I am " and tail == ""


def test_uncompleted_stop_prefix_is_held_then_released(tok: Tokenizer) -> None:
    text = "abc STOP and more"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], ["STOPNOW"])
    emitted_after: list[str] = []
    for i in ids:
        det.append(i)
        emitted_after.append(det.text)
    assert any(t.endswith("abc ") for t in emitted_after)  # "STOP" was held back for a while
    assert not any(t.endswith("STOP") for t in emitted_after)
    assert det.text + det.flush() == text and not det.stopped


def test_stop_prefix_at_end_is_released_by_flush(tok: Tokenizer) -> None:
    ids = tok.encode("abc STO", add_special_tokens=False)
    deltas, tail, det = run(tok, ids, ["STOP"])
    assert "".join(deltas) == "abc "
    assert tail == "STO" and det.text == "abc STO" and not det.stopped


def test_random_stop_strings(tok: Tokenizer) -> None:
    rng = random.Random(2)
    for _ in range(200):
        text = random_text(rng)
        ids = tok.encode(text, add_special_tokens=False)
        a = rng.randrange(len(text))
        stop = text[a : a + rng.randrange(1, 6)]
        deltas, tail, det = run(tok, ids, [stop])
        expected = text[: text.find(stop)]
        assert det.stopped and det.text == expected
        assert "".join(deltas) + tail == expected
        assert all(stop not in d for d in deltas)


def test_empty_stop_strings_are_ignored(tok: Tokenizer) -> None:
    ids = tok.encode("plain text", add_special_tokens=False)
    deltas, tail, det = run(tok, ids, [""])
    assert "".join(deltas) + tail == "plain text" and not det.stopped
    det = IncrementalDetokenizer(tok, [], None)
    assert "".join(det.append(i) for i in ids) + det.flush() == "plain text"
