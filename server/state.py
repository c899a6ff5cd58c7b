"""ServerState: what the routes share (settings, metrics, the engine and its lifecycle)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.async_engine import AsyncEngine
from server.errors import APIError
from server.metrics import ServerMetrics
from server.settings import ServerSettings


class Status(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: ServerMetrics
    engine: AsyncEngine | None = None
    status: Status = Status.LOADING
    load_error: str | None = None
    created_s: int = 0

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    @property
    def max_model_len(self) -> int | None:
        if self.engine is None:
            return self.settings.max_model_len
        return int(getattr(self.engine.engine, "max_model_len", 0) or 0) or self.settings.max_model_len

    def ready_engine(self) -> AsyncEngine:
        """The engine, or a 503 while loading, draining or after a failed load."""
        if self.status is Status.READY and self.engine is not None and self.engine.accepting:
            return self.engine
        if self.status is Status.LOADING:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        if self.status is Status.FAILED:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        raise APIError(503, "the server is shutting down", code="shutting_down")
