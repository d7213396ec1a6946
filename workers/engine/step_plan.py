"""What one engine step computes: a token for each decoding slot and chunks of prompts being prefilled.

A step is one forward over a packed sequence of tokens: first one token per decoding slot, in cache-row order,
then the chunks of prompts, each a run of consecutive positions of one slot. Every token sends its key and value
to its own slot's row; decode tokens attend in groups of neighbouring rows (attention_groups), a chunk attends to
its own row only, causally. No token is padded, and prompts of any length share the linear layers of one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

GROUP_OVERHEAD = 32e-6
"""Seconds a decode attention call (SDPA) costs whatever its size (measured on a 2-core CPU, two threads)."""
SLOT_POSITION_COST = 85e-9
"""Seconds per (slot, cached position) such a call reads and computes (same CPU, 3 kv heads of 64). A further
cost per slot, about 9 microseconds, is the same however slots are grouped, so it does not enter the choice."""


@dataclass(frozen=True)
class DecodeToken:
    row: int
    """Cache row of the slot."""
    token: int
    """The slot's last generated token, fed back in."""
    position: int
    """Where that token's key and value go: the slot's sequence length so far, minus one."""


@dataclass(frozen=True)
class PrefillChunk:
    row: int
    start: int
    """Position of the chunk's first token; positions before it are in the cache already."""
    token_ids: Sequence[int]
    wants_logits: bool
    """Whether the chunk ends its prompt, so the step returns the logits of its last token."""


@dataclass(frozen=True)
class AttentionGroup:
    """Decode tokens of cache rows [start, stop), attending over the first `used` positions of those rows."""

    start: int
    stop: int
    used: int
    query_start: int = 0
    """Index of row `start`'s token among the step's tokens."""


@dataclass(frozen=True)
class ChunkSpan:
    """Where a prefill chunk sits: its tokens are [offset, offset + length) of the step, at positions from start."""

    row: int
    start: int
    length: int
    offset: int


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    rows: torch.Tensor  # [N] cache row of each token
    groups: list[AttentionGroup]
    chunks: list[ChunkSpan]
    logit_index: torch.Tensor  # [K] tokens whose next-token logits the step returns: decode tokens, then chunk ends
    decode_tokens: int

    @property
    def prefill_tokens(self) -> int:
        return sum(chunk.length for chunk in self.chunks)


def attention_groups(positions: Sequence[int]) -> list[AttentionGroup]:
    """Split slots (rows 0..n-1 here) into runs that attend separately, each only as far as its longest slot.

    One call for all slots reads every slot's cache up to the longest one's position; a call per slot reads
    only what each needs but pays the per-call cost n times. The cheapest split into contiguous runs is found
    by dynamic programming over the cost model above (slots are few, so this is quick).
    """
    count = len(positions)
    best = [0.0] + [float("inf")] * count  # best[j]: cost of slots [0, j)
    cut = [0] * (count + 1)
    for stop in range(1, count + 1):
        longest = 0
        for start in range(stop - 1, -1, -1):
            longest = max(longest, positions[start] + 1)
            cost = best[start] + GROUP_OVERHEAD + SLOT_POSITION_COST * (stop - start) * longest
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    groups = []
    stop = count
    while stop > 0:
        start = cut[stop]
        groups.append(AttentionGroup(start, stop, max(positions[start:stop]) + 1, start))
        stop = start
    return groups[::-1]


def decode_groups(decode: Sequence[DecodeToken], split: bool = True) -> list[AttentionGroup]:
    """Attention groups for decode tokens sorted by row: within each run of consecutive rows, the cheapest split
    (or one group per run when `split` is off)."""
    groups: list[AttentionGroup] = []
    run_start = 0
    for index in range(1, len(decode) + 1):
        if index < len(decode) and decode[index].row == decode[index - 1].row + 1:
            continue
        run = decode[run_start:index]
        positions = [token.position for token in run]
        parts = attention_groups(positions) if split else [AttentionGroup(0, len(run), max(positions) + 1, 0)]
        first_row = run[0].row
        groups += [AttentionGroup(first_row + g.start, first_row + g.stop, g.used, run_start + g.start) for g in parts]
        run_start = index
    return groups


def plan_step(
    decode: Sequence[DecodeToken], chunks: Sequence[PrefillChunk], device: torch.device | str, split_groups: bool = True
) -> StepBatch:
    """The tensors and attention layout of one step. `decode` must be sorted by row."""
    assert all(a.row < b.row for a, b in zip(decode, decode[1:])), "decode tokens must be in row order"
    ids = [token.token for token in decode]
    positions = [token.position for token in decode]
    rows = [token.row for token in decode]
    logit_index = list(range(len(decode)))
    spans = []
    for chunk in chunks:
        offset, length = len(ids), len(chunk.token_ids)
        spans.append(ChunkSpan(chunk.row, chunk.start, length, offset))
        ids += chunk.token_ids
        positions += range(chunk.start, chunk.start + length)
        rows += [chunk.row] * length
        if chunk.wants_logits:
            logit_index.append(offset + length - 1)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return StepBatch(
        input_ids=as_tensor(ids),
        positions=as_tensor(positions),
        rows=as_tensor(rows),
        groups=decode_groups(decode, split_groups) if decode else [],
        chunks=spans,
        logit_index=as_tensor(logit_index),
        decode_tokens=len(decode),
    )


def split_prefill(remaining: Sequence[int], budget: int) -> list[int]:
    """Tokens each prompt being prefilled gets in a step of `budget` prefill tokens, first admitted first."""
    # remaining[i]: prompt tokens request i still has to prefill -> tokens it gets this step
    shares = []
    for tokens in remaining:
        share = min(tokens, budget)
        shares.append(share)
        budget -= share
    return shares
