"""ModelConfig: the part of a Hugging Face `config.json` the engine needs, normalised.

One frozen dataclass for every supported architecture; differences between architectures are
fields (norm kind, biases, MoE routing) so that the decoder is written once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not supported."""


class NormKind(StrEnum):
    RMS = "rms"
    LAYER = "layer"


class RouterKind(StrEnum):
    SOFTMAX_TOPK = "softmax_topk"  # Mixtral, Qwen2-MoE
    SPARSEMIXER = "sparsemixer"  # PhiMoE (inference path)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is one of rotary.SUPPORTED_ROPE_TYPES."""

    rope_type: str = "default"
    theta: float = 10000.0
    params: tuple[tuple[str, Any], ...] = ()  # scaling parameters, hashable

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    router: RouterKind
    norm_topk_prob: bool = True
    router_jitter_eps: float = 0.0  # sparsemixer's jitter threshold
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (0: none)
    sparse_layers: tuple[int, ...] = ()  # layers with an MoE block; the others use a dense MLP


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (0 when every layer is MoE)
    max_position_embeddings: int
    norm_eps: float
    norm_kind: NormKind = NormKind.RMS
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    name: str = ""

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe is not None and layer_idx in self.moe.sparse_layers

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face checkpoint directory")
        with config_path.open() as f:
            raw = json.load(f)
        return cls.from_dict(raw, name=Path(path).name)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str = "") -> ModelConfig:
        from engine.model.architectures import parse_config  # architectures know their own fields

        return parse_config(raw, name=name)
