"""finetuning_suite's `GPTQInference`: a model quantized with GPTQ, calibrated on a dataset.

    engine = GPTQInference("my-model", quantization_config_bits=4, quantization_config_dataset="calib.jsonl")
    text = engine.generate("Once upon a time")
"""

from __future__ import annotations

from typing import Any

from shardgen.workers.api import LLM

from .texts import SAMPLED_LIKE_GENERATE, complete, length_limit


class GPTQInference:
    """Maps onto shardgen's `--quantize gptq`: with a dataset, the model is calibrated once (`bits`) and the
    checkpoint cached; without one, `model_id` must already be a GPTQ checkpoint. The dataset is a file (JSONL,
    CSV, Parquet) or hub dataset with a text column, as `shardgen quantize --dataset` takes."""

    def __init__(
        self,
        model_id: str,
        quantization_config_bits: int = 4,
        quantization_config_dataset: str | None = None,
        max_length: int = 500,
        **options: Any,
    ):
        self.model_id = model_id
        self.quantization_config_bits = quantization_config_bits
        self.quantization_config_dataset = quantization_config_dataset
        self.max_length = max_length
        calibration = (
            {"bits": quantization_config_bits, "dataset": quantization_config_dataset}
            if quantization_config_dataset
            else {}
        )
        self.llm = LLM(
            model_id,
            quantize="gptq",
            quantization_config=calibration,
            chat_template=False,
            **{**SAMPLED_LIKE_GENERATE, **options},
        )
        self.device = self.llm.loaded.device
        self.model = self.llm.loaded.model
        self.tokenizer = self.llm.tokenizer

    def generate(self, prompt: str) -> str:
        return complete(self.llm, prompt, **length_limit(self.max_length))[0]
