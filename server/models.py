"""Which model a request names: the served name (or the configured path); 404 otherwise."""

from __future__ import annotations

from server.errors import APIError
from server.state import ServerState


def resolve_model(state: ServerState, requested: str | None) -> str:
    """The served model name for `requested` (None: the default model); 404 when unknown."""
    name = state.model_name
    if requested is None or requested in (name, state.settings.model):
        return name
    raise APIError(404, f"the model '{requested}' does not exist; this server serves '{name}'",
                   param="model", code="model_not_found")
