"""The engine's attention for architectures it decodes through the model's own forward.

Registered with transformers once, on first use, not at import: importing the engine changes nothing global.
"""

from __future__ import annotations

import torch

SLOT_ATTENTION = "shardgen_slot_attention"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for grouped-query attention without copying keys per query head: the query heads sharing a key
    head become rows of one head. Registered as an attention implementation for the engine's decode steps."""
    # query: [A, H, q, D]; key, value: [A, Hkv, T, D]; attention_mask: [A, 1, q, T] bool (True = attend)
    batch, heads, queries, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    grouped_query = query.reshape(batch, kv_heads, group * queries, head_dim)
    grouped_mask = attention_mask.repeat(1, 1, group, 1) if queries > 1 else attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped_query, key, value, attn_mask=grouped_mask, scale=scaling
    )  # [A, Hkv, group * q, D]
    return out.reshape(batch, heads, queries, head_dim).transpose(1, 2), None  # [A, q, H, D]


_registered = False


def register_slot_attention() -> str:
    """Register `slot_attention` with transformers (once) and return the name models select it by."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(SLOT_ATTENTION, slot_attention)
        _registered = True
    return SLOT_ATTENTION
