"""Mixture-of-experts: routers (softmax top-k, PhiMoE's sparsemixer) and the MoE block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.config import MoEConfig, RouterKind
from engine.model.ffn import FFNUnit, adjacent_flat

# [(unit, its tokens' activations [num_tokens, hidden])], optionally the same activations already
# on the host (one per unit, or None) -> each unit's output, same shapes
UnitRunner = Callable[[list[tuple[FFNUnit, torch.Tensor]], "list[torch.Tensor] | None"], list[torch.Tensor]]


@dataclass
class HostRouting:
    """A routing's expert ids and the routed activations, copied to the host (pinned) by the GPU
    right after routing: reading the ids then costs one wait, no kernel, and the CPU's pieces
    need no copy of their own."""

    expert_ids: torch.Tensor  # [num_tokens, top_k] int64, host
    x: torch.Tensor  # [num_tokens, hidden], host: the activations the experts take
    ready: torch.cuda.Event | None  # recorded after both copies (None: no copy, already there)
    # the next layer's likely experts per token [num_tokens, top_k] (a guess that only moves copies
    # earlier: MoEBlock.likely_experts), or None
    next_expert_ids: torch.Tensor | None = None

    def lookahead(self) -> list[int] | None:
        """The next layer's likely experts, most tokens' first picks first (read after `ready`)."""
        if self.next_expert_ids is None:
            return None
        return list(dict.fromkeys(self.next_expert_ids.t().flatten().tolist()))


@dataclass(frozen=True)
class TokenGroup:
    """The tokens routed to one expert: `rows` of the layer's tokens, at positions `k_pos` of their
    top-k. A slice and an int when the rows are contiguous and share one position (every expert at
    batch 1: views, no gather); else index tensors on the routing's device."""

    rows: slice | torch.Tensor
    k_pos: int | torch.Tensor
    host_rows: torch.Tensor | None = None  # index rows on the host too, when built from host ids

    @property
    def is_range(self) -> bool:
        return isinstance(self.rows, slice)


@dataclass
class Routing:
    """Per token, the chosen experts and their weights: both [num_tokens, top_k]."""

    expert_ids: torch.Tensor
    weights: torch.Tensor
    host: HostRouting | None = None

    def tokens_of(self) -> dict[int, TokenGroup]:
        """expert id -> the tokens routed to it, experts in increasing id order."""
        if self.host is not None:
            if self.host.ready is not None:
                self.host.ready.synchronize()
            return self._groups_from_host(self.host.expert_ids.tolist())
        flat = self.expert_ids.flatten()
        order = torch.argsort(flat, stable=True)
        experts_sorted = flat[order].tolist()
        top_k = self.expert_ids.shape[1]
        out: dict[int, TokenGroup] = {}
        begin = 0
        for i in range(1, len(experts_sorted) + 1):
            if i == len(experts_sorted) or experts_sorted[i] != experts_sorted[begin]:
                chosen = order[begin:i]
                out[experts_sorted[begin]] = TokenGroup(chosen // top_k, chosen % top_k)
                begin = i
        return out

    def _groups_from_host(self, ids: list[list[int]]) -> dict[int, TokenGroup]:
        pairs: dict[int, list[tuple[int, int]]] = {}
        for token, experts in enumerate(ids):
            for k, expert in enumerate(experts):
                pairs.setdefault(expert, []).append((token, k))
        out: dict[int, TokenGroup] = {}
        gathered: dict[int, list[tuple[int, int]]] = {}
        for expert in sorted(pairs):
            members = pairs[expert]
            first, k0 = members[0]
            if all(t == first + j and k == k0 for j, (t, k) in enumerate(members)):
                out[expert] = TokenGroup(slice(first, first + len(members)), k0)
            else:
                gathered[expert] = members
                out[expert] = TokenGroup(torch.empty(0), 0)  # placeholder, keeps the id order
        if gathered:  # every other group's indices reach the device in one copy
            flat = [value for members in gathered.values() for pair in members for value in pair]
            device = self.expert_ids.device
            host_index = torch.tensor(flat, dtype=torch.int64).view(-1, 2)
            index = host_index
            if device.type == "cuda":
                index = host_index.pin_memory().to(device, non_blocking=True)
            row = 0
            for expert, members in gathered.items():
                rows = slice(row, row + len(members))
                out[expert] = TokenGroup(index[rows, 0], index[rows, 1], host_index[rows, 0])
                row += len(members)
        return out


def softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool, keep_fp32: bool) -> Routing:
    """Mixtral (normalize, fp32 weights) and Qwen2-MoE (optional normalize, weights in model dtype)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(ids, weights if keep_fp32 else weights.to(logits.dtype))


def _sparsemixer_pick(scores: torch.Tensor, candidates: torch.Tensor, jitter_eps: float):
    threshold, chosen = candidates.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    masked = candidates.masked_fill(((threshold - scores) / factor) > 2 * jitter_eps, float("-inf"))
    return chosen, torch.softmax(masked, dim=-1).gather(-1, chosen)


def sparsemixer(scores: torch.Tensor, jitter_eps: float) -> Routing:
    """PhiMoE's inference routing (top-2): each pick is a softmax over the scores near its max."""
    first, first_weight = _sparsemixer_pick(scores, scores, jitter_eps)
    without_first = torch.scatter(scores, -1, first, float("-inf"))
    second, second_weight = _sparsemixer_pick(scores, without_first, jitter_eps)
    return Routing(torch.cat((first, second), dim=-1), torch.cat((first_weight, second_weight), dim=-1))


@dataclass
class MoEBlock:
    config: MoEConfig
    router: torch.Tensor  # [num_experts, hidden]
    experts: list[FFNUnit]
    shared_expert: FFNUnit | None = None
    shared_expert_gate: torch.Tensor | None = None  # [1, hidden]

    def route(self, x: torch.Tensor) -> Routing:
        return self.route_logits(self.router_logits(x))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> the router's logits [num_tokens, num_experts]."""
        return F.linear(x, self.router)

    def route_logits(self, logits: torch.Tensor) -> Routing:
        """The experts and weights the router's `logits` choose."""
        if self.config.router is RouterKind.SPARSEMIXER:
            return sparsemixer(logits, self.config.router_jitter_eps)
        keep_fp32 = self.shared_expert is None  # Mixtral keeps fp32 weights; Qwen2-MoE casts back
        return softmax_topk(logits, self.config.num_experts_per_tok, self.config.norm_topk_prob, keep_fp32)

    def likely_experts(self, h_before_ffn: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A guess of this layer's experts per token [num_tokens, top_k], from the residual stream one
        FFN and one attention earlier (the previous layer's, before its FFN) through this layer's
        norm and router: the top-k router logits are the experts both routers pick (softmax top-k,
        and sparsemixer's two successive maxima). Streaming uses it to copy early; never results."""
        logits = F.linear(norm(h_before_ffn), self.router)
        return torch.topk(logits, self.config.num_experts_per_tok, dim=-1).indices

    def units(self, x: torch.Tensor, routing: Routing
              ) -> tuple[dict[int, TokenGroup], list[tuple[FFNUnit, torch.Tensor]], list[torch.Tensor] | None]:
        """The routed experts' token groups, the work items (each routed expert with its tokens' rows,
        in increasing expert id, then the shared expert with every token) and the items' activations
        on the host when the routing copied them there."""
        groups = routing.tokens_of()
        items = [(self.experts[e], x[group.rows]) for e, group in groups.items()]
        host_x = None
        if routing.host is not None:
            host_x = [routing.host.x[group.rows if group.is_range else group.host_rows] for group in groups.values()]
        if self.shared_expert is not None:
            items.append((self.shared_expert, x))
            if host_x is not None:
                host_x.append(routing.host.x)
        return groups, items, host_x

    def __call__(
        self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor], run_units: UnitRunner | None = None,
        routing: Routing | None = None,
    ) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden].

        The routed experts (and the shared expert) are handed to `run_units` together, so that an
        executor can schedule all of this layer's units as one job. `routing`: `route(x)` when the
        caller computed it already (a decode graph does).
        """
        routing = routing if routing is not None else self.route(x)
        groups, items, host_x = self.units(x, routing)
        results = run_units(items, host_x) if run_units is not None else [unit(rows, act) for unit, rows in items]
        out = _combine_one_token(results[: len(groups)], groups, routing.weights, x.dtype)
        if out is None:
            out = self._combine(x, results, groups, routing.weights)
        if self.shared_expert is not None:
            out = self.add_shared(out, x, results[-1])
        return out

    def add_shared(self, out: torch.Tensor, x: torch.Tensor, shared_out: torch.Tensor) -> torch.Tensor:
        """`out` plus the shared expert's output `shared_out`, gated per token by x."""
        assert self.shared_expert_gate is not None
        return out + torch.sigmoid(F.linear(x, self.shared_expert_gate)) * shared_out

    def combine_one_token(self, x: torch.Tensor, outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The block's output for one token x [1, hidden] from its units' outputs [top_k (+ 1 shared),
        hidden] (routed experts in the order of the token's top-k) and routing weights [1, top_k]:
        the same kernels as `__call__` takes for one token, so the same bits."""
        top_k = weights.shape[1]
        out = _sum_in_topk_order(outputs[:top_k], weights, x.dtype)
        if self.shared_expert is not None:
            out = self.add_shared(out, x, outputs[top_k : top_k + 1])
        return out

    @staticmethod
    def _combine(x: torch.Tensor, results: list[torch.Tensor], groups: dict[int, TokenGroup],
                 weights: torch.Tensor) -> torch.Tensor:
        """Sum over experts, in expert-id order, of each expert's output times its routing weight
        (rounded to the model's dtype before the sum, as transformers does)."""
        out = torch.zeros_like(x)
        for y, group in zip(results, groups.values(), strict=False):
            y = (y * weights[group.rows, group.k_pos, None]).to(out.dtype)
            if group.is_range:  # the same sum as index_add_ over distinct rows, without the index
                out[group.rows].add_(y)
            else:
                out.index_add_(0, group.rows, y)
        return out


def _combine_one_token(results: list[torch.Tensor], groups: dict[int, TokenGroup], weights: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor | None:
    """MoEBlock._combine for one token whose experts come in the order of its top-k (a decode
    graph sorts them): every expert's product at once, then the same sequential sums, so the
    result is bitwise the loop's with ~k fewer kernels. None when that does not apply."""
    if not results or weights.shape[0] != 1 or len(groups) != weights.shape[1]:
        return None
    if [group.k_pos for group in groups.values()] != list(range(len(groups))):
        return None
    stacked = _adjacent_rows(results)
    if stacked is None:
        stacked = torch.cat(results)
    return _sum_in_topk_order(stacked, weights, dtype)


def _sum_in_topk_order(outputs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """outputs [top_k, hidden] of one token's experts in top-k order, weights [1, top_k] -> [1, hidden]:
    every product at once, rounded to `dtype`, then summed one expert after the other."""
    products = (outputs * weights[0, :, None]).to(dtype)
    out = products[0:1]
    for k in range(1, products.shape[0]):
        out = out + products[k : k + 1]
    return out


def _adjacent_rows(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """[len(rows), hidden] view of one-row tensors that are consecutive rows of one storage, else None."""
    if any(row.dim() != 2 or row.shape != rows[0].shape or row.shape[0] != 1 for row in rows):
        return None
    flat = adjacent_flat(*rows)
    return None if flat is None else flat.view(len(rows), rows[0].shape[1])
