"""Files behind one interface, local or remote: plain paths, file://, s3://, gs://, hf:// (through fsspec).

Credentials come from where users already keep them (the AWS_* variables, AWS_ENDPOINT_URL, ~/.aws, gcloud,
HF_TOKEN) or from storage options (`--storage-options` JSON, a [storage_options] TOML table, or
SHARDGEN_STORAGE_OPTIONS in a worker's environment). They stay in this process: nothing here writes them to
Redis, run.json or Parquet metadata, and URLs that carry them are refused.

Every failure becomes a StorageError of one line that names the location and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import uuid
from typing import IO, Any, Iterator, Mapping
from urllib.parse import urlsplit

from shardgen.schemas.errors import StorageError, TransientStorageError
from shardgen.schemas.layout import is_url

STORAGE_OPTIONS_ENV = "SHARDGEN_STORAGE_OPTIONS"
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}

TRANSIENT_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                    errno.EAGAIN, errno.EIO)

_options: dict[str, Any] | None = None


def set_storage_options(options: Mapping[str, Any] | None) -> None:
    """Options handed to fsspec for every remote location this process opens (e.g. endpoint_url, key, secret)."""
    global _options
    _options = dict(options or {})


def storage_options() -> dict[str, Any]:
    if _options is not None:
        return _options
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    return parse_storage_options(raw, source=STORAGE_OPTIONS_ENV)


def parse_storage_options(value: str | Mapping[str, Any], source: str = "--storage-options") -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{source} is not valid JSON ({exc.msg})", """pass an object such as '{"endpoint_url": "http://host:9000"}'""") from None
    if not isinstance(parsed, dict):
        raise StorageError(f"{source} must be a JSON object", """pass one such as '{"anon": true}'""")
    return parsed


def check_location(location: str, what: str) -> str:
    """Refuse a location that carries credentials (they would be shown and stored with the run)."""
    if is_url(location) and urlsplit(location).password is not None:
        raise StorageError(
            f"the {what} URL carries a password",
            "put credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --storage-options, not in the URL",
        )
    return location


def filesystem(location: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a location; local paths get the local filesystem."""
    import fsspec

    if not is_url(location):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(location))
    protocol = location.split("://", 1)[0]
    options = storage_options() if protocol != "file" else {}
    try:
        fs, path = fsspec.core.url_to_fs(location, **options)
    except ImportError:
        package = PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation for {protocol}://")
        raise StorageError(f"{protocol}:// locations need {package}", f"install it: pip install {package}") from None
    except ValueError as exc:
        raise StorageError(f"cannot open {location}: {_first_line(exc)}", "check the URL's protocol") from None
    return fs, path


def describe(location: str) -> str:
    return location if is_url(location) else os.path.abspath(os.path.expanduser(location))


@contextlib.contextmanager
def storage_errors(location: str, action: str) -> Iterator[None]:
    """Turn whatever a filesystem raises while `action`ing `location` into one StorageError line."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # fsspec backends raise many types (botocore, aiohttp, OSError, ...)
        raise storage_error(exc, location, action) from None


def storage_error(exc: BaseException, location: str, action: str) -> StorageError:
    where = describe(location)
    name = type(exc).__name__
    text = _first_line(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError") or "credentials" in text.lower() and "no" in text.lower():
        return StorageError(
            f"no credentials to {action} {where}",
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS store), or pass --storage-options",
        )
    if "bucket does not exist" in text.lower() or "NoSuchBucket" in text:
        return StorageError(f"cannot {action} {where}: its bucket does not exist", "check the bucket name, or create the bucket")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "403" in text:
        return StorageError(f"permission denied to {action} {where}", "check the credentials' rights, or choose a location you can write")
    if isinstance(exc, FileNotFoundError) and action in ("read", "list"):
        return StorageError(f"{where} does not exist", "check the path")
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(f"cannot {action} {where}: {exc.strerror}", "choose a location you can write")
    if isinstance(exc, (ConnectionError, TimeoutError)) or isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return TransientStorageError(f"cannot {action} {where}: {name}: {text}", "check that the store is reachable")
    if isinstance(exc, OSError) and action not in ("read", "list"):
        return StorageError(f"cannot {action} {where}: {exc.strerror or _first_line(exc)}", "choose a location you can write")
    # What is left is mostly the network's and the store's: refused or reset connections, timeouts, 5xx, throttling.
    return TransientStorageError(f"cannot {action} {where}: {name}: {text}", "check the location and the storage credentials")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


# ---------------------------------------------------------------- operations
def exists(location: str) -> bool:
    fs, path = filesystem(location)
    with storage_errors(location, "read"):
        return bool(fs.exists(path))


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with storage_errors(location, "read"):
        return fs.cat_file(path)


@contextlib.contextmanager
def open_input(location: str) -> Iterator[IO[bytes]]:
    fs, path = filesystem(location)
    with storage_errors(location, "read"):
        with fs.open(path, "rb") as handle:
            yield handle


@contextlib.contextmanager
def open_output(location: str) -> Iterator[IO[bytes]]:
    """A handle whose bytes appear at `location` only if the block completes; a failed block leaves nothing.

    The bytes go to a temporary file first (beside the target on a local disk, in the system's temporary
    directory for an object store), which is then renamed into place or uploaded in one piece.
    """
    fs, path = filesystem(location)
    remote = is_url(location) and not location.startswith("file://")
    with storage_errors(location, "write"):
        if remote:
            directory = None
        else:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        with storage_errors(location, "write"):
            if remote:
                fs.put_file(handle.name, path)
            else:
                os.chmod(handle.name, 0o666 & ~current_umask())  # as open() would have made it, not mkstemp's 0600
                os.replace(handle.name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)


def current_umask() -> int:
    """The process's umask: from /proc on Linux, where reading it changes nothing; elsewhere set and set back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(location: str, data: bytes) -> None:
    with open_output(location) as handle:
        handle.write(data)


def move(source: str, target: str) -> None:
    """Rename within one store (a server-side copy and a delete on object stores); replaces `target`."""
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    with storage_errors(target, "write"):
        if is_url(source) and not source.startswith("file://"):
            fs.copy(source_path, target_path)
            fs.rm_file(source_path)
        else:
            os.replace(source_path, target_path)


def remove(location: str) -> None:
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError), storage_errors(location, "delete"):
        fs.rm_file(path)


def remove_tree(location: str) -> None:
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError), storage_errors(location, "delete"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def list_names(location: str) -> list[str]:
    """Names directly under a directory (or prefix); empty when there is none."""
    fs, path = filesystem(location)
    with storage_errors(location, "list"):
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)


def check_writable(directory: str, what: str) -> None:
    """Fail now, with one line naming `directory`, if nothing can be written there (before any work is done)."""
    check_location(directory, what)
    fs, path = filesystem(directory)
    probe = f"{path.rstrip('/')}/.shardgen-write-check-{uuid.uuid4().hex}"
    with storage_errors(directory, "write to"):
        if not is_url(directory) or directory.startswith("file://"):
            os.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
