"""The scheduler: which sample sits in which row of the slot cache, what each step prefills, who is done.

Every sample being generated owns a slot: one row of the key/value tensors of every layer, where its sequence
sits from position 0 on. Occupied slots are the first rows. Waiting requests are admitted, first come first
served, while their samples fit the free rows. A step decodes one token for every slot that has one to feed back,
and prefills chunks of the prompts being prefilled, first admitted first, within the step's token budget. The
samples of one prompt share its prefill: its keys and values are computed once, in the first sample's row, and
copied to the others when it completes. With a prefix cache (prefix_cache.py), a prompt's prefill starts after
the longest run of stored blocks it begins with, and a prompt whose next block another prompt ahead of it is
computing waits for that one to complete, then reuses it. A finished sample leaves at once: the last occupied row moves into its
row, so the occupied rows stay a prefix and the next waiting prompt takes the free rows before the next step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from shardgen.schemas.sampling import SamplingParams

from ..generation import FINISH_LENGTH, FINISH_STOP, GenerationOutput, GenerationRequest, Sample, TokenLogprobs
from .constraints import Grammars, RowMatcher, check_text
from .kv_cache import SlotCache
from .prefix_cache import PrefixCache
from .sampling import derive_seed, row_generator
from .step_plan import DecodeToken, PrefillChunk, split_prefill
from .stop import StopScanner, truncate_at_stop


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
class Slot:
    """One sample being generated, in cache row `row`."""

    index: int
    """The request's position in the call."""
    sample: int
    prompt_ids: list[int]
    budget: int
    """Most tokens this sample may generate."""
    generator: torch.Generator | None
    """Its own random stream (None when greedy), so its text does not depend on the batch."""
    row: int
    params: SamplingParams
    """Its request's parameters (the call's, or the row's own)."""
    matcher: RowMatcher | None = None
    """Where its text stands in its constraint's grammar (None when unconstrained)."""
    prefilled: int = 0
    """Prompt tokens whose keys and values are in this slot's row."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    stop: StopScanner | None = None
    finish_reason: str | None = None
    prefix_hashes: list[int] | None = None
    """With a prefix cache: a hash of each full block's prefix (the first sample's only)."""
    started: bool = False
    """Whether a chunk of its prompt has been computed (after that its prefix is no longer looked up)."""

    @property
    def position(self) -> int:
        """Where the last generated token goes in the cache (its position id)."""
        return len(self.prompt_ids) + len(self.tokens) - 1

    @property
    def cached(self) -> int:
        """Positions of this slot's row that hold keys and values."""
        return self.prefilled + max(len(self.tokens) - 1, 0)

    def decode_token(self) -> DecodeToken:
        return DecodeToken(self.row, self.tokens[-1], self.position)


@dataclass
class _Pending:
    """A request whose samples are not all finished."""

    request: GenerationRequest
    started: float
    samples: list[Sample | None]


class Scheduler:
    def __init__(self, requests: Sequence[GenerationRequest], waiting: Sequence[int], params: SamplingParams,
                 capacity: int, budget: Callable[[GenerationRequest], int], cache: SlotCache | None,
                 seen: torch.Tensor | None, tokenizer: object, device: torch.device, grammars: Grammars | None = None,
                 prefixes: PrefixCache | None = None):
        self.requests, self.params, self.capacity, self.budget = requests, params, capacity, budget
        self.grammars = grammars
        self.cache, self.seen, self.tokenizer, self.device = cache, seen, tokenizer, device
        self.prefixes = prefixes if cache is not None else None
        self.reused_tokens = 0
        """Prompt tokens whose keys and values came from the prefix cache instead of a prefill."""
        self.prefix_hashes: dict[int, list[int]] = {}
        self._sight(waiting)
        self.waiting: deque[int] = deque(waiting)
        self.slots: list[Slot] = []  # occupied rows: slots[row].row == row
        self.prefilling: deque[Slot] = deque()  # first samples whose prompt is not all in the cache
        self.pending: dict[int, _Pending] = {}

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.slots)

    @property
    def unfinished(self) -> int:
        return len(self.waiting) + len(self.pending)

    def add(self, index: int) -> None:
        """A request that joined the running call (its index into the call's request list) waits for a slot."""
        self._sight([index])
        self.waiting.append(index)

    def admit(self) -> None:
        """Give waiting requests one row per sample while they fit; the first sample's row receives the prefill."""
        while self.waiting:
            index = self.waiting[0]
            request = self.requests[index]
            n = request.params_or(self.params).n
            if len(self.slots) + n > self.capacity:
                break
            self.waiting.popleft()
            self.pending[index] = _Pending(request, time.perf_counter(), [None] * n)
            first_row = len(self.slots)
            for sample in range(n):
                self.slots.append(self._slot(index, sample, request, first_row + sample))
            if self.seen is not None:
                self.seen[first_row : first_row + n] = False
                self.seen[first_row : first_row + n, request.prompt_ids] = True
            leader = self.slots[first_row]
            leader.prefix_hashes = self.prefix_hashes.pop(index, None)
            self.prefilling.append(leader)

    def _sight(self, indices: Sequence[int]) -> None:
        """Tell the prefix cache which blocks the call's prompts hold, so that it keeps those that are shared."""
        if self.prefixes is None:
            return
        for index in indices:
            hashes = self.prefixes.prefix_hashes(self.requests[index].prompt_ids)
            self.prefixes.sighted(hashes)
            self.prefix_hashes[index] = hashes

    def _slot(self, index: int, sample: int, request: GenerationRequest, row: int) -> Slot:
        params = request.params_or(self.params)
        generator = None if params.greedy else row_generator(derive_seed(request.seed, sample), self.device)
        matcher = self.grammars.matcher(params) if self.grammars is not None else None
        return Slot(
            index, sample, request.prompt_ids, self.budget(request), generator, row, params, matcher,
            logprobs=[] if params.logprobs is not None else None,
            stop=StopScanner(self.tokenizer, params.stop) if params.stop else None,
        )

    def plan(self, step_tokens: int, chunked: bool) -> tuple[list[Slot], list[PrefillChunk]]:
        """This step's decoding slots, and the next chunk of each prompt being prefilled within the step's budget
        (at least a quarter of it, so that a step full of decoding slots still moves prefill on). Without chunked
        prefill, chunks are whole prompts."""
        decoding = [slot for slot in self.slots if slot.tokens]
        if not self.prefilling:
            return decoding, []
        ready = self._reuse_prefixes() if self.prefixes is not None else len(self.prefilling)
        remaining = [len(slot.prompt_ids) - slot.prefilled for slot in list(self.prefilling)[:ready]]
        budget = max(step_tokens - len(decoding), step_tokens // 4, 1)
        shares = split_prefill(remaining, budget) if chunked else remaining
        chunks = []
        for slot, share, left in zip(self.prefilling, shares, remaining):
            if share == 0:
                break
            tokens = slot.prompt_ids[slot.prefilled : slot.prefilled + share]
            slot.started = True
            chunks.append(PrefillChunk(slot.row, slot.prefilled, tokens, wants_logits=share == left))
        return decoding, chunks

    def _reuse_prefixes(self) -> int:
        """Give each prompt not started yet the longest stored prefix it begins with; put a prompt whose next block
        one ahead of it is computing behind the others, so that it reuses that block once it is stored. Returns
        how many prompts, from the first, this step may prefill."""
        assert self.prefixes is not None and self.cache is not None
        computing: set[int] = set()  # block prefixes of prompts ahead in line, stored once they are prefilled
        ready: list[Slot] = []
        behind: list[Slot] = []
        for slot in self.prefilling:
            hashes = slot.prefix_hashes or []
            if not slot.started:
                hit = self.prefixes.lookup(slot.prompt_ids)
                if hit.count * self.prefixes.block_tokens > slot.prefilled:
                    reused = self.prefixes.copy_into(self.cache, slot.row, hit)
                    self.reused_tokens += reused - slot.prefilled
                    slot.prefilled = reused
                following = slot.prefilled // self.prefixes.block_tokens
                if following < len(hashes) and hashes[following] in computing:
                    behind.append(slot)
                    continue
            computing.update(hashes)  # stored only once its prefill completes
            ready.append(slot)
        if behind:
            self.prefilling = deque(ready + behind)
        return len(ready)

    def prefilled(self, chunks: list[PrefillChunk]) -> list[list[Slot]]:
        """Note what the step prefilled; the samples of each prompt it completed, in chunk order (their first
        token comes from that prompt's logits)."""
        for leader, chunk in zip(self.prefilling, chunks):
            leader.prefilled += len(chunk.token_ids)
        completed = sum(chunk.wants_logits for chunk in chunks)  # always the first ones being prefilled
        leaders = [self.prefilling.popleft() for _ in range(completed)]
        if self.prefixes is not None:
            for leader in leaders:
                self.prefixes.store(self.cache, leader.row, leader.prompt_ids, leader.prefix_hashes or [])
        return [self._share_prompt(leader) for leader in leaders]

    def _share_prompt(self, leader: Slot) -> list[Slot]:
        """A prompt's prefill is complete in its first sample's row: copy it to its other samples' rows."""
        samples = [slot for slot in self.slots if slot.index == leader.index]
        for slot in samples:
            if slot is not leader and self.cache is not None:
                self.cache.copy_row(leader.row, slot.row, leader.prefilled)
            slot.prefilled = leader.prefilled
        return samples

    def retire(self) -> Iterator[Finished]:
        """Take finished samples out of their rows, keeping occupied rows a prefix; yield finished requests."""
        row = 0
        while row < len(self.slots):
            slot = self.slots[row]
            if slot.finish_reason is None:
                row += 1
                continue
            last = self.slots.pop()
            if last is not slot:
                self._move(last, row)
                self.slots[row] = last
            entry = self.pending[slot.index]
            entry.samples[slot.sample] = self._sample(slot)
            if all(s is not None for s in entry.samples):
                del self.pending[slot.index]
                elapsed = time.perf_counter() - entry.started
                output = GenerationOutput(entry.samples, len(entry.request.prompt_ids), elapsed)  # type: ignore[arg-type]
                yield Finished(slot.index, output)

    def _move(self, slot: Slot, target: int) -> None:
        if self.cache is not None:
            self.cache.copy_row(slot.row, target, slot.cached)
        if self.seen is not None:
            self.seen[target] = self.seen[slot.row]
        slot.row = target

    def _sample(self, slot: Slot) -> Sample:
        params = slot.params
        text, hit = truncate_at_stop(self.tokenizer.decode(slot.tokens, skip_special_tokens=True), params.stop)
        finish = FINISH_STOP if hit else slot.finish_reason or FINISH_LENGTH
        checked = check_text(params, text, slot.matcher is not None and slot.matcher.complete, finish,
                             cut_by_stop=hit and params.constraint is not None)
        return Sample(text, list(slot.tokens), finish, slot.logprobs, checked.error, checked.parsed)
