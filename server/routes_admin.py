"""Operational endpoints: /v1/models, /health, /metrics, /v1/engine/plan."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import APIError
from server.plan import plan_info
from server.protocol import ModelCard, ModelList
from server.state import ServerState, Status

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.scheinfer


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The served model (one per server)."""
    state = _state(request)
    return ModelList(data=[ModelCard(id=state.model_name, created=state.created_s, max_model_len=state.max_model_len)])


@router.get("/health", responses={503: {"description": "loading, draining or failed"}})
async def health(request: Request) -> JSONResponse:
    """200 when ready to serve; 503 while loading, draining or after a failed load."""
    state = _state(request)
    ready = state.status is Status.READY and state.engine is not None and state.engine.is_running
    status = "engine_stopped" if state.status is Status.READY and not ready else state.status.value
    body: dict[str, Any] = {"status": status}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state = _state(request)
    if state.engine is not None:
        snapshot = state.engine.stats()
        state.metrics.refresh_engine_gauges(snapshot.engine_stats, snapshot.num_waiting_first_output)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/engine/plan")
async def engine_plan(request: Request) -> dict[str, Any]:
    """The placement plan in force (engine.plan_info()), or a minimal single-device description."""
    state = _state(request)
    if state.engine is None:
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
    return plan_info(state)
