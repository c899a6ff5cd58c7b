"""Weight layout: allocates the model's tensors and lists which checkpoint tensor fills which.

`build_model(config, allocator)` returns the model with uninitialised tensors and the list of
`TensorFill`s (checkpoint name, expected shape, destination view). A loader fills them from
safetensors files, the random builder from a random bank: one layout, two sources.
Fused tensors (q/k/v, gate/up) are filled slice by slice, so nothing is copied twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch

from engine.model.attention import AttentionWeights
from engine.model.config import ModelConfig, NormKind
from engine.model.decoder import DecoderLayer, DecoderModel
from engine.model.ffn import FFNUnit, UnitSlice
from engine.model.moe import MoEBlock
from engine.model.norms import Norm

DENSE_MLP = -1
SHARED_EXPERT = -2


@dataclass(frozen=True)
class TensorRole:
    """Where a tensor belongs: layer None for embeddings/head/final norm; unit set for FFN weights,
    and `piece` the kind of the unit slice it stores ("GG", "CG", "CC"; None: not partitioned)."""

    layer: int | None = None
    unit: int | None = None  # expert index, DENSE_MLP or SHARED_EXPERT
    piece: str | None = None


Allocator = Callable[[tuple[int, ...], TensorRole], torch.Tensor]
# (layer, unit, intermediate size) -> the unit's slices as (start, end, kind), covering [0, size)
UnitLayout = Callable[[int, int, int], list[tuple[int, int, str | None]]]


def whole_units(layer: int, unit: int, size: int) -> list[tuple[int, int, str | None]]:
    """The single-device layout: every unit is one slice."""
    return [(0, size, None)]


class Init(StrEnum):
    """How the random builder fills a tensor."""

    MATRIX = "matrix"  # std 1/sqrt(fan_in)
    EMBEDDING = "embedding"
    ONES = "ones"
    BIAS = "bias"


@dataclass
class TensorFill:
    name: str  # checkpoint tensor name
    shape: tuple[int, ...]  # expected checkpoint shape (the whole tensor)
    out: torch.Tensor  # destination: the whole tensor, or `region` of it
    init: Init
    region: tuple[int, int, int, int] | None = None  # (row_start, row_end, col_start, col_end) of a 2-D tensor


def _expert_names(config: ModelConfig, layer: int, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) checkpoint names of one expert."""
    if config.model_type == "qwen2_moe":
        p = f"model.layers.{layer}.mlp.experts.{expert}."
        return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
    return p + "w1.weight", p + "w3.weight", p + "w2.weight"


def _router_name(config: ModelConfig, layer: int) -> str:
    if config.model_type == "qwen2_moe":
        return f"model.layers.{layer}.mlp.gate.weight"
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


class _Builder:
    def __init__(self, config: ModelConfig, allocator: Allocator, layout: UnitLayout) -> None:
        self.config = config
        self.allocator = allocator
        self.layout = layout
        self.fills: list[TensorFill] = []

    def tensor(self, name: str, shape: tuple[int, ...], role: TensorRole, init: Init) -> torch.Tensor:
        out = self.allocator(shape, role)
        self.fills.append(TensorFill(name, shape, out, init))
        return out

    def fused(
        self, names: list[str], rows: list[int], tail: tuple[int, ...], role: TensorRole, init: Init
    ) -> torch.Tensor:
        """One [sum(rows), *tail] tensor whose row blocks are the named checkpoint tensors."""
        out = self.allocator((sum(rows), *tail), role)
        start = 0
        for name, n in zip(names, rows, strict=True):
            self.fills.append(TensorFill(name, (n, *tail), out[start : start + n], init))
            start += n
        return out

    def norm(self, prefix: str, role: TensorRole) -> Norm:
        c = self.config
        weight = self.tensor(prefix + ".weight", (c.hidden_size,), role, Init.ONES)
        bias = None
        if c.norm_kind is NormKind.LAYER:
            bias = self.tensor(prefix + ".bias", (c.hidden_size,), role, Init.BIAS)
        return Norm(c.norm_kind, weight, bias, c.norm_eps)

    def attention(self, layer: int) -> AttentionWeights:
        c = self.config
        role = TensorRole(layer)
        p = f"model.layers.{layer}.self_attn."
        rows = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        names = [p + "q_proj", p + "k_proj", p + "v_proj"]
        qkv = self.fused([n + ".weight" for n in names], rows, (c.hidden_size,), role, Init.MATRIX)
        qkv_bias = self.fused([n + ".bias" for n in names], rows, (), role, Init.BIAS) if c.qkv_bias else None
        o = self.tensor(p + "o_proj.weight", (c.hidden_size, rows[0]), role, Init.MATRIX)
        o_bias = self.tensor(p + "o_proj.bias", (c.hidden_size,), role, Init.BIAS) if c.o_bias else None
        return AttentionWeights(qkv, qkv_bias, o, o_bias)

    def unit(self, names: tuple[str, str, str], size: int, role: TensorRole) -> FFNUnit:
        """One unit as slices laid out by `self.layout`; each slice has its own storage, filled
        from its rows of gate/up and its columns of down."""
        gate, up, down = names
        hidden = self.config.hidden_size
        assert role.layer is not None and role.unit is not None
        slices = []
        for start, end, kind in self.layout(role.layer, role.unit, size):
            piece_role = TensorRole(role.layer, role.unit, kind)
            n = end - start
            gate_up = self.allocator((2 * n, hidden), piece_role)
            down_part = self.allocator((hidden, n), piece_role)
            self.fills += [
                TensorFill(gate, (size, hidden), gate_up[:n], Init.MATRIX, (start, end, 0, hidden)),
                TensorFill(up, (size, hidden), gate_up[n:], Init.MATRIX, (start, end, 0, hidden)),
                TensorFill(down, (hidden, size), down_part, Init.MATRIX, (0, hidden, start, end)),
            ]
            slices.append(UnitSlice(start, end, gate_up, down_part, kind))
        unit = FFNUnit(size, slices)
        unit.check_cover()
        return unit

    def ffn(self, layer: int) -> FFNUnit | MoEBlock:
        c = self.config
        if not c.is_moe_layer(layer):
            p = f"model.layers.{layer}.mlp."
            names = (p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight")
            return self.unit(names, c.intermediate_size, TensorRole(layer, DENSE_MLP))
        moe = c.moe
        assert moe is not None
        router = self.tensor(_router_name(c, layer), (moe.num_experts, c.hidden_size), TensorRole(layer), Init.MATRIX)
        experts = [
            self.unit(_expert_names(c, layer, e), moe.expert_intermediate_size, TensorRole(layer, e))
            for e in range(moe.num_experts)
        ]
        shared, shared_gate = None, None
        if moe.shared_expert_intermediate_size:
            p = f"model.layers.{layer}.mlp.shared_expert."
            names = (p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight")
            shared = self.unit(names, moe.shared_expert_intermediate_size, TensorRole(layer, SHARED_EXPERT))
            shared_gate = self.tensor(f"model.layers.{layer}.mlp.shared_expert_gate.weight",
                                      (1, c.hidden_size), TensorRole(layer), Init.MATRIX)
        return MoEBlock(moe, router, experts, shared, shared_gate)

    def model(self) -> DecoderModel:
        c = self.config
        embed = self.tensor("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), TensorRole(), Init.EMBEDDING)
        layers = [
            DecoderLayer(
                input_norm=self.norm(f"model.layers.{i}.input_layernorm", TensorRole(i)),
                attn=self.attention(i),
                post_attention_norm=self.norm(f"model.layers.{i}.post_attention_layernorm", TensorRole(i)),
                ffn=self.ffn(i),
            )
            for i in range(c.num_layers)
        ]
        final_norm = self.norm("model.norm", TensorRole())
        if c.tie_word_embeddings:
            lm_head = embed
        else:
            lm_head = self.tensor("lm_head.weight", (c.vocab_size, c.hidden_size), TensorRole(), Init.MATRIX)
        lm_head_bias = self.tensor("lm_head.bias", (c.vocab_size,), TensorRole(), Init.BIAS) if c.lm_head_bias else None
        return DecoderModel(c, embed, layers, final_norm, lm_head, lm_head_bias)


def build_model(
    config: ModelConfig, allocator: Allocator, layout: UnitLayout = whole_units
) -> tuple[DecoderModel, list[TensorFill]]:
    """The model with unfilled tensors, and what fills each of them. `layout` cuts FFN units
    into slices (and names their kinds); `allocator` places every tensor by its role."""
    builder = _Builder(config, allocator, layout)
    model = builder.model()
    return model, builder.fills


def device_allocator(device: torch.device | str, dtype: torch.dtype) -> Allocator:
    """Every tensor on one device (the single-device layout)."""

    def allocate(shape: tuple[int, ...], role: TensorRole) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    return allocate
