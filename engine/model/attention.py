"""Grouped-query attention over a flattened batch, reading and writing the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.forward_batch import ForwardBatch, SequenceSpan
from engine.kv_cache.paged_cache import PagedKVCache
from engine.model.decode_attention import DecodeKeys, flash_decode
from engine.model.rotary import apply_rotary


@dataclass
class AttentionWeights:
    qkv: torch.Tensor  # [(num_heads + 2 * num_kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, num_heads * head_dim]
    o_bias: torch.Tensor | None


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


def _span_mask(span: SequenceSpan, window: int | None, device: torch.device) -> torch.Tensor:
    """Bool mask [query_len, context_len]: True where a query may attend a key."""
    query_pos = torch.arange(span.context_len - span.query_len, span.context_len, device=device)[:, None]
    key_pos = torch.arange(span.context_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask


def _span_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, span: SequenceSpan, shape: AttentionShape
) -> torch.Tensor:
    """q: [query_len, heads, dim], keys/values: [context_len, kv_heads, dim] -> [query_len, heads, dim].

    Calls SDPA the way transformers does (no mask and GQA inside the kernel when possible, causal
    flag for a whole prompt), so that bf16 results follow the same kernels.
    """
    q_heads = q.transpose(0, 1)[None]  # [1, heads, query_len, dim]
    k_heads, v_heads = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
    whole_prompt = span.query_len == span.context_len
    window = shape.sliding_window
    needs_mask = not (span.query_len == 1 or whole_prompt) or (window is not None and span.context_len > window)
    if needs_mask:
        group = shape.num_heads // shape.num_kv_heads
        k_heads, v_heads = k_heads.repeat_interleave(group, dim=1), v_heads.repeat_interleave(group, dim=1)
        mask = _span_mask(span, window, q.device)
        attended = F.scaled_dot_product_attention(q_heads, k_heads, v_heads, attn_mask=mask, scale=shape.scale)
    else:
        attended = F.scaled_dot_product_attention(q_heads, k_heads, v_heads, is_causal=whole_prompt and span.query_len > 1,
                                                  scale=shape.scale, enable_gqa=True)
    return attended[0].transpose(0, 1)


def project_qkv(
    x: torch.Tensor,
    weights: AttentionWeights,
    shape: AttentionShape,
    layer: int,
    slots: torch.Tensor,
    cache: PagedKVCache,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [num_tokens, hidden] -> rotated q, k and v ([num_tokens, heads, dim]); writes k and v to
    `cache` at `slots`. Fixed shapes for a fixed token count (a decode step can replay it as a graph)."""
    num_tokens = x.shape[0]
    q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    qkv = F.linear(x, weights.qkv, weights.qkv_bias)
    q = qkv[:, :q_size].view(num_tokens, shape.num_heads, shape.head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, shape.num_kv_heads, shape.head_dim)
    v = qkv[:, q_size + kv_size :].view(num_tokens, shape.num_kv_heads, shape.head_dim)
    cos, sin = cos_sin
    q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.contiguous()
    cache.write(layer, slots, k, v)
    return q, k, v


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: AttentionShape,
    layer: int,
    batch: ForwardBatch,
    cache: PagedKVCache,
    out: torch.Tensor | None = None,
    decode: DecodeKeys | None = None,
) -> torch.Tensor:
    """Each span's queries against its context (this step's k/v for a whole prompt, else the cache)
    -> [num_tokens, heads * dim], into `out` when given. `decode`: every span has one query and
    its keys are read in one flash call (engine/model/decode_attention.py)."""
    num_tokens = q.shape[0]
    if decode is not None:
        attended = flash_decode(q, cache.keys[layer], cache.values[layer], decode, shape.scale)
    else:
        one_span = out is not None and len(batch.spans) == 1  # its result straight into `out`
        attended = out.view(num_tokens, shape.num_heads, shape.head_dim) if one_span else torch.empty_like(q)
        for span in batch.spans:
            rows = slice(span.query_start, span.query_start + span.query_len)
            if span.query_len == span.context_len:  # whole sequence computed now: no cache read
                keys, values = k[rows], v[rows]
            elif span.context_start is not None:  # one contiguous range of slots: views, no gather
                keys, values = cache.read_range(layer, span.context_start, span.context_len)
            else:
                keys, values = cache.read(layer, span.context_slots)
            attended[rows] = _span_attention(q[rows], keys, values, span, shape)
    flat = attended.view(num_tokens, shape.num_heads * shape.head_dim)
    if out is None:
        return flat
    if flat.data_ptr() != out.data_ptr():
        out.copy_(flat)
    return out


def attention(
    x: torch.Tensor,
    weights: AttentionWeights,
    shape: AttentionShape,
    layer: int,
    batch: ForwardBatch,
    cache: PagedKVCache,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    decode: DecodeKeys | None = None,
) -> torch.Tensor:
    """x: [num_tokens, hidden] -> [num_tokens, hidden]. Writes this step's keys/values to `cache`."""
    q, k, v = project_qkv(x, weights, shape, layer, batch.slots, cache, cos_sin)
    return F.linear(attend(q, k, v, shape, layer, batch, cache, decode=decode), weights.o, weights.o_bias)
