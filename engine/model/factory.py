"""Builds a DecoderModel from a checkpoint directory or, for a named config, from random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.model.config import ModelConfig
from engine.model.decoder import DecoderModel
from engine.model.loader import CheckpointError, load_weights
from engine.model.random_weights import fill_random
from engine.model.weights import Allocator, UnitLayout, build_model, device_allocator, whole_units

MODEL_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def known_model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIGS_DIR.glob("*.json"))


def resolve_model_config(model: str) -> tuple[ModelConfig, Path | None]:
    """(config, checkpoint dir or None for a named config)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelConfig.from_dir(path), path
    named = MODEL_CONFIGS_DIR / f"{model}.json"
    if named.is_file():
        return ModelConfig.from_dict(json.loads(named.read_text()), name=model), None
    raise CheckpointError(
        f"{model!r} is neither a checkpoint directory nor a known model name "
        f"({', '.join(known_model_names())}); nothing is ever downloaded"
    )


def resolve_dtype(dtype: str, config: ModelConfig, random_weights: bool) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if random_weights:
        return torch.bfloat16
    return DTYPES.get(config.torch_dtype or "", torch.float32)


def load_model(
    model: str,
    device: str,
    dtype: str = "auto",
    random_weights: bool = False,
    seed: int = 0,
    allocator: Allocator | None = None,
    layout: UnitLayout = whole_units,
    show_progress: bool = True,
) -> DecoderModel:
    config, checkpoint = resolve_model_config(model)
    torch_dtype = resolve_dtype(dtype, config, random_weights)
    decoder, fills = build_model(config, allocator or device_allocator(device, torch_dtype), layout)
    if random_weights:
        fill_random(fills, seed=seed, show_progress=show_progress)
    elif checkpoint is None:
        raise CheckpointError(f"{model!r} is a model name without weights: pass random_weights=True")
    else:
        load_weights(checkpoint, fills, show_progress=show_progress)
    return decoder
