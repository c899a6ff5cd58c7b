"""Mixture-of-experts: routers (softmax top-k, PhiMoE's sparsemixer) and the MoE block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.config import MoEConfig, RouterKind
from engine.model.ffn import FFNUnit

# [(unit, its tokens' activations [num_tokens, hidden])] -> each unit's output, same shapes
UnitRunner = Callable[[list[tuple[FFNUnit, torch.Tensor]]], list[torch.Tensor]]


@dataclass
class Routing:
    """Per token, the chosen experts and their weights: both [num_tokens, top_k]."""

    expert_ids: torch.Tensor
    weights: torch.Tensor

    def tokens_of(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """expert id -> (token indices, positions in top-k) of the tokens routed to it."""
        flat = self.expert_ids.flatten()
        order = torch.argsort(flat, stable=True)
        experts_sorted = flat[order].tolist()
        top_k = self.expert_ids.shape[1]
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        begin = 0
        for i in range(1, len(experts_sorted) + 1):
            if i == len(experts_sorted) or experts_sorted[i] != experts_sorted[begin]:
                chosen = order[begin:i]
                out[experts_sorted[begin]] = (chosen // top_k, chosen % top_k)
                begin = i
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
        logits = F.linear(x, self.router)
        if self.config.router is RouterKind.SPARSEMIXER:
            return sparsemixer(logits, self.config.router_jitter_eps)
        keep_fp32 = self.shared_expert is None  # Mixtral keeps fp32 weights; Qwen2-MoE casts back
        return softmax_topk(logits, self.config.num_experts_per_tok, self.config.norm_topk_prob, keep_fp32)

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
        assignment = routing.tokens_of()
        items = [(self.experts[e], x[token_idx]) for e, (token_idx, _) in assignment.items()]
        if self.shared_expert is not None:
            items.append((self.shared_expert, x))
        results = run_units(items) if run_units is not None else [unit(rows, act) for unit, rows in items]
        out = torch.zeros_like(x)
        for y, (token_idx, k_pos) in zip(results, assignment.values(), strict=False):
            y = y * routing.weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        if self.shared_expert is not None:
            assert self.shared_expert_gate is not None
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate)) * results[-1]
        return out
