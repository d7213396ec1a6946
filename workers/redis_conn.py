"""Connecting to Redis (broker and state store): bounded waits, one-line errors, no credentials shown."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shardgen.schemas.errors import BrokerError

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
BROKER_ENV = "SHARDGEN_BROKER_URL"


def broker_url(explicit: str | None = None) -> str:
    url = explicit or os.environ.get(BROKER_ENV) or DEFAULT_BROKER_URL
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise BrokerError(
            f"unsupported broker URL scheme {scheme!r} in {redact(url)}",
            "use redis://[:password@]host:port/db or rediss:// for TLS",
        )
    return url


def redact(url: str) -> str:
    """The URL with any password replaced, fit for logs and error lines."""
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
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    tls = tls_options(url)

    def client_with(retries: int) -> Any:
        return redis.Redis.from_url(
            urlunsplit(urlsplit(url)._replace(query="")) if tls is not None else url,
            **(tls or {}),
            socket_connect_timeout=timeout_s,
            socket_timeout=max(timeout_s, 30.0),
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=retries),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
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
