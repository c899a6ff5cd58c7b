"""ScheInfer's embedded demo model: a small MixtralForCausalLM trained by scripts/train_demo_model.py.

The checkpoint files (config, bfloat16 safetensors, tokenizer with a chat template) live next to
this file; `DEMO_MODEL_DIR` is the directory to pass to `LLM(...)` or `scheinfer serve --model`.
See docs/DEMO_MODEL.md for the training text, its licence and what the model writes.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR: Path = Path(__file__).resolve().parent

__all__ = ["DEMO_MODEL_DIR"]
