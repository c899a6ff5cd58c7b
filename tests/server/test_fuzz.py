"""Schema fuzz (schemathesis) of the OpenAPI spec against a live server: no input gets a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from engine.async_engine import AsyncEngine  # noqa: E402
from tests.server.live_server import API_KEY, LiveServer, build_engine, live_server, make_settings  # noqa: E402

MAX_EXAMPLES = 40  # per operation and mode; keeps the whole fuzz to a few seconds on 2 cores


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server with a 64-token context, so that even the largest valid request is quick."""
    settings = make_settings(tiny_model_dir, max_model_len=64, max_queue_size=64)
    engine = AsyncEngine(build_engine(tiny_model_dir, max_model_len=64), max_queue_size=64)
    with live_server(settings, engine=engine) as live:
        yield live


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> Any:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=MAX_EXAMPLES, deterministic=True)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_no_server_errors(case: Any) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, checks=[not_a_server_error],
                           timeout=60)
