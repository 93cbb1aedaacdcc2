"""The gateway's Prometheus metrics, and the cheap way the request path feeds them.

Every layer counts here (storage: Redis latency, group-commit batches;
live: wake-ups, pub/sub reconnects; web: requests, bytes, refusals), so this
module sits at the bottom beside gateway/config.py and imports nothing of the
gateway.

prometheus_client's own ``inc``/``observe`` cost a lock, and in multi-process
mode (``PROMETHEUS_MULTIPROC_DIR``, set by the console script for its workers)
a ``getpid`` and an mmap write per value: several microseconds per request,
where an append costs about twenty. So the hot paths add to plain Python
numbers instead (``Tally``, ``LocalHistogram``, ``LOCAL``), and ``flush``
moves them into the metric objects: once a second (``start_flushing``), before
every scrape this process answers, and at shutdown. A scrape may therefore
lag up to a second behind the other workers.

Rare events (refusals, reconnects, Redis errors, retention trims) increment
their metric objects directly.

Nothing here runs unless the gateway collects metrics (``Settings.metrics``):
the request path checks one attribute and goes on.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from itertools import repeat
from typing import Any

# prometheus_client is imported by ``enable`` only: it picks its value store
# (in memory, or mmap'ed files in PROMETHEUS_MULTIPROC_DIR) when it is first
# imported, and the console script sets that variable before its workers start.

PREFIX = "durable_streams_"
FLUSH_INTERVAL_S = 1.0

# Latency buckets: an append takes a millisecond or two, a long-poll up to its
# timeout (30 s by default), an SSE response up to a minute.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The metric objects, made once per process by ``enable``."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            PREFIX + "requests_total",
            "HTTP requests answered, by operation and status code (499: the client "
            "went away before its response).",
            ["operation", "status"],
        )
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from a request's arrival at the app to the end of its response (for "
            "long-poll and SSE: the whole wait), by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
        )
        self.received_bytes = Counter(
            PREFIX + "received_bytes_total",
            "Request body bytes received (as declared by Content-Length), by operation.",
            ["operation"],
        )
        self.sent_bytes = Counter(
            PREFIX + "sent_bytes_total",
            "Response body bytes sent, by operation.",
            ["operation"],
        )
        self.live_readers = Gauge(
            PREFIX + "live_readers",
            "Long-poll and SSE readers waiting now, by mode.",
            ["mode"],
            multiprocess_mode="livesum",
        )
        self.wakeups = Counter(
            PREFIX + "wakeups_delivered_total",
            "Waiting live readers woken: by an append, a stream's deletion, or a "
            "re-check after a pub/sub reconnect.",
        )
        self.request_log_dropped = Counter(
            PREFIX + "request_log_dropped_lines_total",
            "Request-log lines dropped because standard output was not being read "
            "(more than 4 MiB of lines waiting).",
        )
        self.pubsub_reconnects = Counter(
            PREFIX + "pubsub_reconnects_total",
            "Times the wake-up listener lost its Redis pub/sub connection and reconnected.",
        )
        self.batch_appends = Histogram(
            PREFIX + "group_commit_batch_appends",
            "Appends per group-commit script run.",
            buckets=BATCH_BUCKETS,
        )
        self.redis_duration = Histogram(
            PREFIX + "redis_command_duration_seconds",
            "Time from writing a Redis command to reading its reply.",
            buckets=REDIS_BUCKETS,
        )
        self.redis_errors = Counter(
            PREFIX + "redis_errors_total",
            "Redis failures that became a 503 (unreachable, timed out, loading, "
            "read-only, ...), by exception type.",
            ["error"],
        )
        self.refusals = Counter(
            PREFIX + "auth_refusals_total",
            "Requests refused by the trust boundary (401, 403) or a rate limit (429), "
            "by status and reason.",
            ["status", "reason"],
        )
        # Entries removed from streams by retention: append.lua reports what
        # its trims removed in each run, and the group commit
        # (gateway/storage/commit.py) increments this directly (trims are rare).
        self.retention_trimmed = Counter(
            PREFIX + "retention_trimmed_entries_total",
            "Stream entries removed by retention.",
        )
        # Not yet flushed: counted on the hot paths as plain numbers.
        self.woken = 0
        self.batches = LocalHistogram(self.batch_appends, BATCH_BUCKETS)
        self.redis = LocalHistogram(self.redis_duration, REDIS_BUCKETS)
        # mode -> readers waiting now (the web layer counts them in and out)
        self.readers: dict[str, int] = {"long_poll": 0, "sse": 0}

    def flush(self) -> None:
        if self.woken:
            self.wakeups.inc(self.woken)
            self.woken = 0
        self.batches.flush()
        self.redis.flush()
        for mode, readers in self.readers.items():
            self.live_readers.labels(mode).set(readers)


# -- cheap local accumulation ------------------------------------------------------


class LocalHistogram:
    """Observations kept as plain numbers until ``flush`` adds them to
    ``child`` (a Histogram, or one labelled child of it).

    ``observe(value)`` is a list's ``append``: one call, no Python frame, as it
    runs for every Redis reply; ``flush`` puts the values in their buckets
    (in C builtins, at most once a second). ``counts`` and ``total`` take
    observations already bucketed (gateway/web/telemetry.py adds a batch's).
    """

    __slots__ = ("_child", "_values", "bounds", "counts", "observe", "total")

    def __init__(self, child: Any, buckets: tuple[float, ...]) -> None:
        self._child = child
        self.bounds = (*buckets, float("inf"))
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self._values: list[float] = []
        self.observe: Callable[[float], None] = self._values.append

    def flush(self) -> None:
        counts = self.counts
        values = self._values
        if values:
            # Prometheus buckets are "less than or equal": the first bound >= value.
            for index, count in Counter(map(bisect_left, repeat(self.bounds), values)).items():
                counts[index] += count
            self.total += sum(values)
            values.clear()
        if not any(counts):
            return
        # prometheus_client has no bulk observe: add to its per-bucket values
        # (stored non-cumulative; it sums them when it exposes them).
        buckets = self._child._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
                counts[index] = 0
        self._child._sum.inc(self.total)
        self.total = 0.0


class Tally:
    """The requests of one operation: counts by status, bytes and latency."""

    __slots__ = (
        "_metrics",
        "_operation",
        "_status_children",
        "by_status",
        "latency",
        "received",
        "sent",
    )

    def __init__(self, metrics: Metrics, operation: str) -> None:
        self._metrics = metrics
        self._operation = operation
        self.by_status: dict[int, int] = {}
        self._status_children: dict[int, Any] = {}
        self.received = 0
        self.sent = 0
        self.latency = LocalHistogram(metrics.request_duration.labels(operation), LATENCY_BUCKETS)

    def flush(self) -> None:
        children = self._status_children
        for status, count in self.by_status.items():
            if count:
                child = children.get(status)
                if child is None:
                    labels = (self._operation, str(status))
                    child = children[status] = self._metrics.requests.labels(*labels)
                child.inc(count)
        self.by_status = dict.fromkeys(self.by_status, 0)
        if self.received:
            self._metrics.received_bytes.labels(self._operation).inc(self.received)
            self.received = 0
        if self.sent:
            self._metrics.sent_bytes.labels(self._operation).inc(self.sent)
            self.sent = 0
        self.latency.flush()


# None until ``enable``: the storage and live layers test it before counting, so
# a gateway without metrics pays one global lookup per event.
LOCAL: Metrics | None = None
_flushers: list[Callable[[], None]] = []


def enable() -> Metrics:
    """Start collecting in this process (idempotent)."""
    global LOCAL
    if LOCAL is None:
        LOCAL = Metrics()
        _flushers.append(LOCAL.flush)
    return LOCAL


def add_flusher(flush: Callable[[], None]) -> None:
    _flushers.append(flush)


def flush() -> None:
    for one in _flushers:
        one()


class _Flushing:
    timer: asyncio.TimerHandle | None = None


def start_flushing(loop: asyncio.AbstractEventLoop) -> None:
    """Flush once a second on ``loop`` until ``stop_flushing``."""

    def tick() -> None:
        # Rescheduled whatever happens: observations wait in lists until a flush.
        _Flushing.timer = loop.call_later(FLUSH_INTERVAL_S, tick)
        flush()

    _Flushing.timer = loop.call_later(FLUSH_INTERVAL_S, tick)


def stop_flushing() -> None:
    """Stop the timer and flush what is left (at shutdown)."""
    if _Flushing.timer is not None:
        _Flushing.timer.cancel()
        _Flushing.timer = None
    flush()


# -- exposition ----------------------------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition() -> bytes:
    """The text a scrape gets: every worker's files in multi-process mode, else
    this process's metrics (with prometheus_client's process and GC metrics).
    Call ``flush`` first, on the event loop, to include this process's latest
    counts; this may run in another thread."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if multiprocess_dir() is None:
        return generate_latest(REGISTRY)
    combined = CollectorRegistry()
    MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
    return generate_latest(combined)


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters stay: they only grow)."""
    if multiprocess_dir() is not None:
        from prometheus_client.multiprocess import mark_process_dead as mark

        mark(pid)  # type: ignore[no-untyped-call]
