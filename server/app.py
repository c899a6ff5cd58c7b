"""create_app: the FastAPI app, its middleware, error handlers and engine lifecycle."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine.async_engine import AsyncEngine, EngineLike, StepRecord
from server import routes_admin, routes_openai
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from server.plan import plan_info
from server.settings import ServerSettings
from server.state import ServerState, Status

logger = logging.getLogger("scheinfer.server")

EngineFactory = Callable[[ServerSettings], EngineLike]


def build_llm_engine(settings: ServerSettings) -> EngineLike:
    """An LLMEngine for `settings` (runs in the loader thread; may take minutes for big models)."""
    import torch

    from engine.engine_config import EngineConfig
    from engine.llm_engine import LLMEngine

    if not settings.model:
        raise ValueError("no model configured: set `model` (flag --model, env SCHEINFER_MODEL or the config file)")
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from engine.executor.setup import PartitionOptions

    options = {"model": settings.model, "device": device, "dtype": settings.dtype,
               "random_weights": settings.random_weights, "max_model_len": settings.max_model_len,
               "kv_cache_tokens": settings.kv_cache_tokens}
    partition = PartitionOptions(settings.policy, settings.gpu_memory_budget, settings.cpu_threads,
                                 host_chunk_rows=settings.host_chunk_rows,
                                 compact_host_weights=settings.compact_host_weights)
    config = EngineConfig(**{k: v for k, v in options.items() if v is not None}, partition=partition)
    return LLMEngine(config)


def create_app(
    settings: ServerSettings,
    engine: AsyncEngine | None = None,
    engine_factory: EngineFactory | None = None,
) -> FastAPI:
    """The server app. Without `engine`, one is built at startup by `engine_factory` (default:
    LLMEngine from settings) in a background thread, so /health answers 503 while it loads."""
    metrics = ServerMetrics()
    state = ServerState(settings=settings, metrics=metrics)
    factory = engine_factory or build_llm_engine

    def observe_step(record: StepRecord) -> None:
        metrics.observe_step(record.duration_s, record.stats, record.failed)

    def attach(async_engine: AsyncEngine) -> None:
        async_engine.step_observer = observe_step
        async_engine.queue_time_observer = metrics.queue_time.observe
        async_engine.start()
        state.engine = async_engine
        try:
            metrics.set_plan(plan_info(state))
        except Exception:
            logger.exception("engine plan_info failed")
        state.status = Status.READY
        logger.info("engine ready: serving %s", state.model_name)

    def load() -> None:
        try:
            start_s = time.perf_counter()
            llm_engine = factory(settings)
            async_engine = AsyncEngine(llm_engine, max_queue_size=settings.max_queue_size,
                                       retry_after_s=settings.retry_after_s)
            attach(async_engine)
            logger.info("model loaded in %.1fs", time.perf_counter() - start_s)
        except Exception as exc:  # /health reports it; the process stays up for inspection
            logger.exception("loading the model failed")
            state.load_error = f"{type(exc).__name__}: {exc}"
            state.status = Status.FAILED

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.created_s = int(time.time())
        if engine is not None:
            attach(engine)
        else:
            threading.Thread(target=load, name="scheinfer-loader", daemon=True).start()
        yield
        if state.status is not Status.FAILED:
            state.status = Status.DRAINING
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, 0.0)

    app = FastAPI(title="ScheInfer", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible inference server")
    app.state.scheinfer = state
    install_error_handlers(app)
    app.include_router(routes_openai.router)
    app.include_router(routes_admin.router)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app
