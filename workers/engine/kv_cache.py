"""The slot KV cache: per-layer keys and values allocated once, one row per sample being generated."""

from __future__ import annotations

from typing import Any

import torch


class SlotCache:
    """Per-layer keys and values, [slots, kv_heads, capacity, head_dim]; one row per sample being generated."""

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots = slots
        self.capacity = capacity

    def write_prompt(self, rows: range, prompt_keys: list[torch.Tensor], prompt_values: list[torch.Tensor]) -> None:
        # prompt_keys[layer]: [1, kv_heads, L, head_dim], copied into rows at positions [0, L)
        length = prompt_keys[0].shape[-2]
        for layer, (keys, values) in enumerate(zip(prompt_keys, prompt_values)):
            self.keys[layer][rows.start : rows.stop, :, :length] = keys
            self.values[layer][rows.start : rows.stop, :, :length] = values

    def move_row(self, source: int, target: int, length: int) -> None:
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[target, :, :length] = layer[source, :, :length]

    def step_view(self, positions: torch.Tensor, used: int) -> "DecodeStepCache":
        return DecodeStepCache(self, positions, used)


class DecodeStepCache:
    """What the model sees as past_key_values for one decode step over the occupied prefix of slots."""

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

