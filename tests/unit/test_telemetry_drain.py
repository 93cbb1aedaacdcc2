"""Telemetry.drain against a plain per-request reading of the same batch.

drain works column by column, or has the recorder count and format a batch
whole (see gateway/web/telemetry.py and recorder.py); these tests feed it
mixed batches, every operation, status and query shape together, and compare
its tallies and log lines with what each request, taken alone, must add. Each
runs with both recorders: the Python one and the C one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import random
import re
import select
from bisect import bisect_left
from collections.abc import Iterator

import pytest

from gateway import metrics
from gateway.config import Settings
from gateway.web import recorder as recorders
from gateway.web import telemetry as tm

PREFIX = "/v1/stream/"
REQUESTS = [
    # method, path, query, live
    ("POST", PREFIX + "a", "", None),
    ("POST", PREFIX + "b/c", "", None),
    ("GET", PREFIX + "a", "offset=-1", None),
    ("GET", PREFIX + "a", "offset=-1&live=long-poll&token=secret", "long_poll"),
    ("GET", PREFIX + "a", "offset=now&live=sse", "sse"),
    ("PUT", PREFIX + 'q"uote\n', "", None),
    ("HEAD", PREFIX + "a", "", None),
    ("DELETE", PREFIX + "a", "", None),
    ("GET", "/healthz", "", None),
    ("GET", "/metrics", "", None),
    ("GET", "/elsewhere", "sig=abc&x=1", None),
]


@pytest.fixture
def log_file(tmp_path: object) -> Iterator[tuple[int, str]]:
    path = os.path.join(str(tmp_path), "access.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        yield fd, path
    finally:
        os.close(fd)


@pytest.fixture(params=["python", "c"])
def recorder(request: pytest.FixtureRequest) -> recorders.RecorderType:
    if request.param == "python":
        return recorders.PyRecorder
    assert recorders.CRecorder is not None, "the C recorder was not built (setup.py)"
    return recorders.CRecorder  # type: ignore[return-value]


def make(log_format: str, fd: int, recorder: recorders.RecorderType) -> tm.Telemetry:
    settings = dataclasses.replace(
        Settings(), access_log=True, metrics_port=9999, log_format=log_format, instance_id="i-1"
    )
    return tm.Telemetry(settings, fd=fd, recorder=recorder)


def record(tel: tm.Telemetry, done: list[Finished]) -> None:
    for request in done:
        tel.recorder.put(*request)


# A finished request as the recorder's put takes it: start, end, status, bytes
# sent, declared length, method, path, query, request id, live operation.
Finished = tuple[int, int, int, int, str | None, str, str, str, str | None, str | None]

APPENDS = [request for request in REQUESTS if request[0] == "POST"]
ON_STREAMS = [request for request in REQUESTS if request[1].startswith(PREFIX)]


def batch(
    seed: int, size: int, kinds: list[tuple[str, str, str, str | None]] = REQUESTS
) -> list[Finished]:
    rng = random.Random(seed)
    done: list[Finished] = []
    end = rng.randrange(10**12, 2 * 10**12)  # perf_counter_ns
    for number in range(size):
        method, path, query, live = rng.choice(kinds)
        # Requests end in order (finish appends them as they end), often
        # within the same millisecond.
        end += rng.choice([0, 0, 1, 999, 50_000, 400_000, 1_000_000, 2_500_000])
        # Nanoseconds; some exactly on a latency bucket's bound.
        elapsed = rng.choice(
            [
                *(0, 1_000, 700_000, 4_000_000, 5_000_000, 30_000_000, 200_000_000),
                *(1_500_000_000, 7 * 10**9, 40 * 10**9, 100 * 10**9),
                round(rng.choice(metrics.LATENCY_BUCKETS) * 1e9),
            ]
        )
        start = end - elapsed
        status = rng.choice([0, 200, 204, 400, 404, 409, 410, 429, 500])
        declared = rng.choice([None, "0", "17", "100", "x"])
        sent = rng.choice([0, 1, 5000])
        done.append(
            (
                start,
                end,
                status,
                sent,
                declared,
                method,
                path,
                query,
                f"id-{number}",
                live,
            )
        )
    return done


def expected_operation(method: str, path: str, query: str, live: str | None) -> str:
    if live is not None:
        return live
    if path.startswith(PREFIX):
        if method == "GET":
            return "read"
        return {"POST": "append", "PUT": "create", "HEAD": "head", "DELETE": "delete"}[method]
    return {"/healthz": "health", "/metrics": "metrics"}.get(path, "other")


@pytest.mark.parametrize(
    ("seed", "kinds"),
    [*((seed, REQUESTS) for seed in range(6)), (6, APPENDS), (7, APPENDS), (8, ON_STREAMS)],
    ids=[*(f"mixed-{seed}" for seed in range(6)), "appends-6", "appends-7", "streams-8"],
)
def test_tallies_match_each_request_counted_alone(
    seed: int,
    kinds: list[tuple[str, str, str, str | None]],
    log_file: tuple[int, str],
    recorder: recorders.RecorderType,
) -> None:
    local = metrics.enable()
    tel = make("text", log_file[0], recorder)
    done = batch(seed, 700, kinds)  # appends only: drain's shortcut for the busy case
    for *_, live in done:
        if live is not None:
            local.readers[live] += 1
    readers_before = {mode: local.readers[mode] for mode in ("long_poll", "sse")}
    live_counts = {"long_poll": 0, "sse": 0}
    record(tel, done)
    tel.drain()

    want: dict[str, dict[str, object]] = {}
    for start, end, status, sent, declared, method, path, query, _, live in done:
        operation = expected_operation(method, path, query, live)
        if live is not None:
            live_counts[live] += 1
        one = want.setdefault(
            operation, {"by_status": {}, "received": 0, "sent": 0, "counts": {}, "total": 0.0}
        )
        by_status = one["by_status"]
        assert isinstance(by_status, dict)
        key = status or 499
        by_status[key] = by_status.get(key, 0) + 1
        one["received"] = int(one["received"]) + (
            int(declared) if declared and declared.isdigit() else 0
        )  # type: ignore[call-overload]
        one["sent"] = int(one["sent"]) + sent  # type: ignore[call-overload]
        counts = one["counts"]
        assert isinstance(counts, dict)
        bucket = bisect_left((*metrics.LATENCY_BUCKETS, float("inf")), (end - start) / 1e9)
        counts[bucket] = counts.get(bucket, 0) + 1
        one["total"] = float(one["total"]) + (end - start) / 1e9  # type: ignore[arg-type]

    assert set(tel.tallies) == set(want)
    for operation, one in want.items():
        tally = tel.tallies[operation]
        assert tally.by_status == one["by_status"], operation
        assert tally.received == one["received"], operation
        assert tally.sent == one["sent"], operation
        counts = one["counts"]
        assert isinstance(counts, dict)
        assert tally.latency.counts == [counts.get(i, 0) for i in range(len(tally.latency.counts))]
        assert tally.latency.total == pytest.approx(one["total"])
    for mode in ("long_poll", "sse"):
        assert local.readers[mode] == readers_before[mode] - live_counts[mode]
    assert len(tel.recorder) == 0
    tel.close()


TEXT_LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) instance=i-1 request_id=(?P<id>\S+) "
    r"method=(?P<method>[A-Z]+) path=(?P<path>\"(?:[^\"\\]|\\.)*\") status=(?P<status>\d+) "
    r"received_bytes=(?P<received>\d+) sent_bytes=(?P<sent>\d+) duration_us=(?P<us>\d+)"
)


def wall_time(tel: tm.Telemetry, end: int) -> str:
    """What the log must say of the time a request ended, derived on its own."""
    millis = end // 10**6 + tel._clock.offset_ns // 10**6  # the clock's millisecond
    when = datetime.datetime.fromtimestamp(millis // 1000, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis % 1000:03d}Z"


def redacted(query: str) -> str:
    parts = []
    for part in query.split("&"):
        name = part.partition("=")[0]
        parts.append(f"{name}=REDACTED" if name.lower() in recorders.SECRET_PARAMS else part)
    return "&".join(parts)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_one_line_per_request_in_order_with_its_own_fields(
    log_format: str, log_file: tuple[int, str], recorder: recorders.RecorderType
) -> None:
    fd, path = log_file
    tel = make(log_format, fd, recorder)
    done = batch(11, 600)
    record(tel, done)
    tel.close()  # drains, and waits for the log's writer thread
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == len(done)
    for line, (start, end, status, sent, declared, method, target, query, rid, _) in zip(
        lines, done, strict=True
    ):
        if log_format == "text":
            match = TEXT_LINE.fullmatch(line)
            assert match, line
            fields: dict[str, object] = dict(match.groupdict())
            logged_target = json.loads(str(fields["path"]))
            want_target = target + "?" + redacted(query) if query else target
            assert logged_target == want_target
        else:
            fields = json.loads(line)
            assert fields["instance"] == "i-1"
            assert fields["path"] == target
            assert fields["query"] == (redacted(query) if query else "")
            fields["id"] = fields["request_id"]
            fields["received"] = fields["received_bytes"]
            fields["sent"] = fields["sent_bytes"]
            fields["us"] = fields["duration_us"]
        assert "secret" not in line and "abc" not in line
        assert fields["id"] == rid
        assert fields["method"] == method
        assert int(str(fields["status"])) == (status or 499)
        assert int(str(fields["received"])) == (
            int(declared) if declared and declared.isdigit() else 0
        )
        assert int(str(fields["sent"])) == sent
        assert int(str(fields["us"])) == (end - start) // 1000
        assert fields["time"] == wall_time(tel, end)


def test_json_lines_fit_in_what_a_pipe_keeps_whole(
    log_file: tuple[int, str], recorder: recorders.RecorderType
) -> None:
    fd, path = log_file
    tel = make("json", fd, recorder)
    long_path = PREFIX + "é\x01" * 6000
    long_query = "sig=abc&" + "x=\x02&" * 3000
    method = "M" * 5000  # any token, through granian or hypercorn (a 405)
    tel.recorder.put(1, 10**15, 405, 0, "9" * 19, method, long_path, long_query, "x" * 128, None)
    tel.close()
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    assert len(lines) == 1
    assert len(lines[0]) <= select.PIPE_BUF
    fields = json.loads(lines[0])
    assert fields["path"].endswith(f"...({len(long_path)} characters)")
    assert long_path.startswith(fields["path"].rpartition("...")[0])
    assert fields["query"].startswith("sig=REDACTED&x=\x02&")
    assert "abc" not in fields["query"]
    assert fields["method"] == "M" * recorders.METHOD_LOG_MAX + "..."


def test_a_made_up_content_length_is_counted_and_logged_as_zero(
    log_file: tuple[int, str], recorder: recorders.RecorderType
) -> None:
    """A client can declare a length of hundreds of digits (HTTP/2 lets it
    through to a 413): it used to reach prometheus_client, whose float could
    not hold it, so that every flush after it failed."""
    metrics.enable()
    fd, path = log_file
    tel = make("text", fd, recorder)
    longest = "9" * recorders.DECLARED_DIGITS_MAX
    for declared in ("400" * 133, "1" * (recorders.DECLARED_DIGITS_MAX + 1), longest):
        tel.recorder.put(1, 2, 413, 32, declared, "POST", PREFIX + "a", "", "r", None)
    tel.drain()
    assert tel.tallies["append"].received == int(longest)
    tel.flush()  # into prometheus_client: no OverflowError
    tel.close()
    with open(path, encoding="utf-8") as f:
        received = [line.split("received_bytes=")[1].split()[0] for line in f]
    assert received == ["0", "0", longest]
