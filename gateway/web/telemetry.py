"""What each request leaves behind: its request metrics and its request-log line.

``Gateway.handle`` calls ``Telemetry.begin`` as a request starts (when metrics
or the request log are on; otherwise nothing here runs): with the log on, the
response gets its request id, which the server adds as ``X-Request-Id`` to it.
The servers note the status and the body bytes of every response as they send
it (gateway/web/request.py's ``Response``). When the handler is done (for
long-poll and SSE: when the response ends), ``Telemetry.finish`` queues its
figures; every 50 ms ``Telemetry.drain`` adds the queued requests to this
process's tallies (gateway/metrics.py flushes them into Prometheus once a
second) and writes their log lines.

The request id is the client's ``X-Request-Id`` when it is a plain token of at
most 128 characters (letters, digits and ``._:/+=@-``), else a new one: a
random per-process prefix and a counter, unique across replicas and cheaper
than a UUID.

Log lines (DS_LOG_FORMAT: ``text``, the default, or ``json``) name the time,
the instance, the request id, method, path and redacted query, status,
bytes received and sent, and the duration. Credentials never reach them: the
Authorization header is not read, and the values of ``token``,
``access_token``, ``signature`` and ``sig`` query parameters become
``REDACTED``. The path is written JSON-quoted, so no client can forge a line.
Lines are written to stdout together, at most 50 ms late (a write per request
would cost more than the rest of the line), without ever blocking the event loop
(gateway/web/log_writer.py): a stdout nobody reads drops lines, counted, and
workers sharing a pipe never tear each other's lines.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import secrets
import socket
import sys
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from itertools import compress, repeat
from operator import floordiv, sub
from typing import NamedTuple

import orjson

from gateway import metrics
from gateway.config import Settings

from .log_writer import LogWriter
from .request import REQUEST_ID_HEADER, Request, Response

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# Query parameters whose values are credentials (gateway/web/auth/: bearer
# tokens for EventSource, pre-signed URLs' signatures).
SECRET_PARAMS = frozenset({"token", "access_token", "signature", "sig"})
REDACTED = "REDACTED"
# A client that never got a response (it went away first), as nginx logs it.
CLIENT_CLOSED = 499

# Finished requests are counted and logged in batches, at most this late.
BATCH_DELAY_S = 0.05
BATCH_REQUESTS = 512

# Operation labels: bounded, whatever clients send.
_STREAM_OPERATIONS = {
    "POST": "append",
    "PUT": "create",
    "HEAD": "head",
    "DELETE": "delete",
    "OPTIONS": "options",
}
LIVE_OPERATIONS = ("long_poll", "sse")


def redact_query(query: str) -> str:
    """``query`` with the values of credential parameters replaced."""
    if "=" not in query:
        return query
    parts = query.split("&")
    for index, part in enumerate(parts):
        name, equals, _ = part.partition("=")
        if equals and name.lower() in SECRET_PARAMS:
            parts[index] = f"{name}={REDACTED}"
    return "&".join(parts)


def operation_of(method: str, path: str, query: str, prefix: str) -> str:
    """The metrics label of a request: what it does, in a word."""
    if path.startswith(prefix):
        if method == "POST":
            return "append"  # the hot path first
        if method == "GET":
            if "live=" in query:
                if "live=sse" in query:
                    return "sse"
                if "live=long-poll" in query:
                    return "long_poll"
            return "read"
        return _STREAM_OPERATIONS.get(method, "other")
    if path in ("/healthz", "/readyz"):
        return "health"
    if path == "/metrics":
        return "metrics"
    return "other"


class _Clock:
    """Wall-clock timestamps for log lines from ``perf_counter_ns`` readings: the
    seconds part formatted once a second, the milliseconds from a table."""

    __slots__ = ("offset_ns", "second", "text")

    _MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.perf_counter_ns()
        self.second = -1
        self.text = ""

    def stamp(self, counter_millis: int) -> str:
        """The time of ``perf_counter_ns`` reading ``counter_millis`` (in milliseconds)."""
        millis = counter_millis + self.offset_ns // 1_000_000
        second = millis // 1000
        if second != self.second:
            self.second = second
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self.text + self._MILLIS[millis - second * 1000]


def _quoted(target: str) -> str:
    """``target`` as a JSON string: a path cannot break the line or forge a field."""
    quoted = _QUOTED.get(target)
    if quoted is None:
        quoted = orjson.dumps(target).decode()
        if len(_QUOTED) < _QUOTED_MAX:
            _QUOTED[target] = quoted
    return quoted


# The quoted paths of busy streams (their appends repeat them), bounded.
_QUOTED: dict[str, str] = {}
_QUOTED_MAX = 4096

now = time.perf_counter_ns  # the clock of a request's start and end

# A finished request, as drain reads it: start and end (perf_counter_ns; each
# end no earlier than the one before), status, bytes sent, Content-Length as
# declared, method, path, query, request id, live operation.
Finished = tuple[int, int, int, int, str | None, str, str, str, str | None, str | None]


class _Columns(NamedTuple):
    """A drained batch, column by column, as the log lines need it."""

    ends: Sequence[int]
    ids: Sequence[str | None]
    methods: Sequence[str]
    paths: Sequence[str]
    queries: Sequence[str]
    statuses: Sequence[int]
    received: Sequence[str]
    sents: Sequence[int]
    elapsed: Sequence[int]


class Telemetry:
    """Per process: the tallies behind the request metrics, and the request log.

    A finished request costs the request path one list append: every
    ``BATCH_DELAY_S`` (or ``BATCH_REQUESTS`` requests) ``drain`` adds the
    batch to the tallies and writes its log lines.
    """

    def __init__(self, settings: Settings, *, fd: int | None = None) -> None:
        self.prefix = settings.stream_prefix + "/"
        self.writer: LogWriter | None = None
        if settings.access_log:
            self.writer = LogWriter(
                sys.stdout.fileno() if fd is None else fd,
                max_pending=settings.access_log_buffer,
                on_drop=self._dropped,
            )
        self.json = settings.log_format == "json"
        self.instance = settings.instance_id or socket.gethostname()
        # The latency buckets' bounds in nanoseconds, as durations are measured.
        self._bounds_ns = (*(round(bound * 1e9) for bound in metrics.LATENCY_BUCKETS), math.inf)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(6) + "-"
        self._clock = _Clock()
        self.tallies: dict[str, metrics.Tally] = {}
        self.local: metrics.Metrics | None = None
        if settings.metrics_enabled:
            self.local = metrics.enable()
            metrics.add_flusher(self.flush)
        self.done: list[Finished] = []
        self._timer: asyncio.TimerHandle | None = None

    def flush(self) -> None:
        self.drain()
        for tally in self.tallies.values():
            tally.flush()

    def close(self) -> None:
        self.drain()
        if self.writer is not None:
            self.writer.close()

    def _dropped(self, lines: int) -> None:
        if self.local is not None:
            self.local.request_log_dropped.inc(lines)

    def begin(self, req: Request, res: Response, query: str) -> str | None:
        """A request starts: the response gets its request id (with the log
        on); the live operation when it is a live reader, counted as one."""
        if self.writer is not None:  # the id is the log's: none without a log
            request_id = req.logged_header(REQUEST_ID_HEADER)
            if request_id is None or _VALID_REQUEST_ID.fullmatch(request_id) is None:
                request_id = self._id_prefix + str(next(self._ids))  # (faster than hex)
            res.request_id = request_id
        if req.method == "GET" and self.local is not None and "live=" in query:
            operation = operation_of("GET", req.loggable_path(), query, self.prefix)
            if operation in LIVE_OPERATIONS:
                self.local.readers[operation] += 1
                return operation
        return None

    def refused(self, status: int, reason: str) -> None:
        """A request the trust boundary or a rate limit refused (401, 403, 429)."""
        if self.local is not None:
            self.local.refusals.labels(str(status), reason).inc()

    def finish(self, req: Request, res: Response, start: int, query: str, live: str | None) -> None:
        """The request is done (a live one: its response has ended). ``query``
        as it came: an SSE request releases its own once it has started."""
        # What drain needs, as a tuple of strings and numbers: the garbage
        # collector stops tracking it at its first pass, and nothing else of
        # the request (its object, headers, connection) outlives the request.
        # Holding those until the drain cost more in collections than the
        # rest of the bookkeeping did. Bytes received are as declared (an SSE
        # request, whose headers are released by now, has no body).
        path = req._path  # decoded when the request was routed, nearly always
        if path is None:
            path = req.loggable_path()
        done = self.done
        done.append(
            (
                start,
                now(),
                res.status,
                res.sent,
                req.logged_header("content-length"),
                req.method,
                path,
                query,
                res.request_id,
                live,
            )
        )
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_DELAY_S, self.drain)
        elif len(done) >= BATCH_REQUESTS:
            self.drain()

    def drain(self) -> None:
        """Count and log the requests finished since the last drain.

        Column by column: the batch is transposed once and most of the work
        runs in C (``map``, ``Counter``, ``count``), so that a request costs
        little Python of its own.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done = self.done
        if not done:
            return
        self.done = []
        starts, ends, statuses, sents, declared, methods, paths, queries, ids, lives = zip(
            *done, strict=True
        )
        if 0 in statuses:
            statuses = tuple([status or CLIENT_CLOSED for status in statuses])
        # Content-Length as declared: digits (the servers refuse others), or none.
        if None in declared or not all(map(str.isdigit, declared)):
            declared = tuple(
                [value if value is not None and value.isdigit() else "0" for value in declared]
            )
        received: Sequence[str] = declared
        elapsed = list(map(sub, ends, starts))  # nanoseconds
        if self.local is not None:
            self._count(
                self.local, statuses, sents, received, elapsed, methods, paths, queries, lives
            )
        if self.writer is not None:
            batch = _Columns(ends, ids, methods, paths, queries, statuses, received, sents, elapsed)
            lines = self._json_lines(batch) if self.json else self._text_lines(batch)
            data = "".join(lines).encode("utf-8", "backslashreplace")
            self.writer.write(data, len(lines))

    def _count(
        self,
        local: metrics.Metrics,
        statuses: Sequence[int],
        sents: Sequence[int],
        received: Sequence[str],
        elapsed: Sequence[int],
        methods: Sequence[str],
        paths: Sequence[str],
        queries: Sequence[str],
        lives: Sequence[str | None],
    ) -> None:
        prefix = self.prefix
        size = len(methods)
        operations: list[str] | None = None
        if not (  # all appends (the busy case): no per-request label needed
            methods.count("POST") == size and all(map(str.startswith, paths, repeat(prefix)))
        ):
            operations = [
                live
                if live is not None
                else "append"  # the hot path, without a call
                if method == "POST" and path.startswith(prefix)
                else operation_of(method, path, query, prefix)
                for live, method, path, query in zip(lives, methods, paths, queries, strict=True)
            ]
            if lives.count(None) != size:
                for live, count in Counter(lives).items():
                    if live is not None:
                        local.readers[live] -= count
        kinds = {"append"} if operations is None else set(operations)
        for operation in kinds:
            if len(kinds) == 1:
                of_statuses, of_sents, of_received, of_elapsed = statuses, sents, received, elapsed
            else:
                assert operations is not None
                mask = list(map(operation.__eq__, operations))
                of_statuses = list(compress(statuses, mask))
                of_sents = list(compress(sents, mask))
                of_received = list(compress(received, mask))
                of_elapsed = list(compress(elapsed, mask))
            tally = self.tallies.get(operation)
            if tally is None:
                tally = self.tallies[operation] = metrics.Tally(local, operation)
            by_status = tally.by_status
            for status, count in Counter(of_statuses).items():
                by_status[status] = by_status.get(status, 0) + count
            tally.received += sum(map(int, of_received))
            tally.sent += sum(of_sents)
            latency = tally.latency
            counts = latency.counts
            for bucket, count in Counter(
                map(bisect_left, repeat(self._bounds_ns), of_elapsed)
            ).items():
                counts[bucket] += count
            latency.total += sum(of_elapsed) / 1e9

    def _stamps(self, ends: Sequence[int]) -> list[str]:
        """The log time of each end (in the order they ended): formatted once
        per millisecond, and found by bisection, a step per millisecond."""
        stamp = self._clock.stamp
        stamps: list[str] = []
        size = len(ends)
        at = 0
        while at < size:
            millis = ends[at] // 1_000_000
            until = bisect_left(ends, (millis + 1) * 1_000_000, at)
            stamps += repeat(stamp(millis), until - at)
            at = until
        return stamps

    def _text_lines(self, batch: _Columns) -> list[str]:
        if any(batch.queries):
            targets = [
                path + "?" + redact_query(query) if query else path
                for path, query in zip(batch.paths, batch.queries, strict=True)
            ]
        else:
            targets = list(batch.paths)
        quoted = list(map(_QUOTED.get, targets))
        if None in quoted:
            quoted = [
                q if q is not None else _quoted(t) for q, t in zip(quoted, targets, strict=True)
            ]
        instance = self.instance
        return [
            f"{stamp} instance={instance} request_id={request_id} method={method} path={target} "
            f"status={status} received_bytes={received} sent_bytes={sent} duration_us={micros}\n"
            for stamp, request_id, method, target, status, received, sent, micros in zip(
                self._stamps(batch.ends),
                batch.ids,
                batch.methods,
                quoted,
                batch.statuses,
                batch.received,
                batch.sents,
                map(floordiv, batch.elapsed, repeat(1000)),
                strict=True,
            )
        ]

    def _json_lines(self, batch: _Columns) -> list[str]:
        instance = self.instance
        return [
            orjson.dumps(
                {
                    "time": stamp,
                    "instance": instance,
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "query": redact_query(query) if query else query,
                    "status": status,
                    "received_bytes": int(declared),
                    "sent_bytes": sent,
                    "duration_us": nanos // 1000,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            ).decode()
            for stamp, request_id, method, path, query, status, declared, sent, nanos in zip(
                self._stamps(batch.ends), *batch[1:], strict=True
            )
        ]
