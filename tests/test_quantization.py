"""Quantization: config parsing, refusals before loading, GGUF caching, GPTQ (algorithm, checkpoint, loading),
bitsandbytes methods on the real model, and bench-quant."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shardgen.producer.bench.quant import bench_quant, method_specs
from shardgen.producer.config import build_run_spec, load_config, merge
from shardgen.producer.quantize import quantize
from shardgen.schemas.errors import InputError, InvalidParameter, ModelError
from shardgen.schemas.model import ModelSpec
from shardgen.workers import quantization
from shardgen.workers.models.loader import load_model, resolve_model
from tests.conftest import run_cli, write_jsonl
from tests.tiny_model import build_tiny_model

CALIBRATION_TEXTS = [
    "The river slowed as it reached the plain, and the farmers watched the water rise over the fields.",
    "Merchants carried salt, cloth and iron along the old road between the two market towns.",
    "In the library the children read about distant cities and the machines that built them.",
    "A storm came in from the sea and broke the fences that had stood for twenty years.",
]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny128_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model with hidden size 128, so GPTQ groups of 128 fit every layer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny128") / "model", hidden=128)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"id": i, "body": CALIBRATION_TEXTS[i % 4] + " " + CALIBRATION_TEXTS[(i + 1) % 4]} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", rows)


@pytest.fixture(scope="module")
def gptq_dir(tiny128_dir: Path, calibration_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written by `shardgen quantize` from the tiny model."""
    output = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    result = CliRunner().invoke(
        quantize,
        [str(tiny128_dir), "--method", "gptq", "--bits", "4", "--dataset", str(calibration_file),
         "--text-column", "body", "--samples", "12", "-o", str(output)],
    )
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture()
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SHARDGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- config and spec
def test_toml_table_takes_gptq_fields_and_json_flag_overrides_field_by_field(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('input = "d.jsonl"\n[quantization_config]\nbits = 4\ngroup_size = 64\ndataset = "calib.jsonl"\n')
    merged = merge(load_config(path), {"quantization_config": '{"group_size": 32, "samples": 16}'})
    model = build_run_spec(merged).model
    assert model.quantize == "gptq" and "@gptq+" in model.queue  # the config's digest follows
    assert dict(model.quantization_config) == {"bits": 4, "group_size": 32, "dataset": "calib.jsonl", "samples": 16}


def test_json_flag_with_bitsandbytes_fields_implies_the_method():
    flag = '{"load_in_4bit": true, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": true}'
    model = build_run_spec(merge({"input": "d.jsonl"}, {"quantization_config": flag})).model
    assert model.quantize == "fp4" and model.quantization_config["bnb_4bit_use_double_quant"] is True


@pytest.mark.parametrize(
    "flag, fragment",
    [("{bits: 4}", "--quantization-config is not valid JSON"), ("[4]", "--quantization-config must be a JSON object")],
)
def test_malformed_quantization_config_flag_is_refused(flag, fragment):
    with pytest.raises(InvalidParameter, match=fragment) as info:
        merge({}, {"quantization_config": flag})
    assert "load_in_4bit" in info.value.hint


@pytest.mark.parametrize(
    "quantize, config, fragment",
    [
        ("int8", {"bits": 4}, "bits do not apply to quantize=int8"),
        ("gptq", {"load_in_4bit": True}, "load_in_4bit do not apply to quantize=gptq"),
        ("awq", {"group_size": 128}, "group_size do not apply to quantize=awq"),
        ("gptq", {"bits": 5}, "GPTQ bits must be one of 2, 3, 4, 8"),
        ("gptq", {"group_size": 100}, "GPTQ group_size must be a power of two or -1"),
        ("gptq", {"samples": 0}, "GPTQ samples must be >= 1"),
        ("gptq", {"bits": "4"}, "quantization_config.bits must be int"),
    ],
)
def test_quantization_fields_must_fit_the_method(quantize, config, fragment):
    with pytest.raises(InvalidParameter, match=fragment):
        ModelSpec(quantize=quantize, quantization_config=config)


def test_auto_means_as_the_checkpoint_says():
    assert ModelSpec(quantize="auto").quantize == "none"
    assert ModelSpec(quantize="awq").slug == "smollm2-135m@awq"


# ---------------------------------------------------------------- refusals before loading
def test_awq_on_cpu_is_refused_before_the_model_is_even_resolved():
    with pytest.raises(ModelError) as info:
        load_model(ModelSpec(model="/no/such/model", quantize="awq"), "cpu")
    assert "AWQ runs only on CUDA" in info.value.message
    assert "--quantize nf4, fp4 or int8" in info.value.hint


def test_cli_prints_the_awq_refusal_as_one_line_and_exits_2(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi"}])
    result = run_cli("run", str(data), "--quantize", "awq", "--device", "cpu", "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: AWQ runs only on CUDA"), result.stderr
    assert "Traceback" not in result.stderr


def test_builtin_calibration_sample_ships_in_the_package_and_names_its_source_and_licence():
    import tomllib

    texts = quantization.builtin_calibration_texts()
    assert len(texts) == 128 and all(len(t) > 150 and "\n" not in t and not t.startswith("#") for t in texts)
    assert quantization.builtin_calibration_texts(5) == texts[:5]
    header = quantization.BUILTIN_SAMPLE.read_text().splitlines()[:5]
    assert all(line.startswith("# ") for line in header)
    assert "Python Software Foundation" in " ".join(header) and "PSF License Agreement" in " ".join(header)
    data = quantization.BUILTIN_SAMPLE.parent
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (data / "PSF-LICENSE.txt").read_text()
    assert "pydoc_data/topics.py" in (data / "README.md").read_text()
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["shardgen.workers.quantization"]
    assert {"data/*.txt", "data/*.md"} <= set(shipped)  # so an installed wheel has the sample and its licence
    with pytest.raises(InputError, match="names a column of a calibration dataset, and none is given"):
        quantization.calibration_texts(None, "body")


def test_gptq_on_a_plain_model_without_a_dataset_calibrates_on_the_builtin_sample(
    tiny128_dir, calibration_file, isolated_cache, caplog, monkeypatch
):
    spec = ModelSpec(model=str(tiny128_dir), quantize="gptq", quantization_config={"samples": 4})
    loaded = load_model(spec, "cpu")
    assert loaded.info["checkpoint_quantization"] == "compressed-tensors"
    assert "calibrating GPTQ on shardgen's built-in sample" in caplog.text and "own domain calibrates better" in caplog.text
    with_data = ModelSpec(model=str(tiny128_dir), quantize="gptq",
                          quantization_config={"samples": 4, "dataset": str(calibration_file), "text_column": "body"})
    assert load_model(with_data, "cpu").source != loaded.source  # each calibration is cached under its own data
    assert load_model(spec, "cpu").source == loaded.source  # made once

    changed = isolated_cache.parent / "calibration.txt"  # a later shardgen shipping another sample recalibrates
    changed.write_text(quantization.BUILTIN_SAMPLE.read_text().replace("A Python program", "A program", 1))
    monkeypatch.setattr(quantization.calibration, "BUILTIN_SAMPLE", changed)
    assert load_model(spec, "cpu").source != loaded.source


def test_gptq_format_checkpoint_without_gptqmodel_names_what_would_work(tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "gptq-format"
    checkpoint.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (checkpoint / "config.json").write_text(json.dumps(config))
    if importlib.util.find_spec("gptqmodel") is not None:
        pytest.fail("gptqmodel is installed here: this test checks the refusal where it is not", pytrace=False)
    with pytest.raises(ModelError, match="is a gptq checkpoint, which transformers loads only with gptqmodel") as info:
        load_model(ModelSpec(model=str(checkpoint)), "cpu")
    assert "shardgen quantize" in info.value.hint


# ---------------------------------------------------------------- GGUF
def test_gguf_cache_dir_follows_path_size_and_mtime(tmp_path, isolated_cache):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 12)
    first = quantization.gguf_cache_dir(gguf)
    assert first.parent == isolated_cache / "models" and first.name.startswith("gguf-")
    assert quantization.gguf_cache_dir(gguf) == first
    os.utime(gguf, ns=(1, 1_000_000_000))
    touched = quantization.gguf_cache_dir(gguf)
    gguf.write_bytes(b"GGUF" + b"\0" * 20)
    os.utime(gguf, ns=(1, 1_000_000_000))
    assert len({first, touched, quantization.gguf_cache_dir(gguf)}) == 3


def test_unreadable_gguf_is_one_clear_error(tmp_path, isolated_cache):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="cannot convert GGUF file .*broken.gguf") as info:
        resolve_model(str(gguf))
    assert "checkpoint directory" in info.value.hint


@pytest.mark.real_model
def test_gguf_file_is_converted_once_and_then_served_from_the_cache(isolated_cache):
    from shardgen.workers.models.default_model import bundled_gguf, default_checkpoint

    first = resolve_model(str(bundled_gguf()))
    again = resolve_model(str(bundled_gguf()))
    assert first.source == again.source and Path(first.source).parent == isolated_cache / "models"
    assert first.note and "converted" in first.note and again.note is None
    converted = json.loads((Path(first.source) / "config.json").read_text())
    reference = json.loads((default_checkpoint() / "config.json").read_text())
    assert (converted["num_hidden_layers"], converted["hidden_size"]) == (reference["num_hidden_layers"], reference["hidden_size"])
    assert "quantization_config" not in converted


# ---------------------------------------------------------------- GPTQ: algorithm
def _correlated_inputs(rows: int, columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(columns, columns, generator=generator)
    return torch.randn(rows, columns, generator=generator) @ mixing


def _on_4bit_grid(levels: torch.Tensor) -> bool:
    """Weights divided by their scales are the signed 4-bit integers -8..7."""
    integers = levels.round()
    return torch.allclose(levels, integers, atol=1e-3) and integers.min() >= -8 and integers.max() <= 7


def test_gptq_beats_round_to_nearest_on_the_calibration_inputs():
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    inputs = _correlated_inputs(512, 64)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    quantized, scales = quantization.gptq_quantize_weight(weight, hessian, bits=4, group_size=32)
    assert scales.shape == (32, 2)
    levels = quantized.reshape(32, 2, 32) / scales.unsqueeze(-1)
    assert _on_4bit_grid(levels)
    rtn_scales = weight.reshape(32, 2, 32).abs().amax(-1, keepdim=True) / 7.5
    rtn = (torch.clamp(torch.round(weight.reshape(32, 2, 32) / rtn_scales), -8, 7) * rtn_scales).reshape(32, 64)
    gptq_error = ((weight - quantized) @ inputs.T).norm()
    rtn_error = ((weight - rtn) @ inputs.T).norm()
    assert gptq_error < 0.8 * rtn_error


def test_group_size_must_divide_every_layer_width():
    layers = torch.nn.ModuleList([torch.nn.Linear(576, 8), torch.nn.Linear(1536, 8)])
    assert quantization.choose_group_size(layers, None) == 64
    assert quantization.choose_group_size(layers, -1) == -1
    with pytest.raises(InvalidParameter, match="group size 128 does not divide the layer input widths 576, 1536") as info:
        quantization.choose_group_size(layers, 128)
    assert info.value.hint == "use --group-size 64"


def test_calibration_texts_need_a_text_column(calibration_file):
    with pytest.raises(InputError, match="has no text column .* pick one of id, body"):
        quantization.calibration_texts(str(calibration_file))
    texts = quantization.calibration_texts(str(calibration_file), "body", samples=5)
    assert len(texts) == 5 and all(isinstance(t, str) and t for t in texts)
    assert texts == quantization.calibration_texts(str(calibration_file), "body", samples=5)


# ---------------------------------------------------------------- GPTQ: checkpoint made by `shardgen quantize`
def test_quantize_writes_a_compressed_tensors_checkpoint_that_loads_and_generates(gptq_dir, tiny128_dir):
    quant = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 128, "group")

    loaded = load_model(ModelSpec(model=str(gptq_dir), quantize="gptq"), "cpu")
    plain = load_model(ModelSpec(model=str(tiny128_dir)), "cpu")
    assert loaded.info["checkpoint_quantization"] == "compressed-tensors"
    assert loaded.footprint_bytes < plain.footprint_bytes
    prompt = loaded.tokenizer("The river", return_tensors="pt")
    with torch.no_grad():
        generated = loaded.model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 4

    # After the first forward the weights are unpacked: each must sit on its group's 4-bit grid.
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    levels = q_proj.weight / q_proj.weight_scale
    assert _on_4bit_grid(levels)
    original = plain.model.model.layers[0].self_attn.q_proj.weight
    assert 0 < (q_proj.weight - original).norm() / original.norm() < 0.3


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_quantize_without_a_dataset_makes_each_bit_width_on_its_grid(bits, tiny128_dir, tmp_path):
    output = tmp_path / f"gptq-{bits}"
    result = CliRunner().invoke(quantize, [str(tiny128_dir), "--bits", str(bits), "--samples", "6", "-o", str(output)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "6 paragraphs of shardgen's built-in sample" in said and "own domain calibrates better" in said
    quant = json.loads((output / "config.json").read_text())["quantization_config"]
    assert quant["config_groups"]["group_0"]["weights"]["num_bits"] == bits

    loaded = load_model(ModelSpec(model=str(output)), "cpu")
    prompt = loaded.tokenizer("The river", return_tensors="pt")
    with torch.no_grad():
        generated = loaded.model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 3
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    levels = q_proj.weight / q_proj.weight_scale
    integers = levels.round()
    assert torch.allclose(levels, integers, atol=1e-3)
    assert integers.min() >= -(2 ** (bits - 1)) and integers.max() <= 2 ** (bits - 1) - 1


def test_quantize_refuses_bits_it_cannot_make_naming_those_it_can(tiny128_dir, tmp_path):
    result = CliRunner().invoke(quantize, [str(tiny128_dir), "--bits", "5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "'5' is not one of '2', '3', '4', '8'" in result.output
    assert not (tmp_path / "out").exists()


def test_prequantized_checkpoint_refuses_a_second_quantization(gptq_dir):
    with pytest.raises(ModelError, match="already quantized \\(compressed-tensors\\)") as info:
        load_model(ModelSpec(model=str(gptq_dir), quantize="nf4"), "cpu")
    assert "drop --quantize" in info.value.hint


def test_quantize_refuses_a_nonempty_output_and_an_ill_fitting_group_size(tiny128_dir, calibration_file, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    runner = CliRunner()
    taken = runner.invoke(quantize, [str(tiny128_dir), "--dataset", str(calibration_file), "-o", str(tmp_path / "taken")])
    assert taken.exit_code == 2 and "is not empty: pass a new directory or --overwrite" in taken.output
    misfit = runner.invoke(quantize, [str(tiny128_dir), "--dataset", str(calibration_file), "--text-column", "body",
                                      "--group-size", "512", "-o", str(tmp_path / "new")])
    assert misfit.exit_code == 2 and "use --group-size 128" in misfit.output
    assert not (tmp_path / "new").exists()


def test_quantize_gptq_with_a_dataset_calibrates_once_at_load(tiny128_dir, calibration_file, isolated_cache):
    spec = ModelSpec(model=str(tiny128_dir), quantize="gptq",
                     quantization_config={"dataset": str(calibration_file), "text_column": "body", "samples": 6})
    first = load_model(spec, "cpu")
    cached = list((isolated_cache / "models").glob("gptq-*"))
    assert len(cached) == 1 and first.source == str(cached[0])
    mtime = (cached[0] / "config.json").stat().st_mtime_ns
    again = load_model(spec, "cpu")
    assert again.source == first.source and (cached[0] / "config.json").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- bench-quant
def test_bench_methods_need_a_gptq_checkpoint_for_gptq():
    with pytest.raises(InvalidParameter, match="--methods gptq needs --gptq-model DIR"):
        method_specs("m", ["none", "gptq"], None)
    labels = [label for label, _ in method_specs("m", ["none"], "/ckpt")]
    assert labels == ["none", "gptq"]


def test_bench_quant_reports_memory_speed_and_perplexity_per_method(tiny128_dir, gptq_dir):
    result = CliRunner().invoke(
        bench_quant,
        ["--model", str(tiny128_dir), "--methods", "none,int8,awq", "--gptq-model", str(gptq_dir), "--device", "cpu",
         "--batch-size", "2", "--max-new-tokens", "4", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["none", "int8", "awq", "gptq", "engine float32", "engine bfloat16", "engine int8"]
    assert rows["awq"]["error"].startswith("AWQ runs only on CUDA")
    for method in ("none", "int8", "gptq", "engine float32"):
        row = rows[method]
        assert row["error"] is None and row["tokens_per_s"] > 0 and 1 < row["perplexity"] < float("inf")
        assert 0 <= row["greedy_agreement"] <= 1
    assert rows["none"]["greedy_agreement"] == rows["engine float32"]["greedy_agreement"] == 1
    assert rows["int8"]["footprint_run_mb"] < rows["none"]["footprint_run_mb"]
    assert rows["gptq"]["footprint_load_mb"] < rows["none"]["footprint_load_mb"]
    for weights in ("bfloat16", "int8"):  # measured where the CPU has the instructions, said so where it has not
        row = rows[f"engine {weights}"]
        if weights in report["cpu_formats"]:
            assert row["error"] is None and 1 < row["perplexity"] < float("inf") and 0 <= row["greedy_agreement"] <= 1
            assert row["footprint_run_mb"] < rows["engine float32"]["footprint_run_mb"]
        else:
            assert "without instructions of its own" in row["error"]


# ---------------------------------------------------------------- bitsandbytes on the real model
@pytest.fixture(scope="module")
def fp32_footprint() -> int:
    return load_model(ModelSpec(), "cpu").footprint_bytes


def _greedy_answer(loaded, question: str, max_new_tokens: int = 8) -> str:
    from shardgen.producer.bench.quant import greedy_generate

    (tokens,) = greedy_generate(loaded, [question], max_new_tokens)
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["none", "nf4", "fp4", "int8"])
def test_each_cpu_method_answers_paris_within_less_memory(method, fp32_footprint):
    loaded = load_model(ModelSpec(quantize=method), "cpu")
    assert "Paris" in _greedy_answer(loaded, "What is the capital of France?")
    if method != "none":
        assert loaded.footprint_bytes < 0.5 * fp32_footprint
