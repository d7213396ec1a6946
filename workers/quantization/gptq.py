"""GPTQ (Frantar et al., 2022, arXiv:2210.17323) in plain torch, so that it runs the same on CPU and CUDA.

Checkpoints are written in the compressed-tensors "pack-quantized" format (the format llm-compressor writes),
which transformers loads on any device and vLLM serves with int4 kernels. Takes texts; reads no dataset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from shardgen.schemas.errors import InvalidParameter, ModelError

from ..models.default_model import staged_directory

CALIBRATION_MAX_TOKENS = 512
DEFAULT_SAMPLES = 128
DEFAULT_DAMP_PERCENT = 0.01


@dataclass(frozen=True)
class GptqSettings:
    bits: int = 4
    group_size: int | None = None
    """None: 128 where it divides every layer's input width, else the largest power of two that does."""
    damp_percent: float = DEFAULT_DAMP_PERCENT

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "GptqSettings":
        return cls(config.get("bits", 4), config.get("group_size"), config.get("damp_percent", DEFAULT_DAMP_PERCENT))


# ---------------------------------------------------------------- GPTQ: the algorithm
def gptq_quantize_weight(
    weight: Any, hessian: Any, bits: int, group_size: int, damp_percent: float = DEFAULT_DAMP_PERCENT
) -> tuple[Any, Any]:
    """GPTQ on one weight matrix [out, in] with Hessian H = 2·XᵀX of its inputs [n, in].

    Columns are quantized left to right; each column's rounding error is spread over the columns not yet
    quantized, weighted by the inverse Hessian, so the layer's output on the calibration inputs moves least.
    Scales are symmetric, one per output row and group of `group_size` columns (-1: one group), computed when
    the group is reached, from the weights as updated so far. Returns (dequantized weight, scales [out, groups]).
    """
    import torch

    columns = weight.shape[1]
    group = columns if group_size == -1 else group_size
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    dead = torch.diag(H) == 0  # inputs never active in calibration: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp_percent * torch.mean(torch.diag(H)) * torch.eye(columns, device=H.device)
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scales = torch.empty(W.shape[0], columns // group, device=W.device)
    for start in range(0, columns, group):
        stop = start + group
        block = W[:, start:stop].clone()
        scale = _symmetric_scale(block, q_min, q_max, weight.dtype)
        scales[:, start // group] = scale[:, 0]
        errors = torch.zeros_like(block)
        H_block = H_inv[start:stop, start:stop]
        for i in range(group):
            column = block[:, i]
            quantized = torch.clamp(torch.round(column / scale[:, 0]), q_min, q_max) * scale[:, 0]
            error = (column - quantized) / H_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * H_block[i, i:].unsqueeze(0)
            block[:, i] = quantized
            errors[:, i] = error
        W[:, start:stop] = block
        W[:, stop:] -= errors @ H_inv[start:stop, stop:]
    return W.to(weight.dtype), scales.to(weight.dtype)


def _symmetric_scale(block: Any, q_min: int, q_max: int, dtype: Any) -> Any:
    """compressed-tensors' symmetric scale (max |w| over half the integer range), rounded to the weights' dtype
    so that packing with the stored scale gives back exactly the integers chosen here."""
    import torch

    largest = block.abs().amax(dim=1, keepdim=True)
    scale = largest / ((q_max - q_min) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(dtype).float()


class _LayerHessians:
    """H = 2/n · Σ xxᵀ over every input row x each Linear of a layer sees (a running mean, so samples may differ
    in length). Linears fed the same tensor (q, k and v; gate and up) share one Hessian, computed once."""

    def __init__(self, linears: Mapping[str, Any]):
        self.hessians: dict[str, Any] = {}
        self.rows: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self._last_input: Any = None
        self._last_owner = ""
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in linears.items()]

    def of(self, name: str) -> Any:
        return self.hessians[self.owner[name]]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last_input = None

    def _hook(self, name: str) -> Callable:
        def add(module: Any, inputs: tuple, output: Any) -> None:
            if inputs[0] is self._last_input:
                self.owner.setdefault(name, self._last_owner)
                return
            self._last_input, self._last_owner = inputs[0], name
            self.owner.setdefault(name, name)
            self._accumulate(name, inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float())

        return add

    def _accumulate(self, name: str, x: Any) -> None:
        import torch

        if name not in self.hessians:
            self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.rows[name] = 0
        before, self.rows[name] = self.rows[name], self.rows[name] + x.shape[0]
        self.hessians[name].addmm_(x.T, x, beta=before / self.rows[name], alpha=2 / self.rows[name])


class _StopForward(Exception):
    pass


# ---------------------------------------------------------------- GPTQ: over a whole model
@dataclass
class GptqResult:
    output: Path
    bits: int
    group_size: int
    samples: int
    layers: int
    seconds: float


def gptq_quantize_model(
    source: str, output: Path, texts: list[str], settings: GptqSettings = GptqSettings(), device: str = "cpu",
    progress: Callable[[int, int], None] | None = None, token: str | None = None,
    max_tokens: int = CALIBRATION_MAX_TOKENS,
) -> GptqResult:
    """Calibrate GPTQ on `texts` (each cut to `max_tokens`) and write a compressed-tensors checkpoint to `output`,
    atomically. Layer by layer: each layer is calibrated on what the already-quantized layers before it output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, token=token)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, token=token).to(device).eval()
    layers = _decoder_layers(model)
    group_size = choose_group_size(layers, settings.group_size)
    samples = [tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
               for text in texts]
    with torch.no_grad():
        inputs = _first_layer_inputs(model, layers[0], samples, device)
        quantized: dict[str, tuple[Any, Any]] = {}
        for index, layer in enumerate(layers):
            quantized.update(_quantize_layer(layer, inputs, settings, group_size, prefix=_module_name(model, layer)))
            inputs = [(_hidden(layer(hidden, *args, **kwargs)), args, kwargs) for hidden, args, kwargs in inputs]
            if progress:
                progress(index + 1, len(layers))
    _write_compressed_checkpoint(model, tokenizer, quantized, settings.bits, group_size, output)
    return GptqResult(output, settings.bits, group_size, len(samples), len(layers), time.perf_counter() - started)


def choose_group_size(layers: Any, requested: int | None) -> int:
    """The requested group size if it divides every Linear's input width; without one, the largest that does."""
    import torch

    widths = sorted({m.in_features for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)})
    fits = lambda size: size == -1 or all(width % size == 0 for width in widths)  # noqa: E731
    if requested is not None:
        if not fits(requested):
            best = choose_group_size(layers, None)
            raise InvalidParameter(
                f"group size {requested} does not divide the layer input widths {', '.join(map(str, widths))}",
                f"use --group-size {best}",
            )
        return requested
    return next((size for size in (128, 64, 32, 16) if fits(size)), -1)


def _decoder_layers(model: Any) -> Any:
    import torch

    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__} for GPTQ",
        "GPTQ here supports decoder-only models whose layers form one list (llama, mistral, qwen, gemma, phi, ...)",
    )


def _module_name(model: Any, module: Any) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _first_layer_inputs(model: Any, first_layer: Any, samples: list, device: str) -> list[tuple[Any, tuple, dict]]:
    """What the first decoder layer receives for each sample: (hidden states, other args, keyword args)."""
    captured: list[tuple[Any, tuple, dict]] = []

    def capture(module: Any, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if "hidden_states" in kwargs:
            captured.append((kwargs.pop("hidden_states"), args, kwargs))
        else:
            captured.append((args[0], args[1:], kwargs))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for sample in samples:
            try:
                model(**{k: v.to(device) for k, v in sample.items()}, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _quantize_layer(layer: Any, inputs: list, settings: GptqSettings, group_size: int, prefix: str) -> dict:
    import torch

    linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    hessians = _LayerHessians(linears)
    try:
        for hidden, args, kwargs in inputs:
            layer(hidden, *args, **kwargs)
    finally:
        hessians.remove()
    results = {}
    for name, module in linears.items():
        weight, scales = gptq_quantize_weight(
            module.weight, hessians.of(name), settings.bits, group_size, settings.damp_percent
        )
        module.weight.data.copy_(weight)  # later layers calibrate on what the quantized layer outputs
        results[f"{prefix}.{name}"] = (weight, scales)
    return results


def _hidden(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _write_compressed_checkpoint(
    model: Any, tokenizer: Any, quantized: Mapping[str, tuple[Any, Any]], bits: int, group_size: int, output: Path
) -> None:
    """Pack the GPTQ weights into compressed-tensors' pack-quantized format and save model and tokenizer."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, **strategy)
    unquantized = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in quantized]
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=unquantized,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config, show_progress=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (weight, scales) in quantized.items():
            module = modules[name]
            module.weight.copy_(weight)
            module.weight_scale.copy_(scales.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    with staged_directory(output) as staging:
        model.save_pretrained(staging)
        compressor.update_config(str(staging))
        tokenizer.save_pretrained(staging)
