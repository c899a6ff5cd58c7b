"""The placement plan in force, as JSON: engine.plan_info() when the engine has one."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi.encoders import jsonable_encoder

from server.state import ServerState


def plan_info(state: ServerState) -> dict[str, Any]:
    """`engine.plan_info()` (dict or dataclass), else a minimal single-device description."""
    assert state.engine is not None
    engine = state.engine.engine
    plan_fn = getattr(engine, "plan_info", None)
    if callable(plan_fn):
        info = plan_fn()
        if dataclasses.is_dataclass(info) and not isinstance(info, type):
            info = dataclasses.asdict(info)
        return jsonable_encoder(info if isinstance(info, dict) else {"plan": info})
    config = getattr(engine, "config", None)
    return {
        "policy": "single-device",
        "device": str(getattr(config, "device", state.settings.device)),
        "dtype": str(getattr(config, "dtype", state.settings.dtype)),
        "model": state.model_name,
        "max_model_len": state.max_model_len,
    }
