"""Shared fixtures: tiny random checkpoints written by `transformers` itself, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.tools.tiny_checkpoint import write_tiny_checkpoint

ARCHS = ["llama", "mixtral", "qwen2", "qwen2_moe", "phimoe"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a tiny random checkpoint (fp32, single file)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_checkpoint(root / arch, arch=arch, seed=1) for arch in ARCHS}


@pytest.fixture(autouse=True)
def _fresh_torch_crossover():
    """An engine built in a test hands the CPU path its profile's torch crossover (a process-wide
    setting, engine/placement/profiler.use_measured_crossover): forgotten after each test."""
    yield
    from engine.cpu_kernels import runner

    if runner._state.measured_torch_tokens != (None, None):
        runner.set_measured_torch_tokens(None, None)
