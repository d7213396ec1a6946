"""Connecting to Redis (broker and state store): bounded waits, one-line errors, no credentials shown.

A broker URL is a Redis URL (redis://, rediss:// for TLS, unix://) or, for a Redis that fails over, the Sentinels
that watch it in kombu's own form: `sentinel://[:password@]host:port[/db][;sentinel://host:port...]`, with the
master's name in SHARDGEN_SENTINEL_MASTER (or `--sentinel-master`). The password is the master's.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shardgen.schemas.errors import BrokerError

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
BROKER_ENV = "SHARDGEN_BROKER_URL"
SENTINEL_MASTER_ENV = "SHARDGEN_SENTINEL_MASTER"


def broker_url(explicit: str | None = None) -> str:
    url = explicit or os.environ.get(BROKER_ENV) or DEFAULT_BROKER_URL
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix", "sentinel"):
        raise BrokerError(
            f"unsupported broker URL scheme {scheme!r} in {redact(url)}",
            "use redis://[:password@]host:port/db, rediss:// for TLS, or sentinel://host:port;sentinel://host:port",
        )
    if scheme == "sentinel":
        sentinels(url)
        sentinel_master()
    return url


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def sentinels(url: str) -> list[tuple[str, int]]:
    """The (host, port) of each Sentinel a sentinel:// URL names, in order."""
    hosts = []
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        try:
            port = parts.port or 26379
        except ValueError:
            port = None
        if parts.scheme != "sentinel" or not parts.hostname or port is None:
            raise BrokerError(f"{redact(part)} is not a Sentinel address", "write sentinel://host:port;sentinel://host:port")
        hosts.append((parts.hostname, port))
    return hosts


def sentinel_master() -> str:
    name = os.environ.get(SENTINEL_MASTER_ENV, "").strip()
    if not name:
        raise BrokerError("a sentinel:// broker needs the name of the master its Sentinels watch",
                          f"set {SENTINEL_MASTER_ENV} or pass --sentinel-master NAME")
    return name


def redact(url: str) -> str:
    """The URL with any password replaced, fit for logs and error lines."""
    if ";" in url:
        return ";".join(redact(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None and "password=" not in (parts.query or ""):
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}"
    query = re.sub(r"(password=)[^&]*", r"\1***", parts.query or "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


TLS_QUERY_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def tls_options(url: str) -> dict[str, Any] | None:
    """For rediss:// URLs, the TLS settings in its query (CA, client cert), certificate checks on by default."""
    import ssl
    from urllib.parse import parse_qs

    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items() if k in TLS_QUERY_KEYS}
    requirement = query.pop("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    levels = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    if requirement not in levels:
        raise BrokerError(f"ssl_cert_reqs must be required, optional or none, got {requirement!r}", "fix the broker URL")
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query and not os.path.isfile(query[key]):
            raise BrokerError(f"{key} file {query[key]} does not exist", "fix the path in the broker URL")
    return {"ssl_cert_reqs": levels[requirement], **query}


def connect(url: str, *, timeout_s: float = 5.0) -> Any:
    """A redis client that has answered a ping, or a BrokerError saying what to do."""
    import redis
    import redis.sentinel
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    tls = tls_options(url)

    def client_with(retries: int) -> Any:
        options: dict[str, Any] = dict(
            socket_connect_timeout=timeout_s,
            socket_timeout=max(timeout_s, 30.0),
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=retries),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        )
        if is_sentinel(url):
            return _master_through_sentinels(url, options, timeout_s)
        return redis.Redis.from_url(
            urlunsplit(urlsplit(url)._replace(query="")) if tls is not None else url, **(tls or {}), **options,
        )

    try:
        client = client_with(retries=5)
        # redis-py retries an AuthenticationError like any ConnectionError (it is one), for half a minute on a
        # missing password: a first ping without retries answers a wrong or missing password at once.
        first = client_with(retries=0)
        try:
            first.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if isinstance(exc, redis.exceptions.AuthenticationError):
                raise
            client.ping()  # maybe not up yet: the bounded retries decide
        finally:
            first.close()
    except redis.exceptions.AuthenticationError:
        if urlsplit(url).password is None:
            raise BrokerError(f"Redis at {redact(url)} needs a password", "use redis://:PASSWORD@host:port/db") from None
        raise BrokerError(f"Redis at {redact(url)} refused the password", "check the password in --broker / SHARDGEN_BROKER_URL") from None
    except redis.sentinel.MasterNotFoundError:
        raise BrokerError(
            f"no Sentinel of {redact(url)} knows a master named {sentinel_master()!r}",
            f"check {SENTINEL_MASTER_ENV} / --sentinel-master and that the Sentinels run",
        ) from None
    except redis.exceptions.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise BrokerError(f"Redis at {redact(url)} needs a password", "use redis://:PASSWORD@host:port/db") from None
        raise BrokerError(f"Redis at {redact(url)} answered an error: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BrokerError(
            f"cannot reach Redis at {redact(url)} ({redact(reason)})",
            f"start redis-server or pass --broker / set {BROKER_ENV}",
        ) from None
    return client


def _master_through_sentinels(url: str, options: dict[str, Any], timeout_s: float) -> Any:
    """A client of the current master: on a connection error it asks the Sentinels again, so a failover is a
    reconnect like any other."""
    from redis.sentinel import Sentinel

    first = urlsplit(url.split(";")[0])
    db = int(first.path.strip("/") or 0)
    sentinel = Sentinel(sentinels(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return sentinel.master_for(sentinel_master(), password=first.password, db=db, **options)
