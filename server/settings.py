"""ServerSettings: one settings object for the HTTP server.

Sources, highest priority first: explicit overrides (CLI flags), environment variables
`SCHEINFER_*`, a YAML config file (default `configs/server.yaml`), then the field defaults.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "server.yaml"

# The YAML file of the settings being built (a context variable so that concurrent builds don't mix).
_config_file: ContextVar[Path | None] = ContextVar("scheinfer_config_file", default=None)


class ServerSettings(BaseSettings):
    """Everything the server needs to start; see configs/server.yaml for the default preset."""

    model_config = SettingsConfigDict(env_prefix="SCHEINFER_", extra="forbid", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str | None = Field(None, description="checkpoint directory, or a model name from configs/models/")
    served_model_name: str | None = Field(None, description="name clients pass as `model` (default: model's basename)")
    random_weights: bool = Field(False, description="build random weights for a model name (benchmarks)")
    dtype: str = "auto"
    device: str = "auto"
    gpu_memory_budget: str | None = Field(None, description='GPU memory the engine may use, e.g. "24GiB"')
    policy: str = Field("auto", description="partition policy: auto, gpu, cpu-experts, stream, fiddler, manual:...")
    cpu_threads: int | None = Field(None, ge=1, description="threads computing CC pieces (default: cores - 1)")
    host_chunk_rows: int = Field(1024, ge=32, multiple_of=32,
                                 description="rows of a host weight piece: the CPU/PCIe split moves whole pieces "
                                             "(512: finer decode balance, slower prefill; benchmarks/README.md)")
    compact_host_weights: bool | None = Field(
        None, description="store host weight pieces compact (lossless, 3/4 of the bytes); default: when the "
                          "CPU kernels decode them in registers (AVX512/AMX)")
    max_model_len: int | None = Field(None, ge=1, description="context length (default: the model's)")
    kv_cache_tokens: int | None = Field(None, ge=1, description="KV cache size in tokens (default: the engine's)")
    api_key: SecretStr | None = Field(None, description="when set, /v1/* require `Authorization: Bearer <key>`")
    max_queue_size: int = Field(256, ge=1, description="requests waiting for their first token before 429")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429")
    drain_timeout_s: float = Field(30.0, ge=0.0, description="on SIGTERM, time running requests get to finish")
    log_level: str = "info"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @property
    def model_name(self) -> str:
        """The name clients use in `model` and that /v1/models lists."""
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return Path(self.model.rstrip("/")).name or self.model
        return "scheinfer"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML config file named by `_config_file` (a mapping of field names to values)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = _config_file.get()
        self._data: dict[str, Any] = _read_yaml(path) if path is not None else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {key: value for key, value in self._data.items() if value is not None}


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
    """Build ServerSettings from overrides > env `SCHEINFER_*` > YAML file > defaults.

    `config_file` None uses configs/server.yaml when it exists. Overrides whose value is None are
    dropped, so CLI flags that were not given don't mask the environment or the file.
    """
    path = Path(config_file) if config_file is not None else DEFAULT_CONFIG_FILE
    if config_file is not None and not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    token = _config_file.set(path if path.is_file() else None)
    try:
        settings = ServerSettings(**{key: value for key, value in overrides.items() if value is not None})
    finally:
        _config_file.reset(token)
    demo = demo_model_dir()
    if settings.model is None and demo is not None:  # first run: serve the embedded demo model
        settings = settings.model_copy(update={"model": str(demo),
                                               "served_model_name": settings.served_model_name or DEMO_MODEL_NAME})
    return settings


DEMO_MODEL_NAME = "scheinfer-demo"


def demo_model_dir() -> Path | None:
    """The small Mixtral-architecture model shipped in engine/demo_model, when it is there."""
    try:
        from engine.demo_model import DEMO_MODEL_DIR
    except ImportError:
        return None
    return DEMO_MODEL_DIR if (DEMO_MODEL_DIR / "config.json").is_file() else None
