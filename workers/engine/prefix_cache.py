"""The prefix cache: keys and values of prompt blocks that several prompts share, computed once.

A prompt is cut into blocks of `block_tokens` token ids from its start. A block is known by its tokens and the
block before it, so a stored block stands for the whole prefix up to its end, exactly (no hash can collide):
two prompts reach the same block only if their token ids agree from position 0 through that block.

- Before a prompt's prefill starts, the scheduler looks its blocks up and copies the longest run it finds into
  the prompt's cache row; prefill then starts after it. At least the prompt's last token is always computed,
  since its logits give the first new token.
- When a prompt's prefill completes, its blocks that some other prompt also holds (counted over the prompts of
  each call, and those of earlier calls) are copied out of its row into the store. A block only one prompt ever had is not kept, so a
  dataset without shared prefixes costs no memory and no copies.
- Blocks live in one pool allocated once, `max_bytes` large (its pages become resident only as blocks are
  written), and stay there across calls (the shards of a run) until the pool is full: then the least recently
  used block that no stored block continues is evicted.

Keys and values depend only on the token ids and their positions, so the tokens generated after a cached
prefix are those of a prefill from scratch (up to the floating-point order of a different chunking, as with
chunked prefill).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .kv_cache import SlotCache
from .memory import CacheLayout

log = logging.getLogger(__name__)

DEFAULT_BLOCK_TOKENS = 16
DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20
"""Memory the pool may take: about 350 blocks (5,600 tokens) of the default model."""
MAX_COUNTED_BLOCKS = 1 << 18
"""Block sightings remembered to decide what is shared; the count starts over past this many."""

BlockKey = tuple[int, tuple[int, ...]]
"""(the previous block's id, or -1 at the start; this block's token ids)."""


@dataclass
class _Block:
    id: int
    slot: int
    """Index in the pool."""
    key: BlockKey
    children: int = 0


@dataclass
class PrefixHit:
    blocks: list[int] = field(default_factory=list)
    """Pool indices of the matched blocks, in prompt order."""

    @property
    def count(self) -> int:
        return len(self.blocks)


class PrefixCache:
    def __init__(self, layout: CacheLayout, device: torch.device | str, *, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        self.layout, self.device, self.block_tokens = layout, device, block_tokens
        self.capacity = max_bytes // layout.slot_bytes(block_tokens)
        self.pool: torch.Tensor | None = None  # [capacity, 2, layers, kv_heads, block_tokens, head_dim]
        self.blocks: dict[BlockKey, _Block] = {}
        self.by_id: dict[int, _Block] = {}
        self.recency: OrderedDict[int, None] = OrderedDict()  # block ids, least recently used first
        self.free_slots: list[int] = list(range(self.capacity - 1, -1, -1))
        self.sightings: dict[int, int] = {}  # hash of a block's prefix -> prompts admitted with it
        self.next_id = 0

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.layout.slot_bytes(self.block_tokens)

    # ----------------------------------------------------------------- what prompts share

    def prefix_hashes(self, prompt_ids: Sequence[int]) -> list[int]:
        """One hash per full block of the prompt, each of the whole prefix up to the block's end."""
        hashes, running = [], 0
        size = self.block_tokens
        for start in range(0, len(prompt_ids) - size + 1, size):
            running = hash((running, tuple(prompt_ids[start : start + size])))
            hashes.append(running)
        return hashes

    def sighted(self, hashes: Sequence[int]) -> None:
        """A prompt with these block prefixes was admitted."""
        if len(self.sightings) > MAX_COUNTED_BLOCKS:
            self.sightings.clear()
        for value in hashes:
            self.sightings[value] = self.sightings.get(value, 0) + 1

    # ----------------------------------------------------------------- lookup and store

    def lookup(self, prompt_ids: Sequence[int]) -> PrefixHit:
        """The longest run of stored blocks the prompt starts with, leaving at least its last token to compute."""
        hit = PrefixHit()
        usable = (len(prompt_ids) - 1) // self.block_tokens
        parent = -1
        for index in range(usable):
            block = self.blocks.get(self._key(parent, prompt_ids, index))
            if block is None:
                break
            hit.blocks.append(block.slot)
            self._touch(block)
            parent = block.id
        return hit

    def copy_into(self, cache: SlotCache, row: int, hit: PrefixHit) -> int:
        """Write the hit's keys and values into a cache row from position 0; the positions written."""
        assert self.pool is not None
        size = self.block_tokens
        for index, slot in enumerate(hit.blocks):
            block = self.pool[slot]  # [2, layers, kv_heads, block_tokens, head_dim]
            cache.key_store[:, row, :, index * size : (index + 1) * size] = block[0]
            cache.value_store[:, row, :, index * size : (index + 1) * size] = block[1]
        return hit.count * size

    def store(self, cache: SlotCache, row: int, prompt_ids: Sequence[int], hashes: Sequence[int]) -> int:
        """Keep the blocks of a prompt just prefilled in `row` that another prompt was also seen with; the
        blocks added."""
        parent, added, chain = -1, 0, set()
        size = self.block_tokens
        for index, value in enumerate(hashes):
            key = self._key(parent, prompt_ids, index)
            block = self.blocks.get(key)
            if block is None:
                if self.sightings.get(value, 0) < 2:
                    break
                slot = self._free_slot(chain)
                if slot is None:
                    break
                pool = self._pool()
                positions = slice(index * size, (index + 1) * size)
                pool[slot, 0] = cache.key_store[:, row, :, positions]
                pool[slot, 1] = cache.value_store[:, row, :, positions]
                block = _Block(self.next_id, slot, key)
                self.next_id += 1
                self.blocks[key], self.by_id[block.id] = block, block
                if parent >= 0:
                    self.by_id[parent].children += 1
                added += 1
            self._touch(block)
            chain.add(block.id)
            parent = block.id
        return added

    def clear(self) -> None:
        self.blocks.clear()
        self.by_id.clear()
        self.recency.clear()
        self.free_slots = list(range(self.capacity - 1, -1, -1))
        self.pool = None

    # ----------------------------------------------------------------- internals

    def _key(self, parent: int, prompt_ids: Sequence[int], index: int) -> BlockKey:
        size = self.block_tokens
        return parent, tuple(prompt_ids[index * size : (index + 1) * size])

    def _touch(self, block: _Block) -> None:
        self.recency[block.id] = None
        self.recency.move_to_end(block.id)

    def _pool(self) -> torch.Tensor:
        if self.pool is None:  # empty, not zeros: pages become resident only as blocks are written
            layout = self.layout
            shape = (self.capacity, 2, layout.layers, layout.kv_heads, self.block_tokens, layout.head_dim)
            self.pool = torch.empty(shape, dtype=layout.dtype, device=self.device)
        return self.pool

    def _free_slot(self, keep: set[int]) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        for block_id in self.recency:
            block = self.by_id[block_id]
            if block.children == 0 and block_id not in keep:
                self._evict(block)
                return self.free_slots.pop()
        return None

    def _evict(self, block: _Block) -> None:
        del self.blocks[block.key], self.by_id[block.id], self.recency[block.id]
        parent = block.key[0]
        if parent >= 0:
            self.by_id[parent].children -= 1
        self.free_slots.append(block.slot)
