"""How many slots a call gets, and the slot KV cache that holds them.

A fixed batch size is a number of slots (never fewer than one request's samples, never more than the call can
fill). Under "auto" a call gets as many slots as its KV cache, at the call's longest sequence, fits in the memory
budget beside what is already in use. The cache is kept between calls and reused while it is big enough; a
bigger one replaces it (the old one freed first).
"""

from __future__ import annotations

import logging

import torch

from ..generation import EngineOOM
from .kv_cache import SlotCache
from .memory import CacheLayout, default_budget, fit_batch_size, memory_in_use

log = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_BATCH_SIZE = 16
"""Slots of a call under a fixed size the engine was not given (the HF fallback's batch under auto)."""
WORK_BYTES_PER_VOCAB_ENTRY = 32
"""Sampling's working memory per slot and vocabulary entry: logits and their float copies (about 8 of 4 bytes)."""


class CacheSizer:
    def __init__(self, layout: CacheLayout, device: torch.device, vocab_size: int, max_memory: int | None):
        self.layout, self.device, self.vocab_size, self.max_memory = layout, device, vocab_size, max_memory
        self.cache: SlotCache | None = None

    def free(self) -> None:
        self.cache = None

    def prepare(self, batch_size: int | str, wanted: int, minimum: int, longest: int) -> int:
        """Make the cache hold at least the slots this call gets, each `longest` positions; returns the slots."""
        if batch_size == AUTO:
            slots = self.auto_slots(wanted, minimum, longest)
        else:
            slots = min(max(int(batch_size), minimum), max(wanted, minimum))
        if self.cache is None or not self.cache.fits(slots, longest):
            if self.cache is not None and batch_size != AUTO:  # a fixed batch keeps the largest shape it has seen
                slots, longest = max(slots, self.cache.slots), max(longest, self.cache.capacity)
            self.cache = None  # free the old one before allocating
            self.cache = SlotCache(self.layout, slots, longest, self.device)
        return min(self.cache.slots, slots)

    def auto_slots(self, wanted: int, minimum: int, longest: int) -> int:
        """The most slots, up to those the call can fill, whose KV cache at the call's longest sequence fits the
        memory budget beside what is in use (the current cache not counted)."""
        budget = self.max_memory if self.max_memory is not None else default_budget(self.device)
        in_use = memory_in_use(self.device) - (self.cache.nbytes if self.cache is not None else 0)
        per_slot = self.layout.slot_bytes(longest) + WORK_BYTES_PER_VOCAB_ENTRY * self.vocab_size
        fitted = fit_batch_size(budget, in_use, per_slot)
        if fitted < minimum:
            raise EngineOOM(
                f"a memory budget of {budget / 2**20:.0f} MiB with {in_use / 2**20:.0f} MiB in use leaves room for "
                f"{fitted} KV cache slots of {longest} positions ({per_slot / 2**20:.1f} MiB each); this call needs "
                f"{minimum}: raise --max-memory or lower max_new_tokens"
            )
        slots = min(fitted, max(wanted, minimum))
        log.info(
            "batch size auto: %d slots of %d positions (%.0f MiB of KV cache) within %.0f MiB, %.0f MiB in use",
            slots, longest, slots * self.layout.slot_bytes(longest) / 2**20, budget / 2**20, in_use / 2**20,
        )
        return slots
