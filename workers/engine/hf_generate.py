"""Plain transformers `generate` in static batches: the baseline the engine is measured against, and the
path for beam search. Left padding, input order, one batch at a time."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from shardgen.schemas.sampling import SamplingParams

from ..generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationCancelled,
    GenerationOutput,
    GenerationRequest,
    OnOutput,
    Sample,
)
from ..models.loader import LoadedModel
from .stop import truncate_at_stop


class HFGenerate:
    name = "hf-generate"

    def __init__(self, loaded: LoadedModel, batch_size: int = 16):
        self.loaded = loaded
        self.batch_size = batch_size

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_output: OnOutput | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[GenerationOutput]:
        outputs: list[GenerationOutput] = []
        for start in range(0, len(requests), self.batch_size):
            if should_stop is not None and should_stop():
                raise GenerationCancelled(f"stopped with {len(requests) - start} requests unfinished")
            batch = requests[start : start + self.batch_size]
            for offset, output in enumerate(self._generate_batch(batch, params)):
                outputs.append(output)
                if on_output:
                    on_output(start + offset, output)
        return outputs

    def generation_kwargs(self, params: SamplingParams) -> dict:
        tokenizer = self.loaded.tokenizer
        eos = list(self.loaded.eos_token_ids) + list(params.stop_token_ids)
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            num_return_sequences=params.n,
            num_beams=params.num_beams,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None if params.ignore_eos else eos,
        )
        if params.max_length is not None:
            kwargs["max_length"] = params.max_length
        if params.num_beams > 1:
            kwargs.update(length_penalty=params.length_penalty, early_stopping=params.early_stopping)
        if not params.greedy:
            kwargs.update(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k or None,
                min_p=params.min_p or None,
            )
        return kwargs

    @torch.inference_mode()
    def _generate_batch(self, batch: Sequence[GenerationRequest], params: SamplingParams) -> list[GenerationOutput]:
        loaded = self.loaded
        width = max(len(r.prompt_ids) for r in batch)
        pad = loaded.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        torch.manual_seed(batch[0].seed)
        started = time.perf_counter()
        generated = loaded.model.generate(
            input_ids=input_ids.to(loaded.device),
            attention_mask=attention.to(loaded.device),
            **self.generation_kwargs(params),
        )
        elapsed = time.perf_counter() - started
        new_tokens = generated[:, width:].tolist()
        stop_ids = set(loaded.eos_token_ids) | set(params.stop_token_ids)
        outputs = []
        for i, request in enumerate(batch):
            samples = [
                self._sample(new_tokens[i * params.n + j], stop_ids, params) for j in range(params.n)
            ]
            outputs.append(GenerationOutput(samples, len(request.prompt_ids), elapsed))
        return outputs

    def _sample(self, tokens: list[int], stop_ids: set[int], params: SamplingParams) -> Sample:
        kept: list[int] = []
        finish = FINISH_LENGTH
        for token in tokens:
            if token in stop_ids and not params.ignore_eos:
                kept.append(token)
                finish = FINISH_STOP
                break
            kept.append(token)
        while kept and kept[-1] == self.loaded.tokenizer.pad_token_id and finish == FINISH_LENGTH:
            kept.pop()
        text = self.loaded.tokenizer.decode(kept, skip_special_tokens=True)
        text, hit = truncate_at_stop(text, params.stop)
        return Sample(text, kept, FINISH_STOP if hit else finish)
