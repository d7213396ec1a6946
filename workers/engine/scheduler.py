"""The generation engine: continuous batching over a slot KV cache, prompts prefilled in chunks between decodes.

Every sample being generated owns a slot: one row of the key/value tensors of every layer, where its sequence
sits from position 0 on. Occupied slots are the first rows. Each step is one forward (llama_step) over a packed
sequence of tokens: one for every slot that is decoding, then chunks of the prompts being prefilled, first
admitted first, up to `step_tokens` tokens in all. Several short prompts thus prefill in one forward with no
padding, and a long prompt is cut into chunks that run beside the decoding slots instead of stalling them.
The samples of one prompt share its prefill: its keys and values are computed once, in the first sample's row,
and copied to the others when it completes. A finished sample leaves at once: the last occupied row moves into
its row, and waiting prompts take the free rows before the next step.

On the CPU the model's float32 linear layers are packed for oneDNN once (packed_linear). Architectures other
than the llama family go through their own forward: whole prompts, then decode steps over the slot cache
(slot_attention). Beam search goes through transformers' generate (HFGenerate); `last_path` names the path.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
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
    Sample,
    TokenLogprobs,
    prompt_too_long,
)
from ..models.loader import LoadedModel
from .hf_generate import HFGenerate
from .kv_cache import SlotCache
from .llama_step import DecoderParts, forward_step, unsupported_reason
from .memory import CacheLayout, default_budget, fit_batch_size, memory_in_use, parse_memory_size
from .packed_linear import pack_linears
from .sampling import derive_seed, next_tokens, row_generator, token_logprobs
from .slot_attention import register_slot_attention
from .stats import EngineStats
from .step_plan import DecodeToken, PrefillChunk, plan_step, split_prefill
from .stop import truncate_at_stop

log = logging.getLogger(__name__)

PATH_ENGINE = "engine"
PATH_ENGINE_RECOMPUTE = "engine (no kv cache)"
PATH_BEAM_SEARCH = "hf-generate (beam search)"
PATH_UNSUPPORTED_CACHE = "hf-generate (model cache layout not supported by the engine)"

AUTO = "auto"
DEFAULT_BATCH_SIZE = 16
DEFAULT_STEP_TOKENS = 512
"""Tokens per forward (decode tokens plus prefill chunks). On a CPU a step costs about the same per token
whatever its mix, so this mainly bounds how long decoding slots wait while prompts prefill."""
WORK_BYTES_PER_VOCAB_ENTRY = 32
"""Sampling's working memory per slot and vocabulary entry: logits and their float copies (about 8 of 4 bytes)."""


@dataclass
class NewToken:
    index: int
    sample: int
    token_id: int
    time: float


@dataclass
class Finished:
    index: int
    output: GenerationOutput


Event = NewToken | Finished


@dataclass
class _Slot:
    """One sample being generated, in cache row `row`."""

    index: int
    sample: int
    prompt_ids: list[int]
    budget: int
    generator: torch.Generator | None
    row: int
    prefilled: int = 0
    """Prompt tokens whose keys and values are in this slot's row."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None

    @property
    def position(self) -> int:
        """Where the last generated token goes in the cache (its position id)."""
        return len(self.prompt_ids) + len(self.tokens) - 1

    @property
    def cached(self) -> int:
        """Positions of this slot's row that hold keys and values."""
        return self.prefilled + max(len(self.tokens) - 1, 0)


@dataclass
class _Pending:
    """A request whose samples are not all finished."""

    request: GenerationRequest
    started: float
    samples: list[Sample | None]


class Engine:
    name = "engine"

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_memory: int | str | None = None,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        compile: bool = False,
        use_kv_cache: bool = True,
        pack_weights: bool = True,
    ):
        """`batch_size` is a number of slots, or "auto": per call, as many as the KV cache at that call's longest
        sequence fits in `max_memory` (bytes or a size such as "8GiB"; by default what the process holds plus
        what the device has free) beside what is in use. `pack_weights` packs the model's float32 linear layers
        for the CPU in place (see packed_linear): the engine owns the model from then on, and anything else using
        it computes the same values through them."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.batch_size = batch_size
        self.max_memory = None if max_memory is None else parse_memory_size(max_memory)
        if not isinstance(step_tokens, int) or step_tokens < 1:
            raise InvalidParameter(f"step_tokens must be a positive integer, got {step_tokens!r}")
        self.step_tokens = step_tokens
        self.use_kv_cache = use_kv_cache
        self.stats = EngineStats()
        self.cache: SlotCache | None = None
        self.seen: torch.Tensor | None = None  # [slots, V] bool, tokens each slot has seen (repetition penalty)
        self.last_path = PATH_ENGINE if use_kv_cache else PATH_ENGINE_RECOMPUTE
        if loaded.info.get("checkpoint_quantization") == "compressed-tensors":
            self._materialize_weights()
        self.packing = pack_linears(self.model) if pack_weights and not compile else None
        """What packing replaced (None when off: torch.compile cannot trace packed weights)."""
        self._parts = DecoderParts.of(self.model) if unsupported_reason(self.model) is None else None
        self._layout = self._parts.cache_layout() if self._parts is not None else self._probe_cache_layout()
        self.compiled = compile
        self._compiled_step = torch.compile(forward_step, dynamic=True) if compile else None

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
    def auto_batch(self) -> bool:
        return self._batch_size == AUTO

    def free_cache(self) -> None:
        """Give back the KV cache between calls (the next call allocates what it needs)."""
        self.cache = None
        self.seen = None

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_output: OnOutput | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[GenerationOutput]:
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        for event in self.events(requests, params, should_stop=should_stop):
            if isinstance(event, Finished):
                outputs[event.index] = event.output
                if on_output:
                    on_output(event.index, event.output)
        return outputs  # type: ignore[return-value]

    def events(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Event]:
        """Tokens as they are produced and outputs as requests finish (any order; outputs name their index)."""
        if params.num_beams > 1 or (self._layout is None and self.use_kv_cache):
            yield from self._via_hf_generate(requests, params)
            return
        self.last_path = PATH_ENGINE if self.use_kv_cache else PATH_ENGINE_RECOMPUTE
        try:
            yield from self._continuous_batches(requests, params, should_stop)
        except torch.OutOfMemoryError as exc:
            raise EngineOOM(f"out of device memory at batch size {self.batch_size}: {exc}") from exc
        except RuntimeError as exc:
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
                raise EngineOOM(f"out of memory at batch size {self.batch_size}: {exc}") from exc
            raise

    # ----------------------------------------------------------------- scheduling

    def _continuous_batches(
        self, requests: Sequence[GenerationRequest], params: SamplingParams, should_stop: Callable[[], bool] | None
    ) -> Iterator[Event]:
        waiting: deque[int] = deque()
        for index, request in enumerate(requests):
            prompt_tokens = len(request.prompt_ids)
            error = prompt_too_long(prompt_tokens, self.loaded.context_length)
            if error is not None:
                yield Finished(index, GenerationOutput.failed(error, prompt_tokens))
            elif self._budget(request, params) == 0:
                empty = [Sample("", [], FINISH_LENGTH, [] if params.logprobs is not None else None) for _ in range(params.n)]
                yield Finished(index, GenerationOutput(empty, prompt_tokens))
            else:
                waiting.append(index)
        if not waiting:
            return
        longest = max(len(requests[i].prompt_ids) + self._budget(requests[i], params) for i in waiting)
        capacity_slots = self._prepare(len(waiting) * params.n, params, longest)
        slots: list[_Slot] = []  # occupied rows: slots[row].row == row
        prefilling: deque[_Slot] = deque()  # first samples whose prompt is not all in the cache, first admitted first
        pending: dict[int, _Pending] = {}
        with torch.inference_mode():
            while waiting or slots:
                if should_stop is not None and should_stop():
                    raise GenerationCancelled(f"stopped with {len(waiting) + len(pending)} requests unfinished")
                while waiting and len(slots) + params.n <= capacity_slots:
                    index = waiting.popleft()
                    pending[index] = _Pending(requests[index], time.perf_counter(), [None] * params.n)
                    prefilling.append(self._admit(index, requests[index], params, slots))
                decoding = [slot for slot in slots if slot.tokens]
                chunks = self._plan_prefill(prefilling, self.step_tokens - len(decoding))
                logits = self._forward(decoding, chunks)  # [len(decoding) + prompts completed, V]
                yield from self._choose(decoding, logits[: len(decoding)], params)
                for leader, chunk in zip(prefilling, chunks):
                    leader.prefilled += len(chunk.token_ids)
                completed = sum(chunk.wants_logits for chunk in chunks)  # always the first ones being prefilled
                for offset in range(completed):
                    leader = prefilling.popleft()
                    samples = self._share_prompt(leader, slots)
                    row_logits = logits[len(decoding) + offset : len(decoding) + offset + 1]
                    yield from self._choose(samples, row_logits.expand(len(samples), -1), params)
                yield from self._retire(slots, pending, params)

    def _budget(self, request: GenerationRequest, params: SamplingParams) -> int:
        prompt_tokens = len(request.prompt_ids)
        return min(params.new_token_budget(prompt_tokens), self.loaded.context_length - prompt_tokens)

    def _admit(self, index: int, request: GenerationRequest, params: SamplingParams, slots: list[_Slot]) -> _Slot:
        """Give a request one row per sample; the first sample's row receives the prompt's prefill."""
        first_row = len(slots)
        for sample in range(params.n):
            generator = None if params.greedy else row_generator(derive_seed(request.seed, sample), self.device)
            logprobs = [] if params.logprobs is not None else None
            slots.append(
                _Slot(index, sample, request.prompt_ids, self._budget(request, params), generator, first_row + sample,
                      logprobs=logprobs)
            )
        if self.seen is not None:
            self.seen[first_row : first_row + params.n] = False
            self.seen[first_row : first_row + params.n, request.prompt_ids] = True
        return slots[first_row]

    def _plan_prefill(self, prefilling: deque[_Slot], budget: int) -> list[PrefillChunk]:
        """The next chunk of each prompt being prefilled, within `budget` tokens (at least a quarter of a step, so
        that a step full of decoding slots still moves prefill on). Chunks are whole prompts where the model runs
        its own forward."""
        if not prefilling:
            return []
        remaining = [len(slot.prompt_ids) - slot.prefilled for slot in prefilling]
        chunked = self._parts is not None and self.use_kv_cache
        shares = split_prefill(remaining, max(budget, self.step_tokens // 4, 1)) if chunked else remaining
        chunks = []
        for slot, share, left in zip(prefilling, shares, remaining):
            if share == 0:
                break
            tokens = slot.prompt_ids[slot.prefilled : slot.prefilled + share]
            chunks.append(PrefillChunk(slot.row, slot.prefilled, tokens, wants_logits=share == left))
        return chunks

    def _share_prompt(self, leader: _Slot, slots: list[_Slot]) -> list[_Slot]:
        """A prompt's prefill is complete in its first sample's row: copy it to its other samples' rows."""
        samples = [slot for slot in slots if slot.index == leader.index]
        for slot in samples:
            if slot is not leader and self.cache is not None:
                self.cache.copy_row(leader.row, slot.row, leader.prefilled)
            slot.prefilled = leader.prefilled
        return samples

    def _choose(self, chosen: list[_Slot], logits: torch.Tensor, params: SamplingParams) -> Iterator[Event]:
        # logits: [len(chosen), V], row i for chosen[i]
        if not chosen:
            return
        seen = rows = None
        if self.seen is not None:
            rows = torch.tensor([slot.row for slot in chosen], device=self.device)
            seen = self.seen[rows]  # [len(chosen), V]
        generators = None if params.greedy else [slot.generator for slot in chosen]
        tokens = next_tokens(logits, params, generators, seen)  # [len(chosen)]
        if rows is not None:
            self.seen[rows, tokens] = True
        per_token = self._logprobs(logits, tokens, params.logprobs) if params.logprobs is not None else None
        now = time.perf_counter()
        for position, (slot, token) in enumerate(zip(chosen, tokens.tolist())):
            slot.tokens.append(token)
            if per_token is not None:
                slot.logprobs.append(per_token[position])
            slot.finish_reason = self._finish_reason(slot, token, params)
            yield NewToken(slot.index, slot.sample, token, now)

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprobs]:
        chosen, top_values, top_ids = (t.tolist() for t in token_logprobs(logits, tokens, top))
        return [
            TokenLogprobs(token, logprob, tuple(ids), tuple(values))
            for token, logprob, ids, values in zip(tokens.tolist(), chosen, top_ids, top_values)
        ]

    def _finish_reason(self, slot: _Slot, token: int, params: SamplingParams) -> str | None:
        if token in params.stop_token_ids or (token in self.loaded.eos_token_ids and not params.ignore_eos):
            return FINISH_STOP
        if params.stop and truncate_at_stop(self._text(slot.tokens), params.stop)[1]:
            return FINISH_STOP
        if len(slot.tokens) >= slot.budget:
            return FINISH_LENGTH
        return None

    def _retire(self, slots: list[_Slot], pending: dict[int, _Pending], params: SamplingParams) -> Iterator[Event]:
        """Take finished samples out of their rows, keeping occupied rows a prefix; yield finished requests."""
        row = 0
        while row < len(slots):
            slot = slots[row]
            if slot.finish_reason is None:
                row += 1
                continue
            last = slots.pop()
            if last is not slot:
                self._move_slot(last, row)
                slots[row] = last
            entry = pending[slot.index]
            entry.samples[slot.sample] = self._sample(slot, params)
            if all(s is not None for s in entry.samples):
                del pending[slot.index]
                elapsed = time.perf_counter() - entry.started
                output = GenerationOutput(entry.samples, len(entry.request.prompt_ids), elapsed)  # type: ignore[arg-type]
                yield Finished(slot.index, output)

    def _move_slot(self, slot: _Slot, target: int) -> None:
        if self.cache is not None:
            self.cache.copy_row(slot.row, target, slot.cached)
        if self.seen is not None:
            self.seen[target] = self.seen[slot.row]
        slot.row = target

    def _sample(self, slot: _Slot, params: SamplingParams) -> Sample:
        text, hit = truncate_at_stop(self._text(slot.tokens), params.stop)
        return Sample(text, list(slot.tokens), FINISH_STOP if hit else slot.finish_reason or FINISH_LENGTH, slot.logprobs)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ----------------------------------------------------------------- model calls

    def _forward(self, decoding: list[_Slot], chunks: list[PrefillChunk]) -> torch.Tensor:
        """One step: logits after each decoding slot's last token, then after each prompt the chunks complete."""
        # -> [len(decoding) + sum(chunk.wants_logits), V]
        self._count(decoding, chunks)
        if not self.use_kv_cache:
            return self._recompute_step(decoding, chunks)
        decode = [DecodeToken(slot.row, slot.tokens[-1], slot.position) for slot in decoding]
        if self._parts is None:
            return self._model_forward_step(decode, chunks)
        if self.compiled and decode and chunks:  # the compiled step is decode-only; prompts go beside it
            return torch.cat([self._own_step(decode, []), self._own_step([], chunks)])
        return self._own_step(decode, chunks)

    def _count(self, decoding: list[_Slot], chunks: list[PrefillChunk]) -> None:
        stats = self.stats
        stats.forwards += 1
        stats.prefill_tokens += sum(len(chunk.token_ids) for chunk in chunks)
        if decoding:
            stats.decode_steps += 1
            stats.decode_tokens += len(decoding)
            stats.slot_steps += stats.slots
            if not self.use_kv_cache:
                stats.recomputed_tokens += sum(slot.position for slot in decoding)

    def _own_step(self, decode: list[DecodeToken], chunks: list[PrefillChunk]) -> torch.Tensor:
        compiled = self._compiled_step is not None and not chunks
        batch = plan_step(decode, chunks, self.device, split_groups=not compiled)
        step = self._compiled_step if compiled else forward_step
        return step(self._parts, self.cache.keys, self.cache.values, batch)

    def _model_forward_step(self, decode: list[DecodeToken], chunks: list[PrefillChunk]) -> torch.Tensor:
        """The step through the model's own forward, for architectures llama_step does not cover: decode tokens
        (always the first rows here, as prompts are prefilled whole) in one call, then each prompt alone."""
        logits = []
        if decode:
            assert [token.row for token in decode] == list(range(len(decode))), "decoding rows must come first"
            logits.append(self._model_decode(decode))
        for chunk in chunks:
            out = self.model(input_ids=torch.tensor([chunk.token_ids], device=self.device), use_cache=True, logits_to_keep=1)
            layers = out.past_key_values.layers
            self.cache.write_prompt(chunk.row, [layer.keys for layer in layers], [layer.values for layer in layers])
            logits.append(out.logits[:, -1])
        return torch.cat(logits)

    def _model_decode(self, decode: list[DecodeToken]) -> torch.Tensor:
        # -> logits [A, V]
        input_ids = torch.tensor([token.token for token in decode], device=self.device)  # [A]
        positions = torch.tensor([token.position for token in decode], device=self.device)  # [A]
        used = int(positions.max()) + 1
        # mask: [A, 1, 1, used], True where a key is at or before the slot's own position
        mask = (torch.arange(used, device=self.device) <= positions[:, None])[:, None, None, :]
        config = self.model.config
        default_attention = config._attn_implementation
        if getattr(type(self.model), "_supports_attention_backend", False):
            config._attn_implementation = register_slot_attention()
        else:  # attention written inline (Falcon) adds the mask to its scores: give it 0 where attended, -inf beyond
            dtype = self.model.get_output_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)
        try:
            out = self.model(
                input_ids=input_ids[:, None],
                attention_mask=mask,
                position_ids=positions[:, None],
                past_key_values=self.cache.step_view(positions, used),
                use_cache=True,
            )
        finally:
            config._attn_implementation = default_attention
        return out.logits[:, -1]

    def _recompute_step(self, decoding: list[_Slot], chunks: list[PrefillChunk]) -> torch.Tensor:
        """No KV cache: each decoding slot's whole sequence again (left-padded) for its next token, and each
        prompt whole."""
        logits = []
        if decoding:
            sequences = [s.prompt_ids + s.tokens for s in decoding]
            width = max(len(seq) for seq in sequences)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(seq)) + seq for seq in sequences], device=self.device)
            attention = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences], device=self.device)
            position_ids = (attention.cumsum(dim=-1) - 1).clamp(min=0)  # [A, W]
            out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False,
                             logits_to_keep=1)
            logits.append(out.logits[:, -1])
        for chunk in chunks:
            input_ids = torch.tensor([chunk.token_ids], device=self.device)
            logits.append(self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1])
        return torch.cat(logits)

    # ----------------------------------------------------------------- setup

    @torch.no_grad()
    def _materialize_weights(self) -> None:
        """compressed-tensors checkpoints build their dense weights on the first forward; packing needs them."""
        self.model(input_ids=torch.tensor([[self.tokenizer.eos_token_id or 0]], device=self.device))

    @torch.inference_mode()
    def _probe_cache_layout(self) -> CacheLayout | None:
        """The cache layout of a model the engine has no step of its own for, read off one token's forward; None
        if some layer's cache is not a plain keys-and-values one."""
        out = self.model(input_ids=torch.tensor([[self.tokenizer.eos_token_id or 0]], device=self.device), use_cache=True)
        layers = getattr(out.past_key_values, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None
        keys = layers[0].keys  # [1, kv_heads, 1, head_dim]
        if any(layer.keys.shape != keys.shape for layer in layers):
            return None
        return CacheLayout(len(layers), keys.shape[1], keys.shape[3], keys.dtype)

    def _prepare(self, wanted_slots: int, params: SamplingParams, longest: int) -> int:
        """Size the KV cache for a call (reusing the current one when it is big enough); the slots to fill."""
        minimum = params.n
        if self.auto_batch and self.use_kv_cache:
            slots = self._auto_slots(wanted_slots, minimum, longest)
        else:
            slots = min(max(self._fixed_batch(), minimum), max(wanted_slots, minimum))
        if self.use_kv_cache and (self.cache is None or not self.cache.fits(slots, longest)):
            if self.cache is not None and not self.auto_batch:  # a fixed batch keeps the largest shape it has seen
                slots, longest = max(slots, self.cache.slots), max(longest, self.cache.capacity)
            self.cache = None  # free the old one before allocating
            self.cache = SlotCache(self._layout, slots, longest, self.device)
        if self.cache is not None:
            slots = min(self.cache.slots, slots)
        if params.repetition_penalty != 1.0:
            if self.seen is None or self.seen.shape[0] < slots:
                vocab = self.model.get_output_embeddings().weight.shape[0]
                self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=self.device)
        else:
            self.seen = None
        self.stats.slots = slots
        self.stats.cache_bytes = self.cache.nbytes if self.cache is not None else 0
        return slots

    def _fixed_batch(self) -> int:
        return DEFAULT_BATCH_SIZE if self.auto_batch else self._batch_size

    def _auto_slots(self, wanted: int, minimum: int, longest: int) -> int:
        """Under batch_size="auto": the most slots, up to those the call can fill, whose KV cache at the call's
        longest sequence fits the memory budget beside what is in use (the current cache not counted)."""
        budget = self.max_memory if self.max_memory is not None else default_budget(self.device)
        in_use = memory_in_use(self.device) - (self.cache.nbytes if self.cache is not None else 0)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        per_slot = self._layout.slot_bytes(longest) + WORK_BYTES_PER_VOCAB_ENTRY * vocab
        fitted = fit_batch_size(budget, in_use, per_slot)
        if fitted < minimum:
            raise EngineOOM(
                f"a memory budget of {budget / 2**20:.0f} MiB with {in_use / 2**20:.0f} MiB in use leaves room for "
                f"{fitted} KV cache slots of {longest} positions ({per_slot / 2**20:.1f} MiB each); this call needs "
                f"{minimum}: raise --max-memory or lower max_new_tokens"
            )
        slots = min(fitted, max(wanted, minimum))
        log.info(
            "batch size auto: %d slots of %d positions (%.0f MiB of KV cache) within %.0f MiB, %.0f MiB in use",
            slots, longest, slots * self._layout.slot_bytes(longest) / 2**20, budget / 2**20, in_use / 2**20,
        )
        return slots

    def _via_hf_generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> Iterator[Event]:
        self.last_path = PATH_BEAM_SEARCH if params.num_beams > 1 else PATH_UNSUPPORTED_CACHE
        hf = HFGenerate(self.loaded, self.batch_size or self._fixed_batch())
        for start in range(0, len(requests), hf.batch_size):
            batch = requests[start : start + hf.batch_size]
            for offset, output in enumerate(hf.generate(batch, params)):
                yield Finished(start + offset, output)
