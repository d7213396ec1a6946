"""The prompts the benchmarks run: chat questions of varied length (ragged), fixed-length raw text (equal)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TOPICS = [
    "the water cycle", "black holes", "the French revolution", "photosynthesis", "machine learning", "volcanoes",
    "the stock market", "honey bees", "the printing press", "climate change", "the human heart", "jazz music",
    "ancient Rome", "quantum computing", "coral reefs", "the Silk Road", "vaccines", "electric cars",
    "the Moon landing", "chess openings", "sourdough bread", "plate tectonics", "the Renaissance", "solar panels",
]
ASKS = [
    "What is {t}?", "Explain {t} to a ten-year-old.", "Give three facts about {t}.", "Why does {t} matter?",
    "Write a short poem about {t}.", "Summarize the history of {t} in a few sentences.",
    "What are common misconceptions about {t}?", "Compare {t} with {u}.", "Write a haiku about {t}.",
    "List the pros and cons of studying {t}.",
]
CONTEXT = [
    "I am preparing a lesson for my class next week.", "Keep the answer friendly and clear.",
    "My friend and I disagreed about this over dinner yesterday.", "Please avoid jargon where you can.",
    "I read an article about it but did not understand the details.", "Assume I know a little biology and physics.",
    "This is for a short presentation at work.", "Use an example from everyday life if possible.",
    "I have been curious about this since I was a child.", "Answer as if you were a patient teacher.",
    "My grandmother asked me and I could not answer.", "Mention one surprising detail.",
]
FILLER = "The quick brown fox jumps over the lazy dog while the curious cat watches from the old stone wall. "


PASSAGE_SHARE = 0.25
"""Share of ragged prompts that also carry a passage to read, the long tail of a real dataset's lengths."""


def ragged_prompts(tokenizer: Any, count: int, seed: int) -> list[list[int]]:
    """Chat prompts of varied length: a question about a topic after 0-10 sentences of context, and for one
    prompt in four a passage of notes before it. With the default model's chat template they run from about 35
    to 550 tokens, mean about 120, like the workload the engine's speed bar was set on."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        topic, other = rng.sample(TOPICS, 2)
        question = rng.choice(ASKS).format(t=topic, u=other)
        context = " ".join(rng.choice(CONTEXT) for _ in range(rng.choice([0, 0, 1, 2, 3, 5, 8, 10])))
        if rng.random() < PASSAGE_SHARE:
            notes = " ".join(rng.choice(CONTEXT + [FILLER.strip()]) for _ in range(rng.randint(10, 40)))
            context = f"My notes so far: {notes} {context}"
        messages = [{"role": "user", "content": f"{context} {question}".strip()}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def equal_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` different raw-text prompts of exactly `length` tokens."""
    ids = tokenizer(FILLER * (length // 8 + count), add_special_tokens=False)["input_ids"]
    return [ids[i : i + length] for i in range(count)]


def write_prompts(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            topic, other = rng.sample(TOPICS, 2)
            question = rng.choice(ASKS).format(t=topic, u=other)
            context = " ".join(rng.sample(CONTEXT, rng.randint(0, 3)))
            handle.write(json.dumps({"prompt": f"{context} {question}".strip()}) + "\n")
    return path


