"""A live uvicorn server on 127.0.0.1 (random free port) in a background thread, for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn

from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.scheduler import SchedulerConfig
from server.app import create_app
from server.settings import ServerSettings
from server.state import ServerState

API_KEY = "test-key"


def build_engine(model_dir: Path, max_model_len: int = 256, kv_cache_tokens: int = 4096,
                 max_num_seqs: int = 32) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", max_model_len=max_model_len,
        kv_cache_tokens=kv_cache_tokens, show_progress=False,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=1024, max_prefill_chunk=256),
    ))


def make_settings(model_dir: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = dict(model=str(model_dir), served_model_name="tiny", device="cpu", dtype="float32",
                                  api_key=API_KEY, max_queue_size=64)
    values.update(overrides)
    return ServerSettings(**values)


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    state: ServerState
    server: uvicorn.Server

    @property
    def engine(self) -> AsyncEngine:
        assert self.state.engine is not None
        return self.state.engine

    def client(self, api_key: str = API_KEY, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60.0, **kwargs)

    def async_client(self, api_key: str = API_KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60.0)

    def http(self, api_key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def wait_idle(self, timeout_s: float = 10.0) -> Any:
        """Wait until the engine has no request and no KV block in use; returns the engine stats."""
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = self.engine.stats()
            stats = snapshot.engine_stats
            idle = (snapshot.num_unfinished == 0 and stats is not None and stats.num_running == 0
                    and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks)
            if idle or time.monotonic() > deadline:
                return snapshot
            time.sleep(0.02)


@contextmanager
def live_server(settings: ServerSettings, engine: AsyncEngine | None = None,
                engine_factory: Callable[[ServerSettings], Any] | None = None,
                wait_ready: bool = True) -> Iterator[LiveServer]:
    """Serve create_app(settings, engine, engine_factory) on 127.0.0.1 until the block exits."""
    app = create_app(settings, engine=engine, engine_factory=engine_factory)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60.0
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    live = LiveServer(f"http://127.0.0.1:{port}", app.state.scheinfer, server)
    if wait_ready:
        while live.state.engine is None or not live.state.engine.is_running:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine did not load: {live.state.load_error}")
            time.sleep(0.01)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30.0)
        sock.close()


class PacedEngine:
    """The real LLMEngine whose steps take at least `step_s` (timing tests that must not depend on
    how fast the machine decodes)."""

    def __init__(self, inner: Any, step_s: float) -> None:
        self.inner = inner
        self.step_s = step_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self) -> Any:
        start = time.perf_counter()
        out = self.inner.step()
        time.sleep(max(0.0, self.step_s - (time.perf_counter() - start)))
        return out


class GatedEngine:
    """The real LLMEngine whose steps wait for `gate` (to hold requests in the queue)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self) -> Any:
        self.gate.wait()
        return self.inner.step()
