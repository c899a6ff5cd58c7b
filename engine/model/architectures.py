"""Supported architectures: how each one's config.json maps onto ModelConfig.

Every architecture shares one decoder (engine/model/decoder.py); what differs is captured here
as ModelConfig fields. Weight names per architecture live in engine/model/weights.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.model.config import (
    ModelConfig,
    MoEConfig,
    NormKind,
    RopeConfig,
    RouterKind,
    UnsupportedModelError,
)

_DTYPE_KEYS = ("dtype", "torch_dtype")


def _rope_config(raw: dict[str, Any], default_theta: float) -> RopeConfig:
    """Accepts both the transformers-5 `rope_parameters` and the older `rope_theta` + `rope_scaling`."""
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", default_theta)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "longrope" and "original_max_position_embeddings" not in params:
        params["original_max_position_embeddings"] = raw.get(
            "original_max_position_embeddings", raw["max_position_embeddings"]
        )
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return RopeConfig(rope_type=rope_type, theta=theta, params=frozen)


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(raw: dict[str, Any], name: str, default_theta: float) -> dict[str, Any]:
    num_heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    sliding = raw.get("sliding_window")
    if raw.get("use_sliding_window") is False:
        sliding = None
    return {
        "architecture": raw["architectures"][0],
        "model_type": raw.get("model_type", ""),
        "vocab_size": raw["vocab_size"],
        "hidden_size": hidden,
        "num_layers": raw["num_hidden_layers"],
        "num_heads": num_heads,
        "num_kv_heads": raw.get("num_key_value_heads") or num_heads,
        "head_dim": raw.get("head_dim") or hidden // num_heads,
        "intermediate_size": raw.get("intermediate_size", 0),
        "max_position_embeddings": raw.get("max_position_embeddings", 4096),
        "norm_eps": raw.get("rms_norm_eps", 1e-6),
        "hidden_act": raw.get("hidden_act", "silu"),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "sliding_window": sliding or None,
        "rope": _rope_config(raw, default_theta),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_ids": _eos_ids(raw),
        "torch_dtype": next((str(raw[k]) for k in _DTYPE_KEYS if raw.get(k)), None),
        "name": name,
    }


def _llama(raw: dict[str, Any], name: str) -> ModelConfig:
    if raw.get("mlp_bias"):
        raise UnsupportedModelError("LlamaForCausalLM with mlp_bias=true is not supported")
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(**_common(raw, name, 10000.0), qkv_bias=bias, o_bias=bias)


def _qwen2(raw: dict[str, Any], name: str) -> ModelConfig:
    return ModelConfig(**_common(raw, name, 10000.0), qkv_bias=True)


def _mixtral(raw: dict[str, Any], name: str) -> ModelConfig:
    common = _common(raw, name, 1e6)
    moe = MoEConfig(
        num_experts=raw["num_local_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"],
        expert_intermediate_size=raw["intermediate_size"],
        router=RouterKind.SOFTMAX_TOPK,
        norm_topk_prob=True,
        sparse_layers=tuple(range(common["num_layers"])),
    )
    return ModelConfig(**{**common, "intermediate_size": 0}, moe=moe)


def _qwen2_moe(raw: dict[str, Any], name: str) -> ModelConfig:
    common = _common(raw, name, 1e6)
    num_layers = common["num_layers"]
    mlp_only = set(raw.get("mlp_only_layers") or [])
    step = raw.get("decoder_sparse_step", 1) or 1
    num_experts = raw.get("num_experts", 0)
    sparse = tuple(i for i in range(num_layers) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)
    moe = MoEConfig(
        num_experts=num_experts,
        num_experts_per_tok=raw["num_experts_per_tok"],
        expert_intermediate_size=raw["moe_intermediate_size"],
        router=RouterKind.SOFTMAX_TOPK,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 0),
        sparse_layers=sparse,
    )
    return ModelConfig(**common, qkv_bias=bool(raw.get("qkv_bias", True)), moe=moe)


def _phimoe(raw: dict[str, Any], name: str) -> ModelConfig:
    common = _common(raw, name, 1e6)
    if raw["num_experts_per_tok"] != 2:
        raise UnsupportedModelError("PhimoeForCausalLM's sparsemixer routing needs num_experts_per_tok == 2")
    bias = bool(raw.get("attention_bias", False))
    moe = MoEConfig(
        num_experts=raw["num_local_experts"],
        num_experts_per_tok=2,
        expert_intermediate_size=raw["intermediate_size"],
        router=RouterKind.SPARSEMIXER,
        router_jitter_eps=float(raw.get("router_jitter_noise", 0.01)),
        sparse_layers=tuple(range(common["num_layers"])),
    )
    return ModelConfig(
        **{**common, "intermediate_size": 0},
        norm_kind=NormKind.LAYER,
        qkv_bias=bias,
        o_bias=bias,
        lm_head_bias=bool(raw.get("lm_head_bias", False)),
        moe=moe,
    )


ARCHITECTURES: dict[str, Callable[[dict[str, Any], str], ModelConfig]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "PhimoeForCausalLM": _phimoe,
}


def parse_config(raw: dict[str, Any], name: str = "") -> ModelConfig:
    archs = raw.get("architectures") or []
    if not archs:
        raise UnsupportedModelError("config.json has no 'architectures' entry")
    parser = ARCHITECTURES.get(archs[0])
    if parser is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs[0]!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    try:
        config = parser(raw, name)
    except KeyError as e:
        raise UnsupportedModelError(f"config.json for {archs[0]} lacks the field {e.args[0]!r}") from e
    if config.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise UnsupportedModelError(f"unsupported hidden_act {config.hidden_act!r}")
    return config
