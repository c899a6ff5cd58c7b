"""Server fixtures: one tiny llama checkpoint per session and a shared live server with the real engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine
from engine.tools.tiny_checkpoint import write_tiny_checkpoint
from tests.server.live_server import LiveServer, build_engine, live_server, make_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("server_tiny") / "llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """The shared live server: real LLMEngine (CPU, fp32), context 256 tokens, API key `test-key`."""
    settings = make_settings(tiny_model_dir, max_queue_size=64)
    engine = AsyncEngine(build_engine(tiny_model_dir), max_queue_size=settings.max_queue_size)
    with live_server(settings, engine=engine) as live:
        yield live
