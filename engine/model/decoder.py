"""The decoder shared by every architecture: embeddings, layers of attention + FFN, final norm, head.

The FFN of each layer is an `FFNUnit` (dense MLP) or an `MoEBlock` (experts as units). How a
layer's units are evaluated is delegated to `unit_executor` so that a partitioned executor can
run their pieces over CPU, PCIe and GPU at once without the model knowing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.forward_batch import ForwardBatch
from engine.kv_cache.paged_cache import PagedKVCache
from engine.model.attention import AttentionShape, AttentionWeights, attention
from engine.model.attention_kernels import attention_kernels
from engine.model.config import ModelConfig
from engine.model.decode_attention import DecodeKeys, decode_keys
from engine.model.decode_graphs import DecodeGraphs
from engine.model.ffn import ACTIVATIONS, FFNUnit
from engine.model.moe import MoEBlock, Routing
from engine.model.norms import Norm
from engine.model.rotary import RotaryEmbedding

FFN = FFNUnit | MoEBlock


class UnitExecutor(Protocol):
    def __call__(self, layer: int, items: list[tuple[FFNUnit, torch.Tensor]], host_x: list[torch.Tensor] | None = None,
                 into: torch.Tensor | None = None, lookahead: list[int] | None = None) -> list[torch.Tensor] | None:
        """(layer index, [(unit, its tokens' activations)], the same activations on the host or None)
        -> each unit's output; with `into` (fp32 zeros, one row per item row) the outputs are summed
        there unrounded and None is returned. `lookahead`: the next layer's likely experts (a guess
        an executor may stream early; it never changes results)."""

    def flush(self) -> None:
        """Waits for work the calls left running (a CPU job whose end only the GPU stream waited
        for) and raises its error; called at the end of every forward."""


@dataclass
class DecoderLayer:
    input_norm: Norm
    attn: AttentionWeights
    post_attention_norm: Norm
    ffn: FFN


@dataclass
class DecoderModel:
    config: ModelConfig
    embed_tokens: torch.Tensor  # [vocab, hidden]
    layers: list[DecoderLayer]
    final_norm: Norm
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied
    lm_head_bias: torch.Tensor | None = None
    unit_executor: UnitExecutor | None = field(default=None, repr=False)
    attention_kernels: str = "flash"  # engine/model/attention_kernels.py
    decode_graphs: DecodeGraphs | None = field(default=None, repr=False)  # engine/model/decode_graphs.py
    # A/B switches of benchmarks (the same results either way): rotary cos/sin gathered from tables
    # (else computed each step), the head enqueued before the last CPU job is collected (else after)
    rotary_tables: bool = True
    head_before_collect: bool = True

    def __post_init__(self) -> None:
        c = self.config
        self.act = ACTIVATIONS[c.hidden_act]
        self.rotary = RotaryEmbedding(c.rope, c.head_dim, c.max_position_embeddings)
        self.attn_shape = AttentionShape(c.num_heads, c.num_kv_heads, c.head_dim, c.sliding_window)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def run_ffn(self, layer_idx: int, ffn: FFN, h: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """`routing`: the MoE routing of `h` when the caller computed it already."""
        if self.unit_executor is None:
            return ffn(h, self.act, routing=routing) if isinstance(ffn, MoEBlock) else ffn(h, self.act)
        executor = self.unit_executor

        def run_units(items: list[tuple[FFNUnit, torch.Tensor]], host_x: list[torch.Tensor] | None = None,
                      ) -> list[torch.Tensor]:
            results = executor(layer_idx, items, host_x, lookahead=_lookahead(routing))
            assert results is not None
            return results

        if isinstance(ffn, MoEBlock):
            return ffn(h, self.act, run_units, routing)
        return run_units([(ffn, h)])[0]

    def run_ffn_into(self, layer_idx: int, ffn: FFN, h: torch.Tensor, routing: Routing | None, sums: torch.Tensor) -> None:
        """The FFN's units evaluated but not combined: each unit's output for its tokens summed in fp32
        into `sums` (zeros, rows in the order of the block's `units`: for one token, the routed
        experts in the order of its top-k, then the shared expert). A decode graph combines them."""
        if isinstance(ffn, MoEBlock):
            routing = routing if routing is not None else ffn.route(h)
            groups, items, host_x = ffn.units(h, routing)
            if [group.k_pos for group in groups.values()] != list(range(routing.weights.shape[1])):
                raise ValueError("run_ffn_into takes one token whose experts come in the order of its top-k")
        else:
            items, host_x = [(ffn, h)], None
        if self.unit_executor is not None:
            self.unit_executor(layer_idx, items, host_x, into=sums,
                               lookahead=_lookahead(routing) if isinstance(ffn, MoEBlock) else None)
            return
        row = 0
        for unit, x in items:
            sums[row : row + x.shape[0]] += unit(x, self.act)
            row += x.shape[0]

    def _long_context_mask(self, batch: ForwardBatch) -> torch.Tensor | None:
        original_max = getattr(self.rotary, "original_max", None)
        if original_max is None:
            return None
        flags = [span.context_len > original_max for span in batch.spans for _ in range(span.query_len)]
        if not any(flags):  # decided here: a mask on the GPU would be read back (a sync) to learn it
            return None
        return torch.tensor(flags, dtype=torch.bool, device=self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Runs the batch, fills the KV cache, returns fp32 logits [len(logits_indices), vocab]."""
        max_position = max((span.context_len for span in batch.spans), default=1) - 1 if self.rotary_tables else None
        cos_sin = self.rotary.cos_sin(batch.positions, self.dtype, self._long_context_mask(batch), max_position)
        c = self.config
        decode = decode_keys(batch, c.head_dim, c.sliding_window, self.dtype, self.device, self.attention_kernels)
        with attention_kernels(self.attention_kernels, self.device):
            try:
                if self.decode_graphs is not None and self.decode_graphs.applies(batch):
                    x = self.decode_graphs.forward_layers(batch, cache, cos_sin, decode)
                else:
                    x = self._forward_layers(batch, cache, cos_sin, decode)
                # enqueued before the last CPU job is collected: where the GPU stream waits for
                # that job itself (stream_signal.py) the head runs the moment its outputs land,
                # not after this thread woke and launched it
                logits = self._head(x, batch) if self.head_before_collect else None
            finally:
                if self.unit_executor is not None:
                    self.unit_executor.flush()
        return logits if logits is not None else self._head(x, batch)

    def _head(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits of the tokens that need them, from the last layer's residual stream."""
        x = self.final_norm(x[batch.logits_indices])
        return F.linear(x, self.lm_head, self.lm_head_bias).float()

    def _forward_layers(self, batch: ForwardBatch, cache: PagedKVCache, cos_sin: tuple[torch.Tensor, torch.Tensor],
                        decode: DecodeKeys | None = None) -> torch.Tensor:
        x = F.embedding(batch.input_ids, self.embed_tokens)
        for i, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            x = x + attention(h, layer.attn, self.attn_shape, i, batch, cache, cos_sin, decode)
            h = layer.post_attention_norm(x)
            x = x + self.run_ffn(i, layer.ffn, h)
        return x


def _lookahead(routing: Routing | None) -> list[int] | None:
    """The next layer's likely experts that came with a host routing (read after its ids were)."""
    return routing.host.lookahead() if routing is not None and routing.host is not None else None
