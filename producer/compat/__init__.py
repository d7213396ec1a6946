"""Drop-in classes for code written against the inference classes shardgen replaces.

Each keeps its constructor and call signatures and runs on shardgen's `LLM` (or, for `Inferencer.run`, on the
embedded run machinery, so a long test set is sharded and resumable):

    Inference            finetuning_suite's Inference(model_id, device, max_length, quantize, quantization_config)
    GPTQInference        GPTQInference(model_id, quantization_config_bits, quantization_config_dataset, max_length)
    FalconInference      the Falcon text-generation pipeline call (max_length, top_k, num_return_sequences)
    Inferencer           a fine-tuning suite's TOML-driven Inferencer, with its ConfigManager and Evaluator
    Generator            Mini-LLM's Generator(checkpoint_path, tokenizer_path, device)

Only the import line changes: `from shardgen.compat import Inference`. The errors the suite's examples
catch, `ModelNotFoundError` and `OutOfMemoryError`, are shardgen's own (a ModelError; a ShardgenError that is
also a RuntimeError). docs/compat.md lists, for each class, what runs unchanged and what does not.
"""

from shardgen.schemas.errors import ModelNotFoundError, OutOfMemoryError

from .evaluator import Evaluator
from .falcon import FalconInference
from .generator import Generator
from .gptq_inference import GPTQInference
from .inference import Inference
from .inferencer import ConfigManager, Inferencer

__all__ = [
    "ConfigManager",
    "Evaluator",
    "FalconInference",
    "GPTQInference",
    "Generator",
    "Inference",
    "Inferencer",
    "ModelNotFoundError",
    "OutOfMemoryError",
]
