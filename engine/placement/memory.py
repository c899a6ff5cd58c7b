"""Byte accounting for a model under a GPU memory budget (no tensors are allocated here)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.model import rotary
from engine.model.config import ModelConfig
from engine.model.decode_attention import num_key_bounds
from engine.model.weights import DENSE_MLP, SHARED_EXPERT

GIB = 1 << 30
# flash-decoding's fp32 partials: tokens x splits rows of q (the kernel keeps about two waves of
# blocks, tokens x splits x kv heads <= ~2 x 132 SMs; 64 rows bound it with room)
KEY_SPLIT_ROWS = 64
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


class PlanDoesNotFitError(ValueError):
    """What the engine must keep on the GPU does not fit the budget."""


def format_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B"


def parse_bytes(value: str | int | float) -> int:
    """'24GiB', '12 GB', '512MiB', 1e9 -> bytes."""
    if isinstance(value, int | float):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 24GiB, 12GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def ffn_units(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(layer, unit, intermediate size) of every FFN unit of the model."""
    units = []
    for layer in range(config.num_layers):
        if config.is_moe_layer(layer):
            moe = config.moe
            assert moe is not None
            units += [(layer, e, moe.expert_intermediate_size) for e in range(moe.num_experts)]
            if moe.shared_expert_intermediate_size:
                units.append((layer, SHARED_EXPERT, moe.shared_expert_intermediate_size))
        else:
            units.append((layer, DENSE_MLP, config.intermediate_size))
    return units


def bytes_per_row(config: ModelConfig, itemsize: int) -> int:
    """Bytes of one intermediate row of a unit: its gate and up rows and its down column."""
    return 3 * config.hidden_size * itemsize


def non_ffn_bytes(config: ModelConfig, itemsize: int) -> int:
    """Embeddings, head, attention, norms and routers: what always lives on the GPU."""
    c, h = config, config.hidden_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = (q + 2 * kv) * h + h * q + 4 * h  # qkv, o, norms (with LayerNorm biases)
    per_layer += (q + 2 * kv) if c.qkv_bias else 0
    per_layer += h if c.o_bias else 0
    if c.moe is not None:
        per_layer += c.moe.num_experts * h + (h if c.moe.shared_expert_intermediate_size else 0)
    embeddings = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + (c.vocab_size if c.lm_head_bias else 0)
    return (per_layer * c.num_layers + embeddings + 2 * h) * itemsize


def kv_bytes_per_token(config: ModelConfig, itemsize: int) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


def activation_bytes(config: ModelConfig, itemsize: int, max_num_tokens: int, max_num_seqs: int) -> int:
    """A generous bound on one step's temporaries: hidden states, the widest FFN intermediate,
    attention outputs and the logits."""
    widest = max(size for _, _, size in ffn_units(config))
    per_token = (16 * config.hidden_size + 4 * widest) * itemsize
    logits = 2 * max_num_seqs * config.vocab_size * 4
    return (max_num_tokens * per_token + logits) * 3 // 2  # room for the allocator's fragmentation


def rotary_table_bytes(config: ModelConfig, itemsize: int, max_positions: int) -> int:
    """The rotary cos/sin tables (engine/model/rotary.py) for sequences of up to `max_positions`
    tokens (the KV cache's), no longer than the model's context (the engine's limit)."""
    return rotary.table_bytes(config.rope, config.head_dim, itemsize,
                              min(max_positions, config.max_position_embeddings), config.max_position_embeddings)


def decode_graph_bytes(config: ModelConfig, itemsize: int, max_tokens: int, num_key_bounds: int = 0) -> int:
    """What decode graphs for 1..max_tokens sequences keep on the GPU (engine/model/decode_graphs.py):
    per captured token and layer the q, k, v, h and routing outputs of the pre/post graphs, and h
    and routing once more for each of `num_key_bounds` sets of one-graph layers
    (engine/model/decode_attention.py: `num_key_bounds`); per token count the static inputs and
    unit sums, once the largest count's temporaries (flash-decoding's fp32 partials included); the
    graphs' private pool takes whole 2 MiB segments."""
    if max_tokens <= 0:
        return 0
    c, h = config, config.hidden_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    top_k = c.moe.num_experts_per_tok if c.moe is not None else 0
    captured_tokens = max_tokens * (max_tokens + 1) // 2  # every size 1..max_tokens, each captured once
    routing = top_k * 12 + (c.moe.num_experts * 4 if c.moe else 0)
    per_layer = (q + 2 * kv + h) * itemsize + routing + num_key_bounds * (h * itemsize + routing)
    # static inputs, plus the fp32 unit sums the pre graphs combine (at most top_k + 1 rows a token)
    static = (3 * h + q + 2 * c.head_dim) * itemsize + 8 + 12 + (top_k + 1) * h * 4
    temporaries = max_tokens * (q + 2 * kv + 8 * h) * 4 + KEY_SPLIT_ROWS * q * 4
    total = captured_tokens * (per_layer * c.num_layers + static) + temporaries
    segment = 2 << 20
    return (total + segment - 1) // segment * segment + segment


@dataclass(frozen=True)
class GpuMemoryBreakdown:
    non_ffn_weights: int
    resident_ffn_weights: int
    staging: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.non_ffn_weights + self.resident_ffn_weights + self.staging + self.kv_cache + self.activations

    def describe(self) -> str:
        parts = [("non-FFN weights", self.non_ffn_weights), ("resident FFN weights", self.resident_ffn_weights),
                 ("staging ring", self.staging), ("KV cache", self.kv_cache), ("activations", self.activations)]
        return " + ".join(f"{name} {format_bytes(b)}" for name, b in parts) + f" = {format_bytes(self.total)}"

    def check(self, budget_bytes: int) -> None:
        if self.total > budget_bytes:
            raise PlanDoesNotFitError(
                f"the plan needs {self.describe()} on the GPU, more than the budget of {format_bytes(budget_bytes)}"
            )
def engine_activation_bytes(config: ModelConfig, itemsize: int, max_num_tokens: int, max_num_seqs: int,
                            graph_tokens: int, kv_cache_tokens: int) -> int:
    """What the engine reserves on the GPU besides weights, staging and KV cache: one step's
    temporaries, the decode graphs for up to `graph_tokens` sequences, the rotary tables."""
    return (activation_bytes(config, itemsize, max_num_tokens, max_num_seqs)
            + decode_graph_bytes(config, itemsize, graph_tokens, num_key_bounds(kv_cache_tokens))
            + rotary_table_bytes(config, itemsize, kv_cache_tokens))
