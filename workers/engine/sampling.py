"""Choosing the next token from logits: small pure functions over [B, V] tensors, gpt-fast style.

Order, as in transformers: repetition penalty, then greedy or (temperature, top-k, top-p, min-p, draw).
Filters renormalize over what survives the previous one. Each row draws from its own torch.Generator, so a
row's tokens do not depend on the other rows of the batch.

Top-p and min-p need the tokens in probability order. Sorting the whole vocabulary every step is slow, so
`next_tokens` sorts only a bounded candidate set (the largest logits) and falls back to a full sort for the
rows whose nucleus does not fit in it; the result is exactly the full-sort one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from shardgen.schemas.sampling import SamplingParams

CANDIDATES = 64
"""Tokens sorted per row before the exact fallback to a full sort is needed."""

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, sample: int) -> int:
    """Seed for sample `sample` of a row seeded `seed` (splitmix64, so nearby seeds give unrelated streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + (sample + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def row_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def greedy(logits: torch.Tensor) -> torch.Tensor:
    # logits: [B, V] -> [B]
    return logits.argmax(dim=-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen less likely: positive logits are divided by `penalty`, negative multiplied."""
    # logits: [B, V]; seen: [B, V] bool (tokens of the prompt and of the generation so far)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # logits: [B, V]
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included); the rest become -inf."""
    # logits: [B, V]
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, -math.inf)


def nucleus_mask(sorted_logits: torch.Tensor, log_normalizer: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens of descending-sorted logits are in the nucleus: those whose more likely tokens hold < top_p."""
    # sorted_logits: [B, K] descending; log_normalizer: [B, 1] (log of the softmax denominator) -> [B, K] bool
    probs = (sorted_logits - log_normalizer).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    return mass_before < top_p


def min_p_mask(sorted_logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Which tokens have a probability of at least min_p times the most likely one's."""
    # sorted_logits: [B, K] descending -> [B, K] bool
    return sorted_logits >= sorted_logits[:, :1] + math.log(min_p)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference full-vocabulary nucleus filter: tokens outside the nucleus become -inf."""
    # logits: [B, V]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    keep = nucleus_mask(sorted_logits, sorted_logits.logsumexp(dim=-1, keepdim=True), top_p)
    return logits.masked_fill(~keep.scatter(-1, order, keep), -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    # logits: [B, V]
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)  # [B, 1]
    return logits.masked_fill(logits < threshold, -math.inf)


def uniforms(generators: Sequence[torch.Generator], device: torch.device | str) -> torch.Tensor:
    """One uniform draw in [0, 1) per row, each from the row's own generator."""
    # -> [B]
    return torch.stack([torch.rand((), generator=g, device=device, dtype=torch.float64) for g in generators])


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the token whose cumulative probability interval holds u (zero-probability tokens never)."""
    # probs: [B, K] (need not sum to 1); u: [B] in [0, 1) -> [B] positions in K
    cdf = probs.double().cumsum(dim=-1)  # [B, K]
    target = (u * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    position = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [B]
    last_possible = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1)  # [B] guards u * total rounding up to total
    return torch.minimum(position, last_possible)


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator] | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of each row under `params` (one generator per row unless greedy)."""
    # logits: [B, V] float; seen: [B, V] bool or None -> [B] long
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return greedy(logits)
    assert generators is not None and len(generators) == logits.shape[0], "sampling needs one generator per row"
    logits = apply_temperature(logits, params.temperature)
    u = uniforms(generators, logits.device)  # [B]
    if not (params.top_k or params.top_p < 1.0 or params.min_p > 0.0):
        return draw(logits.softmax(dim=-1), u)
    return _filtered_draw(logits, params, u)


def _filtered_draw(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    # logits: [B, V] tempered; u: [B] -> [B]
    vocab = logits.shape[-1]
    width = min(params.top_k or CANDIDATES, vocab)
    values, indices = logits.topk(width, dim=-1)  # [B, K] descending
    if params.top_k:
        log_normalizer = values.logsumexp(dim=-1, keepdim=True)  # later filters renormalize over the top k
        return _draw_sorted(values, indices, log_normalizer, params, u)
    log_normalizer = logits.logsumexp(dim=-1, keepdim=True)  # [B, 1]
    fits = _candidates_suffice(values, log_normalizer, params)  # [B]
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if fits.any():
        tokens[fits] = _draw_sorted(values[fits], indices[fits], log_normalizer[fits], params, u[fits])
    if not fits.all():
        spill = ~fits
        all_values, all_indices = logits[spill].sort(dim=-1, descending=True)  # [S, V]
        tokens[spill] = _draw_sorted(all_values, all_indices, log_normalizer[spill], params, u[spill])
    return tokens


def _candidates_suffice(values: torch.Tensor, log_normalizer: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows for which no token outside the candidates can survive top-p or min-p."""
    # values: [B, K] descending; log_normalizer: [B, 1] over the full vocabulary -> [B] bool
    suffice = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    if params.top_p < 1.0:
        # Every token outside has at least the candidates' mass before it.
        suffice |= (values - log_normalizer).exp().sum(dim=-1) >= params.top_p
    if params.min_p > 0.0:
        # Every token outside is no larger than the last candidate.
        suffice |= values[:, -1] < values[:, 0] + math.log(params.min_p)
    return suffice


def _draw_sorted(
    values: torch.Tensor, indices: torch.Tensor, log_normalizer: torch.Tensor, params: SamplingParams, u: torch.Tensor
) -> torch.Tensor:
    # values, indices: [B, K] descending logits and their token ids; log_normalizer: [B, 1]; u: [B] -> [B]
    keep = torch.ones_like(values, dtype=torch.bool)
    if params.top_p < 1.0:
        keep &= nucleus_mask(values, log_normalizer, params.top_p)
    if params.min_p > 0.0:
        keep &= min_p_mask(values, params.min_p)
    probs = values.masked_fill(~keep, -math.inf).softmax(dim=-1)  # [B, K]
    return indices.gather(-1, draw(probs, u).unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and the `top` most likely ones, from raw logits (log-softmax)."""
    # logits: [B, V]; tokens: [B] -> chosen [B], top values [B, top] descending, top token ids [B, top]
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None].to(logits.device))[:, 0]
    values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], tokens.new_empty(tokens.shape[0], 0))
    return chosen, values, ids
