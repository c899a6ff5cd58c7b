"""Bounded load on loopback: many concurrent clients for a fixed time; nothing lost, duplicated or malformed."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.server.live_server import API_KEY, LiveServer

NUM_CLIENTS = 24
DURATION_S = 4.0


@dataclass
class Tally:
    num_sent: int = 0
    num_ok: int = 0
    num_engine_requests: int = 0
    ids: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _check_body(kind: str, body: dict[str, Any], n: int, max_tokens: int) -> str:
    assert body["object"] == ("chat.completion" if kind == "chat" else "text_completion"), body
    assert sorted(c["index"] for c in body["choices"]) == list(range(n)), body
    assert all(c["finish_reason"] == "length" for c in body["choices"]), body
    assert body["usage"]["completion_tokens"] == n * max_tokens, body
    return body["id"]


def _check_stream(kind: str, lines: list[str], n: int, max_tokens: int) -> str:
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    assert "[DONE]" not in data[:-1]
    chunks = [json.loads(item) for item in data[:-1]]
    ids = {chunk["id"] for chunk in chunks}
    assert len(ids) == 1, ids
    finishes = [c["index"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    assert sorted(finishes) == list(range(n)), finishes
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == n * max_tokens, usage
    expected_object = "chat.completion.chunk" if kind == "chat" else "text_completion"
    assert all(chunk["object"] == expected_object for chunk in chunks)
    return ids.pop()


async def _client(http: httpx.AsyncClient, seed: int, deadline_s: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline_s:
        kind = rng.choice(["chat", "completion"])
        stream = rng.random() < 0.5
        n = rng.choice([1, 1, 1, 2])
        max_tokens = rng.randint(1, 16)
        body: dict[str, Any] = {"model": "tiny", "max_tokens": max_tokens, "n": n, "stream": stream,
                                "ignore_eos": True, "temperature": rng.choice([0.0, 0.9])}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": f"client {seed} says hello {rng.random()}"}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = f"Once upon a time {rng.randint(0, 10**6)}"
            path = "/v1/completions"
        tally.num_sent += 1
        try:
            if stream:
                async with http.stream("POST", path, json=body) as response:
                    assert response.status_code == 200, await response.aread()
                    lines = [line async for line in response.aiter_lines()]
                request_id = _check_stream(kind, lines, n, max_tokens)
            else:
                response = await http.post(path, json=body)
                assert response.status_code == 200, response.text
                request_id = _check_body(kind, response.json(), n, max_tokens)
        except Exception as exc:
            tally.failures.append(f"{kind} stream={stream} n={n}: {type(exc).__name__}: {exc}"[:500])
            continue
        tally.num_ok += 1
        tally.num_engine_requests += n
        tally.ids.append(request_id)


def test_bounded_load(server: LiveServer) -> None:
    tally = Tally()

    async def main() -> None:
        limits = httpx.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=60.0, limits=limits) as http:
            deadline_s = time.monotonic() + DURATION_S
            await asyncio.gather(*(_client(http, seed, deadline_s, tally) for seed in range(NUM_CLIENTS)))

    before = server.engine.stats().num_steps
    asyncio.run(main())
    assert tally.failures == []
    assert tally.num_ok == tally.num_sent and tally.num_ok >= NUM_CLIENTS
    assert len(set(tally.ids)) == len(tally.ids), "duplicated response ids"
    snapshot = server.wait_idle()
    assert snapshot.num_unfinished == 0 and snapshot.num_waiting_first_output == 0
    assert snapshot.engine_stats.num_free_blocks == snapshot.engine_stats.num_total_blocks
    assert snapshot.num_steps > before
