"""The C recorder against the Python one: the same requests in, the same log
lines, columns and tallies out (gateway/web/recorder.py, _recorder.c).

The batches mix what the request path can hand over: repeated and unique
paths (quoted from the cache, or not yet), queries with credentials,
client ids too long to copy, missing and odd Content-Length values, lengths
past what 64 bits hold, a client that went away (status 0), non-ASCII text,
and an instance name holding an undecodable byte (os.environ keeps it as a
lone surrogate).
"""

from __future__ import annotations

import random
import select
import sys
import time
from typing import Any
from urllib.parse import parse_qs

import orjson
import pytest

from gateway import metrics
from gateway.protocol.errors import BadRequest
from gateway.web import recorder as recorders
from gateway.web.request import Request, Response

PREFIX = "/v1/stream/"
BOUNDS = tuple(round(bound * 1e9) for bound in metrics.LATENCY_BUCKETS)
OFFSET_NS = 1_765_000_000 * 10**9 + 123_456_789  # wall clock minus the monotonic one

Finished = tuple[int, int, int, int, str | None, str, str, str, str | None, str | None]


def c_recorder_class() -> recorders.RecorderType:
    assert recorders.CRecorder is not None, "the C recorder was not built (setup.py)"
    return recorders.CRecorder  # type: ignore[return-value]


def make(kind: recorders.RecorderType, full: int = 512) -> recorders.PyRecorder:
    return kind(full, "0123456789ab-", recorders.QUOTED, recorders.quoted_target, OFFSET_NS)


def both() -> tuple[recorders.PyRecorder, recorders.PyRecorder]:
    return make(recorders.PyRecorder), make(c_recorder_class())


def exchange(
    method: str,
    path: str | None,
    status: int,
    headers: dict[str, str],
    sent: int = 0,
    query: str = "",
) -> tuple[Request, Response]:
    """A request as a server hands it over, and its response once sent."""
    req = Request()
    req.method = method
    req._path = path
    req._headers = headers
    req.query_string = query
    res = Response()
    res.status = status
    res.sent = sent
    return req, res


def requests(seed: int, size: int, *, appends_only: bool = False) -> list[Finished]:
    rng = random.Random(seed)
    end = rng.randrange(10**12, 2 * 10**12)
    paths = [PREFIX + "a", PREFIX + "b/c", PREFIX + 'q"uote\n\t\\', PREFIX + "é/ü/😀"]
    done: list[Finished] = []
    for number in range(size):
        end += rng.choice([0, 1, 999_999, 1_000_000, 400_000_000, 1_000_000_000])
        elapsed = rng.choice([0, 1, 999, 1_000, 500_000, 500_001, *BOUNDS, 10**11])
        method = "POST" if appends_only else rng.choice(["POST", "GET", "PUT", "HEAD", "DELETE"])
        if appends_only or rng.random() < 0.7:
            path = rng.choice(paths)
        else:
            path = rng.choice(["/healthz", "/metrics", f"/x/{rng.random()}", PREFIX + str(number)])
        query = "" if appends_only else rng.choice(["", "", "offset=-1", "token=s3cret&x=1"])
        live = None if appends_only else rng.choice([None, None, "sse", "long_poll"])
        declared = rng.choice(
            # ("\uff11\uff12": digits, but not ASCII ones)
            [None, "", "0", "007", "100", "x", "\uff11\uff12", "9" * 15]
            + ([] if appends_only else ["9" * 18, "9" * 19, "1" * 40])
        )
        request_id = rng.choice(
            [None, f"0123456789ab-{number}", "c" * 48, "d" * 49, "x" * 128, "é-1"]
        )
        status = rng.choice([0, 200, 201, 204, 400, 404, 409, 410, 413, 429, 500, 503])
        sent = rng.choice([0, 5, 2**40])
        done.append(
            (end - elapsed, end, status, sent, declared, method, path, query, request_id, live)
        )
    return done


def fill(recorder: recorders.PyRecorder, done: list[Finished]) -> None:
    for request in done:
        recorder.put(*request)


def test_the_c_recorder_is_built_and_used() -> None:
    assert recorders.Recorder is c_recorder_class()
    assert recorders.now is not time.perf_counter_ns


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("instance", ["i-1", "pod-é", "bad-\udcff"])
def test_same_lines_and_columns(seed: int, instance: str) -> None:
    python, c = both()
    done = requests(seed, 700)
    fill(python, done)
    fill(c, done)
    assert len(c) == len(python) == 700
    assert c.columns() == python.columns() == tuple(zip(*done, strict=True))
    text = c.text(instance)
    assert text == python.text(instance)
    lines = text.decode("utf-8").splitlines()
    assert len(lines) == 700
    assert all("s3cret" not in line for line in lines)
    # A second call (a drain that failed half way and runs again) gives the same.
    assert c.text(instance) == text


@pytest.mark.parametrize("seed", range(6))
def test_same_tallies(seed: int) -> None:
    python, c = both()
    done = requests(seed, 600, appends_only=True)
    fill(python, done)
    fill(c, done)
    tallied = c.tally(PREFIX, BOUNDS)
    assert tallied is not None
    assert tallied == python.tally(PREFIX, BOUNDS)
    by_status, received, sent, buckets, total = tallied
    assert sum(by_status.values()) == sum(buckets) == 600
    assert 0 not in by_status
    assert received == sum(
        int(d) for *_, d, _, _, _, _, _ in done if d and d.isascii() and d.isdigit()
    )
    assert received > 0
    assert sent == sum(sent for _, _, _, sent, *_ in done)
    assert total == sum(end - start for start, end, *_ in done)


def test_only_appends_are_tallied_in_one_pass() -> None:
    for kind in (recorders.PyRecorder, c_recorder_class()):
        for request in (
            ("GET", PREFIX + "a", "", None),
            ("POST", "/elsewhere", "", None),
            ("POST", PREFIX + "a", "", "sse"),
        ):
            recorder = make(kind)
            fill(recorder, requests(1, 10, appends_only=True))
            method, path, query, live = request
            recorder.put(1, 2, 204, 0, "5", method, path, query, "id", live)
            assert recorder.tally(PREFIX, BOUNDS) is None, (kind, request)
    # Lengths past 64 bits, or sums of them: the C recorder leaves them to Python.
    for lengths in (["9" * 19], ["9" * 18] * 10):
        c = make(c_recorder_class())
        for length in lengths:
            c.put(1, 2, 204, 0, length, "POST", PREFIX + "a", "", "id", None)
        assert c.tally(PREFIX, BOUNDS) is None


def test_add_reads_the_clock_and_says_when_the_batch_begins_or_is_full() -> None:
    for kind in (recorders.PyRecorder, c_recorder_class()):
        recorder = make(kind, full=3)
        before = time.perf_counter_ns()
        answers = []
        for _ in range(4):
            req, res = exchange("POST", PREFIX + "a", 204, {"content-length": "3"})
            assert recorder.begin(req, res) is False
            answers.append(recorder.add(req, res))
        after = time.perf_counter_ns()
        assert answers == [True, False, True, True]
        starts, ends = recorder.columns()[:2]
        assert all(
            before <= start <= end <= after for start, end in zip(starts, ends, strict=True)
        ), kind
        assert list(ends) == sorted(ends) and list(starts) == sorted(starts)


def test_new_ids_are_the_prefix_and_a_counter() -> None:
    for kind in (recorders.PyRecorder, c_recorder_class()):
        recorder = make(kind)
        ids = [recorder.new_id() for _ in range(1000)]
        assert ids[:3] == ["0123456789ab-1", "0123456789ab-2", "0123456789ab-3"]
        assert len(set(ids)) == 1000


class UndecodablePath(Request):
    """A request whose path is not UTF-8 (it got a 400, and is logged anyway)."""

    __slots__ = ()

    def _decode_path(self) -> str:
        raise BadRequest("not UTF-8")


class HeaderMap:
    """Headers as RSGI hands them over: a map of its own, with get()."""

    def __init__(self, headers: dict[str, str]) -> None:
        self._headers = headers

    def get(self, name: str) -> str | None:
        return self._headers.get(name)


def test_begin_and_add_read_the_request_and_note_on_its_response_alike() -> None:
    """Both recorders read and note the same fields: the C one in the slots."""
    batches = []
    for kind in (recorders.PyRecorder, c_recorder_class()):
        recorder = make(kind)
        cases: list[tuple[Request, Response]] = [
            exchange("POST", PREFIX + "a", 204, {"content-length": "100"}, 0, "offset=-1"),
            exchange("GET", PREFIX + "b", 200, {"x-request-id": "trace-1"}, 5, "live=sse"),
            exchange("PUT", PREFIX + "c", 201, {"x-request-id": "bad id"}),
            exchange("HEAD", "/healthz", 0, HeaderMap({"content-length": "7"})),  # type: ignore[arg-type]
            exchange("GET", PREFIX + "d", 200, {}, 0, "offset=now"),
        ]
        undecodable = UndecodablePath()
        undecodable.method, undecodable._headers, undecodable.query_string = "GET", {}, ""
        cases.append((undecodable, Response()))
        live = [recorder.begin(req, res) for req, res in cases]
        assert live == [False, True, False, False, False, False], kind  # a GET asking live=
        ids = [res.request_id for _, res in cases]
        assert ids[1] == "trace-1" and all(i.startswith("0123456789ab-") for i in ids[2:3]), kind
        for res_id, (_, res) in zip(ids, cases, strict=True):
            assert res.id_line == f"x-request-id: {res_id}\r\n".encode(), kind
            assert res.query is not None and res.live is None and isinstance(res.start, int)
        cases[1][0].release()  # (an SSE request releases its query: what it was is logged)
        cases[1][1].live = "sse"
        for req, res in cases:
            recorder.add(req, res)
        columns = recorder.columns()
        batches.append((columns[2:8], columns[9], ids))
        assert columns[6][-1] == "<not UTF-8>" and columns[4] == (
            "100",
            None,
            None,
            "7",
            None,
            None,
        )
        assert columns[7][:2] == ("offset=-1", "live=sse") and columns[9][1] == "sse"
    (py_columns, py_live, py_ids), (c_columns, c_live, c_ids) = batches
    assert py_columns == c_columns and py_live == c_live
    assert py_ids[:2] == c_ids[:2]  # (new ids differ only as two recorders count)


def test_without_ids_begin_gives_no_request_id() -> None:
    for kind in (recorders.PyRecorder, c_recorder_class()):
        recorder = kind(512, "p-", recorders.QUOTED, recorders.quoted_target, OFFSET_NS, ids=False)
        req, res = exchange("POST", PREFIX + "a", 204, {"x-request-id": "trace-1"})
        recorder.begin(req, res)
        recorder.add(req, res)
        assert res.request_id is None and not hasattr(res, "id_line"), kind
        assert recorder.columns()[8] == (None,)
        assert recorder.new_id() == "p-1"  # (none made meanwhile)


def test_a_client_request_id_is_kept_only_when_it_is_a_plain_token() -> None:
    kept = ["a", "trace-42.a:b", "A/z+0=@_-.:", "x" * 128]
    replaced = [None, "", "x" * 129, "two words", 'quote"d', "new\tline", "é", "a\x00b", "a\x7f"]
    # Every ASCII character alone: the C table and the Python pattern must agree.
    singles = [chr(c) for c in range(128)]
    for kind in (recorders.PyRecorder, c_recorder_class()):
        recorder = make(kind)
        for sent in kept:
            assert recorder.request_id(sent) is sent, (kind, sent)
        for sent in replaced:
            assert recorder.request_id(sent).startswith("0123456789ab-"), (kind, sent)
        for sent in singles:
            plain = sent.isascii() and (sent.isalnum() or sent in "._:/+=@-")
            assert (recorder.request_id(sent) == sent) == plain, (kind, sent)


def test_clear_forgets_the_batch_and_releases_its_strings() -> None:
    c = make(c_recorder_class(), full=4)
    # Strings nothing else holds: the recorder must give them back.
    path = "".join([PREFIX, "unique-", str(random.random())])
    query = "".join(["token=", str(random.random())])
    long_id = "".join(["r" * 60, str(random.random())])

    def refs() -> list[int]:
        return [sys.getrefcount(value) for value in (path, query, long_id)]

    held = refs()
    for _ in range(5000):  # past the batch size: grows, then gives the memory back
        c.put(1, 2, 200, 0, None, "GET", path, query, long_id, None)
    c.clear()
    assert len(c) == 0
    assert c.columns() == ((),) * 10
    assert c.text("i") == b""
    assert refs() == held
    for number in range(5000):  # (methods are shared until that table fills)
        c.put(1, 2, 200, 0, None, f"M{number}", f"{PREFIX}{number}", "", None, None)
    c.clear()
    assert refs() == held
    c.put(1, 2, 204, 0, "1", "POST", PREFIX + "a", "", "id", None)
    assert c.columns()[6] == (PREFIX + "a",)


def test_bad_arguments_are_refused_and_record_nothing() -> None:
    c: Any = make(c_recorder_class())
    good = [1, 2, 204, 0, "5", "POST", PREFIX + "a", "", "id", None]
    for index, bad in [(0, "1"), (2, None), (4, 5), (5, None), (6, b"/v1"), (7, None), (8, 1)]:
        args = list(good)
        args[index] = bad
        with pytest.raises(TypeError):
            c.put(*args)
    with pytest.raises(TypeError):
        c.put(*good[:-1])
    with pytest.raises(TypeError):
        c.add(*good)  # add takes the request and its response
    req, res = exchange("POST", PREFIX + "a", 204, {})
    with pytest.raises(TypeError, match="begin"):
        c.add(req, res)  # a response begin() did not see
    for bad in [(object(), res), (req, req), (res, req), (req,)]:
        with pytest.raises(TypeError):
            c.begin(*bad)
    assert not hasattr(res, "start")
    c.begin(req, res)
    for bad in [(object(), res), (req, req), (req, res, None)]:
        with pytest.raises(TypeError):
            c.add(*bad)
    req.query_string = b""  # type: ignore[assignment]
    with pytest.raises(TypeError):
        c.begin(req, res)
    assert len(c) == 0
    with pytest.raises(ValueError):
        c_recorder_class()(512, "é", {}, recorders.quoted_target, 0)


def test_text_survives_a_target_of_that_records_meanwhile() -> None:
    """target_of is Python code: were it to record (growing, and moving, the
    records), the C text must read the records where they are now."""
    done = [
        # (with a query: quoted by target_of, not in C)
        (1, 2_000_000, 200, 0, None, "GET", f"{PREFIX}fresh-{number}", "x=1", "id", None)
        for number in range(3)
    ]

    def target_of(path: str, query: str) -> str:
        for _ in range(2000):
            c.put(1, 2_000_000, 204, 0, "1", "POST", PREFIX + "a", "", "id", None)
        return recorders.quoted_target(path, query)

    c = c_recorder_class()(512, "p-", {}, target_of, OFFSET_NS)
    python = make(recorders.PyRecorder)
    fill(c, done)  # type: ignore[arg-type]
    fill(python, done)
    expected = python.text("i")
    text = c.text("i")
    assert text.startswith(expected)
    # (what it recorded meanwhile is written too, each record once)
    assert text.count(b"\n") == len(c) > 6000


def test_long_paths_are_not_kept_beyond_their_batch() -> None:
    """A client sending thousands of long, distinct paths cannot make the
    recorder's shared strings or the quoted-target cache hold megabytes."""
    c = make(c_recorder_class())
    path = "".join([PREFIX, "p" * 5000, str(random.random())])
    query = ""

    def refs() -> int:
        return sys.getrefcount(path)

    held = refs()
    c.put(1, 2, 404, 0, None, "GET", path, query, "id", None)
    text = c.text("i")
    # (plain ASCII: quoted as it is), cut to the bound
    assert path[:1000].encode() in text
    assert f'...({len(path)} characters)"'.encode() in text
    c.clear()
    assert refs() == held
    assert path not in recorders.QUOTED


def test_the_c_recorder_cuts_targets_at_the_same_bound() -> None:
    from gateway.web import _recorder  # type: ignore[attr-defined]

    assert _recorder.TARGET_MAX_BYTES == recorders.TARGET_MAX_BYTES


@pytest.mark.parametrize(
    "path",
    [
        PREFIX + "a",
        "",
        "/" + "".join(map(chr, range(0x20, 0x7F))),  # every printable character
        *(PREFIX + chr(c) for c in (0x00, 0x1F, 0x7F, 0x80, 0xFF)),
        "/" + "a" * 2045,  # quoted: exactly the bound
        "/" + "a" * 2046,
        "/" + "a" * 2044 + '"',
    ],
    ids=[
        "plain",
        "empty",
        "printable",
        "nul",
        "us",
        "del",
        "c1",
        "latin1",
        "fits",
        "over",
        "quote",
    ],
)
def test_a_plain_path_is_quoted_in_c_as_orjson_quotes_it(path: str) -> None:
    """The C recorder quotes a plain path itself (no cache, no call): the
    line is the Python recorder's, on both sides of every boundary."""
    python, c = both()
    for recorder in (python, c):
        recorder.put(1, 2, 200, 0, None, "GET", path, "", "id", None)
        recorder.put(1, 2, 200, 0, None, "POST", path, "", "id", None)  # (the middle again)
    assert c.text("i") == python.text("i")
    assert orjson.dumps(recorders.bounded(path, recorders.TARGET_MAX_BYTES)) in c.text("i")


@pytest.mark.parametrize(
    "value",
    [
        "/short",
        "a" * 2046,  # quoted: exactly the bound
        "a" * 2047,
        "p" * 5000,
        "é" * 3000,  # two bytes each
        "😀" * 2000,  # four bytes each
        "\x01" * 2000,  # quoted as \u0001: six bytes each
        'q"\\' * 1000,  # two bytes each, quoted
    ],
    ids=["short", "fits", "one-over", "ascii", "two-byte", "four-byte", "control", "escapes"],
)
def test_a_logged_target_is_cut_to_its_bound_and_says_how_long_it_was(value: str) -> None:
    limit = recorders.TARGET_MAX_BYTES
    logged = recorders.bounded(value, limit)
    size = len(orjson.dumps(logged))
    assert size <= limit
    if len(orjson.dumps(value)) <= limit:
        assert logged == value
        return
    marker = f"...({len(value)} characters)"
    assert logged.endswith(marker)
    kept = logged[: -len(marker)]
    assert value.startswith(kept)
    # As much as fits: one more character would not.
    assert len(orjson.dumps(value[: len(kept) + 1] + marker)) > limit


@pytest.mark.parametrize("kind", ["python", "c"])
def test_every_line_fits_in_what_a_pipe_keeps_whole(kind: str) -> None:
    """The longest request a client can make still logs as one line of at
    most PIPE_BUF bytes, so that workers sharing a pipe never interleave."""
    recorder = make(recorders.PyRecorder if kind == "python" else c_recorder_class())
    path = PREFIX + "\x01é" * 6000  # far past any server's URL limit
    query = "token=s3cret&" + "x=\x02&" * 3000
    method = "M" * 5000  # any token, through granian or hypercorn (a 405)
    recorder.put(1, 10**15, 405, 2**40, "9" * 19, method, path, query, "x" * 128, None)
    recorder.put(1, 10**15, 404, 0, None, "GET", path[:300], "", None, None)
    text = recorder.text("pod-" + "i" * 60)
    lines = text.splitlines(keepends=True)
    assert len(lines) == 2
    assert f" method={'M' * recorders.METHOD_LOG_MAX}... ".encode() in lines[0]
    assert all(len(line) <= select.PIPE_BUF for line in lines), [len(line) for line in lines]
    assert b"s3cret" not in text
    target = path + "?" + recorders.redact_query(query)
    assert f"...({len(target)} characters)".encode() in lines[0]
    assert orjson.dumps(path[:300]) in lines[1]  # a shorter one: whole


@pytest.mark.parametrize("seed", range(12))
def test_no_credential_the_gateway_reads_is_logged(seed: int) -> None:
    """Redaction reads a query's names as the gateway's authentication does
    (parse_qs: percent-decoded, "+" a space): ``%74oken=`` is a token too."""
    rng = random.Random(seed)
    names = [*sorted(recorders.SECRET_PARAMS), "offset", "live"]
    rng.shuffle(names)
    parts = []
    for name in names:
        written = "".join(f"%{ord(c):02X}" if rng.random() < 0.4 else c for c in name)
        parts.append(f"{written}=v{rng.randrange(10**9)}x")
    query = "&".join(parts)
    read = parse_qs(query)
    logged = recorders.redact_query(query)
    for name in recorders.SECRET_PARAMS:
        assert read[name][0] not in logged, (query, logged)
    for name in ("offset", "live"):
        assert read[name][0] in logged
