"""What a finished request leaves behind until the next drain: the recorder.

The request path (``Gateway.handle``) makes two calls per request. As it
starts, ``begin(req, res)`` notes on the response the clock, the query as it
came, and (with ids on: the request log's) its request id. As it ends,
``add(req, res)`` records it: the request's method, path and declared
Content-Length, what begin noted, the response's status and bytes sent, and
the clock (its end). The C recorder reads and writes those fields in the
objects' slots where ``layout`` found them, without an attribute lookup.
Telemetry (gateway/web/telemetry.py) drains the batch: it reads the batch
back and empties it (``clear``):

- ``columns()``: the batch as ten tuples (starts, ends, statuses, bytes
  sent, Content-Length as declared, methods, paths, queries, request ids,
  live operations), for the metrics of a mixed batch and for JSON lines;
- ``tally(prefix, bounds)``: a batch of appends only (every request a POST
  under ``prefix``) counted in one pass, or None for any other batch;
- ``text(instance)``: the batch's text log lines, as bytes.

Two implementations behave alike: ``PyRecorder`` below, the reference, and
``gateway/web/_recorder.c``, the same in C, built with the package when a C
compiler is at hand. ``Recorder`` is the C one when it was built: it keeps
short strings as copies, so that a request's objects are freed with it, and
formats lines without a Python object per field (the costs, measured: see
deploy/README.md). tests/unit/test_recorder.py holds the two to the same
output.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import floordiv, sub
from typing import Any
from urllib.parse import unquote_plus

import orjson

from .request import REQUEST_ID_HEADER, Request, Response

# Query parameters whose values are credentials (gateway/web/auth/: bearer
# tokens for EventSource, pre-signed URLs' signatures).
SECRET_PARAMS = frozenset({"token", "access_token", "signature", "sig"})
REDACTED = "REDACTED"
# A client that never got a response (it went away first), as nginx logs it.
CLIENT_CLOSED = 499

# The JSON-quoted log targets of busy paths (their appends repeat them),
# bounded: targets of at most QUOTED_LENGTH_MAX characters, emptied when full.
QUOTED: dict[str, str] = {}
QUOTED_MAX = 4096
QUOTED_LENGTH_MAX = 256

# A logged path (with its query) takes at most this many bytes, JSON-quoted
# as UTF-8; a longer one is cut, and says how long it was. With the line's
# other fields (a request id of at most 128 characters, a method of at most
# METHOD_LOG_MAX, the instance, numbers)
# every line then stays within PIPE_BUF (4,096 bytes): the length whose
# writes a pipe shared by several workers keeps whole (gateway/web/log_writer.py).
TARGET_MAX_BYTES = 2048
# A method is logged with at most this many characters, then "...": servers
# other than the native one pass any token through (a 405 for the gateway).
METHOD_LOG_MAX = 32
# A client's X-Request-Id is kept (and logged, and returned) when it is a
# plain token: at most 128 letters, digits and ._:/+=@- (else a new id).
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# A declared Content-Length of more digits is logged and counted as 0.
DECLARED_DIGITS_MAX = 19

# A batch's columns: starts, ends, statuses, bytes sent, declared lengths,
# methods, paths, queries, request ids, live operations.
Columns = tuple[
    Sequence[int],
    Sequence[int],
    Sequence[int],
    Sequence[int],
    Sequence[str | None],
    Sequence[str],
    Sequence[str],
    Sequence[str],
    Sequence[str | None],
    Sequence[str | None],
]
# tally(): counts by status, bytes received and sent, latency bucket counts,
# the durations' sum in nanoseconds.
Tallied = tuple[dict[int, int], int, int, list[int], int]


def redact_query(query: str) -> str:
    """``query`` with the values of credential parameters replaced. A name is
    compared as the gateway reads it (percent-decoded, ``+`` a space): a
    client's ``%74oken=`` is a ``token`` to its authentication too."""
    if "=" not in query:
        return query
    parts = query.split("&")
    for index, part in enumerate(parts):
        name, equals, _ = part.partition("=")
        if not equals:
            continue
        read = unquote_plus(name) if "%" in name or "+" in name else name
        if read.lower() in SECRET_PARAMS:
            parts[index] = f"{name}={REDACTED}"
    return "&".join(parts)


def bounded(value: str, limit: int) -> str:
    """``value`` if it takes at most ``limit`` bytes JSON-quoted, else as much
    of its start as fits with ``...(N characters)`` after it."""
    if len(value) * 6 + 2 <= limit:  # (no character quotes to more than 6 bytes)
        return value
    size = len(orjson.dumps(value))
    if size <= limit:
        return value
    marker = f"...({len(value)} characters)"
    room = limit - len(marker) - 2
    # The longest start that fits: a start's quoted size grows with it.
    low, high = 0, min(len(value), room)
    while low < high:
        middle = (low + high + 1) // 2
        if len(orjson.dumps(value[:middle])) - 2 <= room:
            low = middle
        else:
            high = middle - 1
    return value[:low] + marker


def quoted_target(path: str, query: str) -> str:
    """The log's ``path=`` value: path and redacted query as a JSON string,
    so that no client can break the line or forge a field; at most
    ``TARGET_MAX_BYTES``."""
    target = path + "?" + redact_query(query) if query else path
    quoted = QUOTED.get(target)
    if quoted is None:
        quoted = orjson.dumps(bounded(target, TARGET_MAX_BYTES)).decode()
        if len(target) <= QUOTED_LENGTH_MAX:
            if len(QUOTED) >= QUOTED_MAX:
                QUOTED.clear()
            QUOTED[target] = quoted
    return quoted


def logged_methods(methods: Sequence[str]) -> Sequence[str]:
    """A batch's methods as logged: each of at most ``METHOD_LOG_MAX``
    characters (the usual batch: as it is)."""
    if methods and max(map(len, methods)) > METHOD_LOG_MAX:
        return [m if len(m) <= METHOD_LOG_MAX else m[:METHOD_LOG_MAX] + "..." for m in methods]
    return methods


def declared_digits(value: str | None) -> str:
    """Content-Length as logged and counted: as sent when it is ASCII digits,
    at most ``DECLARED_DIGITS_MAX`` of them, else 0 (no body is that long: a
    client's made-up length must neither overflow the metrics nor swell the line)."""
    if value is not None and len(value) <= DECLARED_DIGITS_MAX and value.isascii():
        return value if value.isdigit() else "0"
    return "0"


def summarize(
    bounds: tuple[int, ...],
    statuses: Sequence[int],
    sents: Sequence[int],
    received: Sequence[int],
    elapsed: Sequence[int],
) -> Tallied:
    """Requests counted: by status (0, a client gone, as CLIENT_CLOSED), bytes
    received and sent, latency bucket counts (the first bound >= the duration,
    the last bucket past them all) and the durations' sum in nanoseconds."""
    by_status = Counter(statuses)
    if 0 in by_status:
        by_status[CLIENT_CLOSED] = by_status.get(CLIENT_CLOSED, 0) + by_status.pop(0)
    buckets = [0] * (len(bounds) + 1)
    for bucket, count in Counter(map(bisect_left, repeat(bounds), elapsed)).items():
        buckets[bucket] = count
    return dict(by_status), sum(received), sum(sents), buckets, sum(elapsed)


class Clock:
    """Wall-clock timestamps for log lines from ``perf_counter_ns`` readings: the
    seconds part formatted once a second, the milliseconds from a table."""

    __slots__ = ("offset_ns", "second", "text")

    _MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))

    def __init__(self, offset_ns: int | None = None) -> None:
        if offset_ns is None:
            offset_ns = time.time_ns() - time.perf_counter_ns()
        self.offset_ns = offset_ns
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

    def stamps(self, ends: Sequence[int]) -> list[str]:
        """The log time of each end (in the order they ended): formatted once
        per millisecond, and found by bisection, a step per millisecond."""
        stamp = self.stamp
        stamps: list[str] = []
        size = len(ends)
        at = 0
        while at < size:
            millis = ends[at] // 1_000_000
            until = bisect_left(ends, (millis + 1) * 1_000_000, at)
            stamps += repeat(stamp(millis), until - at)
            at = until
        return stamps


# A recorded request: start, end, status, sent, declared, method, path, query,
# request id, live operation.
_Record = tuple[int, int, int, int, str | None, str, str, str, str | None, str | None]
_EMPTY: Columns = ((), (), (), (), (), (), (), (), (), ())


class PyRecorder:
    """The recorder in Python: the batch as a list of tuples, read column by
    column, most of the work in C builtins (``map``, ``Counter``, ``zip``)."""

    __slots__ = (
        "_clock",
        "_done",
        "_full",
        "_id_prefix",
        "_ids",
        "_ids_made",
        "_quoted",
        "_target_of",
    )

    def __init__(
        self,
        full: int,
        id_prefix: str,
        quoted: dict[str, str],
        target_of: Callable[[str, str], str],
        offset_ns: int,
        ids: bool = True,
    ) -> None:
        # A path's quoted log target: from the cache ``quoted`` when there,
        # else from ``target_of`` (quoted_target, which fills that cache).
        self._quoted = quoted
        self._target_of = target_of
        self._full = full
        self._id_prefix = id_prefix
        self._ids = ids  # begin() gives responses their request id
        self._ids_made = 0
        self._clock = Clock(offset_ns)
        self._done: list[_Record] = []

    def new_id(self) -> str:
        self._ids_made += 1
        return self._id_prefix + str(self._ids_made)

    def request_id(self, sent: str | None) -> str:
        """The client's X-Request-Id when it is a plain token, else a new id."""
        if sent is not None and VALID_REQUEST_ID.fullmatch(sent) is not None:
            return sent
        return self.new_id()

    def begin(self, req: Request, res: Response) -> bool:
        """A request starts: note on its response what ``add`` records (the
        clock, the query as it came: an SSE request releases its own; no live
        operation yet) and, with ids on, its request id: ``request_id`` of the
        request's X-Request-Id (its first value, read without refusing a
        repeat: the log must not fail), and that id's HTTP/1.1 header line.
        True for a GET asking for ``live=`` (Telemetry.live_reader's to count)."""
        if self._ids:
            request_id = self.request_id(req._headers.get(REQUEST_ID_HEADER))
            res.request_id = request_id
            res.id_line = f"{REQUEST_ID_HEADER}: {request_id}\r\n".encode()
        res.start = now()
        query = res.query = req.query_string
        res.live = None
        return req.method == "GET" and "live=" in query

    def add(self, req: Request, res: Response) -> bool:
        """Record a request ``begin`` saw start, ending now. True when it
        begins the batch (to drain later) or fills it (to drain now)."""
        path = req._path
        if path is None:
            path = req.loggable_path()
        done = self._done
        done.append(
            (
                res.start,
                now(),
                res.status,
                res.sent,
                req._headers.get("content-length"),
                req.method,
                path,
                res.query,
                res.request_id,
                res.live,
            )
        )
        return len(done) == 1 or len(done) >= self._full

    def put(self, *request: Any) -> None:
        """put(start, end, status, sent, declared, method, path, query,
        request_id, live): a request whose end is given (tests, replays)."""
        self._done.append(request)

    def __len__(self) -> int:
        return len(self._done)

    def clear(self) -> None:
        self._done = []

    def columns(self) -> Columns:
        if not self._done:
            return _EMPTY
        return tuple(zip(*self._done, strict=True))  # type: ignore[return-value]

    def tally(self, prefix: str, bounds: tuple[int, ...]) -> Tallied | None:
        starts, ends, statuses, sents, declared, methods, paths, _, _, lives = self.columns()
        size = len(methods)
        if not (
            methods.count("POST") == size
            and lives.count(None) == size
            and all(map(str.startswith, paths, repeat(prefix)))
        ):
            return None
        received = list(map(int, map(declared_digits, declared)))
        return summarize(bounds, statuses, sents, received, list(map(sub, ends, starts)))

    def text(self, instance: str) -> bytes:
        starts, ends, statuses, sents, declared, methods, paths, queries, ids, _ = self.columns()
        quoted: list[str | None]
        if any(queries):
            quoted = list(map(self._target_of, paths, queries))
        else:
            quoted = list(map(self._quoted.get, paths))
            if None in quoted:
                quoted = [
                    q if q is not None else self._target_of(p, "")
                    for q, p in zip(quoted, paths, strict=True)
                ]
        if 0 in statuses:
            statuses = tuple([status or CLIENT_CLOSED for status in statuses])
        lines = [
            f"{stamp} instance={instance} request_id={request_id} method={method} path={target} "
            f"status={status} received_bytes={received} sent_bytes={sent} duration_us={micros}\n"
            for stamp, request_id, method, target, status, received, sent, micros in zip(
                self._clock.stamps(ends),
                ids,
                logged_methods(methods),
                quoted,
                statuses,
                map(declared_digits, declared),
                sents,
                map(floordiv, map(sub, ends, starts), repeat(1000)),
                strict=True,
            )
        ]
        return "".join(lines).encode("utf-8", "backslashreplace")


RecorderType = type[PyRecorder]
CRecorder: RecorderType | None
now: Callable[[], int]  # the clock of a request's start and end
try:
    from . import _recorder  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the Python recorder serves
    CRecorder = None
    now = time.perf_counter_ns
else:
    CRecorder = _recorder.Recorder
    now = _recorder.now
    _recorder.layout(Request, Response)

# The recorder Telemetry uses.
Recorder: RecorderType = CRecorder if CRecorder is not None else PyRecorder
