"""Every error answers OpenAI's body with the right status; user input never gets a 500."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.async_engine import AsyncEngine
from tests.server.live_server import GatedEngine, LiveServer, build_engine, live_server, make_settings

HELLO = [{"role": "user", "content": "Hello"}]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO, "temperature": -0.5}, "temperature"),
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": "many"}, "max_tokens"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "n": 0}, "n"),
        ({"messages": HELLO, "n": 1000}, "n"),
        ({"messages": HELLO, "presence_penalty": 3}, "presence_penalty"),
        ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": HELLO, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"messages": HELLO, "stop": [""]}, "stop"),
        ({"messages": HELLO, "seed": 2**70}, "seed"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"messages": "hello"}, "messages"),
        ({}, "messages"),
        ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": HELLO, "logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_chat_invalid_parameters_are_400(server: LiveServer, body: dict[str, Any], param: str | None) -> None:
    with server.http() as http:
        error = assert_openai_error(http.post("/v1/chat/completions", json={"model": "tiny", **body}), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "max_tokens": -1},
        {"prompt": [], "max_tokens": 2},
        {"prompt": [1, 2, 10**6]},
        {"prompt": {"text": "hi"}},
        {"prompt": "hi", "best_of": 3},
        {"prompt": "hi", "logprobs": 99},
        {"prompt": "hi", "stream": "yes please"},
        {"prompt": ["hi"] * 40, "n": 2},  # 80 generations > the queue of 64
    ],
)
def test_completion_invalid_parameters_are_400(server: LiveServer, body: dict[str, Any]) -> None:
    with server.http() as http:
        assert_openai_error(http.post("/v1/completions", json={"model": "tiny", **body}), 400)


def test_malformed_json_and_wrong_content_are_400(server: LiveServer) -> None:
    with server.http() as http:
        assert_openai_error(http.post("/v1/chat/completions", content=b"{not json",
                                      headers={"content-type": "application/json"}), 400)
        assert_openai_error(http.post("/v1/chat/completions", json=[1, 2, 3]), 400)
        assert_openai_error(http.post("/v1/completions", content=b"\xff\xfe\x00garbage",
                                      headers={"content-type": "application/json"}), 400)


def test_prompt_longer_than_context_is_400_with_limits(server: LiveServer) -> None:
    client = server.client()
    long_prompt = "the quick brown fox " * 200
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=4)
    message = caught.value.body["message"]  # type: ignore[index]
    assert "256" in message and "context length" in message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1000)
    message = caught.value.body["message"]  # type: ignore[index]
    assert "256" in message and "1000" in message
    with pytest.raises(openai.BadRequestError):  # streamed: the error comes before the stream starts
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1000, stream=True)


def test_unknown_model_is_404(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="gpt-17", messages=HELLO, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    with server.http() as http:
        assert_openai_error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")


def test_unknown_route_and_method(server: LiveServer) -> None:
    with server.http() as http:
        assert_openai_error(http.get("/v1/nothing-here"), 404)
        assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_auth(server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    with server.http(api_key=None) as http:
        error = assert_openai_error(http.post("/v1/completions", json={"prompt": "x"}), 401)
        assert error["code"] == "invalid_api_key"
        assert_openai_error(http.get("/v1/models", headers={"Authorization": "Basic dGVzdC1rZXk="}), 401)
        assert_openai_error(http.get("/v1/models", headers={"Authorization": "Bearer test-key-and-more"}), 401)
        assert http.get("/health").status_code == 200  # probes need no key
        assert http.get("/metrics").status_code == 200
    assert server.client().models.list().data


def test_oversized_body_is_413(server: LiveServer) -> None:
    limit = server.state.settings.max_body_bytes
    big = {"model": "tiny", "prompt": "x" * (limit + 10)}
    with server.http() as http:
        assert_openai_error(http.post("/v1/completions", json=big), 413)

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"prompt": "'
            for _ in range(limit // 65536 + 2):
                yield b"y" * 65536
            yield b'"}'

        assert_openai_error(http.post("/v1/completions", content=chunked(),
                                      headers={"content-type": "application/json"}), 413)


def test_queue_full_is_429_with_retry_after(tiny_model_dir: Path) -> None:
    gated = GatedEngine(build_engine(tiny_model_dir))
    engine = AsyncEngine(gated, max_queue_size=2, retry_after_s=3)  # type: ignore[arg-type]
    settings = make_settings(tiny_model_dir, max_queue_size=2)
    with live_server(settings, engine=engine) as live:
        results: list[Any] = []

        def request() -> None:
            results.append(live.client().completions.create(model="tiny", prompt="Hi", max_tokens=2))

        waiting = [threading.Thread(target=request) for _ in range(2)]
        try:
            for thread in waiting:
                thread.start()
            while engine.stats().num_waiting_first_output < 2:
                time.sleep(0.005)
            with live.http() as http:
                response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                error = assert_openai_error(response, 429)
                assert response.headers["retry-after"] == "3" and error["type"] == "rate_limit_error"
                response = http.post("/v1/chat/completions", json={"messages": HELLO, "n": 2})
                assert_openai_error(response, 429)
                # more generations than the queue can ever hold: not worth retrying
                response = http.post("/v1/chat/completions", json={"messages": HELLO, "n": 3})
                assert_openai_error(response, 400, "n")
        finally:
            gated.gate.set()
            for thread in waiting:
                thread.join(timeout=30)
        assert len(results) == 2
        assert live.client().completions.create(model="tiny", prompt="Hi", max_tokens=2).choices


def test_loading_is_503_then_ready(tiny_model_dir: Path) -> None:
    release = threading.Event()

    def slow_factory(settings: Any) -> Any:
        release.wait(30)
        return build_engine(tiny_model_dir)

    settings = make_settings(tiny_model_dir)
    with live_server(settings, engine_factory=slow_factory, wait_ready=False) as live, live.http() as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        error = assert_openai_error(http.post("/v1/chat/completions", json={"messages": HELLO}), 503)
        assert error["code"] == "model_loading"
        assert_openai_error(http.get("/v1/engine/plan"), 503)
        assert http.get("/v1/models").status_code == 200
        release.set()
        for _ in range(500):
            if http.get("/health").status_code == 200:
                break
            time.sleep(0.02)
        assert http.get("/health").json() == {"status": "ready"}
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_failed_load_is_503_with_reason(tiny_model_dir: Path) -> None:
    def broken_factory(settings: Any) -> Any:
        raise FileNotFoundError("no checkpoint at /nowhere")

    settings = make_settings(tiny_model_dir)
    with live_server(settings, engine_factory=broken_factory, wait_ready=False) as live, live.http() as http:
        for _ in range(500):
            health = http.get("/health")
            if health.json()["status"] != "loading":
                break
            time.sleep(0.02)
        assert health.status_code == 503 and "no checkpoint" in health.json()["error"]
        assert_openai_error(http.post("/v1/completions", json={"prompt": "x"}), 503)


class FailingStep:
    """Makes the engine's next model execution raise (then behaves again)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.original = runner.execute
        self.num_failures = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.runner.execute = self.original
        self.num_failures += 1
        raise RuntimeError("injected fault")


def test_step_exception_fails_only_that_request(server: LiveServer) -> None:
    client = server.client()
    runner = server.engine.engine.runner  # type: ignore[attr-defined]
    fault = FailingStep(runner)
    runner.execute = fault
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=4)
    assert "injected fault" in caught.value.body["message"]  # type: ignore[index]
    assert fault.num_failures == 1
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=4).choices[0].finish_reason

    runner.execute = FailingStep(runner)
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError) as caught_stream:
        list(stream)
    assert "injected fault" in str(caught_stream.value)
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4).choices
    assert server.wait_idle().num_unfinished == 0
