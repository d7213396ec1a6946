"""finetuning_suite's `Inference`: a causal LM behind `inference(prompt_text, max_length)`.

    inference = Inference(model_id="gpt2", max_length=50, quantize=True, quantization_config={...})
    text = inference("Once upon a time")            # prompt + continuation, like the original
"""

from __future__ import annotations

from typing import Any, Mapping

from shardgen.workers.api import LLM

from .texts import SAMPLED_LIKE_GENERATE, complete, length_limit

# The 4-bit config the original used when quantize=True came without one.
DEFAULT_4BIT = {
    "load_in_4bit": True,
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
}


class Inference:
    """Same signature as the original; generation runs on shardgen's engine.

    As in the original, the prompt is raw text (no chat template), sampled as `generate(do_sample=True)` would,
    and the result is the prompt followed by its continuation, at most `max_length` tokens in all. Extra keyword
    arguments go to `LLM` (e.g. `temperature=0` for greedy output, `seed=1`, `batch_size=8`)."""

    def __init__(
        self,
        model_id: str,
        device: str | None = None,
        max_length: int = 20,
        quantize: bool = False,
        quantization_config: Any = None,
        **options: Any,
    ):
        self.model_id = model_id
        self.max_length = max_length
        config = (quantization_config or DEFAULT_4BIT) if quantize else None
        self.llm = LLM(
            model_id,
            device=device,
            quantize=bnb_method(quantize, config),
            quantization_config=config,
            chat_template=False,
            **{**SAMPLED_LIKE_GENERATE, **options},
        )
        self.device = self.llm.loaded.device
        self.model = self.llm.loaded.model
        self.tokenizer = self.llm.tokenizer

    def __call__(self, prompt_text: str, max_length: int | None = None) -> str:
        return complete(self.llm, prompt_text, **length_limit(max_length or self.max_length))[0]

    run = __call__
    generate = __call__


def bnb_method(quantize: bool, config: Any) -> str | bool:
    """`quantize=True` means 4-bit unless the config itself says 4- or 8-bit (then the config decides)."""
    if not quantize:
        return "none"
    fields = config if isinstance(config, Mapping) else getattr(config, "to_dict", dict)()
    return "none" if fields.get("load_in_4bit") or fields.get("load_in_8bit") else True
