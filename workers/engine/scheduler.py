"""The generation engine: continuous batching over a slot-based KV cache allocated once.

Every sample being generated owns a slot: one row of the key/value tensors of every layer, where its prompt
sits from position 0 on. A prompt is prefilled alone (no padding) and its keys and values land in the slots of
its samples; then all occupied slots decode together, one token per step, each at its own position behind its
own attention mask. A finished sample leaves at once: the last
occupied slot moves into its row (occupied slots stay a prefix, so each step works on views, never copies),
and the next waiting prompt fills the free rows before the next step.

On the CPU the model's float32 linear layers are packed for oneDNN once (packed_linear), and llama-family models
prefill and decode through the engine's own steps (llama_step); other models go through their own forward.
Beam search goes through transformers' generate (HFGenerate); `last_path` names the path that ran.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from shardgen.schemas.sampling import SamplingParams

from ..generation import (
    EngineOOM,
    GenerationCancelled,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationOutput,
    GenerationRequest,
    OnOutput,
    Sample,
)
from .kv_cache import SlotCache
from .llama_step import (
    AttentionGroup,
    DecoderParts,
    attention_groups,
    decode_step,
    prefill_step,
    unsupported_reason,
)
from .hf_generate import HFGenerate
from ..models.loader import LoadedModel
from .packed_linear import pack_linears
from .sampling import derive_seed, next_tokens, row_generator
from .slot_attention import register_slot_attention
from .stop import truncate_at_stop

PATH_ENGINE = "engine"
PATH_ENGINE_RECOMPUTE = "engine (no kv cache)"
PATH_BEAM_SEARCH = "hf-generate (beam search)"
PATH_UNSUPPORTED_CACHE = "hf-generate (model cache layout not supported by the engine)"


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
    """One sample being generated."""

    index: int
    sample: int
    prompt_ids: list[int]
    budget: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def position(self) -> int:
        """Where the last generated token goes in the cache (its position id)."""
        return len(self.prompt_ids) + len(self.tokens) - 1


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
        batch_size: int = 16,
        compile: bool = False,
        use_kv_cache: bool = True,
        pack_weights: bool = True,
    ):
        """`pack_weights` packs the model's float32 linear layers for the CPU in place (see packed_linear): the
        engine owns the model from then on, and anything else using it computes the same values through them."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.batch_size = batch_size
        self.use_kv_cache = use_kv_cache
        self.cache: SlotCache | None = None
        self.seen: torch.Tensor | None = None  # [slots, V] bool, for the repetition penalty
        self.last_path = PATH_ENGINE if use_kv_cache else PATH_ENGINE_RECOMPUTE
        self.computed_token_slots = 0
        """Token positions the model computed in the last call (prefill + decode rows), for the bench."""
        self._hf = HFGenerate(loaded, batch_size)
        self.packing = pack_linears(self.model) if pack_weights and not compile else None
        """What packing replaced and the memory it added (None when off: torch.compile cannot trace packed weights)."""
        self._cache_layout = self._probe_cache_layout()
        self._parts = DecoderParts.of(self.model) if unsupported_reason(self.model) is None else None
        step = self._own_step if self._parts is not None else self._model_step
        self.compiled = compile
        self._step = torch.compile(step, dynamic=True) if compile else step

    # ----------------------------------------------------------------- public API

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
        if params.num_beams > 1 or (self._cache_layout is None and self.use_kv_cache):
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
        self.computed_token_slots = 0
        slots_per_request = params.n
        capacity_slots = max(self.batch_size, slots_per_request)
        context = self.loaded.context_length
        waiting: deque[int] = deque()
        for index in sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids)):
            prompt_tokens = len(requests[index].prompt_ids)
            if prompt_tokens >= context:
                message = (
                    f"prompt has {prompt_tokens} tokens; the model's context is {context} tokens, "
                    "leaving no room to generate (shorten the prompt or set max_prompt_tokens)"
                )
                yield Finished(index, GenerationOutput.failed(message, prompt_tokens))
            elif self._budget(requests[index], params) == 0:
                empty = [Sample("", [], FINISH_LENGTH) for _ in range(params.n)]
                yield Finished(index, GenerationOutput(empty, prompt_tokens))
            else:
                waiting.append(index)
        if not waiting:
            return
        longest = max(len(requests[i].prompt_ids) + self._budget(requests[i], params) for i in waiting)
        self._ensure_buffers(capacity_slots, longest)
        slots: list[_Slot] = []
        pending: dict[int, _Pending] = {}
        with torch.inference_mode():
            while waiting or slots:
                if should_stop is not None and should_stop():
                    raise GenerationCancelled(f"stopped with {len(waiting) + len(pending)} requests unfinished")
                while waiting and len(slots) + slots_per_request <= capacity_slots:
                    index = waiting.popleft()
                    pending[index] = _Pending(requests[index], time.perf_counter(), [None] * params.n)
                    yield from self._admit(index, requests[index], params, slots)
                    yield from self._retire(slots, pending, params)
                if slots:
                    logits = self._decode(slots)  # [A, V]
                    yield from self._choose(slots, logits, params, range(len(slots)))
                    yield from self._retire(slots, pending, params)

    def _budget(self, request: GenerationRequest, params: SamplingParams) -> int:
        prompt_tokens = len(request.prompt_ids)
        return min(params.new_token_budget(prompt_tokens), self.loaded.context_length - prompt_tokens)

    def _admit(self, index: int, request: GenerationRequest, params: SamplingParams, slots: list[_Slot]) -> Iterator[Event]:
        """Prefill a prompt into free slots, one per sample, and choose each sample's first token."""
        rows = range(len(slots), len(slots) + params.n)
        logits = self._prefill(request.prompt_ids, rows)  # [1, V]
        for sample in range(params.n):
            generator = None if params.greedy else row_generator(derive_seed(request.seed, sample), self.device)
            slots.append(_Slot(index, sample, request.prompt_ids, self._budget(request, params), generator))
        if self.seen is not None:
            self.seen[rows.start : rows.stop] = False
            self.seen[rows.start : rows.stop, request.prompt_ids] = True
        yield from self._choose(slots, logits.expand(params.n, -1), params, rows)

    def _choose(self, slots: list[_Slot], logits: torch.Tensor, params: SamplingParams, rows: range) -> Iterator[Event]:
        # logits: [len(rows), V] for slots[rows]
        chosen = [slots[row] for row in rows]
        seen = self.seen[rows.start : rows.stop] if self.seen is not None else None
        generators = None if params.greedy else [slot.generator for slot in chosen]
        tokens = next_tokens(logits, params, generators, seen).tolist()
        if seen is not None:
            seen[torch.arange(len(tokens)), tokens] = True
        now = time.perf_counter()
        for slot, token in zip(chosen, tokens):
            slot.tokens.append(token)
            slot.finish_reason = self._finish_reason(slot, token, params)
            yield NewToken(slot.index, slot.sample, token, now)

    def _finish_reason(self, slot: _Slot, token: int, params: SamplingParams) -> str | None:
        if token in params.stop_token_ids or (token in self.loaded.eos_token_ids and not params.ignore_eos):
            return FINISH_STOP
        if params.stop and truncate_at_stop(self._text(slot.tokens), params.stop)[1]:
            return FINISH_STOP
        if len(slot.tokens) >= slot.budget:
            return FINISH_LENGTH
        return None

    def _retire(self, slots: list[_Slot], pending: dict[int, _Pending], params: SamplingParams) -> Iterator[Event]:
        """Take finished samples out of their slots, keeping occupied slots a prefix; yield finished requests."""
        row = 0
        while row < len(slots):
            slot = slots[row]
            if slot.finish_reason is None:
                row += 1
                continue
            last = slots.pop()
            if last is not slot:
                self._move_slot(last, len(slots), row)
                slots[row] = last
            entry = pending[slot.index]
            entry.samples[slot.sample] = self._sample(slot, params)
            if all(s is not None for s in entry.samples):
                del pending[slot.index]
                elapsed = time.perf_counter() - entry.started
                output = GenerationOutput(entry.samples, len(entry.request.prompt_ids), elapsed)  # type: ignore[arg-type]
                yield Finished(slot.index, output)

    def _move_slot(self, slot: _Slot, source: int, target: int) -> None:
        if self.cache is not None:
            self.cache.move_row(source, target, slot.position)
        if self.seen is not None:
            self.seen[target] = self.seen[source]

    def _sample(self, slot: _Slot, params: SamplingParams) -> Sample:
        text, hit = truncate_at_stop(self._text(slot.tokens), params.stop)
        return Sample(text, list(slot.tokens), FINISH_STOP if hit else slot.finish_reason or FINISH_LENGTH)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ----------------------------------------------------------------- model calls

    def _prefill(self, prompt_ids: list[int], rows: range) -> torch.Tensor:
        """Run one prompt (no padding) and store its keys and values in `rows`; logits of its last token."""
        input_ids = torch.tensor([prompt_ids], device=self.device)  # [1, L]
        self.computed_token_slots += len(prompt_ids)
        if not self.use_kv_cache:
            return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        if self._parts is not None:
            logits = prefill_step(self._parts, self.cache.keys, self.cache.values, input_ids[0], rows.start)
            for row in rows[1:]:  # the other samples of the prompt start from the same keys and values
                self.cache.move_row(rows.start, row, len(prompt_ids))
            return logits  # [1, V]
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        layers = out.past_key_values.layers
        self.cache.write_prompt(rows, [layer.keys for layer in layers], [layer.values for layer in layers])
        return out.logits[:, -1]  # [1, V]

    def _decode(self, slots: list[_Slot]) -> torch.Tensor:
        """One step for all occupied slots: logits of the token after each one's last token."""
        self.computed_token_slots += len(slots) if self.use_kv_cache else sum(s.position + 1 for s in slots)
        if not self.use_kv_cache:
            return self._recompute(slots)
        last_tokens = torch.tensor([s.tokens[-1] for s in slots], device=self.device)  # [A]
        positions = [s.position for s in slots]
        if self._parts is not None and not self.compiled:
            groups = attention_groups(positions)
        else:  # one group: the model's forward attends in one call, and a compiled step keeps one structure
            groups = [AttentionGroup(0, len(positions), max(positions) + 1)]
        return self._step(last_tokens, torch.tensor(positions, device=self.device), groups)

    def _own_step(self, input_ids: torch.Tensor, positions: torch.Tensor, groups: list[AttentionGroup]) -> torch.Tensor:
        # input_ids, positions: [A] -> logits [A, V]
        return decode_step(self._parts, self.cache.keys, self.cache.values, input_ids, positions, groups)

    def _model_step(self, input_ids: torch.Tensor, positions: torch.Tensor, groups: list[AttentionGroup]) -> torch.Tensor:
        """The same step through the model's own forward, for architectures decode_step does not cover."""
        # input_ids, positions: [A] -> logits [A, V]
        used = max(group.used for group in groups)
        # mask: [A, 1, 1, used], True where a key is at or before the slot's own position
        mask = (torch.arange(used, device=self.device) <= positions[:, None])[:, None, None, :]
        past = self.cache.step_view(positions, used)
        config = self.model.config
        default_attention = config._attn_implementation
        config._attn_implementation = register_slot_attention()
        try:
            out = self.model(
                input_ids=input_ids[:, None],
                attention_mask=mask,
                position_ids=positions[:, None],
                past_key_values=past,
                use_cache=True,
            )
        finally:
            config._attn_implementation = default_attention
        return out.logits[:, -1]

    def _recompute(self, slots: list[_Slot]) -> torch.Tensor:
        """No KV cache: run every occupied slot's whole sequence again (left-padded) for its next token."""
        sequences = [s.prompt_ids + s.tokens for s in slots]
        width = max(len(seq) for seq in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(seq)) + seq for seq in sequences], device=self.device)
        attention = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences], device=self.device)
        position_ids = (attention.cumsum(dim=-1) - 1).clamp(min=0)  # [A, W]
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False, logits_to_keep=1
        )
        return out.logits[:, -1]

    # ----------------------------------------------------------------- setup

    @torch.inference_mode()
    def _probe_cache_layout(self) -> tuple[int, int, int, torch.dtype] | None:
        """(layers, kv_heads, head_dim, dtype) of the model's cache, or None if some layer is not a plain one."""
        out = self.model(input_ids=torch.tensor([[self.tokenizer.eos_token_id or 0]], device=self.device), use_cache=True)
        layers = getattr(out.past_key_values, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None
        keys = layers[0].keys  # [1, kv_heads, 1, head_dim]
        if any(layer.keys.shape != keys.shape for layer in layers):
            return None
        return len(layers), keys.shape[1], keys.shape[3], keys.dtype

    def _ensure_buffers(self, slots: int, longest: int) -> None:
        """Allocate the slot cache once; only a longer sequence or more slots than before replaces it."""
        if self.use_kv_cache and not self._cache_fits(slots, longest):
            if self.cache is not None:
                slots, longest = max(slots, self.cache.slots), max(longest, self.cache.capacity)
                self.cache = None  # free the old one before allocating
            layers, kv_heads, head_dim, dtype = self._cache_layout
            self.cache = SlotCache(layers, slots, kv_heads, longest, head_dim, dtype, self.device)
        if self.seen is None or self.seen.shape[0] < slots:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=self.device)

    def _cache_fits(self, slots: int, longest: int) -> bool:
        return self.cache is not None and self.cache.slots >= slots and self.cache.capacity >= longest

    def _via_hf_generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> Iterator[Event]:
        self.last_path = PATH_BEAM_SEARCH if params.num_beams > 1 else PATH_UNSUPPORTED_CACHE
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            for offset, output in enumerate(self._hf.generate(batch, params)):
                yield Finished(start + offset, output)
