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


INSTRUCTIONS = [
    "You label and answer questions for an educational dataset.",
    "Read the question carefully and answer it in one or two plain sentences.",
    "Do not repeat the question, do not greet the reader and do not add a closing remark.",
    "If the question asks for a list, give at most three items, separated by commas.",
    "If the question asks for a poem or a haiku, keep it under forty words and do not explain it.",
    "If the question compares two things, name one difference and one similarity.",
    "If a question is ambiguous, answer the most common reading of it and say nothing about the others.",
    "Use words a twelve-year-old knows; when a technical term is needed, explain it in a few words.",
    "Never invent numbers, dates or names; when you are not sure of a fact, leave it out.",
    "Prefer concrete examples from everyday life over abstract definitions.",
    "Write in the present tense unless the question is about history.",
    "Do not use lists, headings, bold text, emoji or any other formatting: plain sentences only.",
    "Keep a neutral, friendly tone, as a patient teacher would with a curious student.",
    "When the topic is a scientific process, name its cause and its effect.",
    "When the topic is a historical event, name when and where it happened, if you know it for certain.",
    "When the topic is a technology, say what problem it solves and what it costs.",
    "When the topic is a living thing, say where it lives and what it needs to survive.",
    "When the question asks why something matters, give one reason that concerns ordinary people.",
    "Summaries must stay under fifty words, whatever the length of the subject.",
    "Misconceptions must be stated first and then corrected, each in one sentence.",
    "Pros and cons come as one sentence of advantages followed by one sentence of drawbacks.",
    "Explanations for children avoid numbers larger than one hundred.",
    "Every answer ends with a full stop and contains no question of its own.",
    "These rules apply to every question in the dataset, whatever its topic.",
]
PREFIX_TOKENS = 400


def shared_prefix_prompts(tokenizer: Any, count: int, seed: int, prefix_tokens: int = PREFIX_TOKENS) -> list[list[int]]:
    """Short chat rows behind one shared system prompt of at least `prefix_tokens` tokens (instructions, as a
    dataset run gives every row): a question of about ten tokens each."""
    rng = random.Random(seed)
    rules: list[str] = []
    while len(tokenizer(" ".join(rules), add_special_tokens=False)["input_ids"]) < prefix_tokens:
        rules.append(INSTRUCTIONS[len(rules) % len(INSTRUCTIONS)])
    system = " ".join(rules)
    prompts = []
    for _ in range(count):
        topic, other = rng.sample(TOPICS, 2)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": rng.choice(ASKS).format(t=topic, u=other)}]
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


