"""The engine's own decode step for llama-family decoders (Llama, Mistral, Qwen2), gpt-fast style.

Through the model's forward, a batched decode step pays for mask building, cache objects, a general attention
kernel for a handful of query rows and module plumbing around every layer. This step calls the same layer
modules (plain, packed or quantized linears alike) and does the rest itself: new keys and values are written
straight into the slot cache, and attention over the occupied slots is two batched matmuls in which the query
heads sharing a key head are rows of one matrix. Other architectures keep the generic path through the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class DecoderParts:
    """The modules and sizes a decode step needs, taken from a transformers *ForCausalLM."""

    embed: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module  # (x, position_ids) -> cos, sin
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @classmethod
    def of(cls, model: torch.nn.Module) -> "DecoderParts":
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            embed=model.model.embed_tokens,
            layers=model.model.layers,
            norm=model.model.norm,
            lm_head=model.get_output_embeddings(),
            rotary=model.model.rotary_emb,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            scaling=head_dim**-0.5,
        )


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why `decode_step` cannot run this model, or None if it can."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "tensor-parallel pretraining layout (pretraining_tp > 1)"
    return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' apply_rotary_pos_emb."""
    # x: [A, heads, D]; cos, sin: [A, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def grouped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask_bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of one new token per slot over that slot's cached keys."""
    # query: [A, Hkv, G, D]; keys, values: [A, Hkv, T, D]; mask_bias: [A, 1, 1, T] (0 or -inf) -> [A, Hkv, G, D]
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scaling + mask_bias  # [A, Hkv, G, T]
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values)


def mask_bias(positions: torch.Tensor, used: int, dtype: torch.dtype) -> torch.Tensor:
    """0 where a slot may attend (its own positions so far), -inf beyond."""
    # positions: [A] -> [A, 1, 1, used]
    beyond = torch.arange(used, device=positions.device) > positions[:, None]  # [A, used]
    bias = torch.zeros(beyond.shape, dtype=dtype, device=positions.device)
    return bias.masked_fill_(beyond, float("-inf"))[:, None, None, :]


GROUP_OVERHEAD = 20e-6
"""Seconds an attention call costs whatever its size (measured on a 2-core CPU: about 20 microseconds)."""
SLOT_POSITION_COST = 135e-9
"""Seconds per (slot, cached position) an attention call reads and computes (same CPU, 3 kv heads of 64)."""


@dataclass(frozen=True)
class AttentionGroup:
    start: int
    stop: int
    used: int  # cached positions the group's slots attend over: its longest slot's position + 1


def attention_groups(positions: list[int]) -> list[AttentionGroup]:
    """Split the occupied slots into runs that attend separately, each only as far as its own longest slot.

    One call for all slots reads every slot's cache up to the longest one's position; a call per slot reads
    only what each needs but pays the per-call cost 16 times. The cheapest split into contiguous runs is found
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
        groups.append(AttentionGroup(start, stop, max(positions[start:stop]) + 1))
        stop = start
    return groups[::-1]


def feed_forward(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A decoder layer's second half: normalized, through the SiLU-gated MLP, added to the residual."""
    # hidden: [..., hidden] -> same shape
    normed = layer.post_attention_layernorm(hidden)
    mlp = layer.mlp
    return hidden + mlp.down_proj(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed))


def cache_rows(positions: torch.Tensor, kv_heads: int, capacity: int) -> torch.Tensor:
    """Row of each (slot, kv head)'s new entry in a layer's cache viewed as [slots * kv_heads * capacity, D]."""
    # positions: [A] (slot i is row i) -> [A * kv_heads]
    active = positions.shape[0]
    slot_heads = torch.arange(active * kv_heads, device=positions.device).view(active, kv_heads)
    return (slot_heads * capacity + positions[:, None]).flatten()


def decode_step(
    parts: DecoderParts,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    groups: list[AttentionGroup],
) -> torch.Tensor:
    """Logits of the next token for the first A slots; their new keys and values are written into the cache."""
    # keys[layer], values[layer]: [slots, Hkv, capacity, D]; input_ids, positions: [A] -> logits [A, V]
    # groups: contiguous runs covering [0, A) (attention_groups)
    active = input_ids.shape[0]
    heads, kv_heads, head_dim = parts.heads, parts.kv_heads, parts.head_dim
    slots, _, capacity, _ = keys[0].shape
    flat = (slots * kv_heads * capacity, head_dim)
    hidden = parts.embed(input_ids)  # [A, hidden]
    cos, sin = parts.rotary(hidden, positions[:, None])  # [A, 1, D]
    rows = cache_rows(positions, kv_heads, capacity)
    biases = [mask_bias(positions[g.start : g.stop], g.used, hidden.dtype) for g in groups]
    for index, layer in enumerate(parts.layers):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = rotate(attention.q_proj(normed).view(active, heads, head_dim), cos, sin)
        key = rotate(attention.k_proj(normed).view(active, kv_heads, head_dim), cos, sin)
        keys[index].view(flat).index_copy_(0, rows, key.reshape(-1, head_dim).to(keys[index].dtype))
        values[index].view(flat).index_copy_(0, rows, attention.v_proj(normed).view(-1, head_dim).to(values[index].dtype))
        grouped_query = query.view(active, kv_heads, heads // kv_heads, head_dim)
        attended = torch.cat([
            grouped_attention(
                grouped_query[g.start : g.stop],
                keys[index][g.start : g.stop, :, : g.used],
                values[index][g.start : g.stop, :, : g.used],
                bias,
                parts.scaling,
            )
            for g, bias in zip(groups, biases)
        ])  # [A, Hkv, G, D]
        hidden = hidden + attention.o_proj(attended.reshape(active, heads * head_dim).to(hidden.dtype))
        hidden = feed_forward(layer, hidden)
    return parts.lm_head(parts.norm(hidden))  # [A, V]


def prefill_step(
    parts: DecoderParts, keys: list[torch.Tensor], values: list[torch.Tensor], prompt_ids: torch.Tensor, row: int
) -> torch.Tensor:
    """Run one prompt, writing its keys and values straight into slot `row`; logits of its last token.

    Through the model's forward the prompt's keys and values would first fill a cache of their own and then be
    copied; here they are written once, where decoding reads them.
    """
    # keys[layer], values[layer]: [slots, Hkv, capacity, D]; prompt_ids: [L] -> logits [1, V]
    length = prompt_ids.shape[0]
    heads, kv_heads, head_dim = parts.heads, parts.kv_heads, parts.head_dim
    hidden = parts.embed(prompt_ids)  # [L, hidden]
    cos, sin = parts.rotary(hidden, torch.arange(length, device=prompt_ids.device)[None])  # [1, L, D]
    cos, sin = cos[0, :, None], sin[0, :, None]  # [L, 1, D]
    for index, layer in enumerate(parts.layers):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = rotate(attention.q_proj(normed).view(length, heads, head_dim), cos, sin)  # [L, H, D]
        key = rotate(attention.k_proj(normed).view(length, kv_heads, head_dim), cos, sin)
        keys[index][row, :, :length] = key.transpose(0, 1)
        values[index][row, :, :length] = attention.v_proj(normed).view(length, kv_heads, head_dim).transpose(0, 1)
        attended = F.scaled_dot_product_attention(
            query.transpose(0, 1)[None],  # [1, H, L, D]
            keys[index][row : row + 1, :, :length],
            values[index][row : row + 1, :, :length],
            is_causal=True,
            scale=parts.scaling,
            enable_gqa=True,
        )  # [1, H, L, D]
        hidden = hidden + attention.o_proj(attended[0].transpose(0, 1).reshape(length, heads * head_dim))
        hidden = feed_forward(layer, hidden)
    return parts.lm_head(parts.norm(hidden[-1:]))  # [1, V]
