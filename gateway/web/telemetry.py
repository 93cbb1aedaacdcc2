"""What each request leaves behind: its request metrics and its request-log line.

When metrics or the request log are on (otherwise nothing here runs),
``Gateway.handle`` calls the recorder (gateway/web/recorder.py: in C when
built, else in Python) itself, twice per request, as a Python call per
request would cost more than the recording. As the request starts, the
recorder's ``begin`` notes on the response the clock, and with the log on its
request id, which the server adds as ``X-Request-Id`` to the response; a GET
asking for ``live=`` goes to ``Telemetry.live_reader``, which counts a live
reader. The servers note the status and the body bytes of every response as
they send it (gateway/web/request.py's ``Response``). When the handler is
done (for long-poll and SSE: when the response ends), the recorder's ``add``
records the request, and its answer starts the batch's timer or drains a full
one (``batch_due``); every 50 ms (or 512 requests) ``Telemetry.drain`` adds
the recorded requests to this process's tallies (gateway/metrics.py flushes
them into Prometheus once a second) and writes their log lines.

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
import secrets
import socket
import sys
from collections import Counter
from collections.abc import Sequence
from itertools import compress
from operator import sub

import orjson

from gateway import metrics
from gateway.config import Settings

from . import recorder as recorders
from .log_writer import LogWriter
from .recorder import (
    CLIENT_CLOSED,
    TARGET_MAX_BYTES,
    Clock,
    Columns,
    Tallied,
    bounded,
    declared_digits,
    logged_methods,
    redact_query,
    summarize,
)
from .request import Request, Response

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


class Telemetry:
    """Per process: the tallies behind the request metrics, and the request log.

    A finished request costs the request path one call to the recorder
    (gateway/web/recorder.py): every ``BATCH_DELAY_S`` (or ``BATCH_REQUESTS``
    requests) ``drain`` adds the batch to the tallies and writes its log lines.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        fd: int | None = None,
        recorder: recorders.RecorderType | None = None,
    ) -> None:
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
        self._bounds_ns = tuple(round(bound * 1e9) for bound in metrics.LATENCY_BUCKETS)
        self._clock = Clock()
        self.recorder = (recorder or recorders.Recorder)(
            BATCH_REQUESTS,
            secrets.token_hex(6) + "-",  # request ids: unique across replicas, and short
            recorders.QUOTED,
            recorders.quoted_target,
            self._clock.offset_ns,
            ids=self.writer is not None,  # (the log's: with it off, responses get none)
        )
        self.tallies: dict[str, metrics.Tally] = {}
        self.local: metrics.Metrics | None = None
        if settings.metrics_enabled:
            self.local = metrics.enable()
            metrics.add_flusher(self.flush)
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

    def live_reader(self, req: Request, res: Response) -> None:
        """A GET asking for ``live=`` starts (the recorder's ``begin`` said
        so): when it is a live reader, counted as one (until its ``add`` is
        drained), its live operation noted on the response for ``add``."""
        if self.local is not None:
            operation = operation_of("GET", req.loggable_path(), res.query, self.prefix)
            if operation in LIVE_OPERATIONS:
                self.local.readers[operation] += 1
                res.live = operation

    def batch_due(self) -> None:
        """The recorder's ``add`` said so: its batch has just begun (drained
        at most ``BATCH_DELAY_S`` from now), or is full (drained now)."""
        if len(self.recorder) >= BATCH_REQUESTS:
            self.drain()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_DELAY_S, self.drain)

    def refused(self, status: int, reason: str) -> None:
        """A request the trust boundary or a rate limit refused (401, 403, 429)."""
        if self.local is not None:
            self.local.refusals.labels(str(status), reason).inc()

    def drain(self) -> None:
        """Count and log the requests finished since the last drain.

        A batch of appends (the busy case) is counted by the recorder in one
        pass, and text lines come from the recorder whole; other batches are
        read column by column, most of the work in C builtins (``map``,
        ``Counter``, ``compress``).
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        recorder = self.recorder
        size = len(recorder)
        if not size:
            return
        try:
            columns: Columns | None = None
            if self.local is not None:
                appends = recorder.tally(self.prefix, self._bounds_ns)
                if appends is not None:
                    self._add(self.local, "append", appends)
                else:
                    columns = recorder.columns()
                    self._count(self.local, columns)
            if self.writer is not None:
                if self.json:
                    data = self._json_lines(columns or recorder.columns())
                else:
                    data = recorder.text(self.instance)
                self.writer.write(data, size)
        finally:
            recorder.clear()

    def _add(self, local: metrics.Metrics, operation: str, counted: Tallied) -> None:
        """Requests of ``operation``, counted (``summarize``), into its tally."""
        by_status, received, sent, buckets, total_ns = counted
        tally = self.tallies.get(operation)
        if tally is None:
            tally = self.tallies[operation] = metrics.Tally(local, operation)
        counts = tally.by_status
        for status, count in by_status.items():
            counts[status] = counts.get(status, 0) + count
        tally.received += received
        tally.sent += sent
        latency = tally.latency
        latency.counts[:] = map(sum, zip(latency.counts, buckets, strict=True))
        latency.total += total_ns / 1e9

    def _count(self, local: metrics.Metrics, columns: Columns) -> None:
        """A mixed batch: each operation's requests counted apart."""
        starts, ends, statuses, sents, declared, methods, paths, queries, _, lives = columns
        prefix = self.prefix
        size = len(methods)
        received = list(map(int, map(declared_digits, declared)))
        elapsed = list(map(sub, ends, starts))  # nanoseconds
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
        counted: list[Sequence[int]] = [statuses, sents, received, elapsed]
        kinds = set(operations)
        for operation in kinds:
            of = counted
            if len(kinds) > 1:
                mask = list(map(operation.__eq__, operations))
                of = [list(compress(column, mask)) for column in counted]
            self._add(local, operation, summarize(self._bounds_ns, *of))

    def _json_lines(self, columns: Columns) -> bytes:
        starts, ends, statuses, sents, declared, methods, paths, queries, ids, _ = columns
        instance = self.instance
        lines = [
            orjson.dumps(
                {
                    "time": stamp,
                    "instance": instance,
                    "request_id": request_id,
                    "method": method,
                    "path": bounded(path, TARGET_MAX_BYTES // 2),
                    "query": bounded(redact_query(query), TARGET_MAX_BYTES // 2)
                    if query
                    else query,
                    "status": status or CLIENT_CLOSED,
                    "received_bytes": int(declared_digits(received)),
                    "sent_bytes": sent,
                    "duration_us": (end - start) // 1000,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
            for stamp, request_id, method, path, query, status, received, sent, start, end in zip(
                self._clock.stamps(ends),
                ids,
                logged_methods(methods),
                paths,
                queries,
                statuses,
                declared,
                sents,
                starts,
                ends,
                strict=True,
            )
        ]
        return b"".join(lines)
