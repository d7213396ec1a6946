"""One prompt's answer as it is generated: its token ids, and the text they spell in pieces that never change.

The Python API's `LLM.stream` and the compat classes that stream (Generator, Inferencer) use these two functions.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.sampling import SamplingParams

from .engine import Finished, NewToken
from .engine.stop import IncrementalText, truncate_at_stop
from .generation import GenerationRequest, Generator


def token_stream(generator: Generator, request: GenerationRequest, params: SamplingParams) -> Iterator[int]:
    """The generated token ids of one request, each as soon as it exists (all at the end where the generator does
    not stream, e.g. beam search); a request that cannot be generated raises its error as InvalidParameter."""
    if params.n != 1:
        raise InvalidParameter(f"streaming makes one sample, got n={params.n}", "use generate for several samples")
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


def text_stream(tokenizer: Any, token_ids: Iterable[int], stop: Sequence[str] = ()) -> Iterator[str]:
    """The text of a token stream in pieces: a piece is sent once no later token can change it (no half-decoded
    character, nothing that may be the start of a stop string), and the text ends before the first stop string.
    Only each token's window is decoded (IncrementalText), then the whole text once at the end."""
    text = IncrementalText(tokenizer)
    sent = ""
    for token in token_ids:
        text.add(token)
        cut, stopped = truncate_at_stop(text.text, stop)
        ready = cut if stopped else settled_prefix(cut, stop)
        if len(ready) > len(sent):
            yield ready[len(sent) :]
            sent = ready
        if stopped:
            return
    final, _ = truncate_at_stop(tokenizer.decode(text.tokens, skip_special_tokens=True) if text.tokens else "", stop)
    if len(final) > len(sent) and final.startswith(sent):
        yield final[len(sent) :]


def settled_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of the text no later token can change: not a half-decoded character, not a possible stop start."""
    end = len(text.rstrip("\ufffd"))
    held = max(
        (size for s in stop for size in range(1, min(len(s) - 1, end) + 1) if text[end - size : end] == s[:size]),
        default=0,
    )
    return text[: end - held]
