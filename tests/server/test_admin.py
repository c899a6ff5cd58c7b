"""/health, /v1/models, /v1/engine/plan, CORS."""

from __future__ import annotations

from pathlib import Path

from engine.async_engine import AsyncEngine
from tests.server.live_server import LiveServer, build_engine, live_server, make_settings


def test_health_ready(server: LiveServer) -> None:
    with server.http(api_key=None) as http:
        response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ready"}


def test_models_list_shape(server: LiveServer) -> None:
    with server.http() as http:
        body = http.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 256


def test_plan_without_planner_is_single_device(server: LiveServer) -> None:
    with server.http() as http:
        plan = http.get("/v1/engine/plan").json()
    assert plan["policy"] == "single-device" and plan["device"] == "cpu"


def test_plan_uses_engine_plan_info(tiny_model_dir: Path) -> None:
    class PlannedEngine:
        def __init__(self) -> None:
            self.inner = build_engine(tiny_model_dir)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def plan_info(self) -> dict[str, object]:
            return {"policy": "scheinfer", "gpu_memory_budget_bytes": 1 << 30, "pieces": {"GG": 3, "CG": 1}}

    engine = AsyncEngine(PlannedEngine())  # type: ignore[arg-type]
    with live_server(make_settings(tiny_model_dir, api_key=None), engine=engine) as live, live.http() as http:
        assert http.get("/v1/engine/plan").json()["pieces"] == {"GG": 3, "CG": 1}
        metrics = http.get("/metrics").text
    assert 'scheinfer:plan_info{' in metrics and 'policy="scheinfer"' in metrics


def test_cors(tiny_model_dir: Path) -> None:
    settings = make_settings(tiny_model_dir, cors_origins=["http://ui.example"])
    engine = AsyncEngine(build_engine(tiny_model_dir))
    with live_server(settings, engine=engine) as live, live.http(api_key=None) as http:
        preflight = http.options("/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
