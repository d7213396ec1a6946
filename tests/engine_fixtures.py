"""Fixtures shared by the engine, API and bench tests; test modules import them by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardgen.schemas.model import ModelSpec
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path):
    from shardgen.workers.model_loader import load_model

    return load_model(ModelSpec(model=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="session")
def real_loaded():
    from shardgen.workers.model_loader import load_model

    return load_model(ModelSpec(), "cpu")


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
