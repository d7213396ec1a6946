"""shardgen's engine: continuous batching over a slot KV cache, prompts prefilled in chunks between decodes.

One call's loop, in full:

    scheduler.admit()                         waiting requests take free cache rows      (scheduler.py)
    decoding, chunks = scheduler.plan()       a token per decoding slot, prompt chunks   (scheduler.py)
    logits = runner.forward(...)              one forward over the packed step           (model_runner.py)
    choose(decoding, logits)                  next tokens, logprobs, finish reasons      (sampling.py, stop.py)
    choose(prompts completed, their logits)   the first token of each prompt just prefilled
    scheduler.retire()                        finished samples leave, requests complete

The KV cache is sized per call (cache_sizing.py). On the CPU the model's float32 linear layers are packed for
oneDNN once (packed_linear). Beam search, and architectures whose cache the engine cannot hold, go through
transformers' generate (generators/hf_generate); `last_path` names the path that ran.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, Sequence

import torch

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.sampling import SamplingParams

from ..generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOOM,
    GenerationCancelled,
    GenerationOutput,
    GenerationRequest,
    OnOutput,
    Refill,
    TokenLogprobs,
    request_error,
)
from ..models.loader import LoadedModel
from .constraints import Grammars
from .cache_sizing import AUTO, DEFAULT_BATCH_SIZE, CacheSizer
from .memory import parse_memory_size
from .model_runner import ModelRunner
from .packed_linear import pack_linears
from .weight_formats import FORMATS, choose_format
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from .sampling import next_tokens, token_logprobs
from .scheduler import Event, Finished, NewToken, Scheduler, Slot
from .stats import EngineStats

log = logging.getLogger(__name__)

PATH_ENGINE = "engine"
PATH_BEAM_SEARCH = "hf-generate (beam search)"
PATH_UNSUPPORTED_CACHE = "hf-generate (model cache layout not supported by the engine)"

DEFAULT_STEP_TOKENS = 512
"""Tokens per forward (decode tokens plus prefill chunks). On a CPU a step costs about the same per token
whatever its mix, so this mainly bounds how long decoding slots wait while prompts prefill."""


JOIN_ROUNDING = 64
"""A call that takes refills sizes its cache's length up to a multiple of this, so that a joining prompt a few
tokens longer than the call's longest still fits."""


class Engine:
    name = "engine"

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        batch_size: int | str = AUTO,
        max_memory: int | str | None = None,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        compile: bool = False,
        prefix_cache: bool = True,
        prefix_cache_memory: int | str = DEFAULT_PREFIX_CACHE_BYTES,
        weights: str | None = None,
    ):
        """`batch_size` is a number of slots, or "auto": per call, as many as the KV cache at that call's longest
        sequence fits in `max_memory` (bytes or a size such as "8GiB"; by default what the process holds plus
        what the device has free). On the CPU the model's float32 linear layers are packed in place (see
        packed_linear): the engine owns the model from then on. With `prefix_cache`, prompt blocks that several
        prompts share are prefilled once and kept across calls within `prefix_cache_memory` (prefix_cache.py).
        `weights` (auto, float32, bfloat16, int8; default: the model spec's dtype) is the format the linear layers
        are packed in on the CPU (weight_formats.py); `self.weights` says which was chosen."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.batch_size = batch_size
        if not isinstance(step_tokens, int) or step_tokens < 1:
            raise InvalidParameter(f"step_tokens must be a positive integer, got {step_tokens!r}")
        self.step_tokens = step_tokens
        self.stats = EngineStats()
        self.last_path = PATH_ENGINE
        if loaded.info.get("checkpoint_quantization") == "compressed-tensors":
            _materialize_weights(loaded)
        self.weights, why = self._weight_format(weights or loaded.spec.dtype, compile)
        log.info("engine weights: %s (%s)", self.weights, why)
        packed = pack_linears(loaded.model, weights=self.weights) if not compile and self.weights in FORMATS else None
        self.packing = packed
        """What packing replaced (None under compile: torch.compile cannot trace packed weights)."""
        self.runner = ModelRunner(loaded.model, self.device, compile=compile)
        self.compiled = compile
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        budget = None if max_memory is None else parse_memory_size(max_memory)
        self.sizer = CacheSizer(self.runner.layout, self.device, vocab, budget) if self.runner.supported else None
        self.prefix_cache_memory = parse_memory_size(prefix_cache_memory)
        self.prefixes: PrefixCache | None = None
        self.prefix_cache = prefix_cache
        self.seen: torch.Tensor | None = None  # [slots, V] bool: tokens each slot has seen (repetition penalty)
        self.vocab_size = vocab
        self._grammars: Grammars | None = None

    # ----------------------------------------------------------------- public API

    @property
    def batch_size(self) -> int:
        """Slots of the KV cache: the fixed number, or under "auto" the number the latest call chose."""
        return self.stats.slots if self._batch_size == AUTO else self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | str) -> None:
        """A number fixes the slots (halving after running out of memory does this); "auto" sizes them per call."""
        if value != AUTO and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidParameter(f"batch_size must be a positive integer or {AUTO!r}, got {value!r}")
        self._batch_size = value

    @property
    def prefix_cache(self) -> bool:
        """Whether shared prompt prefixes are computed once (turning it off drops what is stored)."""
        return self.prefixes is not None

    @prefix_cache.setter
    def prefix_cache(self, on: bool) -> None:
        if not on or self.runner.layout is None:
            self.prefixes = None
        elif self.prefixes is None:
            self.prefixes = PrefixCache(self.runner.layout, self.device, max_bytes=self.prefix_cache_memory)

    @property
    def auto_batch(self) -> bool:
        return self._batch_size == AUTO

    @property
    def cache(self):  # the current SlotCache, or None
        return self.sizer.cache if self.sizer is not None else None

    def free_cache(self) -> None:
        """Give back the KV cache between calls (the next call allocates what it needs)."""
        if self.sizer is not None:
            self.sizer.free()
        self.seen = None

    takes_refills = True
    """generate() accepts `refill`: requests that join a running call as its slots free (a worker's next shard)."""

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_output: OnOutput | None = None,
        should_stop: Callable[[], bool] | None = None,
        refill: Refill | None = None,
    ) -> list[GenerationOutput]:
        outputs: dict[int, GenerationOutput] = {}
        for event in self.events(requests, params, should_stop=should_stop, refill=refill):
            if isinstance(event, Finished):
                outputs[event.index] = event.output
                if on_output:
                    on_output(event.index, event.output)
        return [outputs[index] for index in range(len(outputs))]

    def events(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        should_stop: Callable[[], bool] | None = None,
        refill: Refill | None = None,
    ) -> Iterator[Event]:
        """Tokens as they are produced and outputs as requests finish (any order; outputs name their index)."""
        if any(r.params_or(params).num_beams > 1 for r in requests) or not self.runner.supported:
            yield from self._via_hf_generate(requests, params, should_stop)
            return
        self.last_path = PATH_ENGINE
        try:
            yield from self._continuous_batches(list(requests), params, should_stop, refill)
        except torch.OutOfMemoryError as exc:
            raise EngineOOM(f"out of device memory at batch size {self.batch_size}: {exc}") from exc
        except RuntimeError as exc:
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
                raise EngineOOM(f"out of memory at batch size {self.batch_size}: {exc}") from exc
            raise

    # ----------------------------------------------------------------- the loop

    def _continuous_batches(
        self, requests: list[GenerationRequest], params: SamplingParams, should_stop: Callable[[], bool] | None,
        refill: Refill | None = None,
    ) -> Iterator[Event]:
        waiting = []
        for index, request in enumerate(requests):
            error = self._request_error(request, request.params_or(params))
            if error is not None:
                yield Finished(index, GenerationOutput.failed(error, len(request.prompt_ids)))
            else:
                waiting.append(index)
        if not waiting:
            return
        budget = lambda request: self._budget(request, request.params_or(params))  # noqa: E731
        longest = max(len(requests[i].prompt_ids) + budget(requests[i]) for i in waiting)
        own = [requests[i].params_or(params) for i in waiting]
        wanted = sum(p.n for p in own)
        if refill is not None:  # room for the requests that will join: as many again, a little longer
            wanted, longest = 2 * wanted, min(self.loaded.context_length, -(-longest // JOIN_ROUNDING) * JOIN_ROUNDING)
        capacity = self._prepare(wanted, own, longest)
        grammars = self.grammars if any(p.constraint is not None for p in own) else None
        scheduler = Scheduler(requests, waiting, params, capacity, budget, self.cache, self.seen, self.tokenizer,
                              self.device, grammars, self.prefixes)
        bitmask = grammars.bitmask(capacity) if grammars is not None else None
        fits = lambda request: self._fits(request, params, capacity, grammars)  # noqa: E731
        with torch.inference_mode():
            while True:
                if refill is not None and not scheduler.waiting and len(scheduler.slots) < capacity:
                    yield from self._join(scheduler, requests, refill(fits), params)
                if not scheduler.busy:
                    break
                if should_stop is not None and should_stop():
                    raise GenerationCancelled(f"stopped with {scheduler.unfinished} requests unfinished")
                scheduler.admit()
                decoding, chunks = scheduler.plan(self.step_tokens, self.runner.chunked_prefill)
                self._count(decoding, chunks, scheduler)
                logits = self.runner.forward(self.cache, [slot.decode_token() for slot in decoding], chunks)
                # logits: [len(decoding) + prompts completed, V]
                yield from self._choose(decoding, logits[: len(decoding)], bitmask)
                for offset, samples in enumerate(scheduler.prefilled(chunks)):
                    row_logits = logits[len(decoding) + offset : len(decoding) + offset + 1]
                    yield from self._choose(samples, row_logits.expand(len(samples), -1), bitmask)
                yield from scheduler.retire()

    def _join(self, scheduler: Scheduler, requests: list[GenerationRequest], joining: Sequence[GenerationRequest],
              params: SamplingParams) -> Iterator[Event]:
        """Requests that join the running call: they wait for slots like the call's own."""
        for request in joining:
            index = len(requests)
            requests.append(request)
            error = self._request_error(request, request.params_or(params))
            if error is not None:
                yield Finished(index, GenerationOutput.failed(error, len(request.prompt_ids)))
            else:
                scheduler.add(index)

    def _fits(self, request: GenerationRequest, params: SamplingParams, capacity: int,
              grammars: Grammars | None) -> bool:
        """Whether a request can join the running call: its samples, length and sampling state fit what the call
        allocated (anything else waits for the next call)."""
        own = request.params_or(params)
        cache = self.cache
        return (
            own.num_beams == 1 and own.n <= capacity
            and cache is not None and len(request.prompt_ids) + self._budget(request, own) <= cache.capacity
            and (own.repetition_penalty == 1.0 or self.seen is not None)
            and (own.constraint is None or grammars is not None)
        )

    def _request_error(self, request: GenerationRequest, params: SamplingParams) -> str | None:
        error = request_error(len(request.prompt_ids), params, self.loaded.context_length)
        if error is None and params.constraint is not None:
            try:
                self.grammars.compile(params.constraint)
            except InvalidParameter as exc:
                return exc.line()
        return error

    @property
    def grammars(self) -> Grammars:
        """Compiled constraints for this model's tokenizer, built on the first constrained request."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.loaded.eos_token_ids)
        return self._grammars

    def _budget(self, request: GenerationRequest, params: SamplingParams) -> int:
        prompt_tokens = len(request.prompt_ids)
        return min(params.new_token_budget(prompt_tokens), self.loaded.context_length - prompt_tokens)

    def _choose(self, chosen: list[Slot], logits: torch.Tensor, bitmask: torch.Tensor | None) -> Iterator[Event]:
        """Next token of each slot, its logprobs, and whether the slot is finished. Slots whose parameters differ
        are sampled in groups; each row's token depends only on its own logits, parameters and random stream."""
        # logits: [len(chosen), V], row i for chosen[i]
        if not chosen:
            return
        raw = logits
        if bitmask is not None and any(slot.matcher is not None for slot in chosen):
            logits = logits.clone()  # logprobs stay those of the model's raw logits
            self.grammars.apply(logits, [slot.matcher for slot in chosen], bitmask)
        tokens = torch.empty(len(chosen), dtype=torch.long, device=logits.device)
        per_token: list[TokenLogprobs | None] = [None] * len(chosen)
        for params, positions in _groups(chosen):
            index = torch.tensor(positions, device=logits.device) if len(positions) < len(chosen) else None
            group_logits = logits if index is None else logits[index]
            seen = rows = None
            if self.seen is not None:
                rows = torch.tensor([chosen[p].row for p in positions], device=self.device)
                seen = self.seen[rows]  # [len(positions), V]
            generators = None if params.greedy else [chosen[p].generator for p in positions]
            group_tokens = next_tokens(group_logits, params, generators, seen)  # [len(positions)]
            if rows is not None:
                self.seen[rows, group_tokens] = True
            if index is None:
                tokens = group_tokens
            else:
                tokens[index] = group_tokens
            if params.logprobs is not None:
                group_raw = raw if index is None else raw[index]
                for p, entry in zip(positions, _logprobs(group_raw, group_tokens, params.logprobs)):
                    per_token[p] = entry
        now = time.perf_counter()
        for position, (slot, token) in enumerate(zip(chosen, tokens.tolist())):
            slot.tokens.append(token)
            if slot.matcher is not None:
                slot.matcher.accept(token)
            if per_token[position] is not None:
                slot.logprobs.append(per_token[position])
            slot.finish_reason = self._finish_reason(slot, token, slot.params)
            yield NewToken(slot.index, slot.sample, token, now)

    def _finish_reason(self, slot: Slot, token: int, params: SamplingParams) -> str | None:
        if token in params.stop_token_ids or (token in self.loaded.eos_token_ids and not params.ignore_eos):
            return FINISH_STOP
        if slot.stop is not None and slot.stop.add(token):
            return FINISH_STOP
        if len(slot.tokens) >= slot.budget:
            return FINISH_LENGTH
        return None

    def _count(self, decoding: list[Slot], chunks: list, scheduler: Scheduler) -> None:
        stats = self.stats
        stats.forwards += 1
        stats.reused_prefix_tokens += scheduler.reused_tokens
        scheduler.reused_tokens = 0
        stats.prefill_tokens += sum(len(chunk.token_ids) for chunk in chunks)
        if decoding:
            stats.decode_steps += 1
            stats.decode_tokens += len(decoding)
            stats.slot_steps += stats.slots

    # ----------------------------------------------------------------- setup

    def _weight_format(self, requested: str, compile: bool) -> tuple[str, str]:
        model = self.loaded.model
        if self.loaded.spec.quantize != "none" or self.loaded.info.get("checkpoint_quantization"):
            return self.loaded.spec.quantize if self.loaded.spec.quantize != "none" else "checkpoint", "quantized"
        if compile or self.device.type != "cpu":
            return str(next(model.parameters()).dtype).removeprefix("torch."), "not packed"
        return choose_format(requested if requested in (AUTO, *FORMATS) else AUTO, model)

    def _prepare(self, wanted_slots: int, own: Sequence[SamplingParams], longest: int) -> int:
        """Size the KV cache (and the repetition-penalty state) for a call's requests; the slots to fill."""
        slots = self.sizer.prepare(self._batch_size, wanted_slots, max(p.n for p in own), longest)
        if any(p.repetition_penalty != 1.0 for p in own):
            if self.seen is None or self.seen.shape[0] < slots:
                vocab = self.loaded.model.get_output_embeddings().weight.shape[0]
                self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=self.device)
        else:
            self.seen = None
        self.stats.slots = slots
        self.stats.cache_bytes = self.cache.nbytes
        return slots

    def _via_hf_generate(self, requests: Sequence[GenerationRequest], params: SamplingParams,
                         should_stop: Callable[[], bool] | None) -> Iterator[Event]:
        from ..generators.hf_generate import HFGenerate

        beams = any(r.params_or(params).num_beams > 1 for r in requests)
        self.last_path = PATH_BEAM_SEARCH if beams else PATH_UNSUPPORTED_CACHE
        hf = HFGenerate(self.loaded, DEFAULT_BATCH_SIZE if self.auto_batch else self._batch_size)
        for start in range(0, len(requests), hf.batch_size):
            batch = requests[start : start + hf.batch_size]
            for offset, output in enumerate(hf.generate(batch, params, should_stop=should_stop)):
                yield Finished(start + offset, output)


def _groups(chosen: list[Slot]) -> list[tuple[SamplingParams, list[int]]]:
    """Positions of the chosen slots sharing each distinct set of parameters, in first-seen order."""
    groups: dict[SamplingParams, list[int]] = {}
    for position, slot in enumerate(chosen):
        groups.setdefault(slot.params, []).append(position)
    return list(groups.items())


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprobs]:
    chosen, top_values, top_ids = (t.tolist() for t in token_logprobs(logits, tokens, top))
    return [
        TokenLogprobs(token, logprob, tuple(ids), tuple(values))
        for token, logprob, ids, values in zip(tokens.tolist(), chosen, top_ids, top_values)
    ]


@torch.no_grad()
def _materialize_weights(loaded: LoadedModel) -> None:
    """compressed-tensors checkpoints build their dense weights on the first forward; packing needs them."""
    loaded.model(input_ids=torch.tensor([[loaded.tokenizer.eos_token_id or 0]], device=loaded.device))
