"""Every error shardgen shows a user. Each carries one line: what is wrong and what to do."""

from __future__ import annotations


class ShardgenError(Exception):
    """An expected failure with a message fit for a user; the CLI prints it as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class InvalidParameter(ShardgenError):
    """A generation, model or run parameter has a value or type that cannot work."""


class InputError(ShardgenError):
    """The dataset cannot be read or mapped to prompts."""


class ModelError(ShardgenError):
    """The model cannot be resolved or loaded."""


class BrokerError(ShardgenError):
    """Redis (the broker and state store) cannot be reached or refused us."""


class RunNotFound(ShardgenError):
    """No run with this id is recorded."""


class IncompleteRun(ShardgenError):
    """Collect found rows that are missing or failed."""

    exit_code = 3


class MessageError(ShardgenError):
    """A queue message is malformed or foreign; it is rejected, never executed."""


class StorageError(ShardgenError):
    """A location cannot be read or written: missing, denied, no credentials, unknown protocol."""


class TransientStorageError(StorageError):
    """The store failed in a way that may pass (a connection error, a timeout, a throttled or 5xx request): a
    worker retries the shard with backoff for minutes before the failure spends one of its retries."""


class ModelNotFoundError(ModelError):
    """No model by that name: not an alias, not a checkpoint on disk, and not on the hub (or the hub is out of
    reach and the model is not cached)."""


class OutOfMemoryError(ShardgenError, RuntimeError):
    """Loading or generation ran out of memory (generation: even at batch size 1). Also a RuntimeError, as
    torch's own out-of-memory error is, so code that catches that one catches this one too."""
