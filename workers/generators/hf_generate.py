"""Plain transformers `generate` in static batches: the baseline the engine is measured against, and the
path for beam search. Left padding, input order, one batch at a time."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.sampling import SamplingParams

from ..generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationCancelled,
    GenerationOutput,
    GenerationRequest,
    OnOutput,
    Sample,
    TokenLogprobs,
    request_error,
)
from ..models.loader import LoadedModel
from ..engine.constraints import Grammars, RowMatcher, check_text
from ..engine.sampling import token_logprobs
from ..engine.stop import truncate_at_stop


class _StopWhenAsked(StoppingCriteria):
    """Ends a `generate` call at the next step once `should_stop` turns true (cancel, a shutdown's grace over)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop, self.asked = should_stop, False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.asked = self.asked or bool(self.should_stop())
        return torch.full((input_ids.shape[0],), self.asked, dtype=torch.bool, device=input_ids.device)


class _GrammarMasks(LogitsProcessor):
    """Masks each row's logits to the tokens its constraint allows next; runs before generate's warpers
    (temperature, top-k, top-p), as transformers orders custom processors, and after repetition penalty."""

    def __init__(self, grammars: Grammars, matchers: list[RowMatcher | None], prompt_width: int):
        self.grammars, self.matchers, self.prompt_width = grammars, matchers, prompt_width
        self.bitmask = grammars.bitmask(len(matchers))
        self.accepted = 0
        """Generated tokens already fed to the matchers."""

    def follow(self, sequences: torch.Tensor) -> None:
        """Feed the matchers the tokens generated since the last call."""
        # sequences: [rows, prompt_width + generated]
        for step in range(self.prompt_width + self.accepted, sequences.shape[1]):
            for matcher, token in zip(self.matchers, sequences[:, step].tolist()):
                if matcher is not None:
                    matcher.accept(token)
            self.accepted += 1

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids: [rows, width]; scores: [rows, V]
        self.follow(input_ids)
        self.grammars.apply(scores, self.matchers, self.bitmask)
        return scores


class HFGenerate:
    name = "hf-generate"

    def __init__(self, loaded: LoadedModel, batch_size: int = 16, *, seed_per_request: bool = True,
                 use_cache: bool = True):
        """`seed_per_request` runs sampled requests one at a time, each from its own seed, so a row's text does
        not depend on the rows beside it; the benchmark turns it off to measure plain batched `generate`, and
        turns `use_cache` off to measure what a KV cache saves."""
        self.loaded = loaded
        self.batch_size = batch_size
        self.seed_per_request = seed_per_request
        self.use_cache = use_cache
        self._grammars: Grammars | None = None

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            vocab = self.loaded.model.get_output_embeddings().weight.shape[0]
            self._grammars = Grammars(self.loaded.tokenizer, vocab, self.loaded.eos_token_ids)
        return self._grammars

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_output: OnOutput | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[GenerationOutput]:
        """Requests with their own parameters go in batches of their own: one generate call has one config."""
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        groups: dict[SamplingParams, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.params_or(params), []).append(index)
        for group_params, indices in groups.items():
            # One torch seed drives a whole generate call: sampled requests go alone, each drawing from its own
            # seed, so a row's text does not depend on the rows beside it. Greedy and beam search keep the batch.
            alone = self.seed_per_request and not group_params.greedy and group_params.num_beams == 1
            step = 1 if alone else self.batch_size
            for start in range(0, len(indices), step):
                if should_stop is not None and should_stop():
                    raise GenerationCancelled(f"stopped with {sum(o is None for o in outputs)} requests unfinished")
                chunk = indices[start : start + step]
                for index, output in zip(chunk, self._generate_batch([requests[i] for i in chunk], group_params, should_stop)):
                    outputs[index] = output
                    if on_output:
                        on_output(index, output)
        return outputs  # type: ignore[return-value]

    def generation_kwargs(self, params: SamplingParams, budget: int) -> dict:
        tokenizer = self.loaded.tokenizer
        eos = list(self.loaded.eos_token_ids) + list(params.stop_token_ids)
        kwargs = dict(
            max_new_tokens=budget,
            do_sample=not params.greedy,
            num_return_sequences=params.n,
            num_beams=params.num_beams,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None if params.ignore_eos else eos,
            use_cache=self.use_cache,
        )
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

    def _generate_batch(self, batch: Sequence[GenerationRequest], params: SamplingParams,
                        should_stop: Callable[[], bool] | None) -> list[GenerationOutput]:
        """Outputs of a batch in order; prompts that leave no room to generate fail alone. Prompts whose token
        budgets differ (max_length, the context) generate in separate calls, each to its own budget: generate's
        own max_length would count the batch's padding."""
        outputs: list[GenerationOutput | None] = [None] * len(batch)
        by_budget: dict[int, list[int]] = {}
        for position, request in enumerate(batch):
            prompt_tokens = len(request.prompt_ids)
            error = request_error(prompt_tokens, params, self.loaded.context_length) or self._constraint_error(params)
            if error is not None:
                outputs[position] = GenerationOutput.failed(error, prompt_tokens)
            else:
                budget = min(params.new_token_budget(prompt_tokens), self.loaded.context_length - prompt_tokens)
                by_budget.setdefault(budget, []).append(position)
        for budget, positions in by_budget.items():
            generated = self._generate([batch[p] for p in positions], params, budget, should_stop)
            for position, output in zip(positions, generated):
                outputs[position] = output
        return outputs  # type: ignore[return-value]

    def _constraint_error(self, params: SamplingParams) -> str | None:
        if params.constraint is None:
            return None
        try:
            self.grammars.compile(params.constraint)
        except InvalidParameter as exc:
            return exc.line()
        return None

    @torch.inference_mode()
    def _generate(self, batch: Sequence[GenerationRequest], params: SamplingParams, budget: int,
                  should_stop: Callable[[], bool] | None) -> list[GenerationOutput]:
        loaded = self.loaded
        width = max(len(r.prompt_ids) for r in batch)
        pad = loaded.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        kwargs = self.generation_kwargs(params, budget)
        if params.logprobs is not None:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        stop = _StopWhenAsked(should_stop) if should_stop is not None else None
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
        masks = None
        if params.constraint is not None:
            masks = _GrammarMasks(self.grammars, [self.grammars.matcher(params) for _ in range(len(batch) * params.n)], width)
            kwargs["logits_processor"] = LogitsProcessorList([masks])
        torch.manual_seed(batch[0].seed)
        started = time.perf_counter()
        generated = loaded.model.generate(
            input_ids=input_ids.to(loaded.device), attention_mask=attention.to(loaded.device), **kwargs
        )
        elapsed = time.perf_counter() - started
        if stop is not None and stop.asked:
            raise GenerationCancelled(f"stopped during a batch of {len(batch)} requests")
        sequences = generated.sequences if params.logprobs is not None else generated
        if masks is not None:
            masks.follow(sequences)  # the last token generated never reached the processor
        new_tokens = sequences[:, width:].tolist()
        logprobs = self._logprobs(generated.logits, sequences[:, width:], params.logprobs) if params.logprobs is not None else None
        stop_ids = set(loaded.eos_token_ids) | set(params.stop_token_ids)
        outputs = []
        for i, request in enumerate(batch):
            samples = []
            for j in range(params.n):
                row = i * params.n + j
                matcher = masks.matchers[row] if masks is not None else None
                samples.append(self._sample(new_tokens[row], logprobs[row] if logprobs else None, stop_ids, params, matcher))
            outputs.append(GenerationOutput(samples, len(request.prompt_ids), elapsed))
        return outputs

    @staticmethod
    def _logprobs(step_logits: Sequence[torch.Tensor], tokens: torch.Tensor, top: int) -> list[list[TokenLogprobs]]:
        """Per row, the logprobs of each generated token from generate's raw (unprocessed) logits."""
        # step_logits[t]: [rows, V]; tokens: [rows, T] -> rows lists of T entries
        rows: list[list[TokenLogprobs]] = [[] for _ in range(tokens.shape[0])]
        for step, logits in enumerate(step_logits):
            chosen, values, ids = (t.tolist() for t in token_logprobs(logits, tokens[:, step], top))
            for row, (entries, token) in enumerate(zip(rows, tokens[:, step].tolist())):
                entries.append(TokenLogprobs(token, chosen[row], tuple(ids[row]), tuple(values[row])))
        return rows

    def _sample(
        self, tokens: list[int], logprobs: list[TokenLogprobs] | None, stop_ids: set[int], params: SamplingParams,
        matcher: RowMatcher | None = None,
    ) -> Sample:
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
        finish = FINISH_STOP if hit else finish
        checked = check_text(params, text, matcher is not None and matcher.complete, finish,
                             cut_by_stop=hit and params.constraint is not None)
        return Sample(text, kept, finish, logprobs[: len(kept)] if logprobs is not None else None, checked.error,
                      checked.parsed)
