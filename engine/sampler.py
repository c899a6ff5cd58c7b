"""Sampler: logits [num_seqs, vocab] -> one SampleResult per row.

Order per row: repetition penalty (HF), presence/frequency penalties (OpenAI), then greedy argmax
(temperature == 0) or temperature, top-k, top-p, min-p and a draw from the request's own generator.
Logprobs are the log-softmax of the raw logits (before penalties and temperature), like vLLM.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass
class SamplerRequest:
    """One row of the logits: its params, its tokens so far and its own random generator."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator


@dataclass
class TokenLogprob:
    """The chosen token's logprob and `params.logprobs` alternatives, best first."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


@dataclass
class SampleResult:
    """The sampled token of one row (logprob is None unless params.logprobs is not None)."""

    token_id: int
    logprob: TokenLogprob | None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or with a fresh system-random seed when None."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def apply_penalties(logits: torch.Tensor, requests: list[SamplerRequest]) -> torch.Tensor:
    """An fp32 copy of `logits` with repetition, presence and frequency penalties applied."""
    out = logits.to(torch.float32, copy=True)
    vocab = out.shape[-1]
    for i, req in enumerate(requests):
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = sorted(set(req.prompt_token_ids) | set(req.output_token_ids))
            if seen:
                ids = torch.tensor(seen, dtype=torch.long, device=out.device)
                vals = out[i, ids]
                out[i, ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and req.output_token_ids:
            ids = torch.tensor(req.output_token_ids, dtype=torch.long, device=out.device)
            counts = torch.bincount(ids, minlength=vocab)[:vocab].to(torch.float32)
            out[i] -= p.presence_penalty * (counts > 0).to(torch.float32) + p.frequency_penalty * counts
    return out


def apply_filters(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, then min-p drop; one value per row in each tensor."""
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))

    # top-p: drop a token once the probability mass before it already reaches top_p.
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))

    # min-p: drop tokens less likely than min_p times the most likely one.
    probs = sorted_logits.softmax(dim=-1)
    drop = probs < min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token id from a probability row by the exponential race (argmax of p / Exp(1))."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


class Sampler:
    """Turns a batch of logits into tokens, each row by its own params and generator."""

    def __call__(self, logits: torch.Tensor, requests: list[SamplerRequest]) -> list[SampleResult]:
        """Sample one token per row of `logits` [num_seqs, vocab]; the input is never modified."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(requests)} requests")
        device = logits.device
        scores = apply_penalties(logits, requests)
        token_ids = scores.argmax(dim=-1)

        sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled:
            rows = torch.tensor(sampled, dtype=torch.long, device=device)
            params = [requests[i].params for i in sampled]
            temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
            probs = apply_filters(scores[rows] / temps[:, None], top_k, top_p, min_p).softmax(dim=-1)
            for j, i in enumerate(sampled):
                token_ids[i] = _draw(probs[j], requests[i].generator)

        chosen: list[int] = token_ids.tolist()
        results = [SampleResult(token_id=t, logprob=None) for t in chosen]
        if any(r.params.logprobs is not None for r in requests):
            raw = logits.to(torch.float32).log_softmax(dim=-1)
            for i, req in enumerate(requests):
                n = req.params.logprobs
                if n is None:
                    continue
                top: list[tuple[int, float]] = []
                if n > 0:
                    vals, ids = raw[i].topk(min(n, raw.shape[-1]))
                    top = list(zip(ids.tolist(), vals.tolist(), strict=True))
                results[i].logprob = TokenLogprob(chosen[i], float(raw[i, chosen[i]]), top)
        return results
