"""The engine's own forward step for llama-family decoders (Llama, Mistral, Qwen2), gpt-fast style.

Through the model's forward, a batched decode step pays for mask building, cache objects, a general attention
kernel for a handful of query rows and module plumbing around every layer, and prompts of different lengths
must be padded to share a forward. This step calls the same layer modules (plain, packed or quantized linears
alike) on a packed sequence of tokens and does the rest itself: new keys and values are written straight into
the slot cache, decode attention is one fused call per group of slots in which the query heads sharing a key
head are rows of one matrix, and each prompt chunk attends causally over its own slot. Other architectures keep
the generic path through the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .memory import CacheLayout
from .step_plan import StepBatch

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

    def cache_layout(self) -> CacheLayout:
        """The slot cache this model needs, read from its configuration: keys and values in the hidden dtype."""
        return CacheLayout(len(self.layers), self.kv_heads, self.head_dim, self.embed.weight.dtype)


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
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of one new token per slot over that slot's cached keys, the query heads that share a key head
    being rows of one matrix. SDPA's fused kernel rather than two batched matmuls: on a CPU shared with other
    processes, bmm over many small matrices with two threads ran ten times slower than with one."""
    # query: [A, Hkv, G, D]; keys, values: [A, Hkv, T, D]; mask: [A, 1, 1, T] bool (True = attend) -> [A, Hkv, G, D]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)


def decode_mask(positions: torch.Tensor, used: int) -> torch.Tensor:
    """True where a slot may attend: its own positions so far."""
    # positions: [A] -> [A, 1, 1, used]
    return (torch.arange(used, device=positions.device) <= positions[:, None])[:, None, None, :]


def feed_forward(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A decoder layer's second half: normalized, through the SiLU-gated MLP, added to the residual."""
    # hidden: [..., hidden] -> same shape
    normed = layer.post_attention_layernorm(hidden)
    mlp = layer.mlp
    return hidden + mlp.down_proj(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed))


def cache_index(rows: torch.Tensor, positions: torch.Tensor, kv_heads: int, capacity: int) -> torch.Tensor:
    """Index of each (token, kv head)'s entry in a layer's cache viewed as [slots * kv_heads * capacity, D]."""
    # rows, positions: [N] -> [N * kv_heads]
    heads = torch.arange(kv_heads, device=rows.device)
    return ((rows[:, None] * kv_heads + heads) * capacity + positions[:, None]).flatten()


def chunk_mask(start: int, length: int, device: torch.device) -> torch.Tensor:
    """Causal mask of a chunk whose first token is at position `start`: token i sees positions 0..start + i."""
    # -> [length, start + length] bool (True = attend)
    keys = torch.arange(start + length, device=device)
    return keys[None, :] <= torch.arange(start, start + length, device=device)[:, None]


def step_masks(batch: StepBatch) -> list[torch.Tensor | None]:
    """The attention mask of each decode group, then of each chunk (None: plainly causal), built once a step."""
    masks: list[torch.Tensor | None] = []
    for group in batch.groups:
        masks.append(decode_mask(batch.positions[group.query_start : group.query_start + group.stop - group.start], group.used))
    for chunk in batch.chunks:
        masks.append(None if chunk.start == 0 else chunk_mask(chunk.start, chunk.length, batch.positions.device))
    return masks


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    batch: StepBatch,
    masks: list[torch.Tensor | None],
    scaling: float,
) -> torch.Tensor:
    """Attention of every token of a step over its own slot's cached keys (its new key already written)."""
    # query: [N, H, D]; keys, values: [slots, Hkv, capacity, D]; masks: step_masks(batch) -> [N, H * D]
    tokens, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    outputs = []
    grouped = query[: batch.decode_tokens].view(batch.decode_tokens, kv_heads, heads // kv_heads, head_dim)
    for group, mask in zip(batch.groups, masks):
        count = group.stop - group.start
        attended = grouped_attention(
            grouped[group.query_start : group.query_start + count],
            keys[group.start : group.stop, :, : group.used],
            values[group.start : group.stop, :, : group.used],
            mask,
            scaling,
        )  # [count, Hkv, G, D]
        outputs.append(attended.reshape(count, heads * head_dim))
    for chunk, mask in zip(batch.chunks, masks[len(batch.groups) :]):
        seen = chunk.start + chunk.length
        attended = F.scaled_dot_product_attention(
            query[chunk.offset : chunk.offset + chunk.length].transpose(0, 1)[None],  # [1, H, L, D]
            keys[chunk.row : chunk.row + 1, :, :seen],
            values[chunk.row : chunk.row + 1, :, :seen],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=True,
        )  # [1, H, L, D]
        outputs.append(attended[0].transpose(0, 1).reshape(chunk.length, heads * head_dim))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def forward_step(
    parts: DecoderParts, keys: list[torch.Tensor], values: list[torch.Tensor], batch: StepBatch
) -> torch.Tensor:
    """One step over a packed sequence of decode tokens and prefill chunks (step_plan.StepBatch).

    Every token's key and value are written into its slot's row of the cache; the step returns the logits of
    the tokens in `batch.logit_index` only, so a chunk that does not end its prompt costs no LM head.
    """
    # keys[layer], values[layer]: [slots, Hkv, capacity, D] -> logits [K, V]
    tokens = batch.input_ids.shape[0]
    heads, kv_heads, head_dim = parts.heads, parts.kv_heads, parts.head_dim
    slots, _, capacity, _ = keys[0].shape
    flat = (slots * kv_heads * capacity, head_dim)
    index = cache_index(batch.rows, batch.positions, kv_heads, capacity)  # [N * Hkv]
    hidden = parts.embed(batch.input_ids)  # [N, hidden]
    cos, sin = parts.rotary(hidden, batch.positions[None])  # [1, N, D]
    cos, sin = cos[0, :, None], sin[0, :, None]  # [N, 1, D]
    masks = step_masks(batch)
    for layer_index, layer in enumerate(parts.layers):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = rotate(attention.q_proj(normed).view(tokens, heads, head_dim), cos, sin)  # [N, H, D]
        key = rotate(attention.k_proj(normed).view(tokens, kv_heads, head_dim), cos, sin)  # [N, Hkv, D]
        value = attention.v_proj(normed).view(tokens, kv_heads, head_dim)
        layer_keys, layer_values = keys[layer_index], values[layer_index]
        layer_keys.view(flat).index_copy_(0, index, key.reshape(-1, head_dim).to(layer_keys.dtype))
        layer_values.view(flat).index_copy_(0, index, value.reshape(-1, head_dim).to(layer_values.dtype))
        attended = attend(query, layer_keys, layer_values, batch, masks, parts.scaling)  # [N, H * D]
        hidden = hidden + attention.o_proj(attended.to(hidden.dtype))
        hidden = feed_forward(layer, hidden)
    return parts.lm_head(parts.norm(hidden[batch.logit_index]))  # [K, V]
