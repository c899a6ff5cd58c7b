"""ServerSettings sources: overrides > env SCHEINFER_* > YAML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import DEFAULT_CONFIG_FILE, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("SCHEINFER_"):
            monkeypatch.delenv(key)


def test_default_preset_is_loaded() -> None:
    assert DEFAULT_CONFIG_FILE.is_file()
    settings = load_settings()
    assert settings.port == 8000 and settings.api_key is None and settings.max_queue_size == 256


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("port: 9001\nmax_queue_size: 7\nmodel: /models/a\ncors-origins: [http://x]\n")
    settings = load_settings(config)
    assert (settings.port, settings.max_queue_size, settings.model) == (9001, 7, "/models/a")
    assert settings.cors_origins == ["http://x"]
    monkeypatch.setenv("SCHEINFER_PORT", "9002")
    monkeypatch.setenv("SCHEINFER_API_KEY", "s3cret")
    monkeypatch.setenv("SCHEINFER_CORS_ORIGINS", "http://a, http://b")
    settings = load_settings(config, max_queue_size=None)  # None: flag not given
    assert settings.port == 9002 and settings.max_queue_size == 7
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.cors_origins == ["http://a", "http://b"]
    settings = load_settings(config, port=9003, served_model_name="m")
    assert settings.port == 9003 and settings.model_name == "m"


def test_model_name_defaults_to_basename() -> None:
    assert load_settings(model="/data/ckpt/llama-tiny/").model_name == "llama-tiny"


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("prot: 1\n")
    with pytest.raises(ValidationError):
        load_settings(typo)
    with pytest.raises(ValidationError):
        load_settings(port=70000)


def test_host_chunk_rows_reach_the_engine(tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from server.app import build_llm_engine

    with pytest.raises(ValidationError):
        load_settings(host_chunk_rows=100)  # not a multiple of 32
    monkeypatch.setenv("SCHEINFER_HOST_CHUNK_ROWS", "64")
    settings = load_settings(model=str(tiny_checkpoints["mixtral"]), device="cpu", policy="manual:cg=0.5")
    assert settings.host_chunk_rows == 64
    engine = build_llm_engine(settings)
    assert engine.config.partition.host_chunk_rows == 64
    assert engine.plan_info()["host_chunk_rows"] == 64
