"""One prompt's tokens as the engine produces them, and the text they spell, for the classes that stream."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.api import no_room_error
from shardgen.workers.engine import Finished, NewToken
from shardgen.workers.engine.stop import truncate_at_stop
from shardgen.workers.generation import GenerationRequest, Generator


def stream_token_ids(
    generator: Generator, prompt_ids: Sequence[int], params: SamplingParams, seed: int
) -> Iterator[int]:
    """The generated token ids of one prompt, each as soon as it exists (all at the end where the generator
    does not stream, e.g. beam search); a prompt that cannot be generated from raises its error."""
    if params.n != 1:
        raise InvalidParameter(
            f"streaming makes one sample, got n={params.n}", "use generate for several samples"
        )
    problem = no_room_error(params, len(prompt_ids))
    if problem:
        raise InvalidParameter(problem)
    request = GenerationRequest(list(prompt_ids), seed=seed)
    events = getattr(generator, "events", None)
    if events is None:
        (output,) = generator.generate([request], params)
        if output.error:
            raise InvalidParameter(output.error)
        yield from output.samples[0].token_ids
        return
    for event in events([request], params):
        if isinstance(event, NewToken):
            yield event.token_id
        elif isinstance(event, Finished) and event.output.error:
            raise InvalidParameter(event.output.error)


def stream_text(tokenizer: Any, token_ids: Iterable[int], stop: Sequence[str] = ()) -> Iterator[str]:
    """The text of a token stream in pieces: a piece is sent once no later token can change it (no
    half-decoded character, nothing that may begin a stop string); it ends before the first stop string."""
    tokens: list[int] = []
    sent = ""
    held = max((len(s) - 1 for s in stop), default=0)
    for token in token_ids:
        tokens.append(token)
        text, stopped = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
        settled = text.rstrip("\ufffd")
        ready = text if stopped else settled[: max(0, len(settled) - held)]
        if len(ready) > len(sent) and ready.startswith(sent):
            yield ready[len(sent) :]
            sent = ready
        if stopped:
            return
    text, _ = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
    if len(text) > len(sent) and text.startswith(sent):
        yield text[len(sent) :]
