"""The model runner: one engine step through the model, whatever its architecture.

A step is the tokens of every decoding slot (one each, in cache-row order) and chunks of prompts being
prefilled. Three forward paths compute it:
- llama-family decoders (Llama, Mistral without a window, Qwen2): the engine's own step (llama_step), one
  forward over the packed tokens, writing keys and values straight into the slot cache;
- the same compiled with torch.compile for decode-only steps (`--compile`), prompts beside it;
- any other architecture whose cache is plain keys and values: the model's own forward, decode tokens in one
  call over the slot cache (slot_attention), each prompt alone.
Architectures whose cache is neither (sliding windows, Gemma2's hybrid cache) have no runner: the engine serves
them through transformers' generate.
"""

from __future__ import annotations

from typing import Any

import torch

from .kv_cache import SlotCache
from .llama_step import DecoderParts, forward_step, unsupported_reason
from .memory import CacheLayout
from .slot_attention import register_slot_attention
from .step_plan import DecodeToken, PrefillChunk, plan_step


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, *, compile: bool = False):
        self.model = model
        self.device = device
        self.parts = DecoderParts.of(model) if unsupported_reason(model) is None else None
        self.layout: CacheLayout | None = self.parts.cache_layout() if self.parts is not None else self._probe_layout()
        self.compiled_step = torch.compile(forward_step, dynamic=True) if compile and self.parts is not None else None

    @property
    def supported(self) -> bool:
        """Whether the engine can run this model over its slot cache (else transformers' generate serves it)."""
        return self.layout is not None

    @property
    def chunked_prefill(self) -> bool:
        """Whether prompts may be prefilled in chunks beside decode tokens (only the engine's own step can)."""
        return self.parts is not None

    def forward(self, cache: SlotCache, decode: list[DecodeToken], chunks: list[PrefillChunk]) -> torch.Tensor:
        """Logits after each decode token, then after each prompt the chunks complete."""
        # -> [len(decode) + sum(chunk.wants_logits), V]
        if self.parts is None:
            return self._model_forward_step(cache, decode, chunks)
        if self.compiled_step is not None and decode and chunks:  # the compiled step is decode-only
            return torch.cat([self._own_step(cache, decode, []), self._own_step(cache, [], chunks)])
        return self._own_step(cache, decode, chunks)

    def _own_step(self, cache: SlotCache, decode: list[DecodeToken], chunks: list[PrefillChunk]) -> torch.Tensor:
        compiled = self.compiled_step is not None and not chunks
        batch = plan_step(decode, chunks, self.device, split_groups=not compiled)
        step = self.compiled_step if compiled else forward_step
        return step(self.parts, cache.keys, cache.values, batch)

    def _model_forward_step(self, cache: SlotCache, decode: list[DecodeToken], chunks: list[PrefillChunk]) -> torch.Tensor:
        """Decode tokens (always the first rows here, as prompts are prefilled whole) in one call, then each prompt
        alone, through the model's own forward (after its cached prefix, if the prefix cache gave it one)."""
        logits = []
        if decode:
            assert [token.row for token in decode] == list(range(len(decode))), "decoding rows must come first"
            logits.append(self._model_decode(cache, decode))
        for chunk in chunks:
            out = self.model(input_ids=torch.tensor([chunk.token_ids], device=self.device),
                             past_key_values=_prefix_of_row(cache, chunk.row, chunk.start), use_cache=True,
                             logits_to_keep=1)
            layers = out.past_key_values.layers
            cache.write_prompt(chunk.row, [layer.keys for layer in layers], [layer.values for layer in layers])
            logits.append(out.logits[:, -1])
        return torch.cat(logits)

    def _model_decode(self, cache: SlotCache, decode: list[DecodeToken]) -> torch.Tensor:
        # -> logits [A, V]
        input_ids = torch.tensor([token.token for token in decode], device=self.device)  # [A]
        positions = torch.tensor([token.position for token in decode], device=self.device)  # [A]
        used = int(positions.max()) + 1
        # mask: [A, 1, 1, used], True where a key is at or before the slot's own position
        mask = (torch.arange(used, device=self.device) <= positions[:, None])[:, None, None, :]
        config = self.model.config
        default_attention = config._attn_implementation
        if getattr(type(self.model), "_supports_attention_backend", False):
            config._attn_implementation = register_slot_attention()
        else:  # attention written inline (Falcon) adds the mask to its scores: 0 where attended, -inf beyond
            dtype = self.model.get_output_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)
        try:
            out = self.model(
                input_ids=input_ids[:, None],
                attention_mask=mask,
                position_ids=positions[:, None],
                past_key_values=cache.step_view(positions, used),
                use_cache=True,
            )
        finally:
            config._attn_implementation = default_attention
        return out.logits[:, -1]

    @torch.inference_mode()
    def _probe_layout(self) -> CacheLayout | None:
        """The cache layout of a model the engine has no step of its own for, read off one token's forward; None
        if some layer's cache is not a plain keys-and-values one."""
        out = self.model(input_ids=torch.tensor([[0]], device=self.device), use_cache=True)
        layers: Any = getattr(out.past_key_values, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None
        keys = layers[0].keys  # [1, kv_heads, 1, head_dim]
        if any(layer.keys.shape != keys.shape for layer in layers):
            return None
        return CacheLayout(len(layers), keys.shape[1], keys.shape[3], keys.dtype)


def _prefix_of_row(cache: SlotCache, row: int, length: int) -> Any:
    """The first `length` positions of a cache row as transformers' DynamicCache (None when there are none)."""
    if length == 0:
        return None
    from transformers import DynamicCache

    prefix = DynamicCache()
    for layer, (keys, values) in enumerate(zip(cache.keys, cache.values)):
        prefix.update(keys[row : row + 1, :, :length].clone(), values[row : row + 1, :, :length].clone(), layer)
    return prefix
