"""`shardgen quantize`: calibrate GPTQ on a dataset (or the built-in sample) and write a checkpoint that
`--model DIR` then serves."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from shardgen.schemas.errors import InvalidParameter, ModelError
from shardgen.schemas.model import GPTQ_BITS, ModelSpec

from .command_support import one_line_errors, quiet_libraries

console = Console(stderr=True)


@click.command("quantize")
@click.argument("model")
@click.option("--method", type=click.Choice(["gptq"]), default="gptq", show_default=True,
              help="Calibrated quantization method (bitsandbytes methods need no checkpoint: use --quantize).")
@click.option("--bits", type=click.Choice([str(b) for b in GPTQ_BITS]), default="4", show_default=True,
              help="Bits per weight.")
@click.option("--group-size", type=int,
              help="Columns sharing one scale; -1: one per row [default: 128, or the largest power of two that "
                   "divides every layer's input width].")
@click.option("--dataset",
              help="Calibration data: a .jsonl/.csv/.parquet file, a save_to_disk directory or a hub name "
                   "[default: shardgen's built-in sample of Python documentation prose; data from your own "
                   "domain calibrates better].")
@click.option("--text-column", help="Column of text to calibrate on [default: text, content, prompt, ...].")
@click.option("--samples", type=int, default=128, show_default=True, help="Rows sampled (seed 0) from the dataset.")
@click.option("--max-tokens", type=int, default=512, show_default=True,
              help="Tokens kept per calibration row; fewer make calibration on CPU faster.")
@click.option("--damp-percent", type=float, default=0.01, show_default=True,
              help="Dampening added to the Hessian diagonal, as a fraction of its mean.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or cuda:N to calibrate on.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--hf-token", envvar="HF_TOKEN", show_envvar=True, help="Hugging Face token for private hub models.")
@one_line_errors
def quantize(model: str, method: str, bits: str, group_size: int | None, dataset: str | None,
             text_column: str | None, samples: int, max_tokens: int, damp_percent: float, device: str,
             output: str, overwrite: bool, hf_token: str | None) -> None:
    """Quantize MODEL with GPTQ, calibrated on a sample of DATASET rows, into a compressed-tensors checkpoint.

    Bits 2, 3, 4 and 8 all work. Without --dataset, calibration uses the sample shipped with shardgen.

    The checkpoint loads on cpu and cuda (`shardgen run INPUT --model OUTPUT`) and in vLLM.
    """
    from shardgen.workers import quantization
    from shardgen.workers import check_device, resolve_model

    fields = {"bits": int(bits), "samples": samples, "damp_percent": damp_percent}
    given = (("dataset", dataset), ("group_size", group_size), ("text_column", text_column))
    fields.update({k: v for k, v in given if v is not None})
    spec = ModelSpec(model=model, quantize=method, quantization_config=fields)
    if max_tokens < 1:
        raise InvalidParameter(f"--max-tokens must be >= 1, got {max_tokens}")
    target = Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ModelError(f"output directory {target} exists and is not empty", "pass a new directory or --overwrite")
    device = check_device(device)
    quiet_libraries()
    source = resolve_model(model).source
    already = quantization.checkpoint_quant_method(source, token=hf_token)
    if already is not None:
        raise ModelError(f"{model} is already quantized ({already})", "quantize the original, unquantized checkpoint")
    texts = quantization.calibration_texts(dataset, text_column, samples)
    if dataset is None:
        sample = f"{len(texts)} paragraphs of {quantization.BUILTIN_SAMPLE_NAME}"
        console.print(f"calibrating GPTQ {bits}-bit on {sample} ({device}); {quantization.DOMAIN_NOTE}",
                      highlight=False)
    else:
        console.print(f"calibrating GPTQ {bits}-bit on {len(texts)} rows of {dataset} ({device})")
    with Progress(TextColumn("layers"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("gptq", total=None)
        result = quantization.gptq_quantize_model(
            source, target, texts, quantization.GptqSettings.from_config(spec.quantization_config), device,
            progress=lambda done, total: progress.update(task, completed=done, total=total), token=hf_token,
            max_tokens=max_tokens,
        )
    group = "one per row" if result.group_size == -1 else str(result.group_size)
    console.print(
        f"wrote {result.output}: GPTQ {result.bits}-bit, group size {group}, {result.samples} samples, "
        f"{result.layers} layers in {result.seconds:.0f}s; serve it with `shardgen run INPUT --model {result.output}`",
        highlight=False,
    )
