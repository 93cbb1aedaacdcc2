"""Settings, read once from the environment.

Every limit the gateway enforces lives here so that operators find them in one
place (the README's configuration table mirrors this module).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Values of DS_AUTH (gateway/web/auth/build_authorizer has one branch each).
AUTH_MODES = ("none", "jwt", "forward")


def _int(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


# DS_INSTANCE_ID names responses (X-DS-Instance), request-log lines (an unquoted
# field) and Redis connections (CLIENT SETNAME takes no spaces): a short token.
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _instance_id() -> str | None:
    raw = os.environ.get("DS_INSTANCE_ID") or None
    if raw is not None and not _INSTANCE_ID.fullmatch(raw):
        raise ValueError(
            f"DS_INSTANCE_ID must be 1-64 letters, digits, '.', '_', ':' or '-', got {raw[:80]!r}"
        )
    return raw


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """``REDIS_SENTINELS``: ``host:port,host:port`` (IPv6 hosts in brackets:
    ``[::1]:26379``)."""
    addresses = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"REDIS_SENTINELS: expected host:port, got {item!r}")
        addresses.append((host.strip("[]"), int(port)))
    if not addresses:
        raise ValueError("REDIS_SENTINELS names no sentinel")
    return addresses


def _str(name: str, default: str) -> str:
    raw = os.environ.get(name)
    return default if raw is None or raw.strip() == "" else raw.strip()


def _flag(name: str) -> bool:
    raw = _str(name, "0").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    # Where the streams live. With neither URL set an embedded redis-server starts.
    redis_url: str | None = None
    redis_cluster_url: str | None = None
    # Redis behind Sentinel: "host:port,host:port" of the sentinels and the name
    # of the master they monitor (takes precedence over redis_url).
    redis_sentinels: str | None = None
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = None
    data_dir: str = ".durable-streams-data"
    # Namespace of every Redis key the gateway writes (see gateway/keys.py).
    key_prefix: str = "ds"
    # URL prefix under which streams are served.
    stream_prefix: str = "/v1/stream"
    # Largest accepted request body (POST/PUT); larger bodies get 413.
    max_body_bytes: int = 16 * 1024 * 1024
    # Largest response page; a read returns at most this many bytes of data (or
    # one append, when a single append is larger). 4 MiB amortises the fixed cost
    # of a request and its script call; larger pages got slower again (Redis hands
    # script replies through buffers that grow by copying).
    max_read_bytes: int = 4 * 1024 * 1024
    # How long a long-poll waits for data before answering 204.
    long_poll_timeout_ms: int = 30_000
    # SSE connections are closed after this long so CDNs can collapse clients.
    sse_max_duration_ms: int = 60_000
    # Interval between SSE keep-alive comments while a reader waits.
    sse_keepalive_ms: int = 15_000
    # Redis timeouts: a dead Redis must turn into a fast 503, never a hang.
    redis_connect_timeout_ms: int = 1_000
    redis_command_timeout_ms: int = 2_000
    # Connections per replica for commands (the wake-up listener uses one more).
    redis_pool_size: int = 3
    # Acknowledge a write only once this many replicas have it (Redis WAIT after
    # each script run; 0: do not wait), waiting at most wait_timeout_ms.
    wait_replicas: int = 0
    wait_timeout_ms: int = 1_000
    # Cache-Control visibility for catch-up and long-poll reads: public or private.
    cache_visibility: str = "public"
    # Value of Access-Control-Allow-Origin.
    cors_origin: str = "*"
    # Cursor interval for CDN collapsing (protocol section 10.1).
    cursor_interval_s: int = 20
    # When set, every response carries X-DS-Instance with this value (debugging
    # which replica answered behind a load balancer).
    instance_id: str | None = None
    # Peers whose X-Forwarded-* / Forwarded headers are believed (addresses or
    # networks, comma-separated; "*" for any). See gateway/web/forwarded.py.
    forwarded_allow_ips: str = "127.0.0.1"
    # The trust boundary (gateway/web/auth/): "none" (anyone may do anything),
    # "jwt" (bearer tokens) or "forward" (ask an application).
    auth: str = "none"
    # JWT keys, exactly one with auth=jwt: an HMAC secret, a public key (PEM
    # text or the path of a PEM file), or the URL of a JWKS document.
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    # Clock skew tolerated on exp and nbf, and the iss/aud a token must carry
    # (checked only when set).
    jwt_leeway_s: int = 30
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # HMAC-SHA256 key of pre-signed URLs (gateway/web/auth/presign.py).
    url_signing_key: str | None = None
    # Retention of streams that set none of their own (Stream-Retention-Max-Age,
    # -Max-Bytes; see lua/append.lua): entries older than this many seconds, and
    # the oldest entries beyond this many bytes of data, are trimmed. 0: keep
    # everything.
    retention_max_age_s: int = 0
    retention_max_bytes: int = 0
    # DS_AUTH=forward (gateway/web/auth/forward.py): the endpoint asked about
    # every request; its allows are cached for auth_forward_cache_s per
    # credential, path and operation.
    auth_forward_url: str | None = None
    auth_forward_cache_s: int = 5
    auth_forward_timeout_ms: int = 2_000
    # Rate limits per principal and operation, e.g. "append=200/s;read=50/m"
    # (parsed by gateway/web/auth/limits.py), and the most live readers
    # (long-poll + SSE) one principal may hold at once; 0 = no quota. Both are
    # counted in Redis, so every replica shares them.
    rate_limit: str | None = None
    max_live_readers: int = 0
    # Prometheus metrics (gateway/metrics.py): /metrics on the main port
    # (DS_METRICS=1), and/or on a port of its own served by the console script
    # (DS_METRICS_PORT). Collected only when served somewhere.
    metrics_path: bool = False
    metrics_port: int | None = None
    # The request log (gateway/web/telemetry.py): one line per request on
    # stdout, "text" or "json". The console script turns it on (--no-access-log).
    access_log: bool = False
    log_format: str = "text"
    # Request-log bytes held for a stdout that is not being read, before lines
    # are dropped (gateway/web/log_writer.py).
    access_log_buffer: int = 4 * 1024 * 1024

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_path or self.metrics_port is not None

    @classmethod
    def from_env(cls) -> Settings:
        visibility = _str("DS_CACHE_VISIBILITY", "public").lower()
        if visibility not in ("public", "private"):
            raise ValueError("DS_CACHE_VISIBILITY must be 'public' or 'private'")
        prefix = "/" + _str("DS_STREAM_PREFIX", "/v1/stream").strip("/")
        key_prefix = _str("DS_KEY_PREFIX", "ds")
        auth = _str("DS_AUTH", "none").lower()
        if auth not in AUTH_MODES:
            raise ValueError(f"DS_AUTH must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
        command_timeout_ms = _int("DS_REDIS_COMMAND_TIMEOUT_MS", 2_000, 1)
        wait_replicas = _int("DS_WAIT_REPLICAS", 0, 0)
        wait_timeout_ms = _int("DS_WAIT_TIMEOUT_MS", 1_000, 1)
        # A WAIT holds its connection until the replicas answer or its timeout
        # passes; past the command timeout the connection would be given up.
        if wait_replicas and wait_timeout_ms >= command_timeout_ms:
            raise ValueError(
                f"DS_WAIT_TIMEOUT_MS ({wait_timeout_ms}) must be less than "
                f"DS_REDIS_COMMAND_TIMEOUT_MS ({command_timeout_ms})"
            )
        log_format = _str("DS_LOG_FORMAT", "text").lower()
        if log_format not in ("text", "json"):
            raise ValueError("DS_LOG_FORMAT must be 'text' or 'json'")
        metrics_port = _int("DS_METRICS_PORT", 0, 0, 65535) or None
        sentinels = os.environ.get("REDIS_SENTINELS") or None
        if sentinels is not None:
            sentinel_addresses(sentinels)  # refused now, not when a worker connects
        return cls(
            redis_url=os.environ.get("REDIS_URL") or None,
            redis_cluster_url=os.environ.get("REDIS_CLUSTER_URL") or None,
            redis_sentinels=sentinels,
            redis_sentinel_master=_str("REDIS_SENTINEL_MASTER", "mymaster"),
            redis_sentinel_username=os.environ.get("REDIS_SENTINEL_USERNAME") or None,
            redis_sentinel_password=os.environ.get("REDIS_SENTINEL_PASSWORD") or None,
            data_dir=_str("DS_DATA_DIR", ".durable-streams-data"),
            key_prefix=key_prefix,
            stream_prefix=prefix,
            max_body_bytes=_int("DS_MAX_BODY_BYTES", 16 * 1024 * 1024, 1),
            max_read_bytes=_int("DS_MAX_READ_BYTES", 4 * 1024 * 1024, 1024),
            long_poll_timeout_ms=_int("DS_LONG_POLL_TIMEOUT_MS", 30_000, 1),
            sse_max_duration_ms=_int("DS_SSE_MAX_DURATION_MS", 60_000, 1),
            sse_keepalive_ms=_int("DS_SSE_KEEPALIVE_MS", 15_000, 100),
            redis_connect_timeout_ms=_int("DS_REDIS_CONNECT_TIMEOUT_MS", 1_000, 1),
            redis_command_timeout_ms=command_timeout_ms,
            redis_pool_size=_int("DS_REDIS_POOL_SIZE", 3, 1),
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
            cache_visibility=visibility,
            cors_origin=_str("DS_CORS_ORIGIN", "*"),
            cursor_interval_s=_int("DS_CURSOR_INTERVAL_S", 20, 1),
            instance_id=_instance_id(),
            forwarded_allow_ips=_str("DS_FORWARDED_ALLOW_IPS", "127.0.0.1"),
            auth=auth,
            jwt_secret=os.environ.get("DS_JWT_SECRET") or None,
            jwt_public_key=os.environ.get("DS_JWT_PUBLIC_KEY") or None,
            jwks_url=os.environ.get("DS_JWKS_URL") or None,
            jwt_leeway_s=_int("DS_JWT_LEEWAY_S", 30, 0),
            jwt_issuer=os.environ.get("DS_JWT_ISSUER") or None,
            jwt_audience=os.environ.get("DS_JWT_AUDIENCE") or None,
            url_signing_key=os.environ.get("DS_URL_SIGNING_KEY") or None,
            retention_max_age_s=_int("DS_RETENTION_MAX_AGE_S", 0),
            retention_max_bytes=_int("DS_RETENTION_MAX_BYTES", 0),
            auth_forward_url=os.environ.get("DS_AUTH_FORWARD_URL", "").strip() or None,
            auth_forward_cache_s=_int("DS_AUTH_FORWARD_CACHE_S", 5, 0),
            auth_forward_timeout_ms=_int("DS_AUTH_FORWARD_TIMEOUT_MS", 2_000, 1),
            rate_limit=os.environ.get("DS_RATE_LIMIT", "").strip() or None,
            max_live_readers=_int("DS_MAX_LIVE_READERS", 0, 0),
            metrics_path=_flag("DS_METRICS"),
            metrics_port=metrics_port,
            access_log=_flag("DS_ACCESS_LOG"),
            access_log_buffer=_int("DS_ACCESS_LOG_BUFFER_BYTES", 4 * 1024 * 1024, 65536),
            log_format=log_format,
        )
