"""The OpenAI endpoints through the real `openai` SDK against a live server and the real engine."""

from __future__ import annotations

import httpx
import pytest

from tests.server.live_server import LiveServer

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


def test_chat_completion(server: LiveServer) -> None:
    out = server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "tiny"
    assert out.created > 0
    (choice,) = out.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.prompt_tokens > 0
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_max_completion_tokens_and_ignore_eos(server: LiveServer) -> None:
    out = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_completion_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 12


def test_chat_content_parts_system_and_unknown_fields(server: LiveServer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "What is your name?"},
    ]
    out = server.client().chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0, user="someone",
        extra_body={"metadata_unknown": {"x": 1}, "parallel_tool_calls": False})
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chat_without_model_uses_the_served_one(server: LiveServer) -> None:
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny"


def test_completion(server: LiveServer) -> None:
    out = server.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert out.usage is not None and 1 <= out.usage.completion_tokens <= 6


def test_completion_prompt_list_and_token_ids(server: LiveServer) -> None:
    client = server.client()
    out = client.completions.create(model="tiny", prompt=["Once upon", "The quick brown"], max_tokens=3, n=2,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    # greedy: both choices of one prompt agree
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]
    assert out.usage is not None and out.usage.completion_tokens == 12
    ids = server.engine.tokenizer.encode("Once upon")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_index[0]
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)


def test_completion_echo(server: LiveServer) -> None:
    out = server.client().completions.create(model="tiny", prompt="Once upon", max_tokens=3, temperature=0,
                                             echo=True)
    assert out.choices[0].text.startswith("Once upon")


def test_chat_stream_with_usage(server: LiveServer) -> None:
    stream = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 10
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    non_stream = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert text == non_stream.choices[0].message.content


def test_completion_stream_ends_with_done(server: LiveServer) -> None:
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "stream": True, "temperature": 0}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) >= 3


def test_completion_stream_without_usage_has_no_usage_chunk(server: LiveServer) -> None:
    chunks = list(server.client().completions.create(model="tiny", prompt="Hello", max_tokens=4, stream=True,
                                                     temperature=0))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def _greedy_text(server: LiveServer, num_tokens: int) -> str:
    out = server.client().completions.create(model="tiny", prompt="The quick brown fox", max_tokens=num_tokens,
                                             temperature=0, extra_body={"ignore_eos": True})
    return out.choices[0].text


def test_stop_strings(server: LiveServer) -> None:
    full = _greedy_text(server, 24)
    assert len(full) >= 8, full
    stop = full[4:7]
    expected = full[: full.index(stop)]
    client = server.client()
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=24, temperature=0,
                                    stop=[stop, "zzzzzzzz"], extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=24,
                                         temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_determinism(server: LiveServer) -> None:
    client = server.client()

    def sample(seed: int) -> str:
        out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                        seed=seed, extra_body={"ignore_eos": True})
        return out.choices[0].text

    first, again = sample(1234), sample(1234)
    assert first == again
    assert len({first, sample(1), sample(2)}) >= 2


def test_n_choices_with_seed_use_seed_plus_index(server: LiveServer) -> None:
    client = server.client()
    out = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, n=3, temperature=1.0, seed=7,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage is not None and out.usage.completion_tokens == 24
    texts = {c.index: c.message.content for c in out.choices}
    single = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, seed=8,
                                            extra_body={"ignore_eos": True})
    assert single.choices[0].message.content == texts[1]


def test_n_choices_stream(server: LiveServer) -> None:
    chunks = list(server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=5, n=2, temperature=0.8, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_chat_logprobs(server: LiveServer) -> None:
    out = server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0,
                                                  logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == out.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_completion_logprobs(server: LiveServer) -> None:
    out = server.client().completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=2,
                                             extra_body={"ignore_eos": True})
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 3
    assert all(len(top) <= 2 for top in logprobs.top_logprobs or [])


def test_penalties_and_filters_accepted(server: LiveServer) -> None:
    out = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert out.choices[0].finish_reason in ("stop", "length")


def test_models_endpoint(server: LiveServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_http_keepalive_many_requests(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer test-key"}) as http:
        for _ in range(5):
            assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
