"""Quantization beyond on-the-fly bitsandbytes: pre-quantized checkpoints, GGUF files, and GPTQ calibration."""

from .calibration import (
    BUILTIN_SAMPLE,
    BUILTIN_SAMPLE_NAME,
    DOMAIN_NOTE,
    builtin_calibration_texts,
    calibrated_checkpoint,
    calibration_texts,
)
from .checkpoint import check_checkpoint_fits, checkpoint_quant_method, refuse_unrunnable_method
from .gguf import gguf_cache_dir, gguf_checkpoint
from .gptq import GptqResult, GptqSettings, choose_group_size, gptq_quantize_model, gptq_quantize_weight

__all__ = [
    "BUILTIN_SAMPLE",
    "BUILTIN_SAMPLE_NAME",
    "DOMAIN_NOTE",
    "GptqResult",
    "GptqSettings",
    "builtin_calibration_texts",
    "calibrated_checkpoint",
    "calibration_texts",
    "check_checkpoint_fits",
    "checkpoint_quant_method",
    "choose_group_size",
    "gguf_cache_dir",
    "gguf_checkpoint",
    "gptq_quantize_model",
    "gptq_quantize_weight",
    "refuse_unrunnable_method",
]
