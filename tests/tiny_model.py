"""A tiny random-weight llama model with the default model's tokenizer, built on the fly for fast tests."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(target: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shardgen.workers.models.default_model import default_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random weights rarely pick EOS; scale the logits up so samples differ clearly between seeds.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
