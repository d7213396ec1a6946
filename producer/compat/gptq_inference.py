"""finetuning_suite's `GPTQInference`: a model quantized with GPTQ, calibrated on a dataset.

    engine = GPTQInference("my-model", quantization_config_bits=4, quantization_config_dataset="calib.jsonl")
    text = engine.generate("Once upon a time")
"""

from __future__ import annotations

from typing import Any

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.model import GPTQ_BITS
from shardgen.workers.api import LLM

from .texts import SAMPLED_LIKE_GENERATE, complete, length_limit


class GPTQInference:
    """Maps onto shardgen's `--quantize gptq`: a plain model is calibrated once with
    `quantization_config_bits` (2, 3, 4 or 8) and the checkpoint cached; a GPTQ checkpoint loads as it is (its
    own bits stand).

    The dataset is a file (JSONL, CSV, Parquet), a `save_to_disk` directory or a hub dataset with a text
    column, as `shardgen quantize --dataset` takes. Without one, calibration uses the sample shipped with
    shardgen (transformers fell back to a public calibration set, which needs the hub); a dataset from the
    model's own domain calibrates better."""

    def __init__(
        self,
        model_id: str,
        quantization_config_bits: int = 4,
        quantization_config_dataset: str | None = None,
        max_length: int = 500,
        **options: Any,
    ):
        if quantization_config_bits not in GPTQ_BITS:
            allowed = ", ".join(map(str, GPTQ_BITS))
            bits = quantization_config_bits
            raise InvalidParameter(f"quantization_config_bits must be one of {allowed}, got {bits!r}")
        self.model_id = model_id
        self.quantization_config_bits = quantization_config_bits
        self.quantization_config_dataset = quantization_config_dataset
        self.max_length = max_length
        calibration: dict[str, Any] = {}
        if not _already_quantized(model_id, options.get("hf_token")):
            calibration["bits"] = quantization_config_bits
        if quantization_config_dataset:  # on a GPTQ checkpoint this is refused in one line: it cannot apply
            calibration["dataset"] = quantization_config_dataset
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


def _already_quantized(model_id: str, hf_token: str | None) -> bool:
    """Whether `model_id` is a quantized checkpoint (then calibration bits do not apply to it)."""
    from shardgen.workers.models.loader import check_hub_reachable, resolve_model
    from shardgen.workers.quantization import checkpoint_quant_method

    resolved = resolve_model(model_id)
    if not resolved.local:
        check_hub_reachable(resolved.source, None, hf_token)  # one line in a second, not a minute of retries
    return checkpoint_quant_method(resolved.source, token=hf_token) is not None
