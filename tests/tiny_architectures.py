"""Tiny random-weight models of the architectures shardgen accepts, built on the fly from transformers' config
classes, with the default model's tokenizer (so the vocabulary matches it).

The weights are drawn wider than transformers' default (initializer_range 0.3, not 0.02): with the default, a
tiny model's next token depends almost only on the current one and greedy output repeats two or three tokens,
so an attention bug (a slot attending to positions it should not) would not change a single token. Gemma 2 is
the exception: its embedding scale and logit soft-capping make wide weights saturate, so it keeps the default."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

HIDDEN = 32
LAYERS = 2
HEADS = 4
INIT_RANGE = 0.3
INIT_RANGE_OF = {"gemma2": 0.02}


def _rope_decoder(hidden: int, **extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
    )


def _configs(hidden: int = HIDDEN) -> dict[str, Callable[[dict[str, Any]], Any]]:
    import transformers as tf

    return {
        "llama": lambda common: tf.LlamaConfig(**common, **_rope_decoder(hidden)),
        "mistral": lambda common: tf.MistralConfig(**common, **_rope_decoder(hidden)),
        # a window shorter than the prompts: only exact if every path honours it
        "mistral-window": lambda common: tf.MistralConfig(**common, **_rope_decoder(hidden, sliding_window=16)),
        "qwen2": lambda common: tf.Qwen2Config(**common, **_rope_decoder(hidden)),
        "phi3": lambda common: tf.Phi3Config(**common, **_rope_decoder(hidden)),
        "gemma2": lambda common: tf.Gemma2Config(**common, **_rope_decoder(hidden, head_dim=hidden // HEADS)),
        "falcon": lambda common: tf.FalconConfig(
            **common, hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_kv_heads=2,
            new_decoder_architecture=True,
        ),
        "falcon-7b-layout": lambda common: tf.FalconConfig(
            **common, hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            new_decoder_architecture=False, multi_query=True, parallel_attn=True,
        ),
        "gpt2": lambda common: tf.GPT2Config(**common, n_embd=hidden, n_layer=LAYERS, n_head=HEADS, n_positions=256),
        "gpt_neox": lambda common: tf.GPTNeoXConfig(
            **common, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=256,
        ),
    }


ARCHITECTURES = (
    "llama", "mistral", "mistral-window", "qwen2", "phi3", "gemma2", "falcon", "falcon-7b-layout", "gpt2", "gpt_neox",
)


def build_architecture(name: str, target: Path, *, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """Save a tiny random model of architecture `name` and the default tokenizer into `target`. vLLM's CPU
    attention needs heads of 32 dimensions or more: hidden=128 gives them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardgen.workers.models.default_model import default_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint())
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=INIT_RANGE_OF.get(name, INIT_RANGE),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs(hidden)[name](common))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
