"""Counters of what the engine computed, for the bench and for a worker's metrics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class EngineStats:
    """Running totals over an engine's life; `since(earlier)` gives those of a stretch of work."""

    forwards: int = 0
    """Model forwards (a step carries decode tokens, prefill chunks or both in one)."""
    prefill_tokens: int = 0
    """Prompt tokens computed (once per prompt, whatever its number of samples)."""
    reused_prefix_tokens: int = 0
    """Prompt tokens not computed: their keys and values came from the prefix cache."""
    decode_steps: int = 0
    """Forwards that decoded at least one slot."""
    decode_tokens: int = 0
    """Tokens decoded: the slots occupied in each decode step, summed."""
    slot_steps: int = 0
    """Slots the cache had in each decode step, summed: the most decode_tokens could have been."""
    slots: int = 0
    """KV cache slots of the latest call: the batch size it ran at."""
    cache_bytes: int = 0
    """Size of the KV cache of the latest call."""

    @property
    def batch_occupancy(self) -> float | None:
        """Share of the cache's slots that decoded, over all decode steps."""
        return self.decode_tokens / self.slot_steps if self.slot_steps else None

    @property
    def computed_tokens(self) -> int:
        """Token positions the model computed: prefill and decode."""
        return self.prefill_tokens + self.decode_tokens

    def copy(self) -> "EngineStats":
        return dataclasses.replace(self)

    def since(self, earlier: "EngineStats") -> "EngineStats":
        """Totals accrued after `earlier` was copied; slots and cache size are the latest."""
        totals = {
            field.name: getattr(self, field.name) - getattr(earlier, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("slots", "cache_bytes")
        }
        return EngineStats(**totals, slots=self.slots, cache_bytes=self.cache_bytes)
