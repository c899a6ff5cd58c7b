"""Loader errors name the directory, file or tensor at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM
from engine.model.config import UnsupportedModelError
from engine.model.loader import CheckpointError


@pytest.fixture
def checkpoint(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama"], path)
    return path


def _load(path: Path) -> LLM:
    return LLM(str(path), show_progress=False)


def test_unsupported_architecture_is_named(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: .*MixtralForCausalLM"):
        _load(checkpoint)


def test_missing_tensor_is_named(checkpoint: Path) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks the tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        _load(checkpoint)


def test_misshapen_tensor_is_named_with_both_shapes(checkpoint: Path) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    save_file(weights, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{name} in model\.safetensors has shape \[\d+, \d+\], expected"):
        _load(checkpoint)


def test_missing_shard_file_is_named(checkpoint: Path) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    save_file(weights, checkpoint / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {n: ("model-00001-of-00002.safetensors" if i % 2 else
                                                "model-00002-of-00002.safetensors") for i, n in enumerate(weights)}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names the shard model-00002-of-00002.safetensors, which is missing"):
        _load(checkpoint)


def test_no_weights_and_no_config_are_clear(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files in"):
        _load(checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        _load(empty)


def test_unknown_name_is_not_downloaded() -> None:
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a known model name.*nothing is ever downloaded"):
        LLM("meta-llama/Llama-2-7b-hf", show_progress=False)
