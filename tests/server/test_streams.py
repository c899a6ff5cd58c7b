"""Concurrent streams, client disconnects (KV freed), and the metrics they move."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.live_server import LiveServer


def test_16_parallel_streams_complete_with_right_lengths(server: LiveServer) -> None:
    lengths = [4 + 3 * i for i in range(16)]

    async def one(client: object, max_tokens: int) -> tuple[int, int, str | None]:
        stream = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="tiny", messages=[{"role": "user", "content": f"Count to {max_tokens}"}], max_tokens=max_tokens,
            temperature=0.8, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        finish: str | None = None
        usage_tokens = -1
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                assert finish is None, "two finish chunks"
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
        return max_tokens, usage_tokens, finish

    async def main() -> list[tuple[int, int, str | None]]:
        client = server.async_client()
        try:
            return await asyncio.gather(*(one(client, n) for n in lengths))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert [(asked, got, finish) for asked, got, finish in results] == [(n, n, "length") for n in lengths]
    assert server.wait_idle().engine_stats.kv_cache_usage == 0.0


def test_disconnect_mid_stream_frees_kv(server: LiveServer) -> None:
    server.wait_idle()
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        num_events = 0
        for line in lines:
            num_events += line.startswith("data: ")
            if num_events >= 3:
                break
        busy = server.engine.stats().engine_stats
        assert busy.num_running == 1 and busy.kv_cache_usage > 0
    # the response is closed: the server notices, aborts the request and frees its blocks
    snapshot = server.wait_idle(timeout_s=10.0)
    stats = snapshot.engine_stats
    assert snapshot.num_unfinished == 0 and stats.num_running == 0
    assert stats.num_free_blocks == stats.num_total_blocks and stats.kv_cache_usage == 0.0


def test_disconnect_during_non_streaming_request_frees_kv(server: LiveServer) -> None:
    server.wait_idle()
    before = _total(_samples(server), "scheinfer:requests_total", status="499")
    # n=4 long completions cannot finish within the client's 0.2 s timeout on any machine
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 240, "n": 4, "ignore_eos": True}
    with server.http() as http, contextlib.suppress(httpx.TimeoutException):
        http.post("/v1/completions", json=body, timeout=httpx.Timeout(0.2))
    deadline = time.monotonic() + 10
    while server.engine.stats().num_unfinished and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = server.wait_idle().engine_stats
    assert stats.num_free_blocks == stats.num_total_blocks
    deadline = time.monotonic() + 5
    while _total(_samples(server), "scheinfer:requests_total", status="499") < before + 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    # each of the n=4 choices is an engine request, aborted, not finished
    assert _total(_samples(server), "scheinfer:requests_total", status="499") == before + 4


def _samples(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with server.http(api_key=None) as http:
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and all((k, v) in sample_labels for k, v in labels.items()))


def test_metrics_move(server: LiveServer) -> None:
    server.wait_idle()
    before = _samples(server)
    client = server.client()
    client.completions.create(model="tiny", prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True})
    list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                        stream=True, extra_body={"ignore_eos": True}))
    after = _samples(server)
    requests = "scheinfer:requests_total"
    assert _total(after, requests, finish_reason="length", status="200") - \
        _total(before, requests, finish_reason="length", status="200") == 2
    assert _total(after, "scheinfer:generation_tokens_total") - _total(before, "scheinfer:generation_tokens_total") == 8
    assert _total(after, "scheinfer:prompt_tokens_total") > _total(before, "scheinfer:prompt_tokens_total")
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "queue_time_seconds"):
        name = f"scheinfer:{histogram}_count"
        assert _total(after, name) - _total(before, name) == 2, histogram
    assert _total(after, "scheinfer:inter_token_latency_seconds_count") - \
        _total(before, "scheinfer:inter_token_latency_seconds_count") == 6
    assert _total(after, "scheinfer:step_time_seconds_count", kind="decode") > \
        _total(before, "scheinfer:step_time_seconds_count", kind="decode")
    assert _total(after, "scheinfer:step_time_seconds_count", kind="prefill") > 0
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio"):
        assert (f"scheinfer:{gauge}", ()) in after, gauge
    assert after[("scheinfer:kv_cache_usage_ratio", ())] == 0.0


def test_metrics_count_aborts(server: LiveServer) -> None:
    before = _samples(server)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    server.wait_idle()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = _samples(server)
        if _total(after, "scheinfer:requests_total", status="499") > _total(before, "scheinfer:requests_total",
                                                                             status="499"):
            break
        time.sleep(0.05)
    assert _total(after, "scheinfer:requests_total", finish_reason="abort", status="499") - \
        _total(before, "scheinfer:requests_total", finish_reason="abort", status="499") == 1
