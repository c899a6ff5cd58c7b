"""Loads a Hugging Face checkpoint directory (single or sharded safetensors) into the model layout.

Errors name the directory, file or tensor at fault. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.model.weights import TensorFill

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint directory is missing a file or a tensor, or a tensor has the wrong shape."""


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    index_path = path / INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index_path} names the shard {shard.name}, which is missing from {path}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files in {path} (and no {INDEX_FILE})")
    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), shard))
    return files


def load_weights(path: str | Path, fills: list[TensorFill], show_progress: bool = True) -> None:
    """Copies every tensor named in `fills` from the checkpoint into its destination (dtype converted)."""
    path = Path(path)
    files = checkpoint_files(path)
    missing = [f.name for f in fills if f.name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {path} lacks the tensor {missing[0]}{more}")
    handles: dict[Path, Any] = {}
    with ExitStack() as stack:
        for fill in tqdm(fills, desc=f"loading {path.name}", unit="tensor", disable=not show_progress):
            shard = files[fill.name]
            if shard not in handles:
                handles[shard] = stack.enter_context(safe_open(str(shard), framework="pt"))
            shape = tuple(handles[shard].get_slice(fill.name).get_shape())
            if shape != fill.shape:
                raise CheckpointError(
                    f"tensor {fill.name} in {shard.name} has shape {list(shape)}, expected {list(fill.shape)}"
                )
            with torch.no_grad():
                if fill.region is None:
                    fill.out.copy_(handles[shard].get_tensor(fill.name))
                else:
                    r0, r1, c0, c1 = fill.region
                    fill.out.copy_(handles[shard].get_slice(fill.name)[r0:r1, c0:c1])
