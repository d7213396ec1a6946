"""The slot KV cache: per-layer keys and values allocated once, one row per sample being generated."""

from __future__ import annotations

from typing import Any

import torch

from .memory import CacheLayout


class SlotCache:
    """Per-layer keys and values, [slots, kv_heads, capacity, head_dim]; one row per sample being generated.

    Keys and values of all layers are one allocation each, seen per layer through views: on the CPU, glibc serves
    an allocation that large straight from the system and gives it back when freed, where per-layer tensors of a
    few MB would come from its heap and keep the process's memory up after the cache is gone. Zero-filled:
    positions past a slot's length are masked out of attention, but they still go through its matmuls, where a
    NaN left in freshly allocated memory would spread."""

    def __init__(self, layout: CacheLayout, slots: int, capacity: int, device: torch.device | str):
        shape = (layout.layers, slots, layout.kv_heads, capacity, layout.head_dim)
        self.key_store = torch.zeros(shape, dtype=layout.dtype, device=device)  # [layers, slots, Hkv, capacity, D]
        self.value_store = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.keys = list(self.key_store.unbind(0))
        self.values = list(self.value_store.unbind(0))
        self.slots = slots
        self.capacity = capacity
        self.nbytes = layout.cache_bytes(slots, capacity)

    def fits(self, slots: int, capacity: int) -> bool:
        return self.slots >= slots and self.capacity >= capacity

    def write_prompt(self, row: int, prompt_keys: list[torch.Tensor], prompt_values: list[torch.Tensor]) -> None:
        # prompt_keys[layer]: [1, kv_heads, L, head_dim], copied into `row` at positions [0, L)
        length = prompt_keys[0].shape[-2]
        for layer, (keys, values) in enumerate(zip(prompt_keys, prompt_values)):
            self.keys[layer][row, :, :length] = keys[0]
            self.values[layer][row, :, :length] = values[0]

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of a row into another (moving a slot, or sharing a prompt)."""
        if length == 0 or source == target:
            return
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[target, :, :length] = layer[source, :, :length]

    def step_view(self, positions: torch.Tensor, used: int) -> "DecodeStepCache":
        return DecodeStepCache(self, positions, used)


class DecodeStepCache:
    """What the model sees as past_key_values for one decode step over the first A rows (the generic path)."""

    def __init__(self, cache: SlotCache, positions: torch.Tensor, used: int):
        self.cache = cache
        self.positions = positions  # [A] where each slot's new token goes
        self.rows = torch.arange(positions.shape[0], device=positions.device)  # [A]
        self.used = used

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        # key_states: [A, kv_heads, 1, head_dim] -> keys of the occupied slots [A, kv_heads, used, head_dim]
        active = self.positions.shape[0]
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys[self.rows, :, self.positions] = key_states[:, :, 0]
        values[self.rows, :, self.positions] = value_states[:, :, 0]
        return keys[:active, :, : self.used], values[:active, :, : self.used]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.used
