"""Decode steps with the fixed-shape parts of every layer replayed as CUDA graphs.

At batch 1 a decode step launches ~40 small kernels per layer around attention (norms, the QKV
projection, rotary, KV-cache writes, the output projection, the MoE router): the host spends more
time launching them than the GPU spends running them, and that time sits on the critical path
between two FFNs. Per layer and token count this module captures two graphs:

    pre   the previous FFN's output: its units' fp32 sums rounded and combined (see below);
          residual += it; input norm; QKV; rotary; K/V written to the cache -> q
    post  residual += o(attention); post-attention norm -> h; MoE routing of h (each token's
          experts sorted by id)

Where attention runs in one flash call that reads every sequence's keys in place
(engine/model/decode_attention.py: CUDA, fp16/bf16, "flash" kernels, each sequence's slots one
range), a layer's pre, attention and post are one graph instead, captured per bound on context
lengths (`key_bucket`); otherwise attention runs eagerly between the two graphs. The FFN stays
eager (routing decides which pieces run where; the partitioned executor). The FFN's
units leave their outputs, unrounded, in a static fp32 buffer (`Segments.unit_sums`, one row per
unit and token) that the next layer's pre graph rounds and combines: for one token every layer's
units are the same rows (its top-k experts in top-k order, then a shared expert), for a dense MLP
any token count. Other steps (several tokens through MoE layers) combine eagerly. Inputs reach the
graphs through static buffers (residual, previous FFN output, rotary cos/sin, KV slots, attention
output, unit sums) that are filled before each replay.

The graphs replay the very kernels of the eager path, on the same shapes, so results are bitwise
those of eager decoding (tests/engine/model/test_decode_graphs.py). The same segments also run
eagerly (`Segments`), which is how CPU tests exercise this code path.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.forward_batch import ForwardBatch
from engine.kv_cache.paged_cache import PagedKVCache
from engine.model.attention import attend, project_qkv
from engine.model.config import RouterKind
from engine.model.decode_attention import DecodeKeys, flash_decode
from engine.model.decode_kernels import (
    combine_into_residual,
    combine_into_residual_applies,
    copy_to_host,
    copy_to_host_applies,
    rotate_into_cache,
    rotate_into_cache_applies,
)
from engine.model.moe import HostRouting, MoEBlock, Routing
from engine.model.routing_kernels import fused_sparsemixer_applies, sparsemixer_in_id_order

MAX_GRAPH_TOKENS = 8  # decode steps of up to this many sequences replay graphs; larger ones run eagerly


@dataclass
class StepBuffers:
    """The static inputs of one token count's graphs (filled before each replay)."""

    residual: torch.Tensor  # [n, hidden] the residual stream
    ffn_out: torch.Tensor  # [n, hidden] the previous layer's FFN output (zeros before layer 0)
    cos: torch.Tensor  # [n, head_dim]
    sin: torch.Tensor
    slots: torch.Tensor  # [n] KV slots written this step
    attended: torch.Tensor  # [n, heads * head_dim] attention output, before the o projection
    keys_index: torch.Tensor  # int32 [3 n + 2]: DecodeKeys.index of the step (one-graph layers)
    # [n, hidden] the FFN's input h of the layer being run: one address for every layer and set of
    # graphs, so the executor's per-piece graphs (engine/executor/partial_graphs.py) serve them all
    ffn_in: torch.Tensor

    @classmethod
    def allocate(cls, num_tokens: int, hidden: int, head_dim: int, q_size: int, dtype: torch.dtype,
                 device: torch.device) -> StepBuffers:
        def zeros(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=kind, device=device)

        return cls(zeros(num_tokens, hidden), zeros(num_tokens, hidden), zeros(num_tokens, head_dim),
                   zeros(num_tokens, head_dim), zeros(num_tokens, kind=torch.int64), zeros(num_tokens, q_size),
                   zeros(3 * num_tokens + 2, kind=torch.int32), zeros(num_tokens, hidden))


@dataclass
class HostMirror:
    """Pinned host copies of a layer's routing ids and routed activations (one set per token count,
    reused by every layer: a layer's CPU job is done before the next layer's copies are enqueued)."""

    ids: torch.Tensor  # [n, top_k] int64
    x: torch.Tensor  # [n, hidden]
    ready: torch.cuda.Event
    next_ids: torch.Tensor  # [n, top_k] int64: the next layer's likely experts

    @classmethod
    def allocate(cls, num_tokens: int, top_k: int, hidden: int, dtype: torch.dtype) -> HostMirror:
        return cls(torch.empty((num_tokens, top_k), dtype=torch.int64, pin_memory=True),
                   torch.empty((num_tokens, hidden), dtype=dtype, pin_memory=True), torch.cuda.Event(),
                   torch.empty((num_tokens, top_k), dtype=torch.int64, pin_memory=True))

    def write(self, routing: Routing, h: torch.Tensor, next_ids: torch.Tensor | None) -> bool:
        """Stores the ids, `h` and the next layer's likely experts here by a kernel (in a decode
        graph: decode_kernels.copy_to_host); False where it does not apply (`copy` copies them)."""
        if not copy_to_host_applies(h, routing.expert_ids, self.x, self.ids):
            return False
        copy_to_host(h, routing.expert_ids, next_ids, self.x, self.ids, self._next_for(next_ids))
        return True

    def copy(self, routing: Routing, h: torch.Tensor, next_ids: torch.Tensor | None, written: bool = False) -> Routing:
        """`routing` with its ids, `h` and the next layer's likely experts on their way to the host
        (read them after `ready`); `written`: stored here already (`write`)."""
        host_next = self._next_for(next_ids)
        if not written:
            self.ids.copy_(routing.expert_ids, non_blocking=True)
            self.x.copy_(h, non_blocking=True)
            if host_next is not None:
                host_next.copy_(next_ids, non_blocking=True)
        self.ready.record()
        return Routing(routing.expert_ids, routing.weights, HostRouting(self.ids, self.x, self.ready, host_next))

    def _next_for(self, next_ids: torch.Tensor | None) -> torch.Tensor | None:
        return self.next_ids if next_ids is not None and next_ids.shape == self.next_ids.shape else None


@dataclass
class LayerOutputs:
    """What one layer's segments leave for the eager parts: q, k, v for attention, h and its routing."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    h: torch.Tensor | None = None
    routing: Routing | None = None
    next_ids: torch.Tensor | None = None  # the next layer's likely experts (MoEBlock.likely_experts)
    on_host: bool = False  # the routing's ids, h and next ids stored in the host mirror by the graph


class Segments:
    """The fixed-shape segments of each layer for one set of buffers, run eagerly. `outputs` is the
    layer outputs the segments write: each set of graphs captured from them (split, or one per key
    bound) keeps its own list, since a graph replays into the tensors its capture allocated."""

    def __init__(self, model, cache: PagedKVCache, buffers: StepBuffers, fused: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.buffers = buffers
        # Triton kernels where they apply (a sparsemixer's routing, rotary + cache writes, the MoE
        # combine): the same bits as torch's kernels, fewer launches (routing_kernels.py, decode_kernels.py)
        self.fused = fused
        self.outputs = [LayerOutputs() for _ in model.layers]
        moe = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoEBlock)]
        self.host: HostMirror | None = None  # only where there is a GPU: on the CPU h is on the host
        # guess the next layer's experts when the executor copies ahead on guesses (read at capture:
        # DecodeGraphs.reset after changing the executor's lookahead_pieces)
        self.lookahead = getattr(model.unit_executor, "lookahead_pieces", 0) > 0
        n, hidden = buffers.residual.shape
        if moe and buffers.residual.device.type == "cuda":
            self.host = HostMirror.allocate(n, moe[0].config.num_experts_per_tok, hidden, buffers.residual.dtype)
        # each layer's rows of unit outputs, when the pre graphs combine them (None: combined eagerly)
        rows = [_unit_rows(layer.ffn, n) for layer in model.layers]
        self.unit_rows: list[int] | None = None if None in rows else rows  # type: ignore[assignment]
        self.unit_sums: torch.Tensor | None = None
        if self.unit_rows is not None:
            self.unit_sums = torch.zeros((max(self.unit_rows), hidden), dtype=torch.float32, device=buffers.residual.device)

    def sums_of(self, i: int) -> torch.Tensor:
        """Layer i's rows of the unit sums (only when the graphs combine)."""
        assert self.unit_sums is not None and self.unit_rows is not None
        return self.unit_sums[: self.unit_rows[i]]

    def combine(self, i: int) -> None:
        """Layer i's FFN output from its units' sums -> the ffn_out buffer; the sums zeroed again."""
        b = self.buffers
        sums = self.sums_of(i)
        ffn = self.model.layers[i].ffn
        if isinstance(ffn, MoEBlock):
            out = self.outputs[i]
            assert out.h is not None and out.routing is not None
            b.ffn_out.copy_(ffn.combine_one_token(out.h, sums.to(b.ffn_out.dtype), out.routing.weights))
        else:
            b.ffn_out.copy_(sums)
        sums.zero_()

    def routing_on_host(self, i: int, take_written: bool = True) -> Routing | None:
        """Layer i's routing (after its post segment) with the ids and activations on the host;
        `take_written`: take what the graph stored there (False: copy them again, for A/B)."""
        out = self.outputs[i]
        if out.routing is None or out.h is None:
            return out.routing
        if self.host is None:  # CPU: nothing to copy
            return Routing(out.routing.expert_ids, out.routing.weights,
                           HostRouting(out.routing.expert_ids, out.h, None, out.next_ids))
        return self.host.copy(out.routing, out.h, out.next_ids, written=out.on_host and take_written)

    def pre(self, i: int, keys_in_place: bool = False) -> None:
        """The previous FFN's output into the residual; input norm, QKV, rotary, K/V to the cache.
        `keys_in_place`: attention reads the cache only (one-graph layers), so k and v are not kept."""
        model, b = self.model, self.buffers
        layer = model.layers[i]
        previous = i - 1 if self.unit_sums is not None and i > 0 else None  # its unit sums to combine
        if previous is None or not self._combine_fused(previous):
            if previous is not None:
                self.combine(previous)
            b.residual.add_(b.ffn_out)
        h = layer.input_norm(b.residual)
        out = self.outputs[i]
        keys, values = self.cache.keys[i], self.cache.values[i]
        shape = model.attn_shape
        if keys_in_place and self.fused and rotate_into_cache_applies(h, shape.head_dim, keys, values):
            qkv = F.linear(h, layer.attn.qkv, layer.attn.qkv_bias)
            out.q = rotate_into_cache(qkv, shape.num_heads, shape.num_kv_heads, shape.head_dim, b.cos, b.sin,
                                      b.slots, keys, values)
            out.k = out.v = None
            return
        out.q, out.k, out.v = project_qkv(h, layer.attn, shape, i, b.slots, self.cache, (b.cos, b.sin))

    def _combine_fused(self, i: int) -> bool:
        """Layer i's one-token MoE output combined into the residual by one kernel (False: not here)."""
        ffn, out, sums = self.model.layers[i].ffn, self.outputs[i], self.sums_of(i)
        if not (self.fused and isinstance(ffn, MoEBlock) and ffn.shared_expert is None and out.routing is not None):
            return False
        weights = out.routing.weights
        if not combine_into_residual_applies(sums, weights, self.buffers.residual):
            return False
        combine_into_residual(sums, weights, self.buffers.residual, self.buffers.ffn_out)
        return True

    def attend_in_place(self, i: int, max_k: int) -> None:
        """Layer i's attention in one flash call over the keys where they lie -> the attended buffer."""
        b, out = self.buffers, self.outputs[i]
        where = DecodeKeys(max_k, b.keys_index)
        attended = flash_decode(out.q, self.cache.keys[i], self.cache.values[i], where, self.model.attn_shape.scale)
        b.attended.copy_(attended.view(b.attended.shape))

    def layer(self, i: int, max_k: int) -> None:
        """Layer i up to its routing, attention included (one graph). q, k and v are not kept: their
        memory serves the next layers' captures (every kept output is written before it is read)."""
        self.pre(i, keys_in_place=True)
        self.attend_in_place(i, max_k)
        self.post(i)
        out = self.outputs[i]
        out.q = out.k = out.v = None

    def post(self, i: int) -> None:
        b = self.buffers
        layer = self.model.layers[i]
        b.residual.add_(F.linear(b.attended, layer.attn.o, layer.attn.o_bias))
        b.ffn_in.copy_(layer.post_attention_norm(b.residual))
        h = b.ffn_in  # layer i's h stays there until the next layer's post (its pre combines with it)
        out = self.outputs[i]
        out.h = h
        out.routing = self._route(layer.ffn, h) if isinstance(layer.ffn, MoEBlock) else None
        following = self.model.layers[i + 1] if i + 1 < len(self.model.layers) else None
        out.next_ids = None
        if (self.lookahead and out.routing is not None and following is not None
                and isinstance(following.ffn, MoEBlock)):
            out.next_ids = following.ffn.likely_experts(b.residual, following.post_attention_norm)
        # the routing's ids and h stored on the host by the graph itself (one kernel, no copies)
        out.on_host = (self.fused and self.host is not None and out.routing is not None
                       and self.host.write(out.routing, h, out.next_ids))

    def _route(self, ffn: MoEBlock, h: torch.Tensor) -> Routing:
        """h's routing with each token's experts in increasing id order: a sparsemixer's in one
        kernel where it applies (engine/model/routing_kernels.py: the same bits), else torch's."""
        logits = ffn.router_logits(h)
        if (self.fused and ffn.config.router is RouterKind.SPARSEMIXER
                and fused_sparsemixer_applies(logits)):
            return sparsemixer_in_id_order(logits, ffn.config.router_jitter_eps)
        return _in_id_order(ffn.route_logits(logits))


def _unit_rows(ffn, num_tokens: int) -> int | None:
    """Rows of unit outputs a layer's FFN leaves for a graph to combine: a dense MLP's tokens; one
    token's top-k experts (and shared expert); None for several tokens through experts."""
    if not isinstance(ffn, MoEBlock):
        return num_tokens
    if num_tokens != 1:
        return None
    return ffn.config.num_experts_per_tok + (ffn.shared_expert is not None)


def _in_id_order(routing: Routing) -> Routing:
    """Each token's experts in increasing id order (weights alongside): the same pairs, so the same
    result, but a one-token step's experts then come in top-k order and combine in one pass."""
    ids, order = routing.expert_ids.sort(dim=-1)
    return Routing(ids, routing.weights.gather(-1, order))


@dataclass
class CapturedStep:
    """One token count's segments and, once captured, its graphs (without CUDA: the segments run
    eagerly): pre and post per layer around eager attention, or one graph per layer for each
    bound on key lengths."""

    segments: Segments
    pre: list[Callable[[], None]] = field(default_factory=list)
    post: list[Callable[[], None]] = field(default_factory=list)
    layers: dict[int, list[Callable[[], None]]] = field(default_factory=dict)  # max_k -> per layer
    # the layer outputs of each set of graphs: "split" (pre, post) or a key bound (one graph a layer)
    outputs: dict[str | int, list[LayerOutputs]] = field(default_factory=dict)

    def use_outputs(self, variant: str | int) -> None:
        """Points the segments at the outputs of this set of graphs (a new list for a new set)."""
        num_layers = len(self.segments.model.layers)
        self.segments.outputs = self.outputs.setdefault(variant, [LayerOutputs() for _ in range(num_layers)])


def _capture(runs: list[Callable[[], None]], pool) -> list[Callable[[], None]]:
    """Warms every run up once, in order, on a side stream, then captures each as a graph (their
    replays). The warm-up writes K/V at the buffers' slots: call with this step's inputs in the
    buffers (the step then rewrites those slots) and fill them again before replaying."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for run in runs:
            run()
    torch.cuda.current_stream().wait_stream(side)
    replays = []
    # No garbage collection while capturing: collecting an unreachable engine's graphs or events
    # destroys them, which is not permitted while a stream captures (it invalidates the capture).
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for run in runs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                run()
            replays.append(graph.replay)
    finally:
        if gc_was_enabled:
            gc.enable()
    return replays


class DecodeGraphs:
    """Runs decode steps (every sequence has one new token) through per-layer graphs."""

    def __init__(self, model, max_tokens: int = MAX_GRAPH_TOKENS, capture: bool | None = None) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.capture = model.device.type == "cuda" if capture is None else capture
        self._steps: dict[int, CapturedStep] = {}
        self._cache_id: int | None = None
        self._pool = None
        self.host_routing = True  # routing ids and activations copied to the host with the routing
        # ... by the graphs' own kernel where it applies (False: copied after it again, for A/B)
        self.routing_written = True
        self.one_graph_layers = True  # attention inside the layer's graph where it can be (False: A/B)
        self._fused_kernels = True

    @property
    def fused_kernels(self) -> bool:
        """Whether the graphs take the fused Triton kernels where they apply (False: torch's, for A/B)."""
        return self._fused_kernels

    @fused_kernels.setter
    def fused_kernels(self, value: bool) -> None:
        if value != self._fused_kernels:
            self._fused_kernels = value
            self.reset()  # captured again with the other kernels

    def reset(self) -> None:
        """Drops the captured steps (captured again on next use), e.g. after a setting they read."""
        captured = self._pool is not None
        self._steps.clear()
        self._pool = None  # a pool whose graphs are all gone cannot take a new capture
        if captured:  # the old graphs' memory back to the device before the next capture takes its own
            gc.collect()
            torch.cuda.empty_cache()

    def applies(self, batch: ForwardBatch) -> bool:
        n = batch.num_tokens
        return 0 < n <= self.max_tokens and all(span.query_len == 1 for span in batch.spans)

    def captured_sizes(self) -> list[int]:
        """The token counts that have graphs (or, without capture, segments) so far."""
        return sorted(self._steps)

    def _step(self, num_tokens: int, cache: PagedKVCache) -> CapturedStep:
        """This token count's step (its graphs are captured on first use)."""
        if self._cache_id != id(cache):  # graphs hold the cache tensors' addresses
            self.reset()
            self._cache_id = id(cache)
        step = self._steps.get(num_tokens)
        if step is None:
            c, model = self.model.config, self.model
            buffers = StepBuffers.allocate(num_tokens, c.hidden_size, c.head_dim, c.num_heads * c.head_dim,
                                           model.dtype, model.device)
            step = self._steps[num_tokens] = CapturedStep(Segments(model, cache, buffers, self._fused_kernels))
        return step

    def _graphs(self, runs: list[Callable[[], None]], step: CapturedStep, batch: ForwardBatch,
                cos_sin: tuple[torch.Tensor, torch.Tensor], decode: DecodeKeys | None) -> list[Callable[[], None]]:
        """`runs` captured as graphs (their inputs filled again after the capture's warm-up), or
        `runs` themselves without capture."""
        if not self.capture:
            return runs
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        replays = _capture(runs, self._pool)
        self._fill(step, batch, cos_sin, decode)
        return replays

    def forward_layers(self, batch: ForwardBatch, cache: PagedKVCache, cos_sin: tuple[torch.Tensor, torch.Tensor],
                       decode: DecodeKeys | None = None) -> torch.Tensor:
        """The decoder layers for a decode batch -> the residual stream after the last layer.
        `decode`: the step's keys for one flash call per layer (None: SDPA per sequence)."""
        model = self.model
        step = self._step(batch.num_tokens, cache)
        segments = step.segments
        # keys read in place: one graph per layer for this bound on key lengths
        bound = decode.max_k if self.one_graph_layers and decode is not None and decode.gather is None else None
        in_place = decode if bound is not None else None  # what the one-graph layers read their keys from
        self._fill(step, batch, cos_sin, in_place)
        num_layers = len(model.layers)
        step.use_outputs("split" if bound is None else bound)
        if bound is not None:
            layers = step.layers.get(bound)
            if layers is None:
                runs = [lambda i=i: segments.layer(i, bound) for i in range(num_layers)]
                layers = step.layers[bound] = self._graphs(runs, step, batch, cos_sin, in_place)
        elif not step.pre:
            runs = [run for i in range(num_layers) for run in (lambda i=i: segments.pre(i), lambda i=i: segments.post(i))]
            replays = self._graphs(runs, step, batch, cos_sin, in_place)
            step.pre, step.post = replays[0::2], replays[1::2]
        b, outputs = segments.buffers, segments.outputs
        for i, layer in enumerate(model.layers):
            out = outputs[i]
            if bound is not None:
                layers[i]()
            else:
                step.pre[i]()
                attend(out.q, out.k, out.v, model.attn_shape, i, batch, cache, out=b.attended, decode=decode)
                step.post[i]()
            routing = segments.routing_on_host(i, self.routing_written) if self.host_routing else out.routing
            if routing is not None and routing.host is not None and segments.unit_sums is not None:
                # one token: the executor may start the layer's CPU job from the GPU (routed_job.py)
                prepare = getattr(model.unit_executor, "prepare_routed", None)
                if prepare is not None:
                    prepare(i, layer.ffn, routing)
            if segments.unit_sums is not None:  # the next pre graph combines
                model.run_ffn_into(i, layer.ffn, out.h, routing, segments.sums_of(i))
            else:
                b.ffn_out.copy_(model.run_ffn(i, layer.ffn, out.h, routing))
        if segments.unit_sums is not None:
            segments.combine(len(model.layers) - 1)
        return b.residual + b.ffn_out

    def _fill(self, step: CapturedStep, batch: ForwardBatch, cos_sin: tuple[torch.Tensor, torch.Tensor],
              decode: DecodeKeys | None) -> None:
        b = step.segments.buffers
        if step.segments.unit_sums is not None:  # a failed step may have left partial sums
            step.segments.unit_sums.zero_()
        b.residual.copy_(F.embedding(batch.input_ids, self.model.embed_tokens))
        b.ffn_out.zero_()
        b.cos.copy_(cos_sin[0])
        b.sin.copy_(cos_sin[1])
        b.slots.copy_(batch.slots)
        if decode is not None:  # one-graph layers read the step's keys from here
            b.keys_index.copy_(decode.index)
