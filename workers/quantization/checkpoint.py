"""Which checkpoints a --quantize method can load, refused with one line before anything is read or loaded."""

from __future__ import annotations

import importlib.util
from typing import Mapping

from shardgen.schemas.errors import ModelError
from shardgen.schemas.model import BNB_METHODS, GPTQ_FIELDS, ModelSpec

# Packages transformers needs to load each checkpoint format (import names).
FORMAT_PACKAGES = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",), "compressed-tensors": ("compressed_tensors",)}
CPU_WORKS = "on cpu use --quantize nf4, fp4 or int8, or a GPTQ checkpoint made by `shardgen quantize`"


def checkpoint_quant_method(source: str, revision: str | None = None, token: str | None = None) -> str | None:
    """The `quant_method` in a checkpoint's config.json (gptq, awq, compressed-tensors, ...), None if plain."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source, revision=revision, token=token)
    except (OSError, ValueError):
        return None  # unreadable or unreachable: loading reports it with the full explanation
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping):
        return None
    return str(quant.get("quant_method", "unknown")).lower().replace("_", "-")


def refuse_unrunnable_method(spec: ModelSpec, device: str) -> None:
    """Refuse, before anything is read or loaded, a method the device cannot run."""
    if spec.quantize == "awq" and not device.startswith("cuda"):
        raise ModelError(f"AWQ runs only on CUDA (its kernels come from gptqmodel), not on {device}", CPU_WORKS)


def check_checkpoint_fits(spec: ModelSpec, checkpoint_method: str | None, device: str) -> None:
    """Refuse a --quantize that contradicts the checkpoint, or a checkpoint format this install cannot load."""
    if checkpoint_method is None:
        _check_plain_checkpoint(spec)
    else:
        _check_prequantized_checkpoint(spec, checkpoint_method, device)


def _check_plain_checkpoint(spec: ModelSpec) -> None:
    """A plain checkpoint loads as it is, quantized on the fly (bitsandbytes) or GPTQ-calibrated first."""
    if spec.quantize == "awq":
        raise ModelError(
            f"--quantize awq needs an AWQ checkpoint, and {spec.model} is not quantized",
            "pass an AWQ checkpoint (quant_method awq in its config.json), or use --quantize nf4 or int8",
        )


def _check_prequantized_checkpoint(spec: ModelSpec, checkpoint_method: str, device: str) -> None:
    name = spec.model
    if spec.quantize in BNB_METHODS:
        raise ModelError(
            f"{name} is already quantized ({checkpoint_method}) and cannot be quantized again with {spec.quantize}",
            "drop --quantize: a pre-quantized checkpoint loads as it is",
        )
    if any(key in GPTQ_FIELDS for key in spec.quantization_config):
        raise ModelError(
            f"{name} is already quantized ({checkpoint_method}); GPTQ calibration fields do not apply to it",
            "drop the bits/group_size/dataset fields from --quantization-config",
        )
    expected = {"gptq": ("gptq", "compressed-tensors"), "awq": ("awq",)}.get(spec.quantize)
    if expected and checkpoint_method not in expected:
        raise ModelError(
            f"--quantize {spec.quantize} does not match {name}, which is {checkpoint_method}-quantized",
            "pass --quantize none to load it as the checkpoint says",
        )
    if checkpoint_method == "awq" and not device.startswith("cuda"):
        raise ModelError(f"{name} is an AWQ checkpoint; AWQ runs only on CUDA, not on {device}", CPU_WORKS)
    _require_format_packages(name, checkpoint_method)


def _require_format_packages(name: str, checkpoint_method: str) -> None:
    missing = [pkg for pkg in FORMAT_PACKAGES.get(checkpoint_method, ()) if importlib.util.find_spec(pkg) is None]
    if not missing:
        return
    if checkpoint_method == "compressed-tensors":
        hint = "install it with `pip install compressed-tensors` (a pure-Python wheel)"
    else:
        hint = (
            f"install {' and '.join(missing)} on a CUDA host, or re-quantize the original model with "
            "`shardgen quantize MODEL --method gptq ...`, whose checkpoints load on cpu and cuda"
        )
    raise ModelError(f"{name} is a {checkpoint_method} checkpoint, which transformers loads only with {', '.join(missing)}", hint)
